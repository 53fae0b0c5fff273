"""Which cache a run reads: the folder it names, prepared once if it is not a cache yet, or the
built-in synthetic set (synth.py) when no data is configured.

    resolve_data(DataConfig)               (cache folder, description) for a run's data config
    ensure_cache(ROOT_OR_CACHE, WORK_DIR)  a complete cache for a folder, an archive or a cache
    data_home()                            $SPLITNET_DATA (default runs/data): the synthetic set, caches
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from . import cache as C
from . import preparation as P  # P.prepare at call time: tests replace it to check a cache is reused
from .config import DataConfig
from .synth import make_synthetic

log = logging.getLogger(__name__)


def data_home() -> Path:
    """Where the built-in data set and caches live: $SPLITNET_DATA, default runs/data."""
    return Path(os.environ.get("SPLITNET_DATA", "runs/data"))


def resolve_data(dcfg: DataConfig) -> tuple:
    """(cache folder, description). No data configured: the built-in synthetic set (generated once)."""
    home = data_home()
    if dcfg.root:
        return ensure_cache(dcfg.root, home, dcfg), f"{dcfg.root}"
    root = make_synthetic(home / "synthetic")
    return ensure_cache(root, home, dcfg), "built-in synthetic set (splitnet data synth, seed 0)"


def ensure_cache(data_root_or_cache, work_dir, cfg: DataConfig | None = None) -> Path:
    """A complete cache for `data_root_or_cache`, preparing it if needed; returns the cache folder.

    A cache (has cache.json): used as it is. A folder of class folders (has train/), or the CIFAR-10
    python archive (a file, archive.py): prepared into cfg.cache, or WORK/cache/<name>-<hash>; a
    complete cache there from the same source and image_size is reused without reading the source
    again (`splitnet data prepare` re-checks a folder for changes), an unfinished one is resumed
    (an archive is prepared again: there is nothing to resume).
    """
    cfg = cfg or DataConfig()
    path = Path(data_root_or_cache)
    if C.is_cache(path):
        C.read_info(path)
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder (expected a prepared cache, ROOT/train/<class>/* "
                                f"or the CIFAR-10 python archive)")
    if not path.is_file() and not (path / "train").is_dir():
        if (path / C.MANIFEST).exists():
            C.read_info(path)  # raises the "unfinished preparation" error
        raise FileNotFoundError(f"{path}: neither a prepared cache ({C.CACHE_JSON}) nor a folder of class "
                                f"folders ({path / 'train'} missing)")
    out = Path(cfg.cache) if cfg.cache else C.default_cache_dir(path, work_dir)
    if C.is_cache(out):
        info = C.read_info(out)
        same_resize = info.get("settings", {}).get("resize", "shorter") == cfg.resize
        if info.get("src") == str(path.resolve()) and info.get("image_size") == cfg.image_size and same_resize:
            log.info("data: using the prepared cache %s", out)
            return out
    log.info("data: preparing %s into %s (once; later runs reuse it)", path, out)
    P.prepare(path, out, cfg=cfg)  # a file goes to archive.prepare_archive
    return out
