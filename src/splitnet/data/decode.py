"""Decode one image file into the paper's 256x256 RGB form (§2), or say why it cannot be.

§2: "we down-sampled the images to a fixed resolution of 256x256. Given a rectangular image, we first
rescaled the image such that the shorter side was of length 256, and then cropped out the central
256x256 patch." Images smaller than 256 on a side are upscaled the same way.

Decisions (each reported per file, none silent):
- Content decides the format, not the name: a PNG named .JPEG is decoded as PNG and noted.
- CMYK, grayscale, 1-bit, 16-bit and palette images are converted to RGB and noted. Transparent
  pixels (RGBA, LA, palette with transparency) are composited over white, what a viewer shows.
- Truncated files are refused (Pillow's LOAD_TRUNCATED_IMAGES stays off): a half-grey photo is
  worse than a missing one.
- Decompression bombs: an image of more than `max_pixels` pixels (default Pillow's own threshold,
  89,478,485 = about a 9459x9459 image, far above any ILSVRC photo) is refused from its header
  alone, before any pixel is decoded, and reported; 0 disables the check. Large JPEGs are decoded
  by libjpeg at a reduced scale (Image.draft) that still leaves at least twice the target
  resolution, so the final filter sees as many pixels as it can use.
- EXIF orientation is not applied, as in the original pipeline.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP",
                ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM"}


class BadImage(Exception):
    """A file that cannot be turned into an image; the message is the reason, for report.json."""


def rescaled_size(w: int, h: int, size: int) -> tuple:
    """(W, H) with the shorter side `size` and the aspect ratio kept (rounded, never below `size`)."""
    if w <= h:
        return size, max(size, round(h * size / w))
    return max(size, round(w * size / h)), size


def _to_rgb(img: Image.Image, notes: list) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit/32-bit grayscale: Image.convert would clip at 255; scale the full range down instead.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8)
        notes.append(f"{mode} grayscale scaled to 8 bits and converted to RGB")
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
        notes.append(f"palette image converted to {mode}")
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"{img.mode} alpha composited over white")
        return Image.alpha_composite(white, rgba).convert("RGB")
    notes.append(f"{mode} converted to RGB")
    return img.convert("RGB")


def target_size(w: int, h: int, size: int, resize: str = "shorter") -> tuple:
    """(W, H) before the central crop: §2's shorter side `size` ("shorter"), or `size` x `size`
    whatever the aspect ("squash", Caffe's convert_imageset)."""
    return rescaled_size(w, h, size) if resize == "shorter" else (size, size)


def load_image(path, size: int = 256, resample: str = "lanczos", max_pixels: int = 89_478_485,
               resize: str = "shorter") -> tuple:
    """(uint8 array [3, size, size] RGB, notes) for the file at `path`; raises BadImage(reason).

    Shorter side rescaled to `size` with filter `resample`, central size x size patch kept (§2);
    resize="squash": the whole image resized to size x size (target_size).
    `notes` lists what was converted (format, mode, upscaling): the file was packed, not skipped.
    """
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with open(path, "rb") as f:
                img, (w, h), (tw, th) = _decode(f, path, size, max_pixels, resize, notes)
        except BadImage:
            raise
        except Image.DecompressionBombError as e:
            raise BadImage(f"too large: {e}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            # Pillow signals corrupt data with OSError ("image file is truncated"), SyntaxError
            # (bad PNG chunks), ValueError and EOFError depending on the plug-in.
            msg = str(e) or type(e).__name__
            if "truncated" in msg:
                raise BadImage(f"truncated: {msg}") from None
            raise BadImage(f"corrupt or unreadable: {msg}") from None
    for w_ in caught:
        # Pillow's own warnings (corrupt EXIF, ...) are kept: the file was packed but something was odd.
        notes.append(f"warning: {w_.message}")
    if min(w, h) < size:
        notes.append(f"upscaled from {w}x{h}")
    if img.size != (tw, th):
        img = img.resize((tw, th), RESAMPLE[resample])
    left, top = (tw - size) // 2, (th - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), notes


def _decode(f, path, size: int, max_pixels: int, resize: str, notes: list) -> tuple:
    """(RGB image decoded from the open file f, its (w, h), the (W, H) to resize to); raises BadImage
    for what the header already tells (empty, too large, no pixels), Pillow's errors otherwise."""
    if f.seek(0, 2) == 0:
        raise BadImage("empty file (0 bytes)")
    f.seek(0)
    # Our own check below, from the header, replaces Pillow's (which would warn at 1x and
    # raise only at 2x its global limit): one threshold, applied the same in every process.
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        img = Image.open(f)
    except UnidentifiedImageError:
        raise BadImage("not an image file Pillow can read (unknown format)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise BadImage(f"too large: {w}x{h} = {w * h:,} pixels > max_image_pixels {max_pixels:,} "
                       f"(decompression-bomb guard)")
    if w < 1 or h < 1:
        raise BadImage(f"empty image ({w}x{h})")
    suffix = os.path.splitext(str(path))[1]
    expected = _EXT_FORMATS.get(suffix.lower())
    if expected and img.format and img.format != expected:
        notes.append(f"{img.format} data in a file named {suffix}")
    tw, th = target_size(w, h, size, resize)
    if img.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, keeping >= 2x the target size.
        img.draft(img.mode, (2 * tw, 2 * th))
    img.load()
    return _to_rgb(img, notes), (w, h), (tw, th)
