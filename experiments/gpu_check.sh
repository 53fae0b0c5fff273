#!/usr/bin/env bash
# The device check of a GPU session, in one call (issue 30): every figure the README's GPU rows need.
# Runs the sources with the machine's python3 (PYTHONPATH=src; no install, no network).
#   OUT=/some/dir experiments/gpu_check.sh        (the device tool: OUT=$OUT)
#
# Writes at most 8 files directly under $OUT (no more come back from the device machine):
#   env.json         card, driver, torch, CUDA, cuDNN (written even without a GPU)
#   pytest_gpu.xml   pytest -m gpu, JUnit XML (the GPU tests: placements, fast paths, dropout-equal
#                    CPU-vs-GPU training, streams against sequential with a column delayed)
#   streams.json     streams against sequential, each column's work delayed in turn, fp32 and bf16_cl,
#                    against sequential's own run-to-run noise (bench/gpu_check.py)
#   speed.json       training images/s: split sequential and streams (both columns on cuda:0) against
#                    the grouped network, fp32 and bf16_cl, batch 128 and 256, cudnn.benchmark on
#   input_path.json  training fed from the uint8 cache (device input path) against batches on the GPU
#   train.json       `splitnet train` itself: its run.json and its last train records
#   gpu_check.log    everything the steps printed, with each step's time and exit status
# Expected time on one H200 (16 cores): env 10 s, pytest 60-120 s, streams 20-40 s, speed 60-100 s,
# input path 40-80 s, train 40-80 s: about 6 minutes; every step has its own timeout (sum 9.5 min).
# Without a GPU: writes env.json and gpu_check.log, says so, and exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
: > "$LOG"
status=0

step() {  # step NAME SECONDS COMMAND...: run it under a timeout, its output to the log
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s)" >> "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

step env 60 "$PY" -m splitnet.bench.gpu_check env --out "$OUT/env.json"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >> "$LOG" 2>&1; then
    echo "gpu_check: no CUDA device; env.json written, nothing measured" | tee -a "$LOG"
    exit 2
fi
step pytest 150 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
step streams 60 "$PY" -m splitnet.bench.gpu_check streams --out "$OUT/streams.json"
step speed 120 "$PY" -m splitnet.bench.gpu_check speed --out "$OUT/speed.json"
step input_path 100 "$PY" -c 'import json, sys
from splitnet.bench.data import input_path
json.dump(input_path("cuda:0", batch=256, mode="bf16_cl"), open(sys.argv[1], "w"), indent=1, default=str)' \
    "$OUT/input_path.json"
RUN=$(mktemp -d)/run
step train 90 "$PY" -m splitnet train --config experiments/smoke.toml --out "$RUN" \
    --set 'precision="bf16_cl"' --set batch_size=128 --set max_steps=40 --set data.workers=8
"$PY" -c 'import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
info = json.loads((run / "run.json").read_text())
json.dump({"run": info, "train_last": [r for r in recs if r["kind"] == "train"][-10:],
           "eval": [r for r in recs if r["kind"] == "eval"]}, open(sys.argv[2], "w"), indent=1)' \
    "$RUN" "$OUT/train.json" >> "$LOG" 2>&1 || status=1
echo "gpu_check: done in $SECONDS s, status $status; files: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
exit "$status"
