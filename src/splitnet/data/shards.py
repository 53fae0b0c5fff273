"""What folder preparation (preparation.py) and the CIFAR-10 archive (archive.py) share: the shard
plan, the settings a shard's content depends on, and assembling the finished shards into the
cache (cache.py's layout).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from . import cache as C
from . import stats as S
from .config import DataConfig, DataError

log = logging.getLogger(__name__)

# Small sets get smaller shards (at least 64 shards per split, never below 32 images) so every core
# has work; the rule depends on the set's size only, never on the machine.
MIN_SHARDS, MIN_SHARD_SIZE = 64, 32


def shard_size_for(n_files: int, shard_size: int) -> int:
    return max(1, min(shard_size, max(MIN_SHARD_SIZE, math.ceil(n_files / MIN_SHARDS))))


def shard_settings(cfg: DataConfig) -> dict:
    """What a shard's content depends on besides its files; part of every shard key."""
    out = {"format": C.FORMAT_VERSION, "image_size": cfg.image_size, "resample": cfg.resample,
           "max_image_pixels": cfg.max_image_pixels}
    if cfg.resize != "shorter":  # only then: the keys of caches prepared before `resize` existed hold
        out["resize"] = cfg.resize
    return out


# ---- the cache from finished shards ---------------------------------------------------------------
def assemble(src: Path, out: Path, cfg: DataConfig, classes: list, shards: dict, metas: dict) -> dict:
    """Per split: labels.npy, index.npy, files.txt; training statistics; classes.json. Returns cache.json.

    shards: {split: number of shards}, shard i's meta in metas[(split, i)] and its files written
    (pack_shard's layout). Shared by folder preparation and archive.py (the CIFAR-10 archive)."""
    splits = {}
    total = S.empty_stats(cfg.image_size)
    for split, n_shards in shards.items():
        folder = out / split
        labels, index, files, counts = [], [], [], []
        for i in range(n_shards):
            m = metas[(split, i)]
            labels += m["labels"]
            files += m["files"]
            index += [(i, r) for r in range(m["count"])]
            counts.append(m["count"])
            if split == "train":
                with np.load(folder / f"{C.shard_stem(i)}.stats.npz") as z:
                    total = S.add(total, {k: z[k] for k in total})
        C.write_npy(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
        C.write_npy(folder / "index.npy", np.asarray(index, dtype=np.int64).reshape(-1, 2))
        C.atomic_write(folder / "files.txt", "".join(f + "\n" for f in files).encode())
        for p in folder.glob("shard-*"):  # shards of an earlier, longer plan
            if int(p.name.split(".")[0][len("shard-"):]) >= n_shards:
                p.unlink()
        splits[split] = {"count": len(labels), "shards": counts}
    if total["count"] == 0:
        raise DataError(f"{src / 'train'}: no readable training image; see {out / C.REPORT_JSON}")
    st = S.finalize(total)
    C.write_npy(out / C.MEAN_NPY, st["mean_image"])
    C.write_json(out / C.STATS_JSON, {
        "units": "0..255 pixel values; covariance over every pixel of every packed training image",
        "images": st["count"], "rgb_mean": st["rgb_mean"].tolist(), "rgb_cov": st["rgb_cov"].tolist(),
        "eigvals": st["eigvals"].tolist(), "eigvecs": st["eigvecs"].tolist(),
        "eigvecs_layout": "columns: eigvecs[:, i] is the eigenvector of eigvals[i]"})
    C.write_json(out / C.CLASSES_JSON, classes)
    return {"format": C.FORMAT_VERSION, "src": str(src.resolve()), "image_size": cfg.image_size,
            "array_layout": "uint8 [n, 3, H, W], RGB", "classes": len(classes), "settings": shard_settings(cfg),
            "splits": splits}
