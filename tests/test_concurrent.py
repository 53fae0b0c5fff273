"""Running the columns concurrently (concurrent.py): same network as the sequential walk, in every respect
training reads (logits, input and parameter gradients, dropout masks, exchanges), and clear refusals."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import splitnet
from splitnet.model import concurrent as C
from reference import rel

B = 3


def _pair(layout="paper", classes=10, **kw):
    torch.manual_seed(3)
    seq = splitnet.SplitAlexNet(classes, layout, devices="cpu", concurrency="sequential", **kw)
    thr = splitnet.SplitAlexNet(classes, layout, devices="cpu", concurrency="threads", **kw)
    thr.load_state_dict(seq.state_dict())
    return seq, thr


def _x(seed=0):
    return torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(seed)) * 60


def test_segments_cut_before_every_exchange():
    names = [[r.name for r in seg] for seg in C.segments(splitnet.get_layout("paper"))]
    assert names == [["conv1", "conv2"], ["conv3", "conv4", "conv5"], ["fc6"], ["fc7"], ["fc8"]]
    names = [[r.name for r in seg] for seg in C.segments(splitnet.get_layout("towers"))]
    assert names[0] == ["conv1", "conv2", "conv3", "conv4", "conv5"]


def test_training_step_matches_sequential_with_global_rng_dropout():
    """Dropout drawn from the global RNG (no stream set): threads run those segments in column order,
    so one seed gives the same masks, hence the same loss and gradients."""
    seq, thr = _pair()
    y = torch.tensor([1, 2, 3])
    res = []
    for m in (seq, thr):
        m.train()
        x = _x().requires_grad_(True)
        torch.manual_seed(11)
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        res.append((loss.detach(), x.grad, {k: p.grad for k, p in m.named_parameters()}))
    assert rel(res[0][0], res[1][0]) < 1e-6
    assert rel(res[0][1], res[1][1]) < 1e-5
    for k, g in res[0][2].items():
        assert g.norm() > 0, k
        assert rel(g, res[1][2][k]) < 1e-5, k


def test_autograd_grad_sees_parameter_gradients():
    """The threaded net is one autograd node that *returns* its parameter gradients: torch.autograd.grad
    works as with any module, and nothing is accumulated into .grad on the side."""
    seq, thr = _pair()
    x = _x()
    grads = []
    for m in (seq, thr):
        m.eval()
        params = [m.columns[0].conv1.weight, m.columns[1].conv4.bias, m.columns[0].fc8.weight]
        grads.append(torch.autograd.grad(m(x).square().mean(), params))
    for a, b in zip(*grads):
        assert a.norm() > 0 and rel(a, b) < 1e-5
    assert all(p.grad is None for p in thr.parameters())


def test_frozen_columns_and_image_without_grad():
    seq, thr = _pair()
    for m in (seq, thr):
        for p in m.columns[1].parameters():
            p.requires_grad_(False)
        m.eval()
        m(_x()).sum().backward()
    for (k, a), b in zip(seq.named_parameters(), thr.parameters()):
        assert (a.grad is None) == (b.grad is None), k
        if a.grad is not None:
            assert rel(a.grad, b.grad) < 1e-5, k
    assert all(p.grad is None for p in thr.columns[1].parameters())


def test_inference_and_exchanges_match_sequential():
    seq, thr = _pair("four-columns")
    with torch.no_grad():
        with splitnet.record_exchanges() as log_s:
            a = seq.eval()(_x())
        with splitnet.record_exchanges() as log_t:
            b = thr.eval()(_x())
    assert rel(a, b) < 1e-5
    assert sorted(log_s, key=repr) == sorted(log_t, key=repr)
    assert sum(e.nbytes for e in log_t) // B == sum(thr.layout.exchange_bytes_per_image().values())


def test_columns_really_run_at_the_same_time():
    """The profiler sees column 0 and column 1 busy at once (one worker thread each)."""
    from splitnet.bench.model import column_overlap
    _, thr = _pair()
    res = column_overlap(thr, _x(), steps=2)
    assert res["lanes"] == 2
    assert res["overlap"] > 0.2


def test_auto_and_refusals(monkeypatch):
    m = splitnet.SplitAlexNet(10, "paper", devices="cpu")
    assert m.concurrency == "auto"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert m.strategy == "threads"
        torch.set_num_threads(1)  # one core: nothing to divide among the columns
        assert m.strategy == "sequential"
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="streams.*same CUDA device"):
        splitnet.SplitAlexNet(10, "paper", devices="cpu", concurrency="streams")
    with pytest.raises(ValueError, match="conv1: LRN across columns"):
        splitnet.SplitAlexNet(10, "paper", devices="cpu", concurrency="threads", lrn_scope="all")
    assert splitnet.SplitAlexNet(10, "paper", devices="cpu", lrn_scope="all").strategy == "sequential"
    with pytest.raises(ValueError, match="concurrency: 'fast'"):
        splitnet.SplitAlexNet(10, "paper", devices="cpu", concurrency="fast")
    from splitnet.train.config import TrainConfig
    from splitnet.config import ConfigError
    with pytest.raises(ConfigError, match="concurrency"):
        TrainConfig(concurrency="fast")


def test_fast_paths_equal_the_grouped_network_bf16_and_channels_last():
    """bf16 autocast (carried into the column threads) to bf16 tolerance; channels_last exactly as fp32."""
    from splitnet.model.precision import precision
    from splitnet.model.grouped import GroupedAlexNet
    _, thr = _pair()
    g = GroupedAlexNet(thr.config)
    g.load_state_dict(thr.grouped_state_dict())
    thr.eval(), g.eval()
    x = _x()
    with torch.no_grad():
        ref = g(x)
        with precision("bf16", "cpu"):
            lo = thr(x)
        thr.to(memory_format=torch.channels_last)
        cl = thr(x.contiguous(memory_format=torch.channels_last))
    assert lo.dtype == torch.bfloat16
    assert rel(lo.float(), ref) < 3e-2
    assert rel(cl, ref) < 1e-5
    with precision("bf16", "cpu"):  # and training: gradients reach every layer in bf16
        thr.train()
        thr(x).float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in thr.parameters())


# ---- one walk, one exchange ------------------------------------------------------------------------
class _Stream:
    """A stand-in for a CUDA stream on the CPU: records the waits."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


class _CpuStreams(C.Streams):
    """The streams executor with stand-in streams, so its walk runs (and is checked) on the CPU."""

    def __init__(self, model, log):
        n = model.layout.columns
        super().__init__(model, main=_Stream("main", log), streams=[_Stream(c, log) for c in range(n)])
        self.log = log

    def on(self, stream):
        self.log.append(("on", stream.name))
        return contextlib.nullcontext()

    def keep(self, t, stream):
        pass


def _counting(monkeypatch):
    """Count the walks (with their executor's type) and the exchange's forward and backward calls."""
    from splitnet.model.columns import SplitAlexNet
    from splitnet.model.exchange import LocalExchange
    calls = []
    for cls, name in ((SplitAlexNet, "walk"), (LocalExchange, "gather"), (LocalExchange, "gather_backward")):
        def wrap(self, *a, _f=getattr(cls, name), _name=name, **k):
            # walk: (x, executor, ...); gather: (layer, outs, readers); gather_backward: (outs, grads)
            what = type(a[1]).__name__ if _name == "walk" else a[0] if _name == "gather" else None
            calls.append((_name, what))
            return _f(self, *a, **k)
        monkeypatch.setattr(cls, name, wrap)
    return calls


def test_one_walk_for_every_strategy(monkeypatch):
    """Every strategy's forward is one call of SplitAlexNet.walk, with its own executor; the exchange
    runs once per crossing row forward, and the threads' backward routes gradients through
    exchange.py (gather_backward, once per crossing row), not by itself."""
    seq, thr = _pair()
    crossing = [r.name for r in seq.layout.rows if r.cross]
    assert crossing == ["conv3", "fc6", "fc7", "fc8"]
    x = _x()
    calls = _counting(monkeypatch)
    with torch.no_grad():
        ref = seq.eval()(x)
    assert calls == [("walk", "Sequential")] + [("gather", n) for n in crossing]
    calls.clear()
    with torch.no_grad():
        assert torch.equal(thr.eval()(x), ref)
    assert calls == [("walk", "Threads")] + [("gather", n) for n in crossing]
    calls.clear()
    thr(x).sum().backward()  # training: the walk inside the threaded autograd node
    assert calls == [("walk", "Threads")] + [("gather", n) for n in crossing] + \
        [("gather_backward", None)] * len(crossing)
    calls.clear()
    seq.features(x, "fc7")
    assert calls == [("walk", "Sequential")] + [("gather", n) for n in crossing[:3]]
    calls.clear()
    monkeypatch.setattr(C, "Streams", lambda model: _CpuStreams(model, []))  # no GPU needed
    with torch.no_grad():
        out = C.streams_forward(seq, seq.prepare_input(x))
    assert torch.equal(out, ref)
    assert calls[0] == ("walk", "_CpuStreams")
    assert sorted(n for k, n in calls if k == "gather") == sorted(  # per reader, on its own stream
        r.name for r in seq.layout.rows if r.cross for c, w in enumerate(r.widths) if w)


def test_streams_executor_on_stand_in_streams():
    """The streams executor's walk on the CPU: the same logits, gradients and exchanges as the
    sequential walk, bit for bit; each reader waits for every other column's stream before its
    exchange, and the caller's stream waits for the head's at the end."""
    seq, _ = _pair()
    seq.eval()
    x = _x()
    log = []
    res = []
    for make in (C.Sequential, lambda: _CpuStreams(seq, log)):
        seq.zero_grad(set_to_none=True)
        with splitnet.record_exchanges() as ev:
            out = seq.walk(seq.prepare_input(x), make())[seq.layout.head]
        out.square().mean().backward()
        res.append((out.detach(), sorted(ev, key=repr), [p.grad.clone() for p in seq.parameters()]))
    assert torch.equal(res[0][0], res[1][0]) and res[0][1] == res[1][1]
    assert all(torch.equal(a, b) for a, b in zip(res[0][2], res[1][2]))
    assert log[:2] == [("wait", 0, "main"), ("wait", 1, "main")]
    assert log[-1] == ("wait", "main", seq.layout.head)
    # conv3 (the first exchange): both readers wait for the other column before either gathers.
    first_on = next(i for i, e in enumerate(log) if e[0] == "on" and i > log.index(("on", 1)))
    waits = [e for e in log[:first_on] if e[0] == "wait"][2:]
    assert waits[:2] == [("wait", 0, 1), ("wait", 1, 0)]


def test_only_exchange_py_moves_tensors_between_columns():
    """Read from the source: the walk (columns.py), the executors (concurrent.py) and the layers move
    no tensor between devices and concatenate none; exchange.py does (the runtime side: the exchange's
    calls are counted in test_one_walk_for_every_strategy)."""
    import ast
    from pathlib import Path
    src = Path(splitnet.__file__).parent / "model"
    moving = {"to", "cat", "stack", "narrow", "copy_", "split", "chunk", "index_select", "cuda", "cpu"}
    allowed = {"self.columns[c].to(self.devices[c])",  # placing a column's parameters
               "mod.weight.copy_(w)",  # init: drawn on the CPU, copied to the column (reset_parameters)
               "((off >= -before) & (off <= after) & same).to(dtype)",  # LRN's band matrix: a dtype
               "(xw * dpow).to(x.dtype)", "q.addcmul_(t, xw, value=-1.0).to(x.dtype)"}  # LRN: back from float32
    found = []
    for name in ("columns.py", "concurrent.py", "layers.py"):
        text = (src / name).read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in moving:
                seg = ast.get_source_segment(text, node)
                if seg not in allowed:
                    found.append(f"{name}: {seg}")
    assert found == []
    ex = (src / "exchange.py").read_text()
    assert "torch.cat(" in ex and ".to(" in ex


def test_walk_exchanges_inside_a_row_for_lrn_across_columns():
    """lrn_scope="all": the walk cuts the LRN rows between their layer and their LRN and exchanges
    there (sequential only); the result is the grouped network's with LRN over all maps."""
    from splitnet.model.grouped import GroupedAlexNet
    torch.manual_seed(0)
    m = splitnet.SplitAlexNet(10, "paper", devices="cpu", lrn_scope="all").eval().double()
    plan = [(s.exchange and s.exchange.name, [(r.name, p) for r, p in s.steps]) for s in C.stages(m.layout)]
    assert plan[:3] == [(None, [("conv1", "pre")]), ("conv1", [("conv1", "post"), ("conv2", "pre")]),
                        ("conv2", [("conv2", "post")])]
    g = GroupedAlexNet(m.config).double().eval()
    g.load_state_dict(m.grouped_state_dict())
    x = _x()[:1].double()
    with torch.no_grad(), splitnet.record_exchanges() as log:
        out = m(x)
    assert {e.layer for e in log} == {"conv1", "conv2", "conv3", "fc6", "fc7", "fc8"}
    assert rel(out, g(x)) < 1e-12
