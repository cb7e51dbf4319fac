# Paper stage 1 (section 2.3): 2D only, MIMIC-CXR, from scratch.
# Hardware assumed: 2 GPUs with >= 40 GB (paper: 2x RTX PRO 6000, bf16):
#   torchrun --standalone --nproc_per_node 2 train.py config/stage1.py
# Data: python data.py mimic --root /data/mimic-cxr-jpg --out data/paper
data_dir = "data/paper"
batch_2d, batch_3d = 256, 0  # paper: 256 2D, no 3D
preset = "small"       # ViT-S/14 (the paper does not name the size; see README)
scale_2d = 1.0         # paper: literal zero-padding (the CPU main job uses sqrt(14); see train.py)
proj_hidden = 2048     # LeJEPA projector: 2 hidden layers of 2048, output 128
lam = 0.025            # paper
learning_rate = 1e-4   # paper
view_intensity = (0.1, 0.2, 0.02)  # not stated in the paper; milder than the phantom main job's (RESULTS.md)
min_lr = 1e-6
warmup_iters = 1000
max_iters = 50000      # not stated in the paper; ~96 epochs of 133,749 images at batch 256
token_budget = 32768   # per GPU micro-batch; raise it if memory allows
num_workers = 8
ckpt_interval = 1000
log_interval = 50
out_dir = "out/stage1"
