# Supervised baseline (paper Table 1, "Supervised"): the same backbone, a linear head on the pooled
# embedding, BCE over the 5 findings with unknown labels masked, on all (2D + 3D) training data.
#   torchrun --standalone --nproc_per_node 2 train.py config/supervised.py
exec(open("config/stage1.py").read())
objective = "supervised"
batch_2d, batch_3d = 192, 64  # paper: 192 2D + 64 3D
max_iters = 20000      # not stated in the paper
out_dir = "out/supervised"
