# Paper stage 3 (section 2.3): native joint training from scratch on the mixed 2D/3D stream.
#   torchrun --standalone --nproc_per_node 2 train.py config/stage3.py
exec(open("config/stage1.py").read())
batch_2d, batch_3d = 192, 64  # paper: 192 2D + 64 3D
out_dir = "out/stage3"
