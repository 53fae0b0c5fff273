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
# Order: the measurements of the README's GPU rows first, the GPU tests last. Expected time on one
# H200 (16 cores): env 10 s, streams 20-40 s, speed 60-100 s, input path 40-80 s, train 40-80 s,
# pytest 60-120 s: about 6 minutes. Every step has its own timeout, cut to what is left of BUDGET
# seconds (default 450), so the summary still comes within a call of 8.5 minutes (timeout_s 540); a
# step killed by its timeout keeps what it wrote (speed and streams write after each row).
# Without a GPU: writes env.json and gpu_check.log, says so, and exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1  # unbuffered: a step killed by its timeout leaves its output
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
BUDGET=${BUDGET:-450}
: > "$LOG"
status=0

step() {  # step NAME SECONDS COMMAND...: run it under a timeout, its output to the log
    local name=$1 limit=$2 t0=$SECONDS rc left=$((BUDGET - SECONDS))
    shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, ${left} s of the ${BUDGET} s budget left" | tee -a "$LOG"
        status=1
        return
    fi
    echo "== $name (limit ${limit}s)" >> "$LOG"
    timeout -k 15 "$limit" "$@" >> "$LOG" 2>&1  # -k: training catches SIGTERM to finish its step
    rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

step env 60 "$PY" -m splitnet.bench.gpu_check env --out "$OUT/env.json"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >> "$LOG" 2>&1; then
    echo "gpu_check: no CUDA device; env.json written, nothing measured" | tee -a "$LOG"
    exit 2
fi
step streams 60 "$PY" -m splitnet.bench.gpu_check streams --out "$OUT/streams.json"
step speed 120 "$PY" -m splitnet.bench.gpu_check speed --out "$OUT/speed.json"
step input_path 100 "$PY" -c 'import json, sys
from splitnet.bench.data import input_path
json.dump(input_path("cuda:0", batch=256, mode="bf16_cl"), open(sys.argv[1], "w"), indent=1, default=str)' \
    "$OUT/input_path.json"
RUN=$(mktemp -d)/run
step train 90 "$PY" -m splitnet train --config experiments/smoke.toml --out "$RUN" \
    --set 'precision="bf16_cl"' --set batch_size=128 --set epochs=4 --set max_steps=40 --set data.workers=8
"$PY" -c 'import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
info = json.loads((run / "run.json").read_text())
json.dump({"run": info, "train_last": [r for r in recs if r["kind"] == "train"][-10:],
           "eval": [r for r in recs if r["kind"] == "eval"]}, open(sys.argv[2], "w"), indent=1)' \
    "$RUN" "$OUT/train.json" >> "$LOG" 2>&1 || status=1
# The files that hold gpu tests, named (an import error elsewhere would stop a whole-tests/ run);
# a per-test timeout where pytest-timeout is installed.
PER_TEST=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && PER_TEST=(--timeout=90)
step pytest 150 "$PY" -m pytest -v --durations=15 -m gpu -p no:cacheprovider ${PER_TEST[@]+"${PER_TEST[@]}"} \
    --junitxml="$OUT/pytest_gpu.xml" tests/test_gpu.py tests/test_fp16.py tests/test_data_transforms.py
echo "gpu_check: done in $SECONDS s, status $status; files: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
exit "$status"
