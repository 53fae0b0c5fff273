"""The CIFAR-10 python archive as distributed (cifar-10-python.tar.gz), prepared straight into the cache.

What it reads (https://www.cs.toronto.edu/~kriz/cifar.html, "CIFAR-10 python version"): a gzip'd tar
holding cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta, readme.html}. Each batch is a
pickle written by Python 2 (cPickle): a dict with bytes keys, b"data" a numpy uint8 array
[10000, 3072] whose rows are the R, G and B planes of a 32x32 image, each plane row-major, and
b"labels" a list of 10000 ints. batches.meta holds b"label_names" (label i's name is entry i).

What it writes: the cache of cache.py, exactly as folder preparation writes it (shards.py's
shard plan, statistics and assemble), with train = data_batch_1..5 in that order (50,000 images) and
val = test_batch (10,000). files.txt names every image by member and row (`data_batch_3#17`).
At image_size 32 the native pixels are kept bit for bit; any other size resizes each (square) image
with Pillow and cfg.resample, and says so in the report. A test_batch missing from the archive is an
error, not a train-only cache: the official archive always has it, so its absence means a damaged copy.

Pickle runs code named by the file, so the members are unpickled with an Unpickler that resolves
only the few globals a numpy array needs (safe_pickle.py) and refuses every other one, naming it
and the member, before anything is called. Members are read from the tar in archive order, never
extracted to disk, and the whole archive is checked (gzip CRC, length) before the cache is touched:
a bad archive leaves the output folder as it was.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cache as C
from . import stats as S
from .config import DataConfig, DataError
from .decode import RESAMPLE
from .progress import Progress
from .safe_pickle import unpickle
from .shards import assemble, shard_settings, shard_size_for

log = logging.getLogger(__name__)

SOURCE = "cifar-10 python archive"
META = "batches.meta"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
SPLIT_MEMBERS = {"train": TRAIN_BATCHES, "val": (TEST_BATCH,)}
NATIVE_SIZE = 32
PIXELS = 3 * NATIVE_SIZE * NATIVE_SIZE  # one row of b"data": R plane, G plane, B plane
CIFAR100_MEMBERS = {"meta", "train", "test"}  # cifar-100-python/: a different layout, not read here
# An official batch is about 31 MB; a member far larger is not one, and is not read into memory.
MAX_MEMBER_BYTES = 1 << 30


# ---- reading the archive ----------------------------------------------------------------------------
def _basename(member: tarfile.TarInfo) -> str:
    return posixpath.basename(member.name.rstrip("/"))


def is_cifar_archive(path) -> bool:
    """True when `path` is a regular file holding a tar archive (plain, gzip, bzip2, xz) with a
    `*/batches.meta` member. Stops at that member; never raises (a broken archive is just False)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with tarfile.open(path, "r:*") as tar:
            return any(m.isfile() and _basename(m) == META for m in tar)
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return False


def _open(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except tarfile.ReadError:
        raise DataError(f"{path}: not a tar archive (plain, gzip, bzip2 or xz); expected a folder of class "
                        f"folders or the CIFAR-10 python archive cifar-10-python.tar.gz") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read it as an archive: {e}") from None


def _read_members(path: Path) -> tuple:
    """({basename: unpickled object}, {basename: member name}, [names of the other members]).

    One pass in archive order (a gzip stream is never rewound); each member is unpickled as soon as
    it is read, so at most one raw member is in memory. Then the rest of the stream is drained, so
    gzip checks its CRC and length: a truncated or corrupted download fails here, by name."""
    wanted = {META, *TRAIN_BATCHES, TEST_BATCH}
    objects, where, others = {}, {}, []
    with _open(path) as tar:
        try:
            for m in tar:
                base = _basename(m)
                if not m.isfile():
                    continue
                if base not in wanted:
                    others.append(m.name)
                    continue
                if base in objects:
                    raise DataError(f"{path}: two members named {base}: {where[base]} and {m.name}")
                if m.size > MAX_MEMBER_BYTES:
                    raise DataError(f"{path}: {m.name}: {m.size:,} bytes, far more than a CIFAR-10 batch")
                objects[base] = unpickle(tar.extractfile(m).read(), f"{path}: {m.name}")
                where[base] = m.name
            while tar.fileobj.read(1 << 20):
                pass
        except (EOFError, tarfile.ReadError) as e:
            raise DataError(f"{path}: truncated: the archive ends early ({e}); download it again") from None
        except (OSError, zlib.error) as e:
            raise DataError(f"{path}: corrupt archive ({e}); download it again") from None
    return objects, where, others


def _check_members(path: Path, objects: dict, others: list) -> None:
    """Every member CIFAR-10's archive has; CIFAR-100's archive named as such."""
    bases = {posixpath.basename(n) for n in others}
    if META not in objects and CIFAR100_MEMBERS <= bases:
        raise DataError(f"{path}: a CIFAR-100 python archive (train, test, meta); only CIFAR-10's python "
                        f"archive (cifar-10-python.tar.gz) is supported")
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH, META) if n not in objects]
    if missing:
        raise DataError(f"{path}: no member */{', */'.join(missing)} (the CIFAR-10 python archive holds "
                        f"cifar-10-batches-py/data_batch_1..5, test_batch and batches.meta)")


def _str_keys(obj, where: str) -> dict:
    """A pickled dict with its Python 2 byte-string keys as str."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: holds a {type(obj).__name__}, expected a dict (a CIFAR-10 batch)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _label_names(obj, where: str) -> list:
    names = _str_keys(obj, where).get("label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{where}: no label_names list")
    try:
        names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: a label name is not UTF-8 text ({e})") from None
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise DataError(f"{where}: label_names must be distinct non-empty names, got {names!r}")
    return names


def _describe(x) -> str:
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__


def _batch(obj, where: str, n_classes: int) -> tuple:
    """(uint8 [N, 3, 32, 32] RGB, int64 [N] labels) of one batch, after checking what it holds."""
    d = _str_keys(obj, where)
    data, labels = d.get("data"), d.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == PIXELS):
        raise DataError(f"{where}: data is {_describe(data)}, expected uint8 [N, {PIXELS}] "
                        f"(the R, G, B planes of a {NATIVE_SIZE}x{NATIVE_SIZE} image per row)")
    n = data.shape[0]
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise DataError(f"{where}: labels is {_describe(labels)}, expected a list of {n} ints")
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"{where}: labels is {_describe(arr)}, expected a list of {n} ints")
    if len(arr) != n:
        raise DataError(f"{where}: {len(arr)} labels for {n} images")
    if n and arr.dtype.kind not in "iu":
        raise DataError(f"{where}: labels are {arr.dtype}, expected ints")
    bad = np.flatnonzero((arr < 0) | (arr >= n_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{where}: label {int(arr[i])} of image {i} is outside 0..{n_classes - 1} "
                        f"({n_classes} label_names in {META})")
    # Each row is R, G, B planes, row-major: exactly the cache's channel-first [3, 32, 32].
    return data.reshape(n, 3, NATIVE_SIZE, NATIVE_SIZE), arr.astype(np.int64)


@dataclass
class Split:
    """One split of the archive: its images in member order and where each came from."""

    images: np.ndarray  # uint8 [N, 3, 32, 32]
    labels: np.ndarray  # int64 [N]
    files: list  # "data_batch_1#0", ...: member and row of each image
    members: list = field(default_factory=list)


@dataclass
class Contents:
    classes: list
    splits: dict  # {"train": Split, "val": Split}
    others: list  # member names not read (readme.html)


def _join(members, checked: dict) -> Split:
    """One split from its checked batches, in member order. Each batch is dropped once copied, so
    memory peaks near one copy of the data set, not two."""
    n = sum(len(checked[m][0]) for m in members)
    images = np.empty((n, 3, NATIVE_SIZE, NATIVE_SIZE), dtype=np.uint8)
    labels, files, lo = [], [], 0
    for m in members:
        data, lab = checked.pop(m)
        images[lo:lo + len(data)] = data
        labels.append(lab)
        files += [f"{m}#{r}" for r in range(len(data))]
        lo += len(data)
    return Split(images, np.concatenate(labels), files, list(members))


def read_archive(path) -> Contents:
    """Read and check the whole CIFAR-10 python archive at `path`; DataError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not a file (expected the CIFAR-10 python archive cifar-10-python.tar.gz)")
    objects, where, others = _read_members(path)
    _check_members(path, objects, others)
    classes = _label_names(objects[META], f"{path}: {where[META]}")
    # Every batch is checked before any is copied: a bad one is found at once, whatever its place.
    checked = {m: _batch(objects.pop(m), f"{path}: {where[m]}", len(classes)) for m in (*TRAIN_BATCHES, TEST_BATCH)}
    splits = {split: _join(members, checked) for split, members in SPLIT_MEMBERS.items()}
    if not len(splits["train"].images):
        raise DataError(f"{path}: the training batches hold no image")
    return Contents(classes, splits, others)


# ---- packing ---------------------------------------------------------------------------------------
def resize(images: np.ndarray, size: int, resample: str) -> np.ndarray:
    """uint8 [n, 3, 32, 32] -> [n, 3, size, size], each image resized by Pillow (they are square, so
    shorter side -> size and the central crop of decode.py is the whole image)."""
    if size == NATIVE_SIZE:
        return images
    from PIL import Image  # here: only a resize (image_size != 32) needs it

    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB")
        out[i] = np.asarray(pil.resize((size, size), RESAMPLE[resample])).transpose(2, 0, 1)
    return out


def _archive_id(src: Path) -> str:
    st = src.stat()
    return f"{src.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"


def _pack(out: Path, split: str, index: int, part: Split, lo: int, hi: int, key: str, cfg: DataConfig) -> dict:
    """Write shard `index` of `split` (images lo..hi-1) as pack_shard does: .npy, (train) .stats.npz,
    then .json last. Returns its meta."""
    arr = resize(part.images[lo:hi], cfg.image_size, cfg.resample)
    files = part.files[lo:hi]
    # Per image, like folder preparation's "upscaled from WxH": a larger cache is not the native data.
    notes = [{"file": f, "note": f"upscaled from {NATIVE_SIZE}x{NATIVE_SIZE}"} for f in files] \
        if cfg.image_size > NATIVE_SIZE else []
    folder, stem = out / split, C.shard_stem(index)
    C.write_npy(folder / f"{stem}.npy", np.ascontiguousarray(arr))
    if split == "train":
        C.write_npz(folder / f"{stem}.stats.npz", **S.shard_stats(arr))
    meta = {"key": key, "split": split, "shard": index, "count": hi - lo,
            "labels": part.labels[lo:hi].tolist(), "files": files, "skipped": [], "notes": notes}
    C.write_json(folder / f"{stem}.json", meta)
    return meta


def _key(settings: dict, archive: str, split: str, index: int, lo: int, hi: int) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(f"\0{archive}\0{split}\0{index}\0{lo}\0{hi}".encode())
    return h.hexdigest()


def _report(src: Path, out: Path, contents: Contents, metas: dict, status: str, notes: list) -> dict:
    """report.json, with folder preparation's keys per split (preparation._report)."""
    splits = {}
    for split, part in contents.splits.items():
        ms = [m for (sp, _), m in sorted(metas.items()) if sp == split]
        counts = np.bincount(part.labels, minlength=len(contents.classes))
        splits[split] = {
            "files": len(part.files),
            "packed": sum(m["count"] for m in ms),
            "skipped": [],
            "notes": [c for m in ms for c in m["notes"]],
            "ignored": [{"file": n, "reason": "not a CIFAR-10 batch"} for n in contents.others]
            if split == "train" else [],
            "empty_classes": [c for c, k in zip(contents.classes, counts) if k == 0],
            "members": part.members,
        }
    return {"status": status, "src": str(src.resolve()), "out": str(out.resolve()), "source": SOURCE,
            "notes": notes, "splits": splits}


def _notes(src: Path, contents: Contents, cfg: DataConfig) -> list:
    """The report's notes on the whole archive; an unexpected class order is also warned about."""
    notes = []
    if contents.classes != sorted(contents.classes):
        notes.append(f"label_names of {META} are not in sorted order; class index = label as in the archive "
                     f"(a folder of class folders would number them in sorted order)")
        log.warning("prepare: %s: %s", src, notes[-1])
    if cfg.image_size != NATIVE_SIZE:
        notes.append(f"every image resized from {NATIVE_SIZE}x{NATIVE_SIZE} to {cfg.image_size}x{cfg.image_size} "
                     f"with Pillow ({cfg.resample})")
    return notes


def prepare_archive(src, out, cfg: DataConfig | None = None, progress: bool = True) -> dict:
    """Prepare the CIFAR-10 python archive `src` into the cache `out`; returns the report (report.json).

    The archive is read and checked in full first (DataError naming the file and member otherwise),
    then every shard is written; there is nothing to resume (a rerun redoes it in seconds), so
    cfg.prepare_workers, strict, max_bad_fraction and max_image_pixels do not apply.
    """
    cfg = cfg or DataConfig()
    src, out = Path(src), Path(out)
    contents = read_archive(src)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    C.remove_temporaries(out)
    (out / C.CACHE_JSON).unlink(missing_ok=True)  # from here until the end the cache is incomplete
    # A folder preparation's record of shards that are about to be replaced: never valid again.
    (out / C.MANIFEST).unlink(missing_ok=True)
    notes = _notes(src, contents, cfg)

    settings, archive = shard_settings(cfg), _archive_id(src)
    metas, shards = {}, {}
    bar = Progress(sum(len(s.files) for s in contents.splits.values()), progress)
    try:
        for split, part in contents.splits.items():
            (out / split).mkdir(exist_ok=True)
            n = len(part.files)
            step = shard_size_for(n, cfg.shard_size)
            shards[split] = -(-n // step)
            for i, lo in enumerate(range(0, n, step)):
                hi = min(lo + step, n)
                metas[(split, i)] = _pack(out, split, i, part, lo, hi, _key(settings, archive, split, i, lo, hi), cfg)
                bar.update(hi - lo, f"{split}/{C.shard_stem(i)}")
    except KeyboardInterrupt:
        C.write_json(out / C.REPORT_JSON, _report(src, out, contents, metas, "interrupted", notes))
        log.warning("prepare: interrupted; rerun the same command (an archive is prepared again from the start)")
        raise
    finally:
        bar.close()

    info = assemble(src, out, cfg, contents.classes, shards, metas)
    info["source"] = SOURCE
    report = _report(src, out, contents, metas, "complete", notes)
    C.write_json(out / C.REPORT_JSON, report)
    C.write_json(out / C.CACHE_JSON, info)  # last: the cache is complete
    for split, r in report["splits"].items():
        log.info("prepare: %s: %d images packed from %s", split, r["packed"], ", ".join(r["members"]))
    log.info("prepare: cache ready in %s (report: %s)", out, out / C.REPORT_JSON)
    return report
