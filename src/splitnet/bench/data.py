"""The input path: decoding against the cached path per core (`data_path`), and on a GPU, training fed
from the uint8 cache against training on batches already there (`input_path`), `splitnet train`
itself included (`train_loop_rate`). Synthetic data, prepared into a temporary cache."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import set_item
from ..data import DataConfig, DeviceBatches, LoaderSpec, PackedDataset, make_loader, make_synthetic, prepare
from ..model.columns import SplitAlexNet
from ..model.layout import get_geometry
from ..model.placement import synchronize
from ..model.precision import numerics
from ..train.config import load_config
from ..train.loop import read_metrics, train
from .timing import paper_optimizer, spread, timed, train_step, training_strategy


@contextlib.contextmanager
def _synthetic_cache(per_class: int, workers: int, image_size: int | None = None):
    """A temporary prepared synthetic set (10 classes x per_class training images, cached at
    `image_size`, default the paper's 256): yields (cache folder, images packed, seconds the
    preparation took); removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="splitnet-bench-"))
    try:
        root = make_synthetic(tmp / "src", seed=0, classes=10, train_per_class=per_class, val_per_class=1,
                              workers=workers)
        t0 = time.perf_counter()
        report = prepare(root, tmp / "cache", workers=workers, image_size=image_size, progress=False)
        packed = sum(sp["packed"] for sp in report["splits"].values())
        yield tmp / "cache", packed, time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rate(epochs, step=None, devices=(), skip: int = 1) -> tuple:
    """(images/s over all `epochs`, [images/s of each epoch]); epochs: iterables of (x, y) batches,
    each batch passed to `step` if given. A DataLoader starts its worker processes at every epoch, a
    cost a real run pays once per thousands of batches: in each epoch the clock starts after the
    first `skip` batches (the workers' first batches). `devices` are synchronised before each clock
    reading."""
    n = seconds = 0
    each = []
    for batches in epochs:
        k, t = _count(batches, step, devices, skip)
        n, seconds = n + k, seconds + t
        each.append(k / t if t else 0.0)
    return (n / seconds if n else 0.0), each


def _count(batches, step, devices, skip: int) -> tuple:
    """(images, seconds) after the first `skip` batches of one epoch."""
    n, t0 = 0, None
    for i, (x, y) in enumerate(batches):
        if step is not None:
            step(x, y)
        if i + 1 < skip:
            continue
        if t0 is None:
            synchronize(devices)
            t0 = time.perf_counter()
            continue
        n += len(x)
    synchronize(devices)
    return n, (time.perf_counter() - t0 if t0 is not None else 0.0)


def data_path(batch: int = 128) -> dict:
    """Images/s of preparation (decode) and of the cached training path, on a synthetic folder.
    cached_over_decode's spread is over the 3 epochs of the cached path (the decode is timed once,
    as one preparation of 600 images)."""
    threads = torch.get_num_threads()
    with _synthetic_cache(per_class=60, workers=1) as (cache, packed, seconds):
        decode = packed / seconds
        cfg = DataConfig()
        torch.set_num_threads(1)
        try:
            rates = {workers: _rate(make_loader(cache, LoaderSpec("train", min(batch, 600), seed=0, epoch=epoch),
                                                cfg, workers=workers) for epoch in range(3))
                     for workers in (0, 1)}  # 4 batches an epoch, the first untimed
        finally:
            torch.set_num_threads(threads)
    return {"decode_images_per_s_per_core": decode, "cached_images_per_s_per_core": rates[0][0],
            "one_worker_images_per_s": rates[1][0], "cached_over_decode": rates[0][0] / decode,
            "cached_over_decode_spread": spread(r / decode for r in rates[0][1])}


def input_path(device="cuda:0", batch: int = 128, mode: str = "bf16", workers: int | None = None,
               per_class: int = 600, epochs: int = 1, geometry: str = "imagenet") -> dict:
    """Training images/s fed from the uint8 cache against training on one batch already on the device.

    "device" path: DataLoader workers gather uint8 images, DeviceBatches crops, mirrors, lights and
    subtracts the mean on the device one batch ahead (data/device_input.py). "cpu" path: the workers
    do all of it and send float32 crops. Synthetic 256x256 images, 10 classes x `per_class` (the
    default: 46 batches of 128, a few hundred milliseconds of a fast GPU's training). geometry: the
    paper's network on 256-pixel images ("imagenet") or its CIFAR-scale family on 32-pixel ones ("cifar").
    """
    dev = torch.device(device)
    workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    geo = get_geometry(geometry)  # the prepared image side and the crop the geometry's conv1 reads
    with _synthetic_cache(per_class, workers, geo.image_size) as (cache, _, _):
        torch.manual_seed(0)
        model = SplitAlexNet(10, devices=dev, geometry=geometry)
        model.concurrency = training_strategy(model, batch, mode)
        opt = paper_optimizer(model)
        head = model.devices[model.layout.head]
        cfg = DataConfig(workers=workers, image_size=geo.image_size, crop_size=geo.crop)
        sync = sorted(set(model.devices), key=str)

        def epoch_batches(epoch: int, on_device: bool):
            loader = make_loader(cache, LoaderSpec("train", batch, seed=0, epoch=epoch), cfg,
                                 pin_memory=dev.type == "cuda", raw=on_device)
            return DeviceBatches(loader, dev, head, cfg) if on_device else loader

        count = iter(range(10 ** 9))  # the step number: each step its own dropout masks

        def step(xb, yb):
            train_step(model, opt, xb.to(dev, non_blocking=True), yb.to(head, non_blocking=True),
                       step=next(count), mode=mode)

        model.train()
        with numerics(mode):
            x = torch.randn(batch, 3, model.input_side, model.input_side, device=dev) * 60
            y = torch.randint(0, 10, (batch,), device=head)
            for _ in range(2):
                step(x, y)
            on_device = [timed(lambda: step(x, y), sync) for _ in range(10)]
            # Each worker's first batch of an epoch carries its start-up: untimed.
            rates = {path: _rate((epoch_batches(e, path == "device") for e in range(epochs)), step, sync,
                                 skip=workers)[0] for path in ("device", "cpu")}
        loop, loop_parts = train_loop_rate(cache, model.devices, batch, mode, workers, geometry)
    on_dev_ips = batch / statistics.median(on_device)
    return {"device": str(dev), "precision": mode, "batch": batch, "workers": workers, "geometry": geometry,
            "images": 10 * per_class, "epochs": epochs,
            "train_images_per_s_on_device_batches": on_dev_ips,
            "train_images_per_s_device_input": rates["device"],
            "train_images_per_s_cpu_input": rates["cpu"],
            "device_input_over_on_device": rates["device"] / on_dev_ips,
            "cpu_input_over_on_device": rates["cpu"] / on_dev_ips,
            "train_loop_images_per_s": loop,
            "train_loop_over_on_device": loop / on_dev_ips,
            "train_loop_over_on_device_spread": spread(r / on_dev_ips for r in loop_parts)}


def train_loop_rate(cache, devices, batch: int, mode: str, workers: int, geometry: str = "imagenet") -> tuple:
    """Images/s of `splitnet train` itself (train.train: the input path of its config, dropout
    streams, loss and error read back every step, metrics) on a prepared cache: one run of an
    epoch's batches less one, timed by the wall clock of its metrics records after the first
    `workers + 2` steps (worker start-up, cuDNN's first calls). No evaluation, one checkpoint at
    the end (outside the timed records). Returns (images/s, [images/s of each third of the timed
    records]: their spread; one part when there are fewer than 7 records)."""
    steps = len(PackedDataset(cache, "train")) // batch - 1
    skip = workers + 2
    if steps < skip + 2:
        raise ValueError(f"train_loop_rate: {steps} steps of {batch} in {cache}; need {skip + 2}")
    geo = get_geometry(geometry)
    sets = [set_item("data.root", cache), f"batch_size={batch}", f"max_steps={steps}", "eval_at_stop=false",
            set_item("precision", mode), f"devices={json.dumps([str(d) for d in devices])}", f"data.workers={workers}",
            set_item("model.geometry", geometry), f"data.image_size={geo.image_size}", f"data.crop_size={geo.crop}"]
    with tempfile.TemporaryDirectory(prefix="splitnet-bench-") as tmp:
        train(load_config(None, sets), Path(tmp) / "run", progress=False)
        recs = [r for r in read_metrics(Path(tmp) / "run") if r["kind"] == "train"][skip:]
    parts = 3 if len(recs) >= 7 else 1
    cuts = [round(i * (len(recs) - 1) / parts) for i in range(parts + 1)]  # record indices, shared ends
    return _loop_rate(recs, batch), [_loop_rate(recs[a:b + 1], batch) for a, b in zip(cuts, cuts[1:])]


def _loop_rate(recs: list, batch: int) -> float:
    """Images/s between the first and the last metrics record (each record ends one step)."""
    return batch * (len(recs) - 1) / (recs[-1]["time"] - recs[0]["time"])
