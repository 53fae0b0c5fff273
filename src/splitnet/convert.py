"""Between the column model and its single-device equivalent (the "Caffe" grouped layout).

The grouped network is the one a single device would run: conv layers that do not cross become
`groups=columns` convolutions (Caffe's `group: 2`), crossing layers dense ones. Its state dict has
exactly the keys conv1.weight, conv1.bias, ..., fc8.bias, with output channels in column order
(column 0's, then column 1's). A crossing layer's input channels are likewise column 0's then
column 1's, so fc6's inputs are the concatenated pool5 maps flattened channel-major (c*36 + h*6 + w).
"""
from __future__ import annotations

import torch


def _parts(model, row):
    """(column index, module) of the columns that compute `row`."""
    return [(c, getattr(col, row.name)) for c, col in enumerate(model.columns) if row.widths[c] > 0]


def grouped_shapes(layout) -> dict:
    """Expected grouped shapes per key, e.g. paper: conv2.weight -> (256, 48, 5, 5)."""
    shapes = {}
    for row, st in zip(layout.rows, layout.stats()):
        cols = [c for c, w in enumerate(row.widths) if w > 0]
        fan = {st.in_widths[c] for c in cols}
        if len(fan) != 1:
            raise ValueError(f"layer {row.name}: columns read different input widths {sorted(fan)}; "
                             f"no grouped single-device equivalent")
        if not row.cross and len(cols) not in (1, layout.columns):
            raise ValueError(f"layer {row.name}: computed on {len(cols)} of {layout.columns} columns without "
                             f"crossing; no grouped single-device equivalent")
        if not row.cross and len(set(row.widths)) != 1:
            raise ValueError(f"layer {row.name}: unequal column widths {row.widths} cannot be a grouped layer")
        fan_in = fan.pop()
        k = (row.kernel, row.kernel) if row.kind == "conv" else ()
        shapes[f"{row.name}.weight"] = (row.total, fan_in, *k)
        shapes[f"{row.name}.bias"] = (row.total,)
    return shapes


@torch.no_grad()
def gather_grouped(model, tensor_of) -> dict:
    """{conv1.weight: ..., fc8.bias: ...} of `tensor_of(param)` in grouped form, as CPU copies.

    Stacking every column's output units along dim 0 is the grouped form for both kinds of layer: a
    non-crossing column's weight [out_c, in_c, k, k] is one group's slice; a crossing column's
    [out_c, sum in, k, k] reads all input channels already. Used for weights (grouped_state_dict) and
    for anything shaped like them (the optimiser's velocities in a checkpoint).
    """
    grouped_shapes(model.layout)  # raises if this layout has no grouped equivalent
    out = {}
    for row in model.layout.rows:
        parts = _parts(model, row)
        for key in ("weight", "bias"):
            out[f"{row.name}.{key}"] = torch.cat([tensor_of(getattr(m, key)).detach().cpu() for _, m in parts], 0)
    return out


def check_grouped(model, state: dict, what: str = "grouped state dict") -> None:
    """Missing, unexpected or misshapen keys raise naming the key."""
    expected = grouped_shapes(model.layout)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise KeyError(f"{what} for layout {model.layout.name!r}: "
                       f"missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{what}: {key}: expected shape {list(shape)}, got {list(state[key].shape)}")


@torch.no_grad()
def scatter_grouped(model, state: dict, assign) -> None:
    """Split grouped tensors back into columns: assign(param, chunk) for every column parameter."""
    for row in model.layout.rows:
        parts = _parts(model, row)
        for key in ("weight", "bias"):
            chunks = torch.split(state[f"{row.name}.{key}"], [row.widths[c] for c, _ in parts], 0)
            for (_, m), chunk in zip(parts, chunks):
                assign(getattr(m, key), chunk)


def grouped_state_dict(model) -> dict:
    """The single-device equivalent's state dict, as CPU tensors (copies, not views)."""
    return gather_grouped(model, lambda p: p)


def load_grouped_state_dict(model, state: dict) -> None:
    """Load a grouped state dict; missing, unexpected or misshapen keys raise naming the key."""
    check_grouped(model, state)
    scatter_grouped(model, state, lambda p, chunk: p.copy_(chunk))
