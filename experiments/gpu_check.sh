#!/usr/bin/env bash
# The device checks of a GPU session, in one call: the GPU tests, then `bench` on the GPU(s) with the
# profiler traces kept. Runs the sources with the machine's python3 (no install, no network).
#   OUT=/some/dir experiments/gpu_check.sh        (the device tool: OUT=$OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q tests/test_gpu.py tests/test_fp16.py tests/test_data_transforms.py::test_transforms_run_on_the_gpu_and_match_the_cpu 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
placements=cuda
[ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] && placements="cuda cuda2"
timeout 300 python3 -m splitnet bench --placements $placements --precisions fp32 tf32 bf16 bf16_cl fp16 fp16_cl --out "$OUT/bench.json" --traces "$OUT/traces" \
    2>&1 | grep -v '^USDT' | tee "$OUT/bench.log"
