"""Top-1 / top-5 error on the centre patch, on ten patches, and for ensembles (§4.1, §6, Table 2).

Ten patches: the four corner patches, the centre patch and their horizontal reflections; the network's
prediction is the average of its softmax outputs over the ten (probabilities, not logits). An
ensemble (the paper's 5 and 7 CNNs) averages the models' probabilities likewise.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from ..config import ConfigError, from_dict, replace
from ..data.cache import is_cache
from ..data.folders import list_classes
from ..data import CENTRE_PATCH, DeviceBatches, LoaderSpec, PackedDataset, make_loader, resolve_data
from ..data.progress import Progress
from ..model.precision import autocast, memory_format, numerics
from .config import TrainConfig
from .errors import EvalError
from .rundir import RunDir

log = logging.getLogger("splitnet")


@torch.no_grad()
def predict_probs(model, batches, max_batches: int = 0, mode: str = "fp32", progress: bool = False,
                  desc: str = "eval", centre: bool = False):
    """(probabilities [N, C] float32 CPU, labels [N] int64) over `batches` of (x, y); with centre=True
    also the centre patch's probabilities [N, C], third.

    x: [B, 3, S, S] (one patch) or [B, P, 3, S, S] (P patches per image: their probabilities are
    averaged). centre=True needs the centre patch: one patch, or ten in the order of
    data/transforms.ten_patches (patch CENTRE_PATCH). The model is put in eval mode (paper dropout: outputs x0.5). mode: the numeric mode
    of the forward pass (model/precision.py; a run evaluates in the mode it trains in). progress:
    a bar or periodic lines on stderr (a 50,000-image validation set takes minutes).
    """
    fmt = memory_format(mode)
    was_training = model.training
    model.eval()
    dev = model.devices[model.local[0]] if hasattr(model, "devices") else next(model.parameters()).device
    probs, labels, centres = [], [], []
    bar = Progress(_n_batches(batches, max_batches), progress, desc=desc, noun="batches", unit="batch")
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            bar.update(1)
            patches = x.shape[1] if x.dim() == 5 else 1
            if centre and patches not in (1, 10):
                raise ValueError(f"predict_probs: the centre patch of {patches} patches per image is not defined")
            flat = x.flatten(0, 1) if x.dim() == 5 else x
            logits = _forward_in_chunks(model, flat.to(dev, non_blocking=True), x.shape[0], mode, fmt, dev)
            if logits is None:  # a rank without the head column (distributed): it only takes part
                continue
            p = F.softmax(logits.float(), dim=1).view(x.shape[0], patches, -1)
            if centre:
                centres.append(p[:, CENTRE_PATCH if patches > 1 else 0].cpu())
            probs.append(p.mean(1).cpu())  # mean of probabilities, §4.1
            labels.append(y.cpu())
    finally:
        bar.close()
        model.train(was_training)
    if not probs:
        if getattr(model, "local", None) is not None and model.layout.head not in model.local:
            return (None, None, None) if centre else (None, None)
        raise ValueError("evaluation: no batches (empty validation split?)")
    out = torch.cat(probs), torch.cat(labels)
    return (*out, torch.cat(centres)) if centre else out


def _forward_in_chunks(model, flat: torch.Tensor, rows: int, mode: str, fmt, dev):
    """The model's logits for `flat` [N, 3, S, S], `rows` images per forward pass: ten patches of a
    batch of B images are 10 passes of B rows, not one of 10 B. On a CPU the rate falls as a pass
    outgrows the cache (CIFAR-scale network, one thread: about 2,100 images/s at 128 rows, 1,200 at
    1,000); on a GPU the peak memory stays that of a centre-patch batch. None on a rank without the
    head column (distributed)."""
    outs = []
    with numerics(mode), autocast(mode, dev.type):
        for part in flat.split(rows):
            outs.append(model(part.contiguous(memory_format=fmt)))
    return None if outs[0] is None else torch.cat(outs)


def _n_batches(batches, max_batches: int) -> int:
    """How many batches predict_probs will see (0 when the loader cannot tell: no progress then)."""
    try:
        n = len(batches)
    except TypeError:
        return 0
    return min(n, max_batches) if max_batches else n


def show_progress(asked: bool | None) -> bool:
    """Progress when asked (--progress / --no-progress), else only on an interactive terminal, so
    logs and pipes stay quiet."""
    return sys.stderr.isatty() if asked is None else asked


def topk_errors(probs: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """{'top1_err': ..., 'top5_err': ...}: the share of images whose label is not among the k most
    probable classes (k capped at the number of classes)."""
    return error_rates(topk_misses(probs, labels, ks), len(labels))


def error_rates(misses: dict, n: int, prefix: str = "") -> dict:
    """{prefix + 'top1_err': ..., ...}: miss counts {k: count} (topk_misses) over n images as rates."""
    return {f"{prefix}top{k}_err": m / n for k, m in misses.items()}


def topk_misses(probs: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """{k: the number of images whose label is not among the k most probable classes}. Counts, so that
    shards of a validation set (one per replica) add up to exactly the whole set's errors."""
    out = {}
    for k in ks:
        top = probs.topk(min(k, probs.shape[1]), dim=1).indices
        out[k] = int((top != labels[:, None]).all(1).sum())
    return out


def ensemble(prob_list) -> torch.Tensor:
    """Mean of several models' probabilities over the same images (Table 2's averaged CNNs)."""
    if not prob_list:
        raise ValueError("ensemble: no models")
    shapes = {tuple(p.shape) for p in prob_list}
    if len(shapes) != 1:
        raise ValueError(f"ensemble: models' predictions differ in shape {sorted(shapes)}")
    return torch.stack(prob_list).mean(0)


# ---- the input and the validation error of a run -----------------------------------------------
def _input_on_device(cfg: TrainConfig, model) -> bool:
    """Whether batches are finished on the model's first device (input_device; data/device_input.py)."""
    dev = model.devices[model.local[0]]
    return cfg.input_device == "device" or (cfg.input_device == "auto" and dev.type == "cuda")


def input_batches(model, cache, spec: LoaderSpec, cfg: TrainConfig, ds=None):
    """The batches `spec` names (loader.LoaderSpec: training, an epoch from a batch on, or
    evaluation, the centre or ten patches) for `model`, finished where the run's input_device says:
    by the workers, or on the model's first device from the uint8 cache, one batch ahead. The same
    batches either way."""
    dev = model.devices[model.local[0]]
    on_device = _input_on_device(cfg, model)
    loader = make_loader(cache, spec, cfg.data, dataset=ds, raw=on_device, pin_memory=dev.type == "cuda")
    if on_device:
        loader = DeviceBatches(loader, dev, model.devices[model.layout.head], cfg.data, train=spec.train,
                               ten_patches=spec.ten_patches)
    return loader


def evaluate_split(model, cache, ds, cfg: TrainConfig, rt=None, ten: bool = False) -> dict:
    """Centre-patch (or ten-patch) top-1/top-5 error on the validation split: all of it, or with
    eval_max_batches that many batches' images spread evenly over it (every class in proportion:
    loader.eval_order). Under torchrun every rank takes part: each
    replica evaluates its shard (rt.eval_rows) and the head columns' miss counts are summed
    (rt.eval_result), which gives the one-process errors exactly. The patches are cut on the device
    where the training input is (input_device): the same batches either way."""
    n = min(len(ds), cfg.eval_max_batches * cfg.eval_batch_size) if cfg.eval_max_batches else len(ds)
    rows = (0, n) if rt is None else rt.eval_rows(n)
    if rows[0] == rows[1]:  # more replicas than images: this replica's columns have nothing to do
        misses = dict.fromkeys((1, 5), 0) if model.layout.head in model.local else None
    else:
        spec = LoaderSpec("val", cfg.eval_batch_size, train=False, ten_patches=ten, rows=rows, images=n)
        loader = input_batches(model, cache, spec, cfg, ds)
        # The DataLoader draws a base seed from the global RNG: fork it, so that evaluating (or not,
        # at a stop) leaves the global RNG where it was.
        with torch.random.fork_rng(devices=[]):
            probs, labels = predict_probs(model, loader, 0, cfg.precision)
        misses = None if probs is None else topk_misses(probs, labels)
    return error_rates(misses, n, "val_") if rt is None else rt.eval_result(misses, n)


# ---- command line -------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 error: centre patch, ten patches, ensembles")
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt (or its run directory)")
    p.add_argument("--data", help="folder of class folders or prepared cache (default: the run's data)")
    p.add_argument("--split", default="val")
    p.add_argument("--ten-crop", action="store_true", help="also the ten-patch prediction (§4.1)")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="CK",
                   help="more checkpoints: also report the mean of all models' probabilities")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--devices", nargs="+", default=None)
    p.add_argument("--json", nargs="?", const="-", dest="json_to", metavar="FILE",
                   help="print the results as one JSON line on stdout instead of the table; --json FILE: "
                        "the table on stdout and the JSON written to FILE (as --json-out FILE)")
    p.add_argument("--json-out", dest="json_to", metavar="FILE", help="also write the results to FILE as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr (default: only on an interactive terminal)")
    p.set_defaults(func=_main)


def evaluate_checkpoints(paths, data=None, split="val", ten=False, batch_size=64, devices=None,
                         progress: bool | None = None) -> list:
    """Rows {model, patches, top1_err, top5_err, images}: each checkpoint (its centre patch, then with
    `ten` its ten patches), then their ensemble. Every model is evaluated on one data set, `data` or
    the first checkpoint's run's (an ensemble averages each image's probabilities, so its members must
    see the same images), and must have been trained on its classes. One pass per checkpoint: with
    `ten` the centre patch's prediction is read from the ten-patch pass (the same input:
    CENTRE_PATCH), 10 forward passes per image instead of 11. progress: None shows it on an
    interactive terminal only (show_progress)."""
    first = ckpt.load(ckpt.checkpoint_path(paths[0]))
    if "imported" in first and not data:
        raise ConfigError(f"{paths[0]}: an imported network has no data of its own; give --data (e.g. ILSVRC-2012 "
                          f"as class folders, whose val/ is evaluated)")
    # The first run's preparation rules (an imported Caffe run's squash resize) for a folder given as data.
    dcfg = ckpt.run_data_config(from_dict(TrainConfig, first["config"]), ckpt.checkpoint_path(paths[0]))
    if data and (Path(data) / "train").is_dir() and not is_cache(data):
        # Before hours of preparing ILSVRC-2012 for nothing.
        _check_classes(paths[0], first, list_classes(data), f"{Path(data) / 'train'}", " class folders")
    cache, _ = resolve_data(replace(dcfg, root=str(data)) if data else dcfg)
    ds = PackedDataset(cache, split)
    for path in paths:  # every member's classes, before minutes of evaluating the first ones
        _check_classes(path, first if path is paths[0] else ckpt.load(ckpt.checkpoint_path(path)), ds.classes,
                       str(ds.root))
    rows, probs = [], {1: [], 10: []}
    for path in paths:
        path_ck = ckpt.checkpoint_path(path)
        ck = first if path is paths[0] else ckpt.load(path_ck)  # the first is loaded already (one file: once)
        model, cfg, _ = ckpt.model_from_checkpoint(ck, devices)
        _note_other_data(path, cache)
        # In the mode and on the input path the run trained with (its config), on the one data set,
        # minus the mean it was trained with (an imported run's mean.npy: run_data_config).
        cfg = replace(cfg, data=replace(ckpt.run_data_config(cfg, path_ck), root=str(cache)))
        loader = input_batches(model, cache, LoaderSpec(split, batch_size, train=False, ten_patches=ten), cfg, ds)
        p, labels, *centre = predict_probs(model, loader, mode=cfg.precision, progress=show_progress(progress),
                                           desc=f"eval {Path(path).name} ({'ten' if ten else 'centre'} patches)",
                                           centre=ten)
        for patches, q in ((1, centre[0]), (10, p)) if ten else ((1, p),):
            probs[patches].append(q)
            rows.append(dict(model=str(path), patches=patches, images=len(labels), **topk_errors(q, labels)))
    if len(paths) > 1:
        for patches, plist in probs.items():
            if plist:
                rows.append(dict(model=f"ensemble of {len(paths)}", patches=patches, images=len(labels),
                                 **topk_errors(ensemble(plist), labels)))
    return rows


def _check_classes(path, ck: dict, names: list, holder: str, noun: str = "") -> None:
    """An EvalError unless checkpoint `path` was trained on the classes `names`, in their order
    (those of the cache `holder`, or of its class folders before it is prepared: noun " class folders")."""
    classes = list(ck["classes"])
    if classes != list(names):
        raise EvalError(f"{path} was trained on {len(classes)} classes ({', '.join(classes[:3])}, ...), but "
                        f"{holder} holds {len(names)}{noun} ({', '.join(names[:3])}, ...): evaluate it on "
                        f"data with its classes (--data)")


def _note_other_data(path, cache) -> None:
    """One log line when the run of checkpoint `path` was trained on other data than `cache` holds
    (run.json's data identity): errors on other images than the run's, which may be what was asked."""
    changed = RunDir(ckpt.checkpoint_path(path).parent).data_changes(cache)
    if changed:
        log.warning("eval: %s was trained on other data than %s holds now (%s)", path, cache, changed)


def format_rows(rows) -> str:
    lines = ["| model | patches | images | top-1 err | top-5 err |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'centre' if r['patches'] == 1 else 'ten'} | {r['images']} | "
                     f"{100 * r['top1_err']:.2f}% | {100 * r['top5_err']:.2f}% |")
    return "\n".join(lines)


def _main(args) -> int:
    rows = evaluate_checkpoints([args.checkpoint, *args.ensemble], args.data, args.split, args.ten_crop,
                                args.batch_size, tuple(args.devices) if args.devices else None, args.progress)
    # stdout holds one thing a reader or a script can take whole: the table, or (--json) the JSON.
    if args.json_to == "-":
        print(json.dumps(rows))
        return 0
    print(format_rows(rows))
    if args.json_to:
        Path(args.json_to).write_text(json.dumps(rows, indent=2))
    return 0
