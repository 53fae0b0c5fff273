"""Class names of a trained network: the 1000 ILSVRC-2012 synsets in Caffe's order, or a user's file.

synset_words.txt format, one class per line: `n01440764 tench, Tinca tinca` (a WordNet id, then the
readable names). The ids are the class folder names of ILSVRC-2012, so `eval --data` matches them.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import PretrainedError


def parse(text: str, where: str) -> tuple:
    """([class id, ...], [readable name, ...]) of a synset_words.txt text."""
    ids, names = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        ids.append(wnid)
        names.append(name.strip() or wnid)
    if len(set(ids)) != len(ids):
        raise PretrainedError(f"{where}: a class id appears twice")
    return ids, names


def imagenet() -> tuple:
    """The shipped ILSVRC-2012 list (1000 classes, sorted by WordNet id, as Caffe's synset_words.txt)."""
    return parse(resources.files(__package__).joinpath("synset_words.txt").read_text("utf-8"), "synset_words.txt")


def classes_for(n: int, path=None) -> tuple:
    """(ids, names) for a network of `n` outputs: from `path`, else ImageNet's for n = 1000, else class_0.."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--classes {p}: no such file")
        ids, names = parse(p.read_text("utf-8", errors="replace"), str(p))
    elif n == 1000:
        ids, names = imagenet()
    else:
        ids = names = [f"class_{i}" for i in range(n)]
    if len(ids) != n:
        raise PretrainedError(f"--classes {path}: {len(ids)} classes, the network has {n} outputs (fc8)")
    return list(ids), list(names)
