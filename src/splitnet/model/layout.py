"""The layout: AlexNet's column split as a declarative table (paper §3.2, §3.5, Figure 2).

One row per paper layer. A row gives the layer's kind, its output width on each column (0 = that
column does not compute the layer), kernel/stride/pad, whether ReLU, LRN, pooling and dropout
follow it, and `cross`: whether the layer reads the maps of every column (an exchange) or only its
own column's. Devices never appear here; they are given when the model is built.

A layer-split ablation is an edit of this table: `make_layout(columns=4)`, `cross=(...)`, other
widths. The table also answers, for any layout, what the model would cost: parameters,
multiply-adds per image, training FLOPs per image, and forward exchange bytes per image per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from .analysis import analyse
# The table's pieces live in rows.py, its check and costs in analysis.py; importable from here too.
from .rows import LAYER_NAMES, LayerRow, LayerStats, LayoutError  # noqa: F401

# Total widths of the paper's network (both columns together), §3.5.
PAPER_WIDTHS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256,
                "fc6": 4096, "fc7": 4096}
PAPER_CROSS = ("conv3", "fc6", "fc7", "fc8")
# torchvision's AlexNet, Krizhevsky's "One weird trick" (2014) one-tower net: other conv widths, no LRN.
OWT_WIDTHS = {"conv1": 64, "conv2": 192, "conv3": 384, "conv4": 256, "conv5": 256}
_KERNELS = {"conv1": (11, 4, 0), "conv2": (5, 1, 2), "conv3": (3, 1, 1), "conv4": (3, 1, 1),
            "conv5": (3, 1, 1)}
# Effective conv1 input side: a 224 crop plus cuda-convnet's 3-pixel right/bottom pad (or a 227
# Caffe crop): 1 + (227 - 11) / 4 = 55.
IMAGE_SIDE = 227


@dataclass(frozen=True)
class Geometry:
    """What a layout's rows take from the scale of the input: total widths per layer (both columns),
    (kernel, stride, pad) per conv layer, and conv1's input side. Everything else in a row (which
    layers cross, LRN, pooling, dropout, activations) is the layout's, the same at every scale."""

    name: str
    widths: dict
    kernels: dict
    image_side: int
    crop: int  # the crop the data pipeline cuts (before any conv1 input padding)
    image_size: int  # the side of the prepared images the crop is cut from


# The paper's network (§3.5, Figure 2): 224 crops of 256x256 images.
IMAGENET = Geometry("imagenet", PAPER_WIDTHS, _KERNELS, IMAGE_SIDE, crop=224, image_size=256)
# The same network family on CIFAR-10's 32x32 images (the paper's Figure 1 data set). Only sizes change:
# 24x24 crops of the 32x32 images (the original code's CIFAR-10 nets, cuda-convnet layers-*pct, cropped
# 24 of 32); conv1 5x5/1 (an 11x11/4 filter on 24 pixels would leave 4x4 maps), conv2 5x5, conv3-5
# 3x3, every max pool 3/2, giving per column 24 -> pool1 11 -> pool2 5 -> pool5 2 (the paper: 55 -> 27
# -> 13 -> 6). Total widths 32-64-128-128-64 and 512-512: a third of the paper's in conv1, conv3 and
# conv4, a quarter in conv2 and conv5, an eighth in fc6 and fc7, so that a 2-core CPU trains it at
# about 1,000 images/s (9.5 M multiply-adds per image, 1.3% of the paper's).
CIFAR = Geometry("cifar", {"conv1": 32, "conv2": 64, "conv3": 128, "conv4": 128, "conv5": 64,
                           "fc6": 512, "fc7": 512},
                 {"conv1": (5, 1, 2), "conv2": (5, 1, 2), "conv3": (3, 1, 1), "conv4": (3, 1, 1),
                  "conv5": (3, 1, 1)}, image_side=24, crop=24, image_size=32)
GEOMETRIES = {g.name: g for g in (IMAGENET, CIFAR)}


def get_geometry(name) -> Geometry:
    if isinstance(name, Geometry):
        return name
    if name not in GEOMETRIES:
        raise LayoutError(f"unknown geometry {name!r}; known: {', '.join(GEOMETRIES)}")
    return GEOMETRIES[name]


@dataclass(frozen=True)
class Layout:
    """A named, validated table of LayerRows. Build with `make_layout` or `get_layout`."""

    name: str
    rows: tuple
    image_side: int = IMAGE_SIDE
    geometry: str = "imagenet"  # the scale its widths and kernels come from (GEOMETRIES)
    _stats: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_stats", tuple(analyse(self)))

    # ---- structure -------------------------------------------------------------------------
    @property
    def columns(self) -> int:
        return self.rows[0].columns

    @property
    def num_classes(self) -> int:
        return self.rows[-1].total

    @property
    def head(self) -> int:
        """The column that computes the output layer (fc8)."""
        return next(c for c, w in enumerate(self.rows[-1].widths) if w > 0)

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise LayoutError(f"layout {self.name!r} has no layer {name!r}")

    @property
    def names(self) -> tuple:
        return tuple(r.name for r in self.rows)

    # ---- costs -----------------------------------------------------------------------------
    def stats(self) -> tuple:
        return self._stats

    def params(self) -> int:
        return sum(s.params for s in self._stats)

    def macs_per_image(self) -> int:
        return sum(s.macs for s in self._stats)

    def train_flops_per_image(self) -> int:
        """FLOPs of one image's training step as computed, a multiply-add counted as 2 FLOPs: per
        conv/fc layer the forward pass, the weight gradient and the input gradient, each as many
        multiply-adds as the forward; conv1's input gradient is never computed (the image needs
        none). Bias, ReLU, LRN, pooling, dropout and the SGD update (O(activations + weights), not
        O(MACs)) are left out. Paper layout at 224 (+3 pad): 2 x (3 x 724.4 M - 105.4 M) = 4.14 G."""
        return 2 * (3 * self.macs_per_image() - self._stats[0].macs)

    def exchange_bytes_per_image(self, bytes_per_element: int = 4) -> dict:
        """Forward bytes per image that cross between columns, per layer (fp32 by default)."""
        return {s.name: s.exchange_bytes * bytes_per_element // 4 for s in self._stats
                if s.exchange_bytes}

    def neurons(self) -> tuple:
        return tuple(s.neurons for s in self._stats)

    def table(self) -> str:
        """The layout as a Markdown table, one row per layer."""
        head = ("| layer | per-column widths | kernel/stride/pad | reads | after | output per column (after pooling)"
                " | params | MACs/image | exchange bytes/image |")
        lines = [head, "|" + "---|" * 9]
        for r, s in zip(self.rows, self._stats):
            after = [n for n, on in (("act", r.act), ("lrn" + (" (all columns)" if r.lrn_cross else ""), r.lrn),
                                      ("dropout", r.dropout)) if on]
            if r.pool:
                after.insert(2 if r.lrn else 1, f"pool{r.pool[0]}/{r.pool[1]}")
            ksp = f"{r.kernel}/{r.stride}/{r.pad}" if r.kind == "conv" else "-"
            reads = "all columns" if r.cross else ("image" if r is self.rows[0] else "own column")
            shapes = ", ".join("x".join(map(str, sh)) if sh else "-" for sh in s.out_shapes)
            lines.append(f"| {r.name} | {'/'.join(map(str, r.widths))} | {ksp} | {reads} | "
                         f"{', '.join(after) or '-'} | {shapes} | {s.params:,} | {s.macs:,} | "
                         f"{s.exchange_bytes:,} |")
        lines.append(f"| total | {self.columns} column(s) | | | | | {self.params():,} | "
                     f"{self.macs_per_image():,} | {sum(s.exchange_bytes for s in self._stats):,} |")
        return "\n".join(lines)


def make_layout(name: str = "custom", columns: int = 2, cross: Iterable[str] = PAPER_CROSS,
                num_classes: int = 1000, head: int = 0, widths: dict | None = None,
                pool: tuple | None = (3, 2), lrn_layers: Sequence[str] = ("conv1", "conv2"),
                dropout_layers: Sequence[str] = ("fc6", "fc7"), omit: Sequence[str] = (),
                geometry="imagenet") -> Layout:
    """The paper's table with the knobs the ablations turn.

    columns: how many columns share every layer (the paper's widths divided evenly; §3.2 uses 2).
    cross: layers that read every column (paper: conv3, fc6, fc7, fc8).
    widths: per-layer overrides, {layer: total width} (split evenly) or {layer: (w0, w1, ...)}.
    head: the column that computes fc8 (the original 2012 code used GPU 1, cuda-convnet2 GPU 0).
    pool: (window, stride) of the three max-pooling layers; (3, 2) overlaps (§3.4), (2, 2) does not.
    omit: middle layers to remove (§7: "removing any middle layer ... about 2% worse").
    geometry: the scale, "imagenet" (the paper's) or "cifar" (GEOMETRIES): widths, kernels, input side.
    """
    geo = get_geometry(geometry)
    cross = tuple(cross)
    for n in (*cross, *lrn_layers, *dropout_layers, *omit, *(widths or {})):
        if n not in LAYER_NAMES:
            raise LayoutError(f"unknown layer {n!r} (the paper's layers are {', '.join(LAYER_NAMES)})")
    if not 0 <= head < columns:
        raise LayoutError(f"layer fc8: head column {head} does not exist in a {columns}-column layout")
    totals = dict(geo.widths)
    rows = []
    for n in LAYER_NAMES:
        if n in omit:
            continue
        spec = (widths or {}).get(n)
        if n == "fc8":
            per = tuple(num_classes if c == head else 0 for c in range(columns)) if spec is None else spec
        elif isinstance(spec, (tuple, list)):
            per = tuple(spec)
        else:
            total = totals[n] if spec is None else spec
            if total % columns:
                raise LayoutError(f"width mismatch: layer {n} has {total} maps, not divisible by "
                                  f"{columns} columns")
            per = (total // columns,) * columns
        if isinstance(spec, (tuple, list)) and len(spec) != columns:
            raise LayoutError(f"width mismatch: layer {n} gives {len(spec)} column widths for "
                              f"{columns} columns")
        kind = "fc" if n.startswith("fc") else "conv"
        k, s, p = geo.kernels.get(n, (1, 1, 0))
        rows.append(LayerRow(
            name=n, kind=kind, widths=per, kernel=k, stride=s, pad=p,
            cross=(n in cross and n != "conv1"), act=(n != "fc8"), lrn=(n in lrn_layers),
            pool=(pool if n in ("conv1", "conv2", "conv5") else None), dropout=(n in dropout_layers)))
    return Layout(name=name, rows=tuple(rows), image_side=geo.image_side, geometry=geo.name)


def with_rows(layout: Layout, name: str | None = None, **changes_by_layer) -> Layout:
    """A copy of `layout` with fields of some rows changed: with_rows(l, conv5={'cross': True})."""
    rows = []
    for r in layout.rows:
        ch = changes_by_layer.pop(r.name, None)
        rows.append(replace(r, **ch) if ch else r)
    if changes_by_layer:
        raise LayoutError(f"unknown layer {next(iter(changes_by_layer))!r} in layout {layout.name!r}")
    return Layout(name=name or layout.name, rows=tuple(rows), image_side=layout.image_side,
                  geometry=layout.geometry)


def apply_model_options(layout: Layout, pool=(3, 2), cross_add=(), cross_remove=(), lrn_scope="column") -> Layout:
    """The table edits a ModelConfig asks for (the ablations): pooling window/stride, layers that
    cross in addition or no more, LRN over every column's maps. No edit: the layout itself."""
    pool = tuple(pool)
    changes, tags = {}, []
    for n in (*cross_add, *cross_remove):
        if n not in layout.names:
            raise LayoutError(f"unknown layer {n!r} in cross_add/cross_remove (layout {layout.name!r} has "
                              f"{', '.join(layout.names)})")
    for r in layout.rows:
        ch = {}
        if r.pool and tuple(r.pool) != pool:
            ch["pool"] = pool
        if r.name in cross_add and not r.cross:
            ch["cross"] = True
        if r.name in cross_remove and r.cross:
            ch["cross"] = False
        if r.lrn and lrn_scope == "all" and layout.columns > 1:
            ch["lrn_cross"] = True
        if ch:
            changes[r.name] = ch
    if not changes:
        return layout
    if pool != (3, 2):
        tags.append(f"pool{pool[0]}/{pool[1]}")
    tags += [f"+{n}" for n in cross_add] + [f"-{n}" for n in cross_remove]
    if lrn_scope == "all":
        tags.append("lrn-all")
    return with_rows(layout, f"{layout.name}[{','.join(tags)}]", **changes)


def _builtin(num_classes: int, geometry="imagenet") -> dict:
    geo = get_geometry(geometry)
    half = {n: w // 2 for n, w in geo.widths.items()}

    def make(name, columns, cross, **kw):
        return lambda: make_layout(name, columns, cross, num_classes, geometry=geo, **kw)

    return {
        # §3.2: two columns meeting at conv3 and the fully connected layers; fc8 on one column.
        "paper": make("paper", 2, PAPER_CROSS),
        # A dense network split over two devices: every layer reads both columns.
        "dense": make("dense", 2, LAYER_NAMES[1:]),
        # Two independent conv towers that first meet at fc6.
        "towers": make("towers", 2, ("fc6", "fc7", "fc8")),
        # Footnote 2: the one-GPU comparison net, half the kernels in conv1..conv4, but full-size
        # conv5 and fully connected layers ("to make the two nets have approximately the same
        # number of parameters").
        "one-gpu": make("one-gpu", 1, (), widths={n: half[n] for n in ("conv1", "conv2", "conv3", "conv4")}),
        # The dense network on one device.
        "one-column": make("one-column", 1, ()),
        # The paper's crossings with the widths divided over four columns.
        "four-columns": make("four-columns", 4, PAPER_CROSS),
        # torchvision's trained AlexNet (One weird trick, 2014): one column, no LRN, dropout before
        # fc6 and fc7 (after pool5 and fc6). Its own widths at the imagenet scale, the geometry's elsewhere.
        "owt": make("owt", 1, (), widths=OWT_WIDTHS if geo.name == "imagenet" else None, lrn_layers=(),
                    dropout_layers=("conv5", "fc6")),
    }


def layouts() -> list:
    """Names of the built-in layouts."""
    return list(_builtin(1000))


def get_layout(name, num_classes: int = 1000, geometry="imagenet") -> Layout:
    """A built-in layout by name (see `layouts()`) at `geometry`, or a Layout passed through after
    checking its classes and geometry."""
    if isinstance(name, Layout):
        if name.num_classes != num_classes:
            raise LayoutError(f"layer fc8: layout {name.name!r} has {name.num_classes} outputs, "
                              f"the model asks for {num_classes} classes")
        if name.geometry != get_geometry(geometry).name:
            raise LayoutError(f"layout {name.name!r} is built at geometry {name.geometry!r}, "
                              f"the model asks for {get_geometry(geometry).name!r}")
        return name
    table = _builtin(num_classes, geometry)
    if name not in table:
        raise LayoutError(f"unknown layout {name!r}; built-in layouts: {', '.join(table)}")
    return table[name]()


def fan_in(layout: Layout, name: str) -> int:
    """Inputs per output unit of layer `name` on its first computing column (kernel area x channels
    for a conv layer, features for an fc layer)."""
    for r, st in zip(layout.rows, layout.stats()):
        if r.name == name:
            c = next(i for i, w in enumerate(r.widths) if w)
            return st.in_widths[c] * (r.kernel * r.kernel if r.kind == "conv" else 1)
    raise LayoutError(f"layout {layout.name!r} has no layer {name!r}")


def init_gain_factors(geometry, num_classes: int = 1000) -> dict:
    """Per layer, sqrt(F_paper / F_geometry), F the layer's fan-in in the paper layout at the paper's
    scale and at `geometry`. Multiplying the paper's init std (0.01, §5) by it gives every layer of the
    paper layout at `geometry` the same gain std*sqrt(F) as the paper's network, so the input's
    signal reaches fc8 as strongly as in the paper; other layouts keep their relation to the paper
    layout. 1.0 for every layer at the paper's own scale."""
    full = get_layout("paper", num_classes, IMAGENET)
    here = get_layout("paper", num_classes, geometry)
    return {n: math.sqrt(fan_in(full, n) / fan_in(here, n)) for n in LAYER_NAMES}
