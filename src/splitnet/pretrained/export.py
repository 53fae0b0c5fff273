"""`splitnet export`: a run's network as one single-device, eval-mode graph for other runtimes.

The graph is the grouped equivalent (model/grouped.py: `groups=2` convolutions, what Caffe ran), with
the paper's test-time dropout (outputs x(1-p), §4.2) folded into the next layer's weights, and the
LRN (§3.3) as plain tensor ops instead of splitnet's autograd Function. Input: the preprocessed
batch, float32 [B, 3, c, c] (RGB, 0..255 minus the run's mean, c the run's crop; load.Preprocessing),
B dynamic. Output: logits [B, classes]. Reload with torch.export.load(FILE).module().
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model.grouped import GroupedAlexNet
from ..model.layers import _neg_pow, band_matrix


class PlainLRN(nn.Module):
    """The LRN of layers.LocalResponseNorm written with plain ops (a banded matmul, a power): the same
    values, and a graph exporters can trace (the band is built in the graph, not taken from the
    training LRN's cache). Input [B, C, H, W], `groups` columns side by side."""

    def __init__(self, lrn):
        super().__init__()
        self.size, self.beta, self.k = lrn.size, lrn.beta, lrn.k
        self.a = lrn.alpha if lrn.convention == "paper" else lrn.alpha / lrn.size

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        b, c = x.shape[:2]
        band = band_matrix(c, self.size // 2, (self.size - 1) // 2, self.a, groups, x.dtype, x.device)
        d = torch.matmul(band, (x * x).reshape(b, c, -1)).view_as(x) + self.k
        return x * _neg_pow(d, self.beta)


def fold_dropout(net: GroupedAlexNet) -> GroupedAlexNet:
    """Paper dropout at test time multiplies a layer's outputs by 1-p; as they only feed the next
    layer's weights (after ReLU and pooling, which commute with a positive scale), scale those
    weights instead and drop the multiplication. Inverted dropout is the identity at test already."""
    drop, rows = net.drop, net.layout.rows
    if drop.mode == "paper" and drop.p > 0:
        if rows[-1].dropout:
            raise ValueError(f"layer {rows[-1].name}: dropout on the last layer cannot be folded")
        with torch.no_grad():
            for row, nxt in zip(rows, rows[1:]):
                if row.dropout:
                    getattr(net, nxt.name).weight.mul_(1.0 - drop.p)
    net.drop = nn.Identity()
    return net


def exportable(model) -> GroupedAlexNet:
    """The single-device graph of `model` (a SplitAlexNet): grouped, dropout folded, plain LRN, eval, CPU."""
    net = GroupedAlexNet(model.config, model.layout)
    net.load_state_dict(model.grouped_state_dict())
    if net.lrn is not None:
        net.lrn = PlainLRN(net.lrn)
    return fold_dropout(net).eval()


def export(model, crop: int, out, fmt: str = "pt2") -> Path:
    """Write the exported graph of `model` to `out` (torch.export .pt2, or ONNX with fmt="onnx")."""
    net = exportable(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(2, 3, crop, crop)
    batch = torch.export.Dim("batch", min=1, max=4096)
    if fmt == "pt2":
        prog = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
        torch.export.save(prog, out)
    elif fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ValueError("--format onnx needs the onnx and onnxscript packages "
                             "(pip install 'splitnet[onnx]')") from None
        torch.onnx.export(net, (x,), str(out), dynamo=True, dynamic_shapes=({0: batch},),
                          input_names=["image"], output_names=["logits"])
    else:
        raise ValueError(f"--format {fmt!r}: expected pt2 or onnx")
    return out
