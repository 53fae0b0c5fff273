"""Training-set statistics: the per-pixel mean image (§2) and the RGB covariance for PCA lighting (§4.1).

Each training shard's sums are computed once, by the worker that packs it, and kept next to it, so a
resumed preparation never rereads finished shards. All sums are exact integers (pixel values are
integers; float64 holds every partial sum of a shard exactly), so the totals, the mean and the
covariance do not depend on the number of workers or the order in which shards finish.

Units: 0..255 pixel values throughout (mean image in 0..255, covariance in (0..255)^2).
"""
from __future__ import annotations

import numpy as np


def shard_stats(images: np.ndarray) -> dict:
    """Sums over a uint8 [n, 3, S, S] block: count, per-pixel sum, RGB sum and RGB outer-product sum."""
    n = images.shape[0]
    outer = np.zeros((3, 3), dtype=np.float64)
    for img in images:  # [3, S, S]; one image at a time keeps the float64 copy small
        x = img.reshape(3, -1).astype(np.float64)
        outer += x @ x.T  # each entry <= S*S*255^2 per image: exact in float64
    return {
        "count": np.int64(n),
        "pixel_sum": images.sum(axis=0, dtype=np.uint32),  # <= n*255: exact for any shard below 16M images
        "rgb_sum": images.sum(axis=(0, 2, 3), dtype=np.int64),
        "rgb_outer": np.rint(outer).astype(np.int64),
    }


def empty_stats(size: int) -> dict:
    return {"count": np.int64(0), "pixel_sum": np.zeros((3, size, size), np.int64),
            "rgb_sum": np.zeros(3, np.int64), "rgb_outer": np.zeros((3, 3), np.int64)}


def add(total: dict, part: dict) -> dict:
    """total += part, in int64 (exact for any data set that fits on a disk)."""
    return {k: total[k] + np.asarray(part[k]).astype(np.int64) for k in total}


def finalize(total: dict) -> dict:
    """mean image float32 [3,S,S]; RGB mean [3], covariance [3,3], its eigenvalues (descending) and
    eigenvectors (columns, largest component positive): all in 0..255 units."""
    n = int(total["count"])
    if n == 0:
        raise ValueError("no training images: cannot compute the mean image and the RGB covariance")
    size = total["pixel_sum"].shape[-1]
    pixels = n * size * size
    rgb_mean = total["rgb_sum"] / pixels
    cov = total["rgb_outer"] / pixels - np.outer(rgb_mean, rgb_mean)  # population covariance
    cov = (cov + cov.T) / 2
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    # eigh's signs are arbitrary; fix them so the stored vectors do not depend on the LAPACK build.
    signs = np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(3)])
    vecs = vecs * np.where(signs == 0, 1.0, signs)
    return {
        "count": n,
        "mean_image": (total["pixel_sum"] / n).astype(np.float32),
        "rgb_mean": rgb_mean,
        "rgb_cov": cov,
        "eigvals": vals,
        "eigvecs": vecs,
    }
