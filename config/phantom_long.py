# The phantom world, longer: the main job's settings for 5x the steps (about 23-40 minutes on
# 2 CPU cores), keeping a checkpoint every 600 steps so probe.py can show the trend.
#   torchrun --standalone --nproc_per_node 2 train.py config/phantom_long.py
#   python probe.py --ckpt=out/phantom_long/ckpt.pt
out_dir = "out/phantom_long"
max_iters = 3000
warmup_iters = 150
ckpt_interval = 600
ckpt_keep = True
