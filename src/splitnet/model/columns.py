"""SplitAlexNet: the two-column network of §3.2 / Figure 2, one nn.Module per column.

The columns are generated from the layout table (layout.py) and are identical in code; they only
differ in which device they sit on and which rows give them a nonzero width. A forward pass is one
walk (SplitAlexNet.walk) over the table's segments, the rows between two exchanges; at a crossing
row the exchange (exchange.py) hands every reading column the concatenation of all columns' previous
outputs, and each segment goes to an executor (concurrent.py) that runs every column's rows: in
turn, in worker threads, or on CUDA streams. Nothing else synchronises the columns, so on two GPUs
their kernels are queued back to back and run concurrently.

Shapes per column, paper layout, batch B (224 crop padded to 227 for conv1):
  image [B,3,227,227] -> conv1 [B,48,55,55] -> pool1 [B,48,27,27] -> conv2 [B,128,27,27]
  -> pool2 [B,128,13,13] =exchange=> conv3 reads [B,256,13,13] -> [B,192,13,13] -> conv4 [B,192,13,13]
  -> conv5 [B,128,13,13] -> pool5 [B,128,6,6] -> flatten [B,4608] =exchange=> fc6 reads [B,9216]
  -> [B,2048] =exchange=> fc7 reads [B,4096] -> [B,2048] =exchange=> fc8 (head column) [B,1000]
At geometry "cifar" (layout.CIFAR): image [B,3,24,24] -> conv1 [B,12,24,24] -> pool1 11x11 -> conv2
[B,32,11,11] -> pool2 5x5 -> conv3..conv5 at 5x5 -> pool5 [B,32,2,2] -> fc6..fc8 as above, narrower.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import config as _config
from ..data.rng import derive_seed
from . import concurrent as _concurrent
from .config import ModelConfig
from .convert import grouped_state_dict, load_grouped_state_dict
from .exchange import LocalExchange, broadcast, collect
from .layers import LocalResponseNorm, PaperDropout, activation
from .layout import LAYER_NAMES, Layout, apply_model_options, get_geometry, get_layout, init_gain_factors
from .placement import describe, resolve_devices

# conv1 input padding per input mode, (left, right, top, bottom), and the crop side it expects.
INPUT_MODES = {
    "pad3": ((0, 3, 0, 3), 224),  # cuda-convnet: the last filter hangs 3 pixels over, read as zeros
    "caffe227": ((0, 0, 0, 0), 227),
    "torchvision": ((2, 2, 2, 2), 224),
}


def model_layout(layout, cfg: ModelConfig) -> Layout:
    """The layout a ModelConfig describes: a built-in name (or Layout) plus the config's table edits."""
    return apply_model_options(get_layout(layout, cfg.num_classes, cfg.geometry), cfg.pool, cfg.cross_add,
                               cfg.cross_remove, cfg.lrn_scope)


def input_spec(cfg: ModelConfig) -> tuple:
    """(conv1 input padding (left, right, top, bottom), the crop side the model takes)."""
    if cfg.geometry == "imagenet":
        return INPUT_MODES[cfg.input_mode]
    geo = get_geometry(cfg.geometry)
    return (0, 0, 0, 0), geo.image_side


def init_stds(layout: Layout, cfg: ModelConfig) -> dict:
    """Per layer, the std of its weights' N(0, std^2) init (§5: 0.01; scaled per layer at another
    geometry when init_scaling = "geometry", see layout.init_gain_factors)."""
    if cfg.init_scaling == "none":
        return {n: cfg.init_std for n in layout.names}
    factors = init_gain_factors(layout.geometry, cfg.num_classes)
    return {n: cfg.init_std * factors[n] for n in layout.names}


class Column(nn.Module):
    """One column: the rows of the table where this column has a nonzero width.

    Submodules are named after the paper's layers (conv1..fc8), so state-dict keys read
    `columns.0.conv3.weight`. Stateless parts (activation, LRN, pooling, dropout) follow each layer
    as the row's flags say, in the paper's order: layer, ReLU, LRN, pool, dropout (§3.5).
    """

    is_local = True

    def __init__(self, layout: Layout, index: int, cfg: ModelConfig):
        super().__init__()
        self.index = index
        self.dropout_stream = None  # (seed, full batch, offset): see set_dropout_stream
        self.rows = tuple(r for r in layout.rows if r.widths[index] > 0)
        for row, st in zip(layout.rows, layout.stats()):
            w = row.widths[index]
            if not w:
                continue
            fan_in = st.in_widths[index]
            if row.kind == "conv":
                mod = nn.Conv2d(fan_in, w, row.kernel, row.stride, row.pad)
            else:
                mod = nn.Linear(fan_in, w)
            self.add_module(row.name, mod)
        self.act = activation(cfg.activation)
        self.lrn = (LocalResponseNorm(cfg.lrn_size, cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_k, cfg.lrn_convention)
                    if cfg.lrn else None)
        self.drop = PaperDropout(cfg.dropout, cfg.dropout_mode)

    def layer(self, row, x: torch.Tensor) -> torch.Tensor:
        """Run one row of the table on this column's input x."""
        return self.post(row, self.pre(row, x))

    def pre(self, row, x: torch.Tensor) -> torch.Tensor:
        """The layer and its activation."""
        if row.kind == "fc" and x.dim() > 2:
            x = x.flatten(1)  # channel-major: c*H*W + h*W + w, as the grouped fc6 expects
        x = getattr(self, row.name)(x)
        return self.act(x) if row.act else x

    def run(self, steps, x: torch.Tensor):
        """This column's part of one stage of the walk (concurrent.Stage.steps): its rows in order,
        None from the first row where it has no width."""
        c = self.index
        for row, part in steps:
            if not row.widths[c]:
                return None
            if part == "layer":
                x = self.layer(row, x)
            elif part == "pre":
                x = self.pre(row, x)
            else:  # "post": x holds every column's maps (lrn_scope="all"); this column's come at start
                x = self.post(row, x, (sum(row.widths[:c]), row.widths[c]))
        return x

    def post(self, row, x: torch.Tensor, lrn_slice: tuple | None = None) -> torch.Tensor:
        """LRN, pooling, dropout. lrn_slice=(start, width): x holds every column's maps (lrn_cross);
        normalise across all of them, keep this column's."""
        if row.lrn and self.lrn is not None:
            x = self.lrn(x)
            if lrn_slice is not None:
                x = x[:, lrn_slice[0]:lrn_slice[0] + lrn_slice[1]]
        elif lrn_slice is not None:
            x = x[:, lrn_slice[0]:lrn_slice[0] + lrn_slice[1]]
        if row.pool:
            x = F.max_pool2d(x, row.pool[0], row.pool[1])
        if row.dropout:
            stream = None
            if self.dropout_stream is not None:
                seed, full, offset = self.dropout_stream
                stream = (derive_seed(seed, self.index, LAYER_NAMES.index(row.name)), full, offset)
            x = self.drop(x, stream)
        return x


class RemoteColumn(nn.Module):
    """Stands in for a column that lives in another process (train/distributed.py): no parameters here."""

    is_local = False

    def __init__(self, layout: Layout, index: int):
        super().__init__()
        self.index = index
        self.rows = tuple(r for r in layout.rows if r.widths[index] > 0)
        self.dropout_stream = None


class SplitAlexNet(nn.Module):
    """The paper's network split into columns placed on `devices` (§3.2, Figure 2).

    num_classes: outputs of fc8 (default 1000, or config's). layout: a name from `splitnet.layouts()` or a Layout.
    devices: None (pick GPUs if present, else CPU emulation), one device for all columns, or one per
    column, e.g. ("cuda:0", "cuda:1"). config / overrides: ModelConfig fields (paper defaults).
    concurrency: how one process runs its columns at the same time, "auto", "sequential", "threads"
    (CPU emulation) or "streams" (one GPU); concurrent.py. It changes speed, never the result.
    Input: float [B, 3, 224, 224] mean-subtracted 0..255 RGB (227 with input_mode="caffe227";
    [B, 3, 24, 24] at geometry "cifar").
    Output: logits [B, num_classes] on the head column's device.
    """

    def __init__(self, num_classes: int | None = None, layout=None, devices=None,
                 config: ModelConfig | None = None, local_columns=None, concurrency: str = "auto",
                 **overrides):
        super().__init__()
        cfg = config or ModelConfig()
        num_classes = cfg.num_classes if num_classes is None else num_classes
        layout = cfg.layout if layout is None else layout
        name = layout.name if isinstance(layout, Layout) else layout
        cfg = _config.replace(cfg, num_classes=num_classes, layout=name, **overrides)
        self.config = cfg
        self.layout = model_layout(layout, cfg)
        self.devices = resolve_devices(devices, self.layout.columns)
        self.pad, self.input_side = input_spec(cfg)
        self.columns = nn.ModuleList(Column(self.layout, c, cfg) for c in range(self.layout.columns))
        self.reset_parameters()  # every column, so a seed gives the same network on any placement
        # local_columns: the columns this process holds (train/distributed.py: one per rank); the others
        # become parameter-free stand-ins and their maps arrive through the exchange.
        self.local = tuple(range(self.layout.columns)) if local_columns is None else tuple(local_columns)
        for c in range(self.layout.columns):
            if c not in self.local:
                self.columns[c] = RemoteColumn(self.layout, c)
        for c in self.local:
            self.columns[c].to(self.devices[c])
        self.exchange = LocalExchange(self.devices)
        self.concurrency = concurrency
        self.tuned_strategy = None  # what tune.calibrate measured fastest here ("auto" then uses it)
        _concurrent.choose(self, concurrency)  # a bad or impossible request fails here, naming why

    @property
    def strategy(self) -> str:
        """The concurrency strategy the next forward pass uses ("auto" resolved now: it depends on
        the intra-op thread count, which a run may set after building the model)."""
        return _concurrent.choose(self, self.concurrency)

    # ---- init (§5) ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Every weight ~ N(0, std^2) (init_stds: 0.01 at the paper's scale); biases init_bias in
        init_bias_layers, 0 elsewhere (§5).

        Draws on the CPU in table order (layer by layer, column by column) and copies to each
        column's device, so a seed gives the same network on any placement.
        """
        cfg = self.config
        stds = init_stds(self.layout, cfg)
        for row in self.layout.rows:
            for col in self.columns:
                mod = getattr(col, row.name, None) if col.is_local else None
                if mod is None:
                    continue
                w = torch.empty(mod.weight.shape).normal_(0.0, stds[row.name], generator=generator)
                mod.weight.copy_(w)
                mod.bias.fill_(cfg.init_bias if row.name in cfg.init_bias_layers else 0.0)

    # ---- forward -----------------------------------------------------------------------------
    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Check the crop and apply conv1's input padding (input_mode)."""
        side = self.input_side
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != side or x.shape[3] != side:
            raise ValueError(f"conv1: expected input [B, 3, {side}, {side}] (input_mode="
                             f"{self.config.input_mode!r}), got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"conv1: expected a float tensor (mean-subtracted 0..255 RGB), got {x.dtype}")
        return F.pad(x, self.pad) if any(self.pad) else x

    def walk(self, x: torch.Tensor, executor, upto: str | None = None) -> list:
        """The forward pass over the layout's segments: per-column outputs of layer `upto` (default:
        the last), None where a column has none. x: the padded input (prepare_input).

        The one walk every strategy takes: between segments it calls the exchange (exchange.py:
        `self.exchange.gather`, once per crossing row), and it hands each segment to `executor`
        (concurrent.py: Sequential, Threads or Streams), which only decides where each column's rows
        run.
        """
        if upto is not None and upto not in self.layout.names:
            raise ValueError(f"layout {self.layout.name!r} has no layer {upto!r}")
        n = self.layout.columns
        # Both columns read the whole image (§3.2): a copy on each column's device.
        outs = executor.begin(self, broadcast(x, self.devices, self.local))
        for stage in _concurrent.stages(self.layout, self.config.lrn, upto):
            if stage.exchange is not None:
                row, prev = stage.exchange, outs
                readers = [c for c, w in enumerate(row.widths) if w > 0]
                outs = executor.exchange(lambda rs: self.exchange.gather(row.name, prev, rs), readers)
            first = stage.steps[0][0]
            jobs = [(c, outs[c]) for c in range(n)
                    if c in self.local and outs[c] is not None and first.widths[c] > 0]
            outs = executor.run(self, stage, jobs)
        return executor.end(outs)

    def forward_columns(self, x: torch.Tensor, upto: str | None = None) -> list:
        """Per-column outputs of layer `upto` (default: the last); None where a column has none.
        The sequential walk: the columns one after the other in this thread."""
        return self.walk(self.prepare_input(x), _concurrent.Sequential(), upto)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits on the head column's device (None in a process that does not hold the head)."""
        strategy = self.strategy
        if strategy == "threads":
            return _concurrent.threads_forward(self, self.prepare_input(x))
        if strategy == "streams":
            return _concurrent.streams_forward(self, self.prepare_input(x))
        return self.forward_columns(x)[self.layout.head]

    def set_dropout_stream(self, seed: int | None, full_batch: int = 0, offset: int = 0) -> None:
        """Draw the next forward passes' dropout masks from generators seeded by (seed, column, layer),
        as if for a batch of `full_batch` rows of which this batch starts at row `offset`; None goes
        back to the global RNG. Training sets a new seed every step (train/step.py), which makes the masks a
        function of (run seed, step) alone: the same on every placement and after a resume."""
        for col in self.columns:
            col.dropout_stream = None if seed is None else (int(seed), int(full_batch), int(offset))

    def features(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """Layer `layer`'s output of all columns concatenated in column order, on the head's device
        (fc7: the 4096-d vectors of Figure 4's nearest neighbours, §6.1)."""
        return collect(self.forward_columns(x, upto=layer), self.devices[self.layout.head])

    # ---- single-device equivalent (convert.py) --------------------------------------------
    def grouped_state_dict(self) -> dict:
        return grouped_state_dict(self)

    def load_grouped_state_dict(self, state: dict) -> None:
        load_grouped_state_dict(self, state)

    def extra_repr(self) -> str:
        return f"layout={self.layout.name!r}, devices={describe(self.devices)}"
