"""Composing the transforms into a training batch and an evaluation batch (§2, §4.1).

Training (per image): crop 224 at a random offset (0..32 on each axis) -> float -> minus the mean
image -> mirror with p = 0.5 -> plus the PCA lighting shift. Evaluation: the centre patch, or the ten
patches, minus the mean. Each step obeys its DataConfig switch (the §4.1 ablations).

Mean subtraction, `mean_crop`: "aligned" (default) subtracts from each crop the mean image cropped at
the same offset and mirrored with it: exactly the 256x256 mean subtracted before cropping, the order
in which §2 and §4.1 describe it. "center" subtracts the mean's centre 224 patch from every crop, as
cuda-convnet2 did. The mean image is nearly flat, so the two differ little; both are here to check.

Randomness: every parameter of every sample is drawn (all of them, even for switched-off steps, so
switching one off does not change the others) from its own SplitMix64 stream seeded with
derive_seed(seed, epoch, STREAM_AUGMENT, position), position being the sample's place in the epoch
(rng.uniforms: seven uniforms per sample, for the whole batch at once).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import get_worker_info

from . import transforms as T
from .config import DataConfig
from .rng import STREAM_AUGMENT, uniforms


@dataclass(frozen=True)
class AugmentParams:
    """Per-image random choices of §4.1: crop offsets dy, dx (int64 [B]), flip (bool [B]), alpha (float32 [B, 3])."""

    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor
    alpha: torch.Tensor

    def __len__(self) -> int:
        return self.dy.shape[0]

    def pin_memory(self) -> "AugmentParams":  # DataLoader(pin_memory=True) calls this
        return AugmentParams(*(getattr(self, f).pin_memory() for f in ("dy", "dx", "flip", "alpha")))

    def to(self, device, non_blocking: bool = False) -> "AugmentParams":
        """The same choices on `device` (the device input path: from pinned memory, non_blocking, so
        the copy is queued rather than waited for, and the lighting shift is computed there)."""
        return AugmentParams(*(getattr(self, f).to(device, non_blocking=non_blocking)
                               for f in ("dy", "dx", "flip", "alpha")))


SMALL_CROP = 32  # crops up to this side are built by the batched gather on a CPU too (train_batch)
N_UNIFORMS = 7  # per sample: 2 crop offsets, 1 flip, 4 for the three lighting alphas (Box-Muller)


def draw_params(u: torch.Tensor, max_offset: int, flip_p: float = 0.5, lighting_std: float = 0.1) -> AugmentParams:
    """n images' choices from uniforms u [n, N_UNIFORMS]: offsets, flips, alphas, in that column order."""
    dy, dx = T.random_offsets(u[:, 0:2], max_offset)
    fl = T.random_flips(u[:, 2], flip_p)
    alpha = T.random_alphas(u[:, 3:7], lighting_std)
    return AugmentParams(dy, dx, fl, alpha)


def sample_params(seed: int, epoch: int, positions, cfg: DataConfig, image_size: int) -> AugmentParams:
    """The choices for the samples at `positions` of epoch `epoch`: each from its own stream, so they
    do not depend on batch size, worker or history."""
    u = uniforms((seed, epoch, STREAM_AUGMENT), positions, N_UNIFORMS)
    return draw_params(u, image_size - cfg.crop_size, cfg.flip_p, cfg.lighting_std)


def train_batch(images: torch.Tensor, params: AugmentParams, mean: torch.Tensor | None, eigvals, eigvecs,
                cfg: DataConfig) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 [B, 3, c, c], c = cfg.crop_size: the §4.1 training input.

    On a CPU a fused per-image loop computes it (one pass over each crop, no batch-sized
    temporaries, several times faster), except for crops of SMALL_CROP pixels or less; on a GPU, and
    for small crops, one batched gather (no per-image kernels: the device input path,
    device_input.py). All give bitwise the same result as the composition of the transforms (tests
    hold them equal): the same float32 operations, on the same operands.
    """
    b, s = images.shape[0], images.shape[-1]
    if cfg.random_crop:
        dy, dx = params.dy, params.dx
    else:  # "no crops" ablation: the centre patch every time
        dy = dx = torch.full((b,), T.center_offset(s, cfg.crop_size), dtype=torch.int64, device=images.device)
    flips = params.flip if cfg.flip else torch.zeros(b, dtype=torch.bool, device=images.device)
    shift = T.lighting_shift(params.alpha, eigvals, eigvecs, cfg.lighting_units) if cfg.lighting else None
    if not (cfg.mean_subtraction and mean is not None):
        mean = None
    # The per-image loop wins on a CPU for large crops (224: 5.7 ms against 41 ms for 32 images); for
    # small ones its per-image overhead dominates (24 of 32: 4.6 ms against 2.1 ms for 128 images).
    fused = images.device.type == "cpu" and cfg.crop_size > SMALL_CROP
    return (_fused_cpu if fused else _gathered)(images, dy, dx, flips, mean, shift, cfg)


def _composed(images, dy, dx, flips, mean, shift, cfg) -> torch.Tensor:
    """The definition: crop -> float -> minus the mean -> mirror -> plus the lighting shift."""
    c = cfg.crop_size
    x = T.crop(images, dy, dx, c)
    if mean is None:
        x = x.to(torch.float32)
    elif cfg.mean_crop == "aligned":
        x = T.subtract_mean(x, T.crop(mean.to(images.device).expand(x.shape[0], -1, -1, -1), dy, dx, c))
    else:
        x = T.subtract_mean(x, T.center_patch(mean.to(images.device), c))
    x = T.flip(x, flips)  # after the aligned mean: the mean is mirrored with its image
    return x if shift is None else T.add_lighting(x, shift)


def _fused_cpu(images, dy, dx, flips, mean, shift, cfg) -> torch.Tensor:
    """_composed, one image at a time into a preallocated output (same float32 operations, same order)."""
    c = cfg.crop_size
    out = _output((images.shape[0], images.shape[1], c, c))
    m_center = T.center_patch(mean, c) if mean is not None and cfg.mean_crop == "center" else None
    for b, (y, x, f) in enumerate(zip(dy.tolist(), dx.tolist(), flips.tolist())):
        src = images[b, :, y:y + c, x:x + c]
        m = None if mean is None else (m_center if m_center is not None else mean[:, y:y + c, x:x + c])
        if f:  # mirroring image and mean before subtracting = mirroring the difference
            src = src.flip(-1)
            m = None if m is None else m.flip(-1)
        o = out[b]
        o.copy_(src)
        if m is not None:
            o.sub_(m)
        if shift is not None:
            o.add_(shift[b].view(-1, 1, 1))
    return out


def _gathered(images, dy, dx, flips, mean, shift, cfg) -> torch.Tensor:
    """_composed as a few batched kernels: the crop (mirrored or not) is one gather of pixel indices,
    so a batch costs the same number of kernel launches whatever its size (the GPU path)."""
    b, ch, s = images.shape[0], images.shape[1], images.shape[-1]
    c, dev = cfg.crop_size, images.device
    ar = torch.arange(c, device=dev)
    dy, dx, flips = dy.to(dev), dx.to(dev), flips.to(dev)

    def index(oy, ox):  # [B, c*c] flat pixel indices of each crop, columns reversed where mirrored
        cols = torch.where(flips[:, None], ox[:, None] + (c - 1 - ar), ox[:, None] + ar)
        return ((oy[:, None] + ar)[:, :, None] * s + cols[:, None, :]).reshape(b, 1, c * c)

    idx = index(dy, dx)
    x = images.reshape(b, ch, s * s).gather(2, idx.expand(b, ch, -1)).to(torch.float32)
    if mean is not None:
        if cfg.mean_crop == "aligned":  # the mean cropped and mirrored with its image
            midx = idx
        else:  # the centre patch, mirrored where the image is (mirroring x - m mirrors both)
            o = torch.full_like(dy, T.center_offset(s, c))
            midx = index(o, o)
        m = mean.to(dev, torch.float32).reshape(1, ch, s * s).expand(b, -1, -1).gather(2, midx.expand(b, ch, -1))
        x = x - m
    x = x.reshape(b, ch, c, c)
    return x if shift is None else x + shift.to(dev, torch.float32).view(b, ch, 1, 1)


def _output(shape, dtype=torch.float32) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, allocated in shared memory directly (as
    torch's own collate does), which spares the copy into shared memory when the batch is sent."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for n in shape:
        numel *= n
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def eval_batch(images: torch.Tensor, mean: torch.Tensor | None, cfg: DataConfig, ten: bool = False) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 [B, 3, c, c] (centre patch) or [B, 10, 3, c, c] (ten patches,
    order of transforms.ten_patches) minus the mean (§4.1)."""
    c = cfg.crop_size
    if ten:
        x = T.ten_patches(images, c)
        if not (cfg.mean_subtraction and mean is not None):
            return x.to(torch.float32)
        m = mean.to(images.device)
        return T.subtract_mean(x, T.ten_patches(m[None], c)[0] if cfg.mean_crop == "aligned" else T.center_patch(m, c))
    x = T.center_patch(images, c)
    if not (cfg.mean_subtraction and mean is not None):
        return x.to(torch.float32)
    return T.subtract_mean(x, T.center_patch(mean.to(images.device), c))
