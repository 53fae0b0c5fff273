"""`make test`: the test files dealt to N pytest processes that run at once (N = 2 by default).

Much of the suite waits on subprocesses (torchrun ranks, `splitnet` commands, killed and resumed
runs), each of which spends seconds importing torch, so one pytest process keeps a 2-core machine
about 1.3 cores busy. Two at once took 350 s by the clock against 430 s for one on a 2-core box
(docs/results.md).

Files are dealt longest first, each to the shard with the least work so far, by SECONDS below (about
what each file's tests took in one pytest process on that box, from --durations; a file not listed
counts DEFAULT_S): only the balance depends on them. Each shard's output is printed whole when every
shard has ended, then one summary line. The exit status is 0 only when every shard exited 0 (pytest's 5, no test collected,
is a failure like any other).

    python tests/shards.py [--jobs N] [PYTEST_ARGS ...]     # --jobs 1: one plain pytest process
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_S = 10.0
SECONDS = {
    "test_distributed.py": 105, "test_bench.py": 70, "test_train.py": 55, "test_runs.py": 40,
    "test_concurrent.py": 32, "test_model.py": 30, "test_ablate.py": 28, "test_fp16.py": 22,
    "test_cifar_scale.py": 20, "test_tune.py": 19, "test_newcomer.py": 10, "test_cli.py": 8,
    "test_data_prepare.py": 8, "test_exchange.py": 6, "test_layout.py": 6, "test_data_loader.py": 6,
    "test_data_archive.py": 5, "test_data_transforms.py": 5, "test_layers.py": 5, "test_data_synth.py": 4,
    "test_optim.py": 3, "test_config.py": 3, "test_placement.py": 3, "test_imports.py": 3, "test_gpu.py": 1,
    "test_shards.py": 2, "test_pretrained.py": 85, "test_faults.py": 16, "test_step.py": 4, "test_gpu_check.py": 4,
    "test_compat.py": 1, "test_bf16emu.py": 6,
}


def deal(files: list, jobs: int) -> list:
    """[[file, ...] per shard]: longest first, each to the shard with the least work so far."""
    shards, load = [[] for _ in range(jobs)], [0.0] * jobs
    for f in sorted(files, key=lambda f: (-SECONDS.get(f.name, DEFAULT_S), f.name)):
        i = load.index(min(load))
        shards[i].append(f)
        load[i] += SECONDS.get(f.name, DEFAULT_S)
    return [s for s in shards if s]


def _counts(text: str) -> dict:
    """{"passed": n, "failed": n, ...} from pytest's last summary line."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def main(argv=None, root: Path = HERE) -> int:
    """Run the test_*.py files of `root` (this folder) in --jobs pytest processes; the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="pytest processes at once (1: a plain pytest run)")
    args, pytest_args = p.parse_known_args(argv)
    if args.jobs <= 1:
        return subprocess.call([sys.executable, "-m", "pytest", "-q", *pytest_args, str(root)])
    shards = deal(sorted(Path(root).glob("test_*.py")), args.jobs)
    if not shards:
        print(f"no test_*.py file in {root}")
        return 5  # what pytest says when it collected nothing
    print(f"tests/shards.py: {len(shards)} pytest processes at once; each one's output follows when all "
          f"have ended", flush=True)
    t0, logs, procs, bases = time.time(), [], [], []
    for i, files in enumerate(shards):
        log = tempfile.TemporaryFile(mode="w+")
        # Its own base temp folder and no shared .pytest_cache: nothing two shards write is shared.
        base = tempfile.mkdtemp(prefix=f"splitnet-tests-{i + 1}-")
        bases.append(base)
        procs.append(subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       f"--basetemp={base}", *pytest_args, *map(str, files)],
                                      stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:  # a terminal's Ctrl-C reached the shards too: print what they said
        codes = [proc.wait() for proc in procs]
    _report(shards, logs, codes, bases, time.time() - t0)
    return next((c for c in codes if c != 0), 0)


def _report(shards: list, logs: list, codes: list, bases: list, seconds: float) -> None:
    """Each shard's output whole, its temporary folder removed if it passed, then one summary line."""
    total: dict = {}
    for i, (files, log, code) in enumerate(zip(shards, logs, codes)):
        log.seek(0)
        text = log.read()
        print(f"---- shard {i + 1}/{len(shards)} (exit {code}): {' '.join(f.name for f in files)}")
        print(text, end="" if text.endswith("\n") else "\n")
        for k, n in _counts(text).items():
            total[k] = total.get(k, 0) + n
        if code == 0:
            shutil.rmtree(bases[i], ignore_errors=True)
        else:
            print(f"---- shard {i + 1}'s temporary files are kept in {bases[i]}")
    summary = ", ".join(f"{n} {k}" for k, n in total.items())
    failed = [i + 1 for i, c in enumerate(codes) if c != 0]
    print(f"==== {len(shards)} shards: {summary or 'no result line'} in {seconds:.1f} s"
          + (f"; shard(s) {failed} failed" if failed else ""))


if __name__ == "__main__":
    sys.exit(main())
