"""Listing an ImageNet-style source folder: ROOT/train/<class>/*, ROOT/val/<class>/* (§2).

Class indices are the positions of the train folder's class names in sorted order (for ILSVRC, the
sorted WordNet ids, the usual 0..999 order). A val class that train lacks is an error naming it.
Files are listed in sorted order within each class, so the listing, and with it every shard of the
cache, is the same on every machine. Nothing is decoded here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataError

SPLITS = ("train", "val")
# Extensions taken as images (case-insensitive). Others inside class folders are listed as ignored,
# never counted as unreadable: a stray README is not a broken photo.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class SourceFile:
    """One image file to prepare: its path relative to ROOT, its label, and what identifies its content
    cheaply (size, mtime) so a resumed preparation redoes a shard whose files changed."""

    rel: str
    label: int
    size: int
    mtime_ns: int


@dataclass
class SplitListing:
    split: str
    files: list = field(default_factory=list)  # [SourceFile], sorted by class then path
    ignored: list = field(default_factory=list)  # [{"file", "reason"}]: not images, not in a class folder
    empty_classes: list = field(default_factory=list)  # class folders with no image file


def _visible(name: str) -> bool:
    return not name.startswith(".")  # .DS_Store, ._foo (macOS), .ipynb_checkpoints


def _subdirs(path: Path) -> list:
    return sorted(e.name for e in os.scandir(path) if _visible(e.name) and e.is_dir())


def list_classes(root) -> list:
    """Sorted class folder names under ROOT/train; index = class label."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(
            f"{train}: missing; expected an ImageNet-style folder ROOT/train/<class>/*.JPEG "
            f"(and optionally ROOT/val/<class>/*)")
    classes = _subdirs(train)
    if not classes:
        raise DataError(f"{train}: no class folders (expected {train}/<class>/<image files>)")
    return classes


def list_split(root, split: str, classes: list) -> SplitListing:
    """Every file of ROOT/<split>, with labels from `classes` (the train folder's sorted names)."""
    root = Path(root)
    base = root / split
    out = SplitListing(split)
    index = {c: i for i, c in enumerate(classes)}
    names = _subdirs(base)
    unknown = [c for c in names if c not in index]
    if unknown:
        raise DataError(f"{base}: class folder(s) {', '.join(repr(c) for c in unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''} not in {root / 'train'} "
                        f"(class indices come from the train folder)")
    for e in sorted(os.scandir(base), key=lambda e: e.name):
        if _visible(e.name) and not e.is_dir():
            out.ignored.append({"file": f"{split}/{e.name}", "reason": f"not inside a class folder of {split}/"})
    if not names and out.ignored:
        raise DataError(f"{base}: {len(out.ignored)} file(s) but no class folders; sort them into "
                        f"{base}/<class>/ (ILSVRC ships val/ flat, with the labels in a separate list)")
    for name in names:
        found = 0
        for dirpath, dirnames, filenames in os.walk(base / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            for fn in sorted(filenames):
                if not _visible(fn):
                    continue
                path = Path(dirpath) / fn
                rel = path.relative_to(root).as_posix()
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    out.ignored.append({"file": rel, "reason": f"extension {path.suffix or '(none)'!r} is not an image type"})
                    continue
                st = path.stat()
                out.files.append(SourceFile(rel, index[name], st.st_size, st.st_mtime_ns))
                found += 1
        if not found:
            out.empty_classes.append(name)
    return out


def list_source(root) -> tuple:
    """(classes, {split: SplitListing}) for ROOT; val is optional, train is required."""
    classes = list_classes(root)
    splits = {}
    for split in SPLITS:
        if split == "train" or (Path(root) / split).is_dir():
            splits[split] = list_split(root, split, classes)
    return classes, splits
