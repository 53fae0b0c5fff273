"""The prepared cache on disk: its layout, atomic writes, and opening it (reading side of preparation.py).

    CACHE/
      cache.json          written last: its presence means the cache is complete (format, sizes, counts)
      classes.json        ["n01440764", ...]: class index = position (sorted train folder names)
      mean.npy            float32 [3, 256, 256]: the training set's per-pixel mean image, 0..255 (§2)
      stats.json          RGB mean, 3x3 covariance, eigenvalues (descending), eigenvectors (columns),
                          all in 0..255 units, over every pixel of every packed training image (§4.1)
      report.json         per split: files listed, images packed, files skipped (with the reason),
                          notes on packed files (CMYK, grayscale, PNG named .JPEG, upscaled...),
                          files ignored (not image files, not in a class folder), empty class folders,
                          links not followed (loops, second links), hidden entries (count, paths)
      manifest.jsonl      one line per finished shard (resumption bookkeeping)
      train/ val/
        shard-00000.npy   uint8 [n, 3, 256, 256], RGB, channel-first; opened with mmap_mode="r"
        shard-00000.json  the shard's labels, source files, skipped files; and its content key
        shard-00000.stats.npz   (train) the shard's exact sums for the mean and covariance
        labels.npy        int64 [N]: label of each image, in index order
        index.npy         int64 [N, 2]: (shard, row) of each image
        files.txt         source path (relative to ROOT) of each image, one a line; from the CIFAR-10
                          archive (archive.py), member and row instead: data_batch_1#0

Every file is written to a temporary name and renamed into place (os.replace), so an interrupted
run leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from .config import DataError


FORMAT_VERSION = 1
CACHE_JSON = "cache.json"
CLASSES_JSON = "classes.json"
MEAN_NPY = "mean.npy"
STATS_JSON = "stats.json"
REPORT_JSON = "report.json"
MANIFEST = "manifest.jsonl"
TMP_MARK = ".tmp-"


def shard_stem(i: int) -> str:
    return f"shard-{i:05d}"


# ---- atomic writes -------------------------------------------------------------------------------
def atomic_write(path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync, then os.replace."""
    _atomic(path, lambda f: f.write(data))


def write_json(path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def write_npy(path, arr: np.ndarray) -> None:
    """np.save, atomically. Streams through a temp file (no second in-memory copy of a big shard)."""
    _atomic(path, lambda f: np.save(f, arr, allow_pickle=False))


def _atomic(path, write) -> None:
    """write(f) into a temporary file beside `path`, fsync, rename. A failed write (a full disk) is
    a DataError naming the file: one line, also from a preparation worker (whose OSError reached the
    user as the pool's remote traceback); the temporary goes, finished shards stay for a resume."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise DataError(f"could not write {path} ({e.strerror or e}); the shards finished so far are kept: "
                        f"make room and run the same command again to resume") from None


def write_npz(path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def remove_temporaries(folder) -> None:
    """Delete temp files a killed run left behind (their content is incomplete by construction)."""
    for p in Path(folder).rglob(f"*{TMP_MARK}*"):
        p.unlink(missing_ok=True)


# ---- reading -------------------------------------------------------------------------------------
def is_cache(path) -> bool:
    """True when `path` is a complete splitnet cache."""
    return (Path(path) / CACHE_JSON).is_file()


def read_info(path) -> dict:
    """cache.json of a complete cache; a clear error for a folder that is not one (yet)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such cache folder")
    if not is_cache(path):
        hint = (" (an unfinished preparation: rerun `splitnet data prepare` with the same --src/--out to resume)"
                if (path / MANIFEST).exists() else "")
        raise DataError(f"{path}: not a complete splitnet cache, no {CACHE_JSON}{hint}")
    info = json.loads((path / CACHE_JSON).read_text())
    if info.get("format") != FORMAT_VERSION:
        raise DataError(f"{path / CACHE_JSON}: cache format {info.get('format')!r}, this splitnet reads "
                        f"{FORMAT_VERSION}; prepare it again")
    return info


def read_classes(path) -> list:
    return json.loads((Path(path) / CLASSES_JSON).read_text())


def read_stats(path) -> dict:
    """{"mean": float32 [3,S,S], "rgb_mean", "rgb_cov", "eigvals", "eigvecs": float64 numpy arrays}."""
    path = Path(path)
    s = json.loads((path / STATS_JSON).read_text())
    out = {k: np.asarray(s[k], dtype=np.float64) for k in ("rgb_mean", "rgb_cov", "eigvals", "eigvecs")}
    out["mean"] = np.load(path / MEAN_NPY)
    return out


# ---- a cache for a run ---------------------------------------------------------------------------
def default_cache_dir(src, work_dir) -> Path:
    """WORK/cache/<name>-<hash of the absolute source path>: one cache per source, reused across runs."""
    src = Path(src).resolve()
    digest = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    return Path(work_dir) / "cache" / f"{src.name}-{digest}"


def identity(path) -> dict:
    """What a run records of its data, to tell on a resume or an eval whether the cache still holds
    it: {"images": {split: count}, "digest": sha256 hex}. The digest covers the index (classes,
    labels, source names, shard sizes), the training set's mean image and colour statistics (sums
    over every training pixel) and the first image of each shard: a cache prepared again from other
    images, even in the same number under the same names, gives another digest, without reading
    every image of a large set."""
    path = Path(path)
    info = read_info(path)
    h = hashlib.sha256(json.dumps({k: info.get(k) for k in ("image_size", "splits")}, sort_keys=True).encode())
    for name in (CLASSES_JSON, STATS_JSON, MEAN_NPY):
        h.update((path / name).read_bytes())
    for split in sorted(info["splits"]):
        for name in ("labels.npy", "files.txt"):
            h.update((path / split / name).read_bytes())
        for i in range(len(info["splits"][split]["shards"])):
            h.update(np.load(path / split / f"{shard_stem(i)}.npy", mmap_mode="r")[:1].tobytes())
    return {"images": {s: v["count"] for s, v in info["splits"].items()}, "digest": h.hexdigest()}


def identity_changes(recorded: dict, now: dict) -> str | None:
    """'train images 80 -> 60, content digest 1a2b3c4d -> 5e6f7a8b' where two identity() differ, else None."""
    if not recorded or recorded == now:
        return None
    parts = [f"{s} images {recorded['images'].get(s, 0)} -> {now['images'].get(s, 0)}"
             for s in sorted(set(recorded["images"]) | set(now["images"]))
             if recorded["images"].get(s) != now["images"].get(s)]
    if recorded["digest"] != now["digest"]:
        parts.append(f"content digest {recorded['digest'][:8]} -> {now['digest'][:8]}")
    return ", ".join(parts)
