"""Checkpoints: written atomically, loadable with weights_only=True, placement-independent.

Weights and the optimiser's velocities are stored in the grouped single-device form (model/convert.py), so a
checkpoint written by any placement (two GPUs, the CPU emulation, torchrun ranks) loads into any
other. Everything in it is a tensor, a number, a string, or lists/dicts of them.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path

import torch

from ..config import from_dict, replace
from ..model.columns import SplitAlexNet
from ..model.convert import check_grouped, gather_grouped, scatter_grouped
from .config import TrainConfig
from .errors import CheckpointError, write_failure

FORMAT = 1


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`. A failed
    write (a full disk, a read-only or deleted folder) removes the temporary file and leaves the
    previous `path` as it was. The folder is not created: a run folder deleted during training is
    an error, not a new folder holding only checkpoints."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"could not write {path}: the folder {path.parent} no longer exists "
                              f"(deleted while the run was training?); stopped")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as RuntimeError
        with contextlib.suppress(OSError):  # a read-only folder refuses this too: the first error counts
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path} ({write_failure(e)}); {_kept(path)}") from None


def _kept(path: Path) -> str:
    return f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} exists"


def save(payload: dict, path) -> None:
    """A checkpoint's atomic_save, refused when its weights or velocities hold a NaN or inf: a
    checkpoint is only ever a state training can go on from (the previous one stays)."""
    bad = nonfinite(payload)
    if bad:
        raise CheckpointError(f"not writing {path} at step {payload.get('step', '?')}: {bad}; {_kept(Path(path))}. "
                              f"Lower optim.lr or check the data")
    atomic_save(payload, path)


def nonfinite(ck: dict) -> str | None:
    """'fc7.weight (velocities) holds 1 value(s) that are not finite (NaN or inf)' for the first
    tensor of ck["model"] or ck["velocity"] with one, else None."""
    for part in ("model", "velocity"):
        for name, t in (ck.get(part) or {}).items():
            if torch.is_tensor(t) and t.is_floating_point():
                n = int((~torch.isfinite(t)).sum())
                if n:
                    what = "weights" if part == "model" else "velocities"
                    return f"{name} ({what}) holds {n} value(s) that are not finite (NaN or inf)"
    return None


def rng_state() -> dict:
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"][:torch.cuda.device_count()]
        for i, s in enumerate(states):
            torch.cuda.set_rng_state(s, i)


def model_payload(model, optimizer=None) -> dict:
    out = {"model": gather_grouped(model, lambda p: p)}
    if optimizer is not None:
        def velocity(p):
            st = optimizer.state.get(p, {})
            return st["velocity"] if "velocity" in st else torch.zeros_like(p)
        out["velocity"] = gather_grouped(model, velocity)
    return out


def load(path) -> dict:
    """A splitnet checkpoint, loaded with weights_only=True; a CheckpointError naming the file and
    what is wrong for anything else (empty, truncated, random bytes, another program's file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (a write that never finished?)")
    not_one = _not_a_zip(path)
    if not_one:
        raise CheckpointError(f"checkpoint {path} {not_one}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in first or "Weights only" in first:
            first = "it holds objects other than tensors, numbers and strings"
        raise CheckpointError(f"checkpoint {path} cannot be read: {first[:200]}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT or "model" not in ck:
        raise CheckpointError(f"checkpoint {path} is not a splitnet checkpoint (format {FORMAT})")
    bad = nonfinite(ck)
    if bad:  # a corrupt file or a diverged run: neither evaluating nor training on from it means anything
        raise CheckpointError(f"checkpoint {path} is unusable: {bad}")
    return ck


def _not_a_zip(path: Path) -> str | None:
    """What `path` is when it is not the zip archive torch.save writes (so torch.load's own error, a
    pickle opcode number or a miniz message, is not what the user reads), else None."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return None if zipfile.is_zipfile(path) else ("is truncated or damaged: its zip archive has no end "
                                                       "(a write or a copy that did not finish?)")
    try:
        head.decode("utf-8")
        return "is a text file, not a checkpoint"
    except UnicodeDecodeError:
        pass
    if head[:1] == b"\x80":
        return "is a plain pickle, not a checkpoint (torch.save's zip format)"
    return f"is not a checkpoint (not torch.save's zip format; it starts with bytes {head[:4].hex(' ')})"


def restore_model(model, ck: dict, optimizer=None) -> None:
    check_grouped(model, ck["model"], "checkpoint weights")
    scatter_grouped(model, ck["model"], lambda p, chunk: p.copy_(chunk))
    if optimizer is not None and "velocity" in ck:
        check_grouped(model, ck["velocity"], "checkpoint velocities")

        def put(p, chunk):
            optimizer.state[p]["velocity"] = chunk.to(p.device, p.dtype).clone()
        scatter_grouped(model, ck["velocity"], put)


def model_from_checkpoint(ck: dict, devices=None):
    """(SplitAlexNet with the checkpoint's weights, its TrainConfig, its class names)."""
    cfg = from_dict(TrainConfig, ck["config"])
    classes = list(ck["classes"])
    mcfg = replace(cfg.model, num_classes=len(classes))
    model = SplitAlexNet(config=mcfg, devices=devices if devices is not None else (tuple(cfg.devices) or None),
                         concurrency=cfg.concurrency)
    restore_model(model, ck)
    return model.eval(), cfg, classes


def checkpoint_path(run) -> Path:
    """RUN/checkpoint.pt for a run folder, or the checkpoint file itself."""
    p = Path(run)
    return p / "checkpoint.pt" if p.is_dir() else p


def run_data_config(cfg: TrainConfig, ck_path):
    """The run's DataConfig with a relative data.mean_file (an imported run's mean.npy) read against
    the run folder, so the folder can move."""
    d = cfg.data
    if d.mean_file and not Path(d.mean_file).is_absolute():
        d = replace(d, mean_file=str(Path(ck_path).parent / d.mean_file))
    return d
