"""Between the column model and its single-device equivalent (the "Caffe" grouped layout).

The grouped network is the one a single device would run: conv layers that do not cross become
`groups=columns` convolutions (Caffe's `group: 2`), crossing layers dense ones. Its state dict has
exactly the keys conv1.weight, conv1.bias, ..., fc8.bias, with output channels in column order
(column 0's, then column 1's). A crossing layer's input channels are likewise column 0's then
column 1's, so fc6's inputs are the concatenated pool5 maps flattened channel-major (c*36 + h*6 + w).
"""
from __future__ import annotations

import torch


def _computing(layout, row) -> list:
    return [c for c, w in enumerate(row.widths) if w > 0]


def column_tensors(model, tensor_of) -> list:
    """Per column: {"conv1.weight": tensor_of(param), ...} (CPU copies); None for a column that lives
    in another process (distributed placement)."""
    out = []
    for col in model.columns:
        if not getattr(col, "is_local", True):
            out.append(None)
            continue
        out.append({f"{row.name}.{key}": tensor_of(getattr(getattr(col, row.name), key)).detach().cpu().clone()
                    for row in col.rows for key in ("weight", "bias")})
    return out


def grouped_from_columns(layout, columns: list) -> dict:
    """Stack per-column tensors into the grouped form (every column must be present)."""
    grouped_shapes(layout)  # raises if this layout has no grouped equivalent
    out = {}
    for row in layout.rows:
        for key in ("weight", "bias"):
            k = f"{row.name}.{key}"
            out[k] = torch.cat([columns[c][k] for c in _computing(layout, row)], 0)
    return out


def columns_from_grouped(layout, state: dict) -> list:
    """The inverse: per column {"conv1.weight": chunk, ...} (views into `state`)."""
    cols = [{} for _ in range(layout.columns)]
    for row in layout.rows:
        who = _computing(layout, row)
        for key in ("weight", "bias"):
            k = f"{row.name}.{key}"
            for c, chunk in zip(who, torch.split(state[k], [row.widths[c] for c in who], 0)):
                cols[c][k] = chunk
    return cols


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
    return grouped_from_columns(model.layout, column_tensors(model, tensor_of))


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
    """Split grouped tensors back into columns: assign(param, chunk) for every local column parameter."""
    cols = columns_from_grouped(model.layout, state)
    for c, col in enumerate(model.columns):
        if not getattr(col, "is_local", True):
            continue
        for row in col.rows:
            for key in ("weight", "bias"):
                assign(getattr(getattr(col, row.name), key), cols[c][f"{row.name}.{key}"])


def grouped_state_dict(model) -> dict:
    """The single-device equivalent's state dict, as CPU tensors (copies, not views)."""
    return gather_grouped(model, lambda p: p)


def load_grouped_state_dict(model, state: dict) -> None:
    """Load a grouped state dict; missing, unexpected or misshapen keys raise naming the key."""
    check_grouped(model, state)
    scatter_grouped(model, state, lambda p, chunk: p.copy_(chunk))
