"""The single-device grouped network: what the split model equals, run on one device.

This is the network Caffe's bvlc_alexnet emulates with `group: 2`: conv layers that do not cross are
`groups=columns` convolutions, crossing layers dense ones, and LRN is applied per group (per column,
§3.3). It loads `SplitAlexNet.grouped_state_dict()` as is. Benchmarks use it as the baseline the
split must match in speed; the tests hold the split model equal to an independent version of it.

Its forward is deliberately its own loop over the table, not SplitAlexNet.walk (columns.py): it is
the independent equivalent the split walk is checked against (and the baseline it is timed
against), so it shares the table and the layers, never the walk or the exchange.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .convert import grouped_shapes
from .layers import LocalResponseNorm, PaperDropout, activation
from .columns import input_spec, model_layout


class GroupedAlexNet(nn.Module):
    """Single-device equivalent of SplitAlexNet(layout, config); state dict keys conv1.weight..fc8.bias."""

    def __init__(self, config: ModelConfig | None = None, layout=None):
        super().__init__()
        cfg = config or ModelConfig()
        self.config = cfg
        self.layout = model_layout(layout if layout is not None else cfg.layout, cfg)
        shapes = grouped_shapes(self.layout)
        self.columns_of = {}  # computing columns per layer: LRN normalises within each column
        for i, row in enumerate(self.layout.rows):
            out_c, fan_in = shapes[f"{row.name}.weight"][:2]
            ncols = sum(1 for w in row.widths if w > 0)
            self.columns_of[row.name] = ncols
            # conv1 reads the one image in every column, a crossing layer all maps: both dense.
            g = 1 if (row.cross or i == 0) else ncols
            if row.kind == "conv":
                mod = nn.Conv2d(fan_in * g, out_c, row.kernel, row.stride, row.pad, groups=g)
            elif g == 1:
                mod = nn.Linear(fan_in, out_c)
            else:
                raise ValueError(f"layer {row.name}: a non-crossing fully connected layer over {g} "
                                 f"columns has no single nn.Linear equivalent")
            self.add_module(row.name, mod)
        self.act = activation(cfg.activation)
        self.lrn = (LocalResponseNorm(cfg.lrn_size, cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_k, cfg.lrn_convention)
                    if cfg.lrn else None)
        self.drop = PaperDropout(cfg.dropout, cfg.dropout_mode)
        self.pad, self.input_side = input_spec(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad) if any(self.pad) else x
        for row in self.layout.rows:
            if row.kind == "fc" and x.dim() > 2:
                x = x.flatten(1)
            x = getattr(self, row.name)(x)
            if row.act:
                x = self.act(x)
            if row.lrn and self.lrn is not None:
                # Per-column LRN (§3.3): each window stays in its column's maps, in x's own memory
                # order (folding the columns into the batch would copy channels_last maps to NCHW, a
                # cost the split model does not pay, which flattered it in the _cl precisions).
                x = self.lrn(x, groups=1 if row.lrn_cross else self.columns_of[row.name])
            if row.pool:
                x = F.max_pool2d(x, row.pool[0], row.pool[1])
            if row.dropout:
                x = self.drop(x)
        return x
