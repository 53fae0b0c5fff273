"""ModelConfig: the network's options, the paper's values as defaults (§3, §5)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, _choice
from .layout import GEOMETRIES


@dataclass(frozen=True)
class ModelConfig:
    """The network's options. Defaults are the paper's (Krizhevsky et al. 2012, §3, §5).

    Every deviation the original code (cuda-convnet) or later ports made is a value here, the paper's
    value being the default (docs/paper-map.md names each one beside its section of the paper).
    """

    layout: str = "paper"
    num_classes: int = 1000
    # The scale of the network (layout.GEOMETRIES): "imagenet" is the paper's (224 crops, 11x11/4 conv1,
    # paper widths); "cifar" the same family on 32x32 images (24 crops, 5x5 conv1, narrower layers).
    geometry: str = "imagenet"
    # Input geometry for conv1 (§3.5, docs/paper-map.md): "pad3" = 224 crops with cuda-convnet's 3-pixel
    # right/bottom zero pad (the original), "caffe227" = 227 crops, no pad, "torchvision" = 224 with
    # a symmetric pad of 2. All three give 55x55 conv1 maps.
    input_mode: str = "pad3"
    activation: str = "relu"  # "relu" (paper §3.1) or "tanh" (the Figure 1 comparison)
    lrn: bool = True  # §3.3; per column, after ReLU, before pooling, on conv1 and conv2
    lrn_size: int = 5
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    lrn_k: float = 2.0
    # "paper": alpha multiplies the plain sum of squares, as P prints it.
    # "code": cuda-convnet/Caffe/torch divide alpha by the window size n.
    lrn_convention: str = "paper"
    # "column": each column normalises its own maps (the original code's rnorm1a/rnorm1b);
    # "all": across every column's maps, as Caffe's single-device net (needs an exchange).
    lrn_scope: str = "column"
    pool: tuple = (3, 2)  # (window, stride) of the max pooling layers; (3, 2) overlaps (§3.4)
    cross_add: tuple = ()  # layers that also read every column (e.g. ["conv5"])
    cross_remove: tuple = ()  # layers of the layout that no longer cross
    dropout: float = 0.5  # §4.2, on the outputs of fc6 and fc7
    dropout_mode: str = "paper"  # "paper": mask at train, x(1-p) at eval; "inverted": /(1-p) at train
    init_std: float = 0.01  # §5: every weight ~ N(0, 0.01^2)
    init_bias: float = 1.0  # §5: bias 1 in conv2, conv4, conv5, fc6, fc7 (Caffe later used 0.1)
    init_bias_layers: tuple = ("conv2", "conv4", "conv5", "fc6", "fc7")
    # "geometry": init_std times layout.init_gain_factors (1.0 everywhere at the imagenet geometry; at
    # another scale, each layer keeps the paper network's gain std*sqrt(fan-in)). "none": init_std as is.
    init_scaling: str = "geometry"

    def __post_init__(self):
        _choice(self, "input_mode", ("pad3", "caffe227", "torchvision"))
        _choice(self, "activation", ("relu", "tanh"))
        _choice(self, "lrn_convention", ("paper", "code"))
        _choice(self, "dropout_mode", ("paper", "inverted"))
        _choice(self, "lrn_scope", ("column", "all"))
        _choice(self, "init_scaling", ("geometry", "none"))
        _choice(self, "geometry", tuple(GEOMETRIES))
        if self.geometry != "imagenet" and self.input_mode != "pad3":
            raise ConfigError(f"input_mode: {self.input_mode!r} applies to the imagenet geometry only "
                              f"(geometry {self.geometry!r} has no conv1 input padding)")
        if len(self.pool) != 2 or any((not isinstance(v, int)) or v < 1 for v in self.pool):
            raise ConfigError(f"pool: expected [window, stride] (positive integers), got {list(self.pool)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes: must be >= 1, got {self.num_classes}")
        if self.lrn_size < 1:
            raise ConfigError(f"lrn_size: must be >= 1, got {self.lrn_size}")
