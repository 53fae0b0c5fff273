"""DataConfig: the input pipeline's options, the paper's values as defaults (§2, §4.1), and DataError.

Every augmentation can be switched off for the ablations of §4.1 (`random_crop=False` trains on the
centre patch, `flip=False`, `lighting=False`, `mean_subtraction=False`); every place where the paper
and the original code (cuda-convnet2, "CC2") differ is a value here, the paper's reading as default.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, _choice

# Pillow's own default decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS, 1024*1024*1024 // 4 // 3).
PIL_MAX_IMAGE_PIXELS = 89_478_485


class DataError(ConfigError):
    """Bad input data that the user must fix (missing folder, too many unreadable files, a val class
    unknown to train). A ConfigError, so every splitnet command prints it as one line, no traceback."""


@dataclass(frozen=True)
class DataConfig:
    """Where the data is, how it is prepared once (§2), and how each batch is built from it (§4.1)."""

    # ---- source and cache ----
    # A folder of class folders (ROOT/train/<class>/*, ROOT/val/<class>/*) or a prepared cache;
    # "" leaves the choice to the caller (e.g. the built-in synthetic set).
    root: str = ""
    cache: str = ""  # where to prepare `root`; "" = a folder under the run's work directory

    # ---- preparation, once (§2) ----
    image_size: int = 256  # shorter side rescaled to this, then the central square is kept
    resample: str = "lanczos"  # Pillow filter for the rescale: lanczos (PIL's old ANTIALIAS), bicubic, bilinear
    # "shorter": §2's rule, shorter side to image_size then the central square. "squash": the whole
    # image resized to image_size x image_size, aspect ratio lost (what Caffe's ImageNet tools did;
    # an imported bvlc_alexnet is evaluated this way).
    resize: str = "shorter"
    shard_size: int = 1024  # images per memory-mapped shard (the unit of resumption)
    prepare_workers: int = 0  # processes for preparation; 0 = every core
    max_bad_fraction: float = 0.01  # share of unreadable files per split above which preparation stops
    strict: bool = False  # stop at the first unreadable file
    max_image_pixels: int = PIL_MAX_IMAGE_PIXELS  # larger images are refused and reported; 0 = no limit

    # ---- training input (§4.1) ----
    crop_size: int = 224  # offsets 0..image_size-crop_size (0..32) on each axis
    random_crop: bool = True  # False: train on the centre patch (the "no crops" ablation)
    flip: bool = True
    flip_p: float = 0.5
    lighting: bool = True  # PCA colour noise
    lighting_std: float = 0.1  # alpha_i ~ N(0, lighting_std^2)
    # "cc2": shift = P (alpha * sqrt(lambda)), lambda of 0..255 pixels (a pixel value; what CC2 did).
    # "unit": shift = 255 * P (alpha * lambda'), lambda' of 0..1 pixels (the widely copied form).
    lighting_units: str = "cc2"
    mean_subtraction: bool = True  # §2: subtract the training set's per-pixel mean image
    # "aligned": each crop minus the mean image cropped (and mirrored) like it, i.e. the 256x256 mean
    # subtracted before cropping, as §2 orders it. "center": the mean's centre crop, as CC2 did.
    mean_crop: str = "aligned"
    # A .npy mean image [3, image_size, image_size] (RGB, 0..255) used instead of the cache's own
    # training mean: an imported network's mean (splitnet import) is the one it was trained with.
    mean_file: str = ""

    # ---- evaluation (§4.1) ----
    # 10: four corners + centre and their mirrors; 1: the centre patch only. For the evaluation code to
    # read; make_loader itself takes LoaderSpec(ten_patches=True/False).
    test_patches: int = 10

    # ---- loading ----
    workers: int = 2  # DataLoader worker processes; batches are identical for any number

    def __post_init__(self):
        # Paths as absolute, symlinks resolved: a run records where its data is, not how it was typed,
        # so a resume or an eval from another directory finds it, and another spelling of the same
        # folder is not a change of data.root.
        for key in ("root", "cache"):
            if getattr(self, key):
                object.__setattr__(self, key, str(Path(getattr(self, key)).expanduser().resolve()))
        _choice(self, "resample", ("lanczos", "bicubic", "bilinear", "box", "hamming"))
        _choice(self, "lighting_units", ("cc2", "unit"))
        _choice(self, "resize", ("shorter", "squash"))
        _choice(self, "mean_crop", ("aligned", "center"))
        if self.test_patches not in (1, 10):
            raise ConfigError(f"test_patches: must be 1 or 10, got {self.test_patches}")
        if self.image_size < 1:
            raise ConfigError(f"image_size: must be >= 1, got {self.image_size}")
        if self.crop_size < 1:
            raise ConfigError(f"crop_size: must be >= 1, got {self.crop_size}")
        # crop_size <= the cache's image side is checked where both are known (make_loader): a cache
        # may be prepared at another size than the config's default.
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be >= 1, got {self.shard_size}")
        for key in ("prepare_workers", "workers", "max_image_pixels"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("max_bad_fraction", "flip_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.lighting_std < 0:
            raise ConfigError(f"lighting_std: must be >= 0, got {self.lighting_std}")

    @property
    def max_offset(self) -> int:
        """Largest crop offset on each axis (§4.1: 256 - 224 = 32; offsets 0..32 inclusive, as CC2)."""
        return self.image_size - self.crop_size

