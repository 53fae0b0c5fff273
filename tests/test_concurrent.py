"""Running the columns concurrently (concurrent.py): same network as the sequential walk, in every respect
training reads (logits, input and parameter gradients, dropout masks, exchanges), and clear refusals."""
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
