"""What the tests of runs build the same way: the checkout's paths, the tiny CIFAR-scale run on the
synthetic cache (tests/conftest.py's cache32), and the run records they read back."""
from __future__ import annotations

import json
from pathlib import Path

from splitnet.train.config import load_config
from splitnet.train.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
CIFAR = EXPERIMENTS / "cifar.toml"


def tiny_sets(cache, *extra, threads: int | None = 1, eval_batch_size: int = 20) -> list:
    """The --set items of a tiny run on `cache`: batch 8 (80 training images of cache32: 10 steps an
    epoch), no loader workers, evaluation in batches of `eval_batch_size`, `threads` torch threads
    (None: the config's), then `extra`."""
    sets = [f'data.root="{cache}"', "batch_size=8", "data.workers=0", f"eval_batch_size={eval_batch_size}"]
    if threads is not None:
        sets.append(f"threads={threads}")
    return sets + list(extra)


def tiny_cfg(cache, *extra, threads: int | None = 1, config=CIFAR):
    """The TrainConfig of `config` (experiments/cifar.toml) with tiny_sets(cache, *extra)."""
    return load_config(config, tiny_sets(cache, *extra, threads=threads))


def cli_sets(sets) -> list:
    """["--set", s, ...] for each item of `sets`: the same settings on the command line."""
    out = []
    for s in sets:
        out += ["--set", s]
    return out


def tiny_cli_sets(cache, *extra, threads: int | None = 1) -> list:
    """tiny_sets(cache, *extra) as `splitnet train` arguments."""
    return cli_sets(tiny_sets(cache, *extra, threads=threads))


def records(run, kind: str) -> list:
    """The run's metrics records of one kind ("train", "eval"), in order."""
    return [m for m in read_metrics(run) if m["kind"] == kind]


def train_recs(run) -> list:
    return records(run, "train")


def eval_recs(run) -> list:
    return records(run, "eval")


def losses(run) -> list:
    """The training loss of every step the run logged."""
    return [m["loss"] for m in train_recs(run)]


def run_json(run) -> dict:
    """The run's run.json."""
    return json.loads((Path(run) / "run.json").read_text())


def dropout_masks_on_cpu(monkeypatch) -> None:
    """Dropout masks drawn on the CPU wherever the layer runs: a CUDA generator draws other masks from
    the same seed, so a GPU run compared with a CPU run would otherwise differ by its masks, not its
    arithmetic (layers.PaperDropout.stream_mask)."""
    from splitnet.model.layers import PaperDropout
    draw = PaperDropout.stream_mask

    def on_cpu(self, x, keep, seed, full, offset):
        return draw(self, x.detach().to("cpu"), keep, seed, full, offset).to(x.device)
    monkeypatch.setattr(PaperDropout, "stream_mask", on_cpu)
