"""A training run's configuration: TOML files in experiments/ over the paper's defaults (§5).

    [model]   ModelConfig fields (model/config.py)
    [data]    DataConfig fields (data/config.py)
    [optim]   OptimConfig fields (below)
    top level TrainConfig fields (batch_size, epochs, seed, max_steps, ...)

`--set key=value` overrides any field with a dotted key (`optim.lr=0.02`, `max_steps=10`); the value is
read as a TOML value (numbers, booleans, "strings", [lists]) and, failing that, as a bare string.
Unknown keys and wrong types are errors naming the key (config.from_dict).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, from_dict, to_dict
from ..data.config import DataConfig
from ..model.concurrent import STRATEGIES
from ..model.config import ModelConfig
from ..model.precision import PRECISIONS


@dataclass(frozen=True)
class OptimConfig:
    """§5: SGD, momentum 0.9, weight decay 0.0005, eps 0.01 divided by 10 when the validation error
    stops improving, three times at most."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_decay: bool = False  # the original code: no weight decay on biases (wc=0)
    # "plateau": divide by `factor` after `patience` epochs without improvement (the paper's rule;
    # patience is not given in the paper). "milestones": at the given epochs (2012 run: 23, 49).
    # "none": constant eps.
    schedule: str = "plateau"
    patience: int = 5
    factor: float = 10.0
    max_drops: int = 3
    min_delta: float = 0.0
    milestones: tuple = (23, 49)
    # Not the paper's: divide eps by `factor` when these fractions of the run's budget (max_minutes
    # or max_steps) are spent, e.g. [0.75, 0.9]: a capped run ends at a small eps, stably, even when
    # it is too short for the schedule above to fire. () = off.
    budget_drops: tuple = ()
    # What a drop does to the velocity: "keep" (the paper's update, eps inside v: the steps it holds
    # keep their size and decay over ~10 steps) or "scale" (divided with eps; not the paper's; for
    # short runs whose drops come at the edge of stability, experiments/reproduce.toml).
    drop_velocity: str = "keep"
    # precision "fp16"/"fp16_cl" only: the loss scaler's first scale (train/scaler.py; it then halves
    # on each overflowing step and doubles after 2000 steps without one). A power of two keeps the
    # unscaling exact. Not resume-safe: the scale a run has reached is in its checkpoint.
    loss_scale_init: float = 65536.0

    def __post_init__(self):
        if self.schedule not in ("plateau", "milestones", "none"):
            raise ConfigError(f"schedule: {self.schedule!r} is not 'plateau', 'milestones' or 'none'")
        if self.drop_velocity not in ("keep", "scale"):
            raise ConfigError(f"drop_velocity: {self.drop_velocity!r} is not 'keep' or 'scale'")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:  # >= 1: the velocity never decays, the run diverges
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum}")
        for key in ("weight_decay", "min_delta"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.factor <= 1:  # a "drop" that keeps or raises eps
            raise ConfigError(f"factor: must be > 1, got {self.factor}")
        if self.patience < 1:
            raise ConfigError(f"patience: must be >= 1, got {self.patience}")
        if self.loss_scale_init <= 0:
            raise ConfigError(f"loss_scale_init: must be > 0, got {self.loss_scale_init}")
        if any(not 0 < f < 1 for f in self.budget_drops) or list(self.budget_drops) != sorted(self.budget_drops):
            raise ConfigError(f"budget_drops: increasing fractions between 0 and 1, got {list(self.budget_drops)}")


@dataclass(frozen=True)
class TrainConfig:
    """One run. Defaults: the paper's recipe on real data (batch 128, about 90 epochs)."""

    name: str = "paper"
    note: str = ""  # why this run deviates from the paper, if it does; copied into the report
    batch_size: int = 128
    epochs: int = 90
    seed: int = 0
    max_steps: int = 0  # stop after this many optimiser steps in total (0: no limit)
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much training time (0: no limit)
    devices: tuple = ()  # one device per column, or () to pick (GPUs if present, else CPU)
    eval_every: int = 1  # evaluate on the validation set every this many epochs
    eval_batch_size: int = 64
    eval_max_batches: int = 0  # cap on validation batches per evaluation, spread over the classes (0: all)
    eval_at_stop: bool = True  # evaluate when max_steps / max_minutes stop a run mid-epoch
    checkpoint_every: int = 0  # also checkpoint every this many steps (0: at each epoch end only)
    log_every: int = 10  # progress lines every this many steps (no terminal); losses read off the device as often
    threads: int = 0  # torch intra-op threads (0: torch's default)
    # how one process runs its columns at once: "auto", "sequential", "threads", "streams" (model/concurrent.py)
    concurrency: str = "auto"
    # where the training input is cropped, mirrored, lit and mean-subtracted: "cpu" (DataLoader
    # workers), "device" (the model's first device, from the uint8 cache: data/device_input.py), or
    # "auto" (device on a GPU, cpu otherwise). The batches are bitwise the same either way.
    input_device: str = "auto"
    # numeric mode of the forward pass (model/precision.py): "fp32" (the paper's), "fp32_cl" (the same
    # arithmetic in channels_last memory order: faster on a CPU at CIFAR scale), "tf32", "bf16" (autocast;
    # weights, update and loss stay float32) or "bf16_cl" (bf16 + channels_last); the GPU fast path.
    # "fp16" / "fp16_cl": the same in float16 with a loss scaler (train/scaler.py), for GPUs without bf16
    precision: str = "fp32"
    dist_timeout_s: float = 300.0  # under torchrun: a collective waiting longer (a dead or hung rank) fails
    # under torchrun with replicas: gradient all-reduce buckets of this many MB, launched while backward
    # runs (train/grad_sync.py); 0: one all-reduce after backward. The same gradients either way.
    dist_bucket_mb: float = 25.0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        for key in ("batch_size", "epochs", "eval_every", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.concurrency not in STRATEGIES:
            raise ConfigError(f"concurrency: {self.concurrency!r} is not one of {', '.join(STRATEGIES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.input_device not in ("auto", "cpu", "device"):
            raise ConfigError(f"input_device: {self.input_device!r} is not 'auto', 'cpu' or 'device'")
        for key in ("max_steps", "max_minutes", "checkpoint_every", "eval_max_batches", "threads", "dist_bucket_mb"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"dist_timeout_s: must be > 0, got {self.dist_timeout_s}")


def check_num_classes(cfg: TrainConfig, classes: list, cache) -> None:
    """The model is built with the data's class count. A model.num_classes set to another count
    (the default, the paper's 1000, stands for "the data's") would be silently replaced: refused."""
    n = cfg.model.num_classes
    if n != len(classes) and n != ModelConfig.num_classes:
        raise ConfigError(f"model.num_classes = {n}, but the data ({cache}) has {len(classes)} classes: "
                          f"leave the key out (the model takes the data's count) or set it to {len(classes)}")


# What --set may change on `train --resume`: budgets, evaluation and logging, and where or how fast
# the run computes (devices, threads, concurrency, the input path: the same batches, the same
# numbers). optim.lr is an explicit override, applied and logged. Anything else (batch size, seed,
# model, data, schedule) would change what the saved batch index, permutation or weights mean.
RESUME_SAFE = frozenset({
    "name", "note", "epochs", "max_steps", "max_minutes", "eval_every", "eval_batch_size",
    "eval_max_batches", "eval_at_stop", "checkpoint_every", "log_every", "threads", "devices",
    "concurrency", "input_device", "dist_timeout_s", "dist_bucket_mb", "data.workers", "data.prepare_workers", "optim.lr"})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(saved: TrainConfig, new: TrainConfig) -> dict:
    """{dotted key: (saved value, new value)} for every field that differs."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(new))
    # model.num_classes is always the data's class count (the loop sets it), whatever a file says
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k != "model.num_classes"}


def unsafe_changes(changed: dict) -> dict:
    """The entries of config_changes() that a resume may not make (keys not in RESUME_SAFE)."""
    return {k: v for k, v in changed.items() if k not in RESUME_SAFE}


def resume_changes(saved: TrainConfig, new: TrainConfig) -> dict:
    """config_changes(saved, new); a ConfigError naming the key when one of them is not in RESUME_SAFE."""
    changed = config_changes(saved, new)
    for k, (old, value) in unsafe_changes(changed).items():
        raise ConfigError(f"{k}: cannot change on resume ({old!r} -> {value!r}); it would change what "
                          f"the saved run means. Start a new run (--out) instead")
    return changed


def resume_lr(ck: dict, cfg: TrainConfig) -> float | None:
    """The eps a resume sets in place of the checkpoint's: cfg.optim.lr where it differs from the lr
    of the config the checkpoint was written under, else None (the checkpoint's eps stands, with the
    schedule's drops). Compared with the checkpoint, not with config.toml: a resume of a done run
    records an lr in config.toml without training a step, and the next resume must train with it."""
    saved = ck.get("config", {}).get("optim", {}).get("lr")
    return cfg.optim.lr if saved is not None and cfg.optim.lr != saved else None


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_sets(data: dict, sets) -> dict:
    """Merge `key=value` strings (dotted keys) into a nested dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in sets or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a table")
        node[parts[-1]] = _parse_value(value.strip())
    return out


def read_toml(path) -> dict:
    """A TOML file as a dict; a one-line error naming the file when it is missing, a folder, not
    UTF-8 (as TOML requires) or not valid TOML."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not a TOML file")
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); TOML files are "
                          f"UTF-8: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def load_config(path=None, sets=(), base: dict | None = None) -> TrainConfig:
    """TrainConfig from a TOML file (or none: the paper's defaults) plus --set overrides."""
    data = dict(base or {})
    if path is not None:
        data.update(read_toml(path))
    data = apply_sets(data, sets)
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{e}") from None


def dump_toml(cfg) -> str:
    """The resolved config as TOML (what each run directory records)."""
    d = to_dict(cfg)
    lines, tables = [], []
    for k, v in d.items():
        (tables if isinstance(v, dict) else lines).append((k, v))
    out = [f"{k} = {_toml(v)}" for k, v in lines]
    for k, v in tables:
        out.append(f"\n[{k}]")
        out.extend(f"{kk} = {_toml(vv)}" for kk, vv in v.items())
    return "\n".join(out) + "\n"


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if v is None:
        return '""'
    raise TypeError(f"cannot write {v!r} as TOML")
