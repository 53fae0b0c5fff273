"""`splitnet data prepare`: decode every image once into the cache that training reads (§2).

Plan: list the source (folders.py), cut each split's sorted file list into shards, pack each shard
in a worker process (decode.py: shorter side -> 256, central 256x256, uint8), then assemble the
index, the labels, the training statistics (stats.py) and report.json. See cache.py for the layout.

Resumable: a shard is identified by a key (hash of the preparation settings and of its files' names,
labels, sizes and mtimes). Each finished shard is written atomically and then recorded in
manifest.jsonl; a rerun with the same source and settings skips every shard whose key is recorded
and whose files are intact, and redoes the others (new, changed, interrupted). Interrupting
(Ctrl-C) loses at most the shards in flight.

Bad input never stops the run silently or loses work: unreadable files (corrupt, or a broken link,
found while listing) are skipped and listed with their reason; more than `max_bad_fraction` of a split
unreadable stops with an error naming the first ones (report.json is still written); `strict` stops
at the first one. Links not followed (loops, second links) and hidden entries are listed too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import config as _config
from . import cache as C
from . import stats as S
from .archive import prepare_archive
from .config import DataConfig, DataError
from .decode import BadImage, load_image
from .folders import list_source
from .progress import Progress
from .shards import assemble, shard_settings, shard_size_for

log = logging.getLogger(__name__)

# report.json lists at most this many hidden paths per split (a folder of macOS ._ files can hold
# as many as there are images); the count is always exact.
HIDDEN_LISTED = 100


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    files: tuple  # ((rel, label), ...)
    key: str
    src: str
    out: str
    size: int
    resample: str
    max_pixels: int
    strict: bool
    resize: str = "shorter"


def _key(settings: dict, split: str, files) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(split.encode())
    for f in files:
        h.update(f"\0{f.rel}\0{f.label}\0{f.size}\0{f.mtime_ns}".encode())
    return h.hexdigest()


# ---- one shard, in a worker process --------------------------------------------------------------
def pack_shard(task: ShardTask) -> dict:
    """Decode and pack one shard; write .npy, (train) .stats.npz, then .json, each atomically."""
    size = task.size
    arr = np.empty((len(task.files), 3, size, size), dtype=np.uint8)
    labels, files, skipped, notes_ = [], [], [], []
    for rel, label in task.files:
        try:
            img, notes = load_image(Path(task.src) / rel, size, task.resample, task.max_pixels, task.resize)
        except BadImage as e:
            if task.strict:
                raise DataError(f"{Path(task.src) / rel}: {e} (strict: stopped at the first unreadable file)") from None
            skipped.append({"file": rel, "reason": str(e)})
            continue
        arr[len(labels)] = img
        labels.append(label)
        files.append(rel)
        if notes:
            notes_.append({"file": rel, "note": "; ".join(notes)})
    arr = arr[:len(labels)]
    folder = Path(task.out) / task.split
    stem = C.shard_stem(task.index)
    C.write_npy(folder / f"{stem}.npy", arr)
    if task.split == "train":
        C.write_npz(folder / f"{stem}.stats.npz", **S.shard_stats(arr))
    meta = {"key": task.key, "split": task.split, "shard": task.index, "count": len(labels), "labels": labels,
            "files": files, "skipped": skipped, "notes": notes_}
    C.write_json(folder / f"{stem}.json", meta)  # last: a meta file with this key means the shard is whole
    return meta


def _ignore_sigint():
    # Ctrl-C goes to the whole process group; only the parent should handle it (and stop the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- resumption ----------------------------------------------------------------------------------
def _read_manifest(out: Path) -> dict:
    done = {}
    path = out / C.MANIFEST
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[(rec["split"], rec["shard"])] = rec["key"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interruption: that shard is simply redone
    return done


def _finished_meta(out: Path, task: ShardTask, recorded: dict):
    """The shard's meta if it is recorded with this key and its files are intact; else None."""
    if recorded.get((task.split, task.index)) != task.key:
        return None
    folder, stem = out / task.split, C.shard_stem(task.index)
    try:
        meta = json.loads((folder / f"{stem}.json").read_text())
        n = np.load(folder / f"{stem}.npy", mmap_mode="r").shape[0]
        if task.split == "train" and not (folder / f"{stem}.stats.npz").is_file():
            return None
    except (OSError, ValueError):
        return None
    return meta if meta.get("key") == task.key and meta.get("count") == n else None


def _record(out: Path, meta: dict) -> None:
    with open(out / C.MANIFEST, "a") as f:
        f.write(json.dumps({"split": meta["split"], "shard": meta["shard"], "key": meta["key"],
                            "count": meta["count"]}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _workers(n: int) -> int:
    if n:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run(tasks: list, workers: int, on_done) -> None:
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            on_done(pack_shard(t))
        return
    with multiprocessing.get_context().Pool(min(workers, len(tasks)), initializer=_ignore_sigint) as pool:
        # Leaving the `with` on any exception (an error, Ctrl-C) terminates the workers at once;
        # the shards they had in flight are redone on resume, finished ones are kept.
        for meta in pool.imap_unordered(pack_shard, tasks, chunksize=1):
            on_done(meta)


# ---- the whole preparation -------------------------------------------------------------------------
def prepare(src, out, cfg: DataConfig | None = None, *, workers: int | None = None, strict: bool | None = None,
            max_bad_fraction: float | None = None, shard_size: int | None = None, image_size: int | None = None,
            max_image_pixels: int | None = None, progress: bool = True) -> dict:
    """Prepare the class folders under `src` into the cache `out` (§2); returns the report (report.json).

    `src` may also be the CIFAR-10 python archive (cifar-10-python.tar.gz): archive.prepare_archive.

    Keyword arguments override the matching DataConfig fields (workers -> prepare_workers).
    Raises FileNotFoundError (no src/train), DataError (a val class unknown to train, too many
    unreadable files, strict and an unreadable file, no readable training image).
    """
    cfg = cfg or DataConfig()
    overrides = {"prepare_workers": workers, "strict": strict, "max_bad_fraction": max_bad_fraction,
                 "shard_size": shard_size, "image_size": image_size, "max_image_pixels": max_image_pixels}
    cfg = _config.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    src, out = Path(src), Path(out)
    if src.is_file():
        # A file can only be an archive. Every file goes to archive.py, not just those is_cifar_archive
        # accepts, so a truncated or foreign one gets its exact fault rather than "not a folder".
        return prepare_archive(src, out, cfg, progress=progress)
    classes, listings = _open(src, out)
    plans = _plan(src, out, cfg, listings)
    metas, todo = _resume(out, plans)
    _pack_all(src, out, cfg, listings, plans, metas, todo, progress)
    return _finish(src, out, cfg, classes, listings, plans, metas)


def _open(src: Path, out: Path):
    """(classes, listings) of the source folder; the cache folder made, and marked incomplete."""
    if C.is_cache(src):
        raise DataError(f"{src}: already a prepared cache; pass it to training as it is")
    classes, listings = list_source(src)
    for inner in (src / "train", src / "val"):
        if out.resolve().is_relative_to(inner.resolve()):
            raise DataError(f"{out}: the cache cannot live inside the source folder {inner}")
    out.mkdir(parents=True, exist_ok=True)
    C.remove_temporaries(out)
    (out / C.CACHE_JSON).unlink(missing_ok=True)  # from here until the end the cache is incomplete
    return classes, listings


def _plan(src: Path, out: Path, cfg: DataConfig, listings: dict) -> dict:
    """{split: [ShardTask, ...]}: each split's sorted file list cut into shards."""
    settings = shard_settings(cfg)
    plans = {}
    for split, listing in listings.items():
        (out / split).mkdir(exist_ok=True)
        step = shard_size_for(len(listing.files), cfg.shard_size)
        chunks = [listing.files[i:i + step] for i in range(0, len(listing.files), step)]
        plans[split] = [ShardTask(split, i, tuple((f.rel, f.label) for f in ch), _key(settings, split, ch),
                                  str(src.resolve()), str(out.resolve()), cfg.image_size, cfg.resample,
                                  cfg.max_image_pixels, cfg.strict, cfg.resize) for i, ch in enumerate(chunks)]
        _warn_listing(listing)
    if "val" not in listings:
        log.warning("prepare: %s has no val/ folder: the cache will have a training split only", src)
    return plans


def _resume(out: Path, plans: dict):
    """(metas of the shards already finished {(split, shard): meta}, the tasks still to do)."""
    recorded = _read_manifest(out)
    metas = {}  # (split, shard) -> meta
    todo = []
    for tasks in plans.values():
        for t in tasks:
            meta = _finished_meta(out, t, recorded)
            if meta is None:
                todo.append(t)
            else:
                metas[(t.split, t.index)] = meta
    if metas:
        log.info("prepare: resuming: %d of %d shards already finished, %d to do", len(metas), _n_shards(plans),
                 len(todo))
    return metas, todo


def _n_shards(plans: dict) -> int:
    return sum(len(v) for v in plans.values())


def _check_bad(src: Path, out: Path, cfg: DataConfig, listing, metas: dict) -> None:
    """Stop (DataError) when the split's unreadable files are more than max_bad_fraction allows, or at
    the first one under strict."""
    split = listing.split
    skipped = _skipped(listing, metas)
    if skipped and cfg.strict:
        s = skipped[0]
        raise DataError(f"{src / s['file']}: {s['reason']} (strict: stopped at the first unreadable file)")
    total = _n_files(listing)
    if len(skipped) > cfg.max_bad_fraction * total:
        first = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        raise DataError(f"{src / split}: {len(skipped)} of {total} files unreadable, more than max_bad_fraction "
                        f"{cfg.max_bad_fraction:g} allows (first: {first}); see {out / C.REPORT_JSON}")


def _pack_all(src: Path, out: Path, cfg: DataConfig, listings: dict, plans: dict, metas: dict, todo: list,
              progress: bool) -> None:
    """Pack the shards of `todo`, recording each in the manifest and in `metas` as it finishes; on an
    interruption or an error, report.json says what was finished."""
    bar = Progress(sum(len(t.files) for t in todo), progress)

    def on_done(meta: dict) -> None:
        metas[(meta["split"], meta["shard"])] = meta
        _record(out, meta)
        bar.update(len(meta["files"]) + len(meta["skipped"]), f"{meta['split']}/{C.shard_stem(meta['shard'])}")
        _check_bad(src, out, cfg, listings[meta["split"]], metas)

    try:
        for split in plans:
            _check_bad(src, out, cfg, listings[split], metas)  # reused shards count too
        _run(todo, _workers(cfg.prepare_workers), on_done)
    except KeyboardInterrupt:
        _write_report(out, src, listings, metas, "interrupted")
        log.warning("prepare: interrupted; %d of %d shards finished and kept: rerun the same command to resume",
                    len(metas), _n_shards(plans))
        raise
    except DataError as e:
        _write_report(out, src, listings, metas, f"failed: {e}")
        raise
    finally:
        bar.close()


def _finish(src: Path, out: Path, cfg: DataConfig, classes, listings: dict, plans: dict, metas: dict) -> dict:
    """Assemble the index, labels and statistics, write report.json, then cache.json (the cache is complete)."""
    info = assemble(src, out, cfg, classes, {split: len(tasks) for split, tasks in plans.items()}, metas)
    report = _write_report(out, src, listings, metas, "complete")
    C.write_json(out / C.CACHE_JSON, info)  # last: the cache is complete
    for split in plans:
        r = report["splits"][split]
        log.info("prepare: %s: %d images packed, %d skipped, %d packed with a note (converted, upscaled)", split,
                 r["packed"], len(r["skipped"]), len(r["notes"]))
    log.info("prepare: cache ready in %s (report: %s)", out, out / C.REPORT_JSON)
    return report


def _warn_listing(listing) -> None:
    """One warning line per kind of thing the listing left out, so none goes by unnoticed."""
    split = listing.split
    if listing.empty_classes:
        log.warning("prepare: %s: %d class folder(s) without images: %s", split, len(listing.empty_classes),
                    ", ".join(listing.empty_classes[:10]))
    if listing.links_skipped:
        first = listing.links_skipped[0]
        log.warning("prepare: %s: %d symbolic link(s) not followed (loops, second links, broken links), "
                    "listed in report.json; first: %s: %s", split, len(listing.links_skipped), first["file"],
                    first["reason"])
    if listing.unreadable:
        log.warning("prepare: %s: %d image(s) cannot be opened (broken links), counted as unreadable; first: %s",
                    split, len(listing.unreadable), listing.unreadable[0]["file"])


def _n_files(listing) -> int:
    """Image files of a split, the unreadable ones included: the base of max_bad_fraction."""
    return len(listing.files) + len(listing.unreadable)


def _skipped(listing, metas: dict) -> list:
    """Every unreadable file of a split: found while listing (broken links), then while packing."""
    packed = [s for (sp, _), m in sorted(metas.items()) if sp == listing.split for s in m["skipped"]]
    return listing.unreadable + packed


def _report(src, out, listings, metas, status) -> dict:
    splits = {}
    for split, listing in listings.items():
        ms = [m for (sp, _), m in sorted(metas.items()) if sp == split]
        splits[split] = {
            "files": _n_files(listing),
            "packed": sum(m["count"] for m in ms),
            "skipped": _skipped(listing, metas),
            "notes": [c for m in ms for c in m["notes"]],
            "ignored": listing.ignored,
            "empty_classes": listing.empty_classes,
            "links_skipped": listing.links_skipped,
            "hidden": {"count": len(listing.hidden), "paths": listing.hidden[:HIDDEN_LISTED]},
        }
    return {"status": status, "src": str(Path(src).resolve()), "out": str(Path(out).resolve()), "splits": splits}


def _write_report(out, src, listings, metas, status) -> dict:
    report = _report(src, out, listings, metas, status)
    C.write_json(Path(out) / C.REPORT_JSON, report)
    return report
