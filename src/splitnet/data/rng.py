"""Seeds derived from (run seed, epoch, stream, position): the reason batches are reproducible.

A sample's augmentation is a function of (seed, epoch, its position in the epoch) only, never of
which worker process built it or what ran before, so a run resumed at batch k sees bitwise the
batches an uninterrupted run would, with any number of workers.
"""
from __future__ import annotations

_MASK = (1 << 64) - 1

STREAM_SHUFFLE = 1  # the epoch's permutation
STREAM_AUGMENT = 2  # per-sample crop offsets, flip, lighting


def _splitmix64(x: int) -> int:
    # Steele, Lea & Flood's SplitMix64 finaliser: consecutive inputs give unrelated outputs.
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed (valid for torch.Generator.manual_seed) mixing the integers `parts` in order."""
    h = 0x5EED5EED5EED5EED
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK))
    return h >> 1
