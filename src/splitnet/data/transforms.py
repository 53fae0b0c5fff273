"""The paper's input transforms (§2, §4.1), one small batched function each.

Every function takes a batch [B, C, H, W] (uint8 from the cache, or float) on any device, so a later
stage can run them on a GPU; the random ones come in two parts, a `random_*` function that draws the
parameters from an explicit torch.Generator (on the CPU) and a deterministic function that applies
them, so tests check each against its definition and a resumed run can redraw exactly.

Output scale: raw 0..255 RGB minus the mean image, no division by a standard deviation (§2; the
paper's init, biases of 1, was tuned for this scale).
"""
from __future__ import annotations

import torch


# ---- crops (§4.1) --------------------------------------------------------------------------------
def random_offsets(u: torch.Tensor, max_offset: int) -> tuple:
    """(dy, dx), int64 [n] each, uniform on 0..max_offset inclusive (§4.1: "extracting random 224x224
    patches ... from the 256x256 images": 33 positions per axis, 0..32, as cuda-convnet2 did), from
    uniforms u [n, 2] in [0, 1) (data/rng.uniforms)."""
    d = (u * (max_offset + 1)).floor_().long().clamp_(0, max_offset)
    return d[:, 0].contiguous(), d[:, 1].contiguous()


def crop(images: torch.Tensor, dy, dx, size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size, size]: image b's patch has its top-left corner at (dy[b], dx[b]) (§4.1)."""
    dy = dy.tolist() if torch.is_tensor(dy) else list(dy)
    dx = dx.tolist() if torch.is_tensor(dx) else list(dx)
    h, w = images.shape[-2:]
    if any(not (0 <= y <= h - size) for y in dy) or any(not (0 <= x <= w - size) for x in dx):
        raise ValueError(f"crop: offsets must lie in 0..{h - size} x 0..{w - size}, got {dy}, {dx}")
    return torch.stack([images[b, :, y:y + size, x:x + size] for b, (y, x) in enumerate(zip(dy, dx))])


def center_offset(image_size: int, size: int) -> int:
    return (image_size - size) // 2


def center_patch(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[..., H, W] -> [..., size, size]: the central patch (§4.1 footnote: one centre patch at test
    time; also the training input of the "no crops" ablation). Offset (H-size)//2: 16 for 256/224."""
    oy, ox = center_offset(images.shape[-2], size), center_offset(images.shape[-1], size)
    return images[..., oy:oy + size, ox:ox + size]


# The centre patch's index among ten_patches' ten (patch_offsets' order): the input a centre-patch
# evaluation cuts (center_patch), so a ten-patch pass also gives the centre-patch prediction.
CENTRE_PATCH = 4


def patch_offsets(image_size: int, size: int) -> tuple:
    """The five test positions (§4.1), in this order: top-left, top-right, bottom-left, bottom-right,
    centre; as (dy, dx). For 256/224: (0,0), (0,32), (32,0), (32,32), (16,16)."""
    m, c = image_size - size, center_offset(image_size, size)
    return ((0, 0), (0, m), (m, 0), (m, m), (c, c))


def ten_patches(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[B, C, S, S] -> [B, 10, C, size, size] (§4.1: "the four corner patches and the center patch as
    well as their horizontal reflections"). Order: patches 0-4 as `patch_offsets` (TL, TR, BL, BR,
    centre), patches 5-9 the horizontal mirror images of 0-4 in the same order."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"ten_patches: expected square images, got {list(images.shape)}")
    five = torch.stack([images[..., y:y + size, x:x + size] for y, x in patch_offsets(images.shape[-1], size)], dim=1)
    return torch.cat([five, five.flip(-1)], dim=1)


# ---- horizontal reflection (§4.1) ----------------------------------------------------------------
def random_flips(u: torch.Tensor, p: float) -> torch.Tensor:
    """bool [n]: True with probability p (§4.1: horizontal reflections; p = 0.5), from uniforms u [n]."""
    return u < p


def flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right (reverse the last axis) the images where mask[b] is True (§4.1)."""
    mask = mask.to(images.device).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(mask, images.flip(-1), images)


# ---- PCA lighting (§4.1) ---------------------------------------------------------------------------
def random_alphas(u: torch.Tensor, std: float) -> torch.Tensor:
    """float32 [n, 3], alpha_i ~ N(0, std^2), drawn once per image per use (§4.1: std = 0.1), from
    uniforms u [n, 4] by the Box-Muller transform: (u0, u1) give alpha_1 and alpha_2, (u2, u3) alpha_3."""
    u = u.to(torch.float64)
    r = (-2.0 * torch.log1p(-u[:, 0::2])).sqrt()  # 1 - u in (0, 1]: no log(0)
    theta = 2.0 * torch.pi * u[:, 1::2]
    z = torch.stack([r[:, 0] * theta[:, 0].cos(), r[:, 0] * theta[:, 0].sin(), r[:, 1] * theta[:, 1].cos()], 1)
    return (z * std).to(torch.float32)


def lighting_shift(alphas: torch.Tensor, eigvals, eigvecs, units: str = "cc2") -> torch.Tensor:
    """float32 [B, 3]: the RGB value added to every pixel of image b (§4.1):
    [p1 p2 p3][a1 s1, a2 s2, a3 s3]^T, with p_i the eigenvectors (columns of `eigvecs`) and
    eigenvalues `eigvals` of the training set's RGB covariance in 0..255 units.

    Units, `units`:
    - "cc2" (default): s_i = sqrt(lambda_i). The paper writes lambda_i, but with lambda in 0..255 units
      a shift alpha*lambda would be thousands of pixel values; sqrt(lambda_i) is the standard deviation
      along p_i, a pixel value, so the shift is dimensionally a colour and its covariance is
      std^2 * Cov (1% of the data's own colour covariance for std = 0.1). This is what Krizhevsky's
      cuda-convnet2 did. Typical ImageNet size: 0.1 * 121.8 = 12 pixel values along p1.
    - "unit": s_i = lambda'_i with lambda' the eigenvalues of 0..1 pixels (lambda / 255^2), the shift
      computed on 0..1 pixels and scaled back by 255 (the form most reimplementations copy: eigenvalues
      0.2175, 0.0188, 0.0045). About half the "cc2" size on ImageNet; on data of other contrast the
      two differ by the factor sqrt(lambda)/255.
    The sum over i is written out (not a matmul) so its result is the same on every BLAS and thread count.
    """
    alphas = alphas.to(torch.float32)
    lam = torch.as_tensor(eigvals, dtype=torch.float32, device=alphas.device)
    vecs = torch.as_tensor(eigvecs, dtype=torch.float32, device=alphas.device)
    if units == "cc2":
        s = lam.clamp_min(0).sqrt()
    elif units == "unit":
        s = lam / 255.0
    else:
        raise ValueError(f"lighting units: {units!r} is not 'cc2' or 'unit'")
    return (vecs[None, :, :] * (alphas * s)[:, None, :]).sum(-1)


def add_lighting(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Add shift[b] (an RGB triple) to every pixel of float image b (§4.1)."""
    return images + shift.to(images.device, images.dtype).view(shift.shape[0], 3, *([1] * (images.dim() - 2)))


# ---- mean subtraction (§2) ---------------------------------------------------------------------------
def subtract_mean(images: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """images (uint8 or float) as float32 minus `mean`, broadcast (§2: "subtracting the mean activity
    over the training set from each pixel"): `mean` is the matching patch of the 3x256x256 mean image,
    [3, s, s] for one patch shared by all, or [B, 3, s, s] cropped like each image."""
    return images.to(torch.float32) - mean.to(images.device, torch.float32)
