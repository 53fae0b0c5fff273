"""Checking a layout table and computing, per layer, shapes and costs (LayerStats); errors name the
layer. Layout runs `analyse` when it is built."""
from __future__ import annotations

from .rows import LAYER_NAMES, LayerStats, LayoutError


def analyse(layout) -> list:
    """Validate the table and compute shapes and costs; errors name the layer."""
    rows = layout.rows
    _check_rows(layout.name, rows)
    stats = []
    prev_out = [(3, layout.image_side, layout.image_side)] * rows[0].columns  # the image, on every column
    for i, r in enumerate(rows):
        st = _layer_stats(r, prev_out, rows[i - 1].name if i else None)
        stats.append(st)
        prev_out = list(st.out_shapes)
    return stats


def _check_rows(name: str, rows) -> None:
    """What the table must hold before any shape is computed: names, order, kinds, widths, ends."""
    if not rows:
        raise LayoutError(f"layout {name!r} has no layers")
    ncol = rows[0].columns
    if ncol < 1:
        raise LayoutError(f"layer {rows[0].name}: no columns")
    last_index = -1
    for r in rows:
        last_index = _check_row(r, ncol, rows[0].name, last_index)
    if rows[0].name != "conv1":
        raise LayoutError(f"layer {rows[0].name}: the first layer must be conv1")
    if rows[-1].name != "fc8":
        raise LayoutError(f"layer {rows[-1].name}: the last layer must be fc8 (the classifier)")
    if rows[0].cross:
        raise LayoutError("layer conv1: conv1 reads the whole image in every column (§3.2); "
                          "'cross' has no meaning there")
    if rows[0].widths.count(0):
        raise LayoutError("layer conv1: every column must compute conv1 (each column starts from the image)")
    if sum(1 for w in rows[-1].widths if w > 0) != 1:
        raise LayoutError(f"layer fc8: the output layer is computed on exactly one column (the head), "
                          f"got widths {rows[-1].widths}")


def _check_row(r, ncol: int, first: str, last_index: int) -> int:
    """One row's own consistency; returns its index in the paper's order."""
    if r.name not in LAYER_NAMES:
        raise LayoutError(f"unknown layer {r.name!r} (the paper's layers are {', '.join(LAYER_NAMES)})")
    index = LAYER_NAMES.index(r.name)
    if index <= last_index:
        raise LayoutError(f"layer {r.name}: out of order or repeated (layers run in the paper's order)")
    expected_kind = "fc" if r.name.startswith("fc") else "conv"
    if r.kind != expected_kind:
        raise LayoutError(f"layer {r.name}: kind {r.kind!r}, expected {expected_kind!r}")
    if r.columns != ncol:
        raise LayoutError(f"width mismatch: layer {r.name} gives {r.columns} column widths, "
                          f"layer {first} gives {ncol}")
    if any((not isinstance(w, int)) or w < 0 for w in r.widths):
        raise LayoutError(f"layer {r.name}: widths must be non-negative integers, got {r.widths}")
    if r.total == 0:
        raise LayoutError(f"layer {r.name}: every column has width 0")
    if r.pool is not None and (len(r.pool) != 2 or min(r.pool) < 1):
        raise LayoutError(f"layer {r.name}: pool must be (window, stride), got {r.pool}")
    return index


def _layer_stats(r, prev_out: list, prev_name: str | None) -> LayerStats:
    """Row `r` reading `prev_out` (per column the previous layer's shape after pooling, None where
    absent; the image for conv1): its shapes, costs and exchanges."""
    # What each column reads: its own previous output, or every column's (concatenated).
    present = [sh for sh in prev_out if sh is not None]
    if r.kind == "conv" and any(len(sh) != 3 for sh in present):
        raise LayoutError(f"layer {r.name}: a conv layer cannot follow a fully connected one")
    if r.cross and len({sh[1:] for sh in present}) != 1:
        raise LayoutError(f"layer {r.name}: columns' inputs have different spatial sizes")
    in_widths, in_feats, out_shapes, exch = [], [], [], []
    for c, w in enumerate(r.widths):
        in_width, in_feat, out_shape = _column_input(r, c, w, prev_out, prev_name, exch)
        in_widths.append(in_width)
        in_feats.append(in_feat)
        out_shapes.append(out_shape)
    if prev_name is not None:
        _check_all_read(r, prev_out, prev_name)
    column_params = tuple(f * w + w if w else 0 for f, w in zip(in_feats, r.widths))
    spatial = [(sh[1] * sh[2]) if sh and len(sh) == 3 else 1 for sh in out_shapes]
    if r.lrn and r.lrn_cross:
        cols = [c for c, w in enumerate(r.widths) if w]
        exch += [(s_, d, 4 * r.widths[s_] * spatial[s_]) for d in cols for s_ in cols if s_ != d]
    macs = sum(f * w * sp for f, w, sp in zip(in_feats, r.widths, spatial) if w)
    neurons = sum(w * sp for w, sp in zip(r.widths, spatial) if w)
    # Pooling shrinks the maps the next layer reads.
    after = tuple((sh[0], _pool_out(sh[1], r.pool), _pool_out(sh[2], r.pool)) if sh and len(sh) == 3
                  else sh for sh in out_shapes)
    if any(sh is not None and len(sh) == 3 and sh[1] < 1 for sh in after):
        raise LayoutError(f"layer {r.name}: pooling {r.pool} leaves no pixels")
    return LayerStats(r.name, tuple(in_widths), after, neurons, sum(column_params), macs,
                      sum(b for _, _, b in exch), tuple(exch), column_params)


def _column_input(r, c: int, w: int, prev_out: list, prev_name, exch: list) -> tuple:
    """Column c of row r: (input width, fan-in, output shape before pooling); appends to `exch` the
    tensors it reads from other columns."""
    if w == 0:
        return 0, 0, None
    if r.cross:
        srcs = [s for s, sh in enumerate(prev_out) if sh is not None]
    else:
        if prev_out[c] is None:
            raise LayoutError(
                f"layer {r.name}: column {c} computes {w} outputs but reads only its own column, "
                f"which has no {prev_name} output (mark {r.name} cross, or give column {c} "
                f"a {prev_name} width)")
        srcs = [c]
    exch += [(s, c, 4 * _numel(prev_out[s])) for s in srcs if s != c]
    ch = sum(prev_out[s][0] for s in srcs)
    if r.kind != "conv":
        feats = sum(_numel(prev_out[s]) for s in srcs)
        return feats, feats, (w,)
    side = prev_out[srcs[0]][1]
    out = (side + 2 * r.pad - r.kernel) // r.stride + 1
    if out < 1:
        raise LayoutError(f"layer {r.name}: input {side}x{side} is smaller than the kernel")
    return ch, ch * r.kernel * r.kernel, (w, out, out)


def _check_all_read(r, prev_out: list, prev_name: str) -> None:
    """Every output the previous layer computed must be read by row r."""
    for s, sh in enumerate(prev_out):
        if sh is None:
            continue
        read = r.widths[s] > 0 or (r.cross and any(w > 0 for w in r.widths))
        if not read:
            raise LayoutError(
                f"unused row: layer {prev_name} of column {s} is never read "
                f"({r.name} does not cross and column {s} has no {r.name} units)")


def _pool_out(side: int, pool) -> int:
    return side if not pool else (side - pool[0]) // pool[1] + 1


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
