"""Seeds derived from (run seed, epoch, stream, position): the reason batches are reproducible.

A sample's augmentation is a function of (seed, epoch, its position in the epoch) only, never of
which worker process built it or what ran before, so a run resumed at batch k sees bitwise the
batches an uninterrupted run would, with any number of workers.
"""
from __future__ import annotations

import numpy as np
import torch

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's state increment

STREAM_SHUFFLE = 1  # the epoch's permutation
STREAM_AUGMENT = 2  # per-sample crop offsets, flip, lighting


def _splitmix64(x: int) -> int:
    # Steele, Lea & Flood's SplitMix64 finaliser: consecutive inputs give unrelated outputs.
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed (valid for torch.Generator.manual_seed) mixing the integers `parts` in order."""
    return _absorb(parts) >> 1


def _absorb(parts) -> int:
    """The 64-bit state after mixing the integers `parts` in order (derive_seed's before its final shift)."""
    h = 0x5EED5EED5EED5EED
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK))
    return h


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """_splitmix64 on a uint64 array (numpy's uint64 array arithmetic wraps mod 2^64, as the masks do)."""
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(parts: tuple, positions, k: int) -> torch.Tensor:
    """float64 [n, k] in [0, 1): row i is the first k numbers of the SplitMix64 stream seeded with
    derive_seed(*parts, positions[i]); each number's top 53 bits. Row i depends on (parts, positions[i])
    only, so a sample's numbers do not depend on its batch, worker or history. Vectorised over the
    positions (a batch of 128 in well under a millisecond; a torch.Generator per sample took 13 ms)."""
    pos = np.asarray(list(positions), dtype=np.int64).astype(np.uint64)
    seeds = _splitmix64_np(np.uint64(_absorb(parts)) ^ pos) >> np.uint64(1)  # = derive_seed(*parts, position)
    steps = np.arange(k, dtype=np.uint64) * np.uint64(_GOLDEN)  # the stream's states before each draw
    bits = _splitmix64_np(seeds[:, None] + steps[None, :])
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)
