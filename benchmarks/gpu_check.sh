#!/usr/bin/env bash
# The GPU checks of stacked runs, prepared as one device run (a session with a GPU machine):
#   - the CUDA tests (tests/test_gpu.py: placement, resumption, bf16, a stack against runs alone);
#   - benchmarks/bench_stack.py on CUDA: a stack of R = 1, 10, 30, 100 Fashion-MNIST members
#     against separate runs, and peak memory;
#   - the 10-seed Table 7 sweep stacked (configs/sweeps/fmnist_table7_gpu.yaml --stack), timed.
# Needs, in ignored folders of the checkout named in `carry`: .whl/ (omegaconf and antlr4
# wheels: the device image lacks them) and .data/fashion-mnist/ (the four IDX .gz files).
# Writes everything under $OUT (default /tmp/gpu_check).
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MOE_DIST_DATA=$PWD/.data
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:randomly tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
timeout 240 python3 benchmarks/bench_stack.py --device cuda --members 1 10 30 100 --steps 20 \
  --json "$OUT/bench_stack.json" 2>&1 | tee "$OUT/bench_stack.log"
start=$(date +%s)
timeout 300 python3 -m moe_dist.cli sweep configs/sweeps/fmnist_table7_gpu.yaml --stack --stack-size 100 \
  --root "$OUT/table7" train.device=cuda 2>&1 | tail -30 | tee "$OUT/table7.log"
echo "table7 stacked sweep: $(( $(date +%s) - start )) s" | tee -a "$OUT/table7.log"
tar czf "$OUT/table7_runs.tgz" --exclude=checkpoints --exclude='*.tfevents*' -C "$OUT" table7 && rm -rf "$OUT/table7"
