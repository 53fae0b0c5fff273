"""`splitnet.load(RUN)`: a run's network and the preprocessing it expects, for any run folder.

A run is a trained one (`splitnet train`, `reproduce`), or an imported one (`splitnet import`). The
preprocessing is the run's own (its DataConfig): the resize rule (§2's shorter side or Caffe's
squash), the prepared image side, the crop, and the mean image: the run's mean.npy (imported), or
the mean of the cache it was trained on (run.json's "cache", or the `data` given).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import replace
from ..data import cache as C
from ..data import pipeline as P
from ..data.config import DataConfig, DataError
from ..data.decode import load_image
from ..data.loader import read_mean_file
from ..train import checkpoint as ckpt
from ..train.rundir import RunDir


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the network's input: decode and resize (§2 or Caffe's rule), then the
    centre patch or the ten patches (§4.1) minus the mean; float32, RGB, 0..255 scale."""

    data: DataConfig
    mean: torch.Tensor | None  # [3, S, S] float32, S = data.image_size; None: not loaded (need_mean=False)
    classes: tuple  # class ids (folder names; ILSVRC: WordNet ids)
    names: tuple  # readable names, one per class

    @property
    def crop(self) -> int:
        return self.data.crop_size

    def image(self, path) -> torch.Tensor:
        """uint8 [3, S, S] of the file at `path`; decode.BadImage(reason) if it cannot be read."""
        d = self.data
        arr, _ = load_image(path, d.image_size, d.resample, d.max_image_pixels, d.resize)
        return torch.from_numpy(arr)

    def batch(self, images: torch.Tensor, ten: bool = False) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> [B, 3, c, c] (centre) or [B, 10, 3, c, c] (ten patches), minus the mean."""
        if self.mean is None and self.data.mean_subtraction:
            raise DataError("preprocessing: the run's mean image was not loaded (load(..., need_mean=True))")
        return P.eval_batch(images, self.mean, self.data, ten=ten)

    def __call__(self, path, ten: bool = False) -> torch.Tensor:
        return self.batch(self.image(path)[None], ten)[0]


def _mean(dcfg: DataConfig, ck_path: Path, data=None) -> torch.Tensor:
    """The run's mean image [3, S, S]: its mean file (imported), or its training cache's (`data`, else
    the cache run.json records)."""
    if dcfg.mean_file:
        return read_mean_file(dcfg.mean_file)
    cache = data if data is not None else RunDir(ck_path.parent).read_info().get("cache")
    if not cache or not C.is_cache(Path(cache)):
        raise DataError(f"{ck_path}: the mean image of the run's training data is needed and its cache "
                        f"{cache or '(not recorded)'} is not there; pass the prepared cache (data=/--data)")
    return torch.from_numpy(C.read_stats(cache)["mean"].astype(np.float32))


def load(run, devices=None, data=None, need_mean: bool = True):
    """(model in eval mode, Preprocessing) of the run folder (or checkpoint file) `run`. devices: one
    per column (default: the run's own, else GPUs if present, else the CPU). data: a prepared cache
    whose mean image to use for a trained run whose own cache has moved. need_mean=False: no mean
    (Preprocessing.mean None), for what only reads the weights (export, Figure 3)."""
    path = ckpt.checkpoint_path(run)
    ck = ckpt.load(path)
    model, cfg, classes = ckpt.model_from_checkpoint(ck, devices)
    dcfg = ckpt.run_data_config(cfg, path)
    names = ck.get("imported", {}).get("class_names") or classes
    mean = _mean(dcfg, path, data) if need_mean else None
    if mean is not None:  # the images are prepared at the mean's side (a trained CIFAR run's cache: 32)
        dcfg = replace(dcfg, image_size=int(mean.shape[-1]))
    return model, Preprocessing(dcfg, mean, tuple(classes), tuple(names))
