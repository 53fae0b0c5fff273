"""Reading the cache: PackedDataset (one image at a time) and make_loader (whole batches, §4.1:
the ones a LoaderSpec names).

make_loader's unit of work is a batch, not an image: DataLoader worker w builds batch k from the
epoch's permutation (seeded by (seed, epoch)) and each sample's augmentation (seeded by
(seed, epoch, position), pipeline.py). Batch k is therefore the same tensor whoever builds it, and
starting at batch k (a resumed run) yields exactly the batches k, k+1, ... an uninterrupted run sees.
For the same reason a data-parallel replica can build only its rows of batch k (`share`): they are the
rows of the whole batch, augmented alike, without the rest being read or augmented.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import cache as C
from . import pipeline as P
from .config import DataConfig, DataError
from .rng import STREAM_SHUFFLE, derive_seed

_OPEN_SHARDS = 128  # memory maps kept open per process (each holds a file descriptor)


def read_mean_file(mean_file, side: int | None = None) -> torch.Tensor:
    """The mean image of a .npy file (DataConfig.mean_file): float32 [3, S, S], RGB, 0..255, with S =
    `side` when given (the images it is subtracted from); a DataError naming the file otherwise."""
    try:
        mean = np.load(mean_file, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"data.mean_file {mean_file}: cannot be read ({e})") from None
    s = side if side is not None else (mean.shape[-1] if mean.ndim == 3 else -1)
    if mean.shape != (3, s, s):
        need = f"the cache's images need {[3, s, s]}" if side is not None else "expected [3, S, S]"
        raise DataError(f"data.mean_file {mean_file}: shape {list(mean.shape)}, {need}")
    return torch.from_numpy(mean.astype(np.float32))


class PackedDataset(Dataset):
    """The images of one split of a prepared cache, as packed (§2: 256x256, uint8, not augmented).

    ds[i] -> (uint8 tensor [3, 256, 256] RGB, int label). Attributes: classes (list of names),
    labels (int64 numpy [N]), files (source paths), mean (float32 tensor [3, 256, 256], 0..255),
    eigvals (float32 [3], descending) and eigvecs (float32 [3, 3], columns) of the training set's
    RGB covariance in 0..255 units, image_size.
    """

    def __init__(self, cache_dir, split: str = "train"):
        self.root = Path(cache_dir)
        info = C.read_info(self.root)
        if split not in info["splits"]:
            raise FileNotFoundError(f"{self.root}: the cache has no {split!r} split "
                                    f"(has: {', '.join(info['splits'])})")
        self.split = split
        self.image_size = int(info["image_size"])
        folder = self.root / split
        self.labels = np.load(folder / "labels.npy")
        self._index = np.load(folder / "index.npy")
        self.classes = C.read_classes(self.root)
        st = C.read_stats(self.root)
        self.mean = torch.from_numpy(st["mean"].astype(np.float32))
        self.eigvals = torch.from_numpy(st["eigvals"].astype(np.float32))
        self.eigvecs = torch.from_numpy(st["eigvecs"].astype(np.float32))
        self._shards = OrderedDict()  # opened lazily, in each process that reads

    def with_mean(self, mean_file) -> "PackedDataset":
        """This split with the mean image of `mean_file` (read_mean_file) instead of the cache's
        training mean: an imported network subtracts the mean it was trained with."""
        import copy
        out = copy.copy(self)
        out.mean = read_mean_file(mean_file, self.image_size)
        return out

    @property
    def files(self) -> list:
        return (self.root / self.split / "files.txt").read_text().splitlines()

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):  # for spawned workers: the maps are reopened there
        state = self.__dict__.copy()
        state["_shards"] = OrderedDict()
        return state

    def _shard(self, i: int) -> np.ndarray:
        arr = self._shards.pop(i, None)
        if arr is None:
            arr = np.load(self.root / self.split / f"{C.shard_stem(i)}.npy", mmap_mode="r")
            if len(self._shards) >= _OPEN_SHARDS:
                self._shards.popitem(last=False)
        self._shards[i] = arr
        return arr

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        shard, row = self._index[i]
        return torch.from_numpy(np.array(self._shard(int(shard))[row])), int(self.labels[i])

    def get_batch(self, indices, shared: bool = False) -> tuple:
        """(uint8 [B, 3, S, S], int64 [B]) for the images at `indices`, in that order. shared=True: in a
        DataLoader worker, gathered straight into shared memory (for a batch sent on as is: raw=True)."""
        idx = np.asarray(indices, dtype=np.int64)
        shape = (len(idx), 3, self.image_size, self.image_size)
        images = P._output(shape, torch.uint8) if shared else torch.empty(shape, dtype=torch.uint8)
        out = images.numpy()
        for j, i in enumerate(idx):
            shard, row = self._index[i]
            out[j] = self._shard(int(shard))[row]
        return images, torch.from_numpy(self.labels[idx].astype(np.int64))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of 0..n-1 used in epoch `epoch` of a run seeded `seed` (int64 [n])."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, STREAM_SHUFFLE))
    return torch.randperm(n, generator=g)


def eval_order(size: int, n: int) -> torch.Tensor:
    """The images an evaluation of n of a split's `size` images reads, in this order (int64 [n]):
    all of them (n = size), else n spread evenly over the split (image i * size // n). Caches are
    class-sorted, so the first n images would be the first classes only; spread evenly, a capped
    evaluation samples every class in proportion to its images."""
    if not 0 < n <= size:
        raise ValueError(f"evaluating {n} of {size} images: need 0 < n <= {size}")
    return torch.arange(n, dtype=torch.int64) * size // n


@dataclass(frozen=True)
class LoaderSpec:
    """Which batches make_loader yields: the same tensors however many workers build them.

    split, batch_size; seed, epoch: the training shuffle and augmentation; train=True: shuffled and
    augmented, False: in cache order, the centre patch or (ten_patches=True) the ten patches.
    drop_last (None: True when training) drops the epoch's last partial batch. start_batch: resume
    inside the epoch. share=(offset, n): of each batch only rows offset..offset+n-1 (a data-parallel
    replica's slice; the epoch's batches and augmentations are the whole batch's). Evaluation only:
    images=n reads n of the split's images spread evenly over it (eval_order; 0: all, in cache
    order), and rows=(lo, hi) only positions lo..hi-1 of those (one replica's shard of the
    validation set).
    """

    split: str = "train"
    batch_size: int = 128
    seed: int = 0
    epoch: int = 0
    train: bool = True
    start_batch: int = 0
    ten_patches: bool = False
    drop_last: bool | None = None
    share: tuple | None = None
    rows: tuple | None = None
    images: int = 0


class _Batches(Dataset):
    """Item k = the finished batch k of one epoch (the DataLoader sees whole batches)."""

    def __init__(self, ds: PackedDataset, order: torch.Tensor, n_batches: int, spec: LoaderSpec, cfg: DataConfig,
                 raw: bool = False):
        self.ds, self.order, self.batch_size, self.n_batches = ds, order, spec.batch_size, n_batches
        self.seed, self.epoch, self.train, self.ten = spec.seed, spec.epoch, spec.train, spec.ten_patches
        self.cfg, self.raw, self.share = cfg, raw, spec.share

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, k: int):
        lo = k * self.batch_size
        hi = min(lo + self.batch_size, len(self.order))
        if self.share is not None:  # only rows [offset, offset + rows) of the batch (one replica's)
            offset, rows = self.share
            lo, hi = lo + offset, min(lo + offset + rows, hi)
        images, labels = self.ds.get_batch(self.order[lo:hi].numpy(), shared=self.raw)
        mean = self.ds.mean
        if self.raw:  # the device input path augments on the model's device (device_input.py)
            if not self.train:
                return images, labels
            return images, labels, P.sample_params(self.seed, self.epoch, range(lo, hi), self.cfg, self.ds.image_size)
        if self.train:
            params = P.sample_params(self.seed, self.epoch, range(lo, hi), self.cfg, self.ds.image_size)
            x = P.train_batch(images, params, mean, self.ds.eigvals, self.ds.eigvecs, self.cfg)
        else:
            x = P.eval_batch(images, mean, self.cfg, ten=self.ten)
        return x.contiguous(), labels


class BatchLoader:
    """Iterable of (float32 images, int64 labels) for one epoch, from batch `start_batch` on.

    len() is the number of batches it yields; `num_batches` the epoch's total; `dataset` the
    PackedDataset (classes, mean, eigvals, eigvecs).
    """

    def __init__(self, batches: _Batches, start_batch: int, workers: int, pin_memory: bool):
        self.dataset, self.start_batch, self.num_batches = batches.ds, start_batch, batches.n_batches
        self._loader = DataLoader(batches, batch_size=None, sampler=range(start_batch, batches.n_batches),
                                  num_workers=workers, pin_memory=pin_memory,
                                  prefetch_factor=2 if workers else None)

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def __iter__(self):
        return iter(self._loader)


def make_loader(cache_dir, spec: LoaderSpec, cfg: DataConfig | None = None, workers: int | None = None,
                pin_memory: bool = False, dataset: PackedDataset | None = None, raw: bool = False) -> BatchLoader:
    """The batches `spec` names of the cache (§4.1), augmented per cfg.

    Training: float32 [B, 3, 224, 224]; evaluation: the centre patch [B, 3, 224, 224] or the ten
    patches [B, 10, 3, 224, 224]. All mean-subtracted, 0..255 scale. Labels int64 [B]. workers:
    DataLoader processes (default cfg.workers); results are bitwise the same for any number.
    dataset: an already opened PackedDataset of that split, to save re-reading. raw=True: the
    batches as cached, not yet augmented: (uint8 [B, 3, S, S], labels, AugmentParams) when
    training, (uint8, labels) otherwise; device_input.DeviceBatches finishes them on a GPU.
    """
    cfg = cfg or DataConfig()
    ds = dataset if dataset is not None else PackedDataset(cache_dir, spec.split)
    if cfg.mean_file:
        ds = ds.with_mean(cfg.mean_file)
    if cfg.crop_size > ds.image_size:
        raise ValueError(f"crop_size {cfg.crop_size} is larger than the cache's images ({ds.image_size})")
    n_batches, order = _epoch_batches(spec, len(ds))
    batches = _Batches(ds, order, n_batches, spec, cfg, raw)
    return BatchLoader(batches, spec.start_batch, cfg.workers if workers is None else workers, pin_memory)


def _epoch_batches(spec: LoaderSpec, size: int) -> tuple:
    """(the number of batches in the epoch, the order of the images they read) for a split of `size`
    images; a ValueError for a spec that does not fit."""
    batch_size, share, rows, images, train = spec.batch_size, spec.share, spec.rows, spec.images, spec.train
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if share is not None and not (0 <= share[0] and share[1] >= 1 and share[0] + share[1] <= batch_size):
        raise ValueError(f"share {share}: rows outside a batch of {batch_size}")
    if (rows is not None or images) and train:
        raise ValueError("rows, images: evaluation only (a training replica takes a share of every batch)")
    n = (images or size) if rows is None else rows[1] - rows[0]
    drop_last = train if spec.drop_last is None else spec.drop_last
    n_batches = n // batch_size if drop_last else -(-n // batch_size)
    if not 0 <= spec.start_batch <= n_batches:
        raise ValueError(f"start_batch {spec.start_batch} outside 0..{n_batches} (batches in this epoch)")
    lo = rows[0] if rows else 0
    order = epoch_order(n, spec.seed, spec.epoch) if train else (
        eval_order(size, images) if images else torch.arange(size))[lo:lo + n]
    return n_batches, order
