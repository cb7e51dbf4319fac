# Paper stage 2 (section 2.3): curriculum. Start from the stage-1 weights (fresh optimizer, step 0)
# and continue on the mixed 2D/3D stream (MIMIC-CXR + CT-RATE).
#   torchrun --standalone --nproc_per_node 2 train.py config/stage2.py
# Data: python data.py mimic ... --out data/paper ; python data.py ctrate --root /data/ct-rate --out data/paper
exec(open("config/stage1.py").read())
init_from = "out/stage1/ckpt.pt"
batch_2d, batch_3d = 192, 64  # paper: 192 2D + 64 3D
warmup_iters = 500
max_iters = 25000      # not stated in the paper
out_dir = "out/stage2"
