"""The input pipeline (§2, §4.1): ImageNet-style folders -> a packed uint8 cache -> augmented batches.

    splitnet data synth --out ROOT         the built-in synthetic set (synth.py)
    splitnet data prepare --src ROOT --out CACHE   decode once (preparation.py, archive.py for CIFAR-10,
                                                   decode.py, stats.py, shards.py, cache.py)
    resolve_data(DataConfig)                       a run's cache, prepared once if needed (resolve.py)
    make_loader(CACHE, LoaderSpec("train", 128, seed, epoch))   batches for training / evaluation (loader.py,
                                                                pipeline.py)

    DeviceBatches(make_loader(..., raw=True), "cuda:0")   the same batches finished on the GPU (device_input.py)

transforms.py holds the paper's transforms, one small function each.
"""
from .cache import is_cache
from .config import DataConfig, DataError
from .device_input import DeviceBatches
from .loader import BatchLoader, LoaderSpec, PackedDataset, epoch_order, eval_order, make_loader
from .preparation import prepare
from .resolve import data_home, ensure_cache, resolve_data
from .synth import make_synthetic
from .transforms import CENTRE_PATCH

__all__ = ["DataConfig", "DataError", "PackedDataset", "BatchLoader", "LoaderSpec", "make_loader", "epoch_order",
           "eval_order", "prepare",
           "ensure_cache", "resolve_data", "data_home", "is_cache", "make_synthetic",
           "DeviceBatches", "CENTRE_PATCH"]
