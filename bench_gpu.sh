#!/usr/bin/env bash
# The GPU checks in one unattended go, on one CUDA GPU, in under 8 minutes: bash bench_gpu.sh
#   1. the main job under torchrun (nccl + gloo, pinned memory, the side-stream copy) for 50 steps, with steps
#      10-19 profiled: every host sync is warned with its stack, then the share of the step the GPU waited
#   2. the same for 5 steps with --deterministic=True (cuBLAS workspace, flash-attn's deterministic backward)
#   3. bench.py: small and base in bf16 on each installed attention path, model TFLOP/s against this GPU's matmul
#      TFLOP/s, peak memory at two token budgets; packing, the loader and the host side as on CPU
# Healthy: no traceback, one sync warning (the loss check before each optimizer step), "waited for the host"
# at most 5 %, base at least 40 % of the matmul's TFLOP/s. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
out=${1:-out/bench_gpu}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'bench_gpu.sh needs a CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())"
python -c "import data; data.ensure_phantom('data/phantom', workers=8)"
echo "== 1. torchrun, 1 GPU, 50 steps, steps 10-19 profiled"
torchrun --standalone --nproc_per_node 1 train.py --max_iters=50 --profile=10 --num_workers=4 --out_dir="$out/run" 2>&1 \
  | tee "$out/train.log"
grep -q "waited for the host" "$out/train.log"
echo "== 2. deterministic"
torchrun --standalone --nproc_per_node 1 train.py --max_iters=5 --deterministic=True --out_dir="$out/det"
echo "== 3. bench.py"
python bench.py --threads=8
echo "bench_gpu.sh: all checks ran"
