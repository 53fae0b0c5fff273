"""The layout table's pieces: the paper's layer names, one row, one row's costs, and the error an
inconsistent table raises. layout.py builds tables from them; analysis.py checks and costs them."""
from __future__ import annotations

from dataclasses import dataclass

LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


class LayoutError(ValueError):
    """An inconsistent layout table; the message names the layer."""


@dataclass(frozen=True)
class LayerRow:
    """One paper layer. `widths[c]` is the number of maps (conv) or units (fc) column c computes."""

    name: str
    kind: str  # "conv" or "fc"
    widths: tuple
    kernel: int = 1
    stride: int = 1
    pad: int = 0
    cross: bool = False  # reads every column's maps (an exchange) instead of only its own
    act: bool = True  # ReLU (or tanh) after the layer; the paper has none on fc8 (§3.5)
    lrn: bool = False  # local response normalisation after the activation (§3.3)
    # The LRN window runs over every column's maps (Caffe's single-device net), not only this
    # column's (the original code): the maps of the other columns must be exchanged first.
    lrn_cross: bool = False
    pool: tuple | None = None  # (window, stride) max pooling after LRN; (3, 2) overlaps (§3.4)
    dropout: bool = False  # dropout on the layer's output (§4.2)

    @property
    def columns(self) -> int:
        return len(self.widths)

    @property
    def total(self) -> int:
        return sum(self.widths)


@dataclass(frozen=True)
class LayerStats:
    """What one layer costs and produces, per column, for one image."""

    name: str
    in_widths: tuple  # input channels (conv) or features (fc) per column (0 = not computed)
    out_shapes: tuple  # per column: (C, H, W) after conv / pooling, or (units,) for fc; None if absent
    neurons: int  # conv/fc outputs before pooling, summed over columns (Fig. 2 caption)
    params: int
    macs: int  # multiply-adds per image
    exchange_bytes: int  # forward bytes per image leaving their column to feed this layer
    exchanges: tuple  # (src, dst, bytes per image) for every tensor that leaves its column
    column_params: tuple = ()  # params per column (their sum is `params`)
