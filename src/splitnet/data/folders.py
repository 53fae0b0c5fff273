"""Listing an ImageNet-style source folder: ROOT/train/<class>/*, ROOT/val/<class>/* (§2).

Class indices are the positions of the train folder's class names in sorted order (for ILSVRC, the
sorted WordNet ids, the usual 0..999 order). A val class that train lacks is an error naming it.
Files are listed in sorted order within each class, so the listing, and with it every shard of the
cache, is the same on every machine. Nothing is decoded here.

Symbolic links are followed, but never blindly: every real folder is listed once per split (a link
back to a folder already listed, a loop, is not followed, and is reported), every real file is packed
once (a second link to it is reported), a broken link to an image counts as an unreadable file, and a
broken link or an unreadable folder where class folders live is an error naming it, because dropping
a class would shift the labels of the classes after it. Hidden entries are skipped and listed.
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
    unreadable: list = field(default_factory=list)  # [{"file", "reason"}]: images that cannot be opened (broken links)
    links_skipped: list = field(default_factory=list)  # [{"file", "reason"}]: loops and second links, not followed
    hidden: list = field(default_factory=list)  # paths of hidden files and folders ("/" ends a folder)


def _visible(name: str) -> bool:
    return not name.startswith(".")  # .DS_Store, ._foo (macOS), .ipynb_checkpoints


def _scan(folder: Path) -> list:
    """The entries of `folder`, sorted by name. A folder that cannot be read is an error naming it and
    the reason: reading it as empty would drop its images, or a whole class, without a word."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{folder}: cannot read this folder ({e.strerror or e}); fix its permissions "
                        f"or remove it") from None


def _broken_link(entry) -> str | None:
    """Why the symbolic link `entry` cannot be followed (missing target, a loop), or None."""
    if not entry.is_symlink():
        return None
    try:
        os.stat(entry.path)
        return None
    except OSError as e:
        return f"broken symbolic link to {os.readlink(entry.path)!r} ({e.strerror})"


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino


def _rel(root: Path, path) -> str:
    return Path(path).relative_to(root).as_posix()


def _split_entries(root: Path, split: str) -> tuple:
    """(class folder names, [{"file", "reason"}] of files outside class folders, hidden paths) of
    ROOT/<split>. A broken link here could be a class folder: an error, never a silently dropped class."""
    base = root / split
    names, stray, hidden = [], [], []
    for e in _scan(base):
        if not _visible(e.name):
            hidden.append(f"{split}/{e.name}" + ("/" if e.is_dir() else ""))
            continue
        why = _broken_link(e)
        if why:
            raise DataError(f"{base / e.name}: {why}, where {split}/ holds class folders; fix or remove it "
                            f"(skipping it could drop a class and shift the labels of the classes after it)")
        if e.is_dir():
            names.append(e.name)
        else:
            stray.append({"file": f"{split}/{e.name}", "reason": f"not inside a class folder of {split}/"})
    return names, stray, hidden


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
    classes, _, _ = _split_entries(root, "train")
    if not classes:
        raise DataError(f"{train}: no class folders (expected {train}/<class>/<image files>)")
    return classes


class _Walk:
    """One split's walk over its class folders. `dirs` and `files` map each real folder and file
    (device, inode) to where it was first listed, so a link never lists anything twice."""

    def __init__(self, root: Path, out: SplitListing):
        self.root, self.out = root, out
        self.dirs, self.files = {}, {}

    def claim_dir(self, path: Path, rel: str) -> str | None:
        """None if the real folder at `path` is new (now claimed); else where it was first listed."""
        key = _identity(os.stat(path))
        if key in self.dirs:
            return self.dirs[key]
        self.dirs[key] = rel
        return None

    def class_folder(self, folder: Path, label: int) -> int:
        """List `folder` and its subfolders (top-down, sorted, as os.walk did); returns images found."""
        found = 0
        subdirs = []
        for e in _scan(folder):
            rel = _rel(self.root, e.path)
            if not _visible(e.name):
                self.out.hidden.append(rel + ("/" if e.is_dir() else ""))
            elif e.is_dir():
                subdirs.append((e, rel))
            else:
                found += self.file(e, rel, label)
        for e, rel in subdirs:
            first = self.claim_dir(Path(e.path), rel)
            if first is not None:
                self.out.links_skipped.append({"file": rel, "reason": f"link to the folder already listed as "
                                               f"{first}/ (a loop or a second link); not followed"})
                continue
            found += self.class_folder(Path(e.path), label)
        return found

    def file(self, e, rel: str, label: int) -> int:
        """1 if `e` is an image file listed for packing, else 0 (ignored, unreadable, or seen before)."""
        suffix = Path(e.name).suffix
        image = suffix.lower() in IMAGE_EXTENSIONS
        why = _broken_link(e)
        if why and not image:  # perhaps a folder of this class: say so rather than call it a stray file
            self.out.links_skipped.append({"file": rel, "reason": f"{why}; not followed"})
            return 0
        if not image:
            self.out.ignored.append({"file": rel, "reason": f"extension {suffix or '(none)'!r} is not an image type"})
            return 0
        try:
            st = None if why else e.stat()  # follows a link: the target's size and mtime identify the content
        except OSError as err:
            why = f"cannot read it ({err.strerror})"
        if why:
            # An image that cannot be opened: counted against max_bad_fraction like a corrupt one.
            self.out.unreadable.append({"file": rel, "reason": why})
            return 0
        first = self.files.setdefault(_identity(st), rel)
        if first != rel:
            self.out.links_skipped.append({"file": rel, "reason": f"the same file as {first} (a link); packed once"})
            return 0
        self.out.files.append(SourceFile(rel, label, st.st_size, st.st_mtime_ns))
        return 1


def list_split(root, split: str, classes: list) -> SplitListing:
    """Every file of ROOT/<split>, with labels from `classes` (the train folder's sorted names)."""
    root = Path(root)
    base = root / split
    out = SplitListing(split)
    index = {c: i for i, c in enumerate(classes)}
    names, out.ignored, out.hidden = _split_entries(root, split)
    unknown = [c for c in names if c not in index]
    if unknown:
        raise DataError(f"{base}: class folder(s) {', '.join(repr(c) for c in unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''} not in {root / 'train'} "
                        f"(class indices come from the train folder)")
    if not names and out.ignored:
        raise DataError(f"{base}: {len(out.ignored)} file(s) but no class folders; sort them into "
                        f"{base}/<class>/ (ILSVRC ships val/ flat, with the labels in a separate list)")
    walk = _Walk(root, out)
    # Claimed before any walk: a link from inside a class up to ROOT, a split folder or another class
    # folder would otherwise pack other classes' images under this class's label.
    for folder in [root, *(root / s for s in SPLITS if (root / s).is_dir())]:
        walk.claim_dir(folder, _rel(root, folder) or ".")
    for name in names:
        walk.claim_dir(base / name, f"{split}/{name}")
    for name in names:
        if not walk.class_folder(base / name, index[name]):
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
