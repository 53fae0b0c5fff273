"""record_exchanges(): the traffic between columns, against the layout's table."""
import pytest
import torch

import splitnet
from splitnet.model.layout import get_layout


def test_paper_exchanges_at_conv3_fc6_fc7_fc8_only():
    m = splitnet.SplitAlexNet(num_classes=1000, layout="paper", devices=("cpu", "cpu")).eval()
    B = 3
    with splitnet.record_exchanges() as log, torch.no_grad():
        m(torch.randn(B, 3, 224, 224))
    assert {e.layer for e in log} == {"conv3", "fc6", "fc7", "fc8"}
    assert sum(e.nbytes for e in log) == 234_496 * B
    # conv3, fc6, fc7: both ways; fc8: only into the head column 0.
    pairs = sorted((e.layer, e.src, e.dst) for e in log)
    assert pairs == [("conv3", 0, 1), ("conv3", 1, 0), ("fc6", 0, 1), ("fc6", 1, 0),
                     ("fc7", 0, 1), ("fc7", 1, 0), ("fc8", 1, 0)]
    conv3 = [e for e in log if e.layer == "conv3"]
    assert all(e.shape == (B, 128, 13, 13) and e.nbytes == B * 128 * 13 * 13 * 4 for e in conv3)


@pytest.mark.parametrize("name", splitnet.layouts())
def test_recorded_bytes_match_the_table(name):
    m = splitnet.SplitAlexNet(num_classes=10, layout=name, devices="cpu").eval()
    B = 2
    with splitnet.record_exchanges() as log, torch.no_grad():
        m(torch.randn(B, 3, 224, 224))
    measured = {}
    for e in log:
        assert e.src != e.dst
        measured[e.layer] = measured.get(e.layer, 0) + e.nbytes // B
    assert measured == get_layout(name, 10).exchange_bytes_per_image()
    expected_events = [(s.name, src, dst) for s in get_layout(name, 10).stats() for src, dst, _ in s.exchanges]
    assert sorted((e.layer, e.src, e.dst) for e in log) == sorted(expected_events)


def test_no_events_outside_the_block_and_nested_blocks():
    m = splitnet.SplitAlexNet(num_classes=10, devices="cpu").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        with splitnet.record_exchanges() as outer:
            m(x)
            with splitnet.record_exchanges() as inner:
                m(x)
        m(x)
    assert len(inner) == 7 and len(outer) == 14


def test_exchange_gradients_flow_back_across_columns():
    """Backward through the exchange: column 0's conv1 gets gradient from column 1's conv3 output."""
    torch.manual_seed(0)
    m = splitnet.SplitAlexNet(num_classes=10, devices=("cpu", "cpu")).eval()
    out = m.forward_columns(torch.randn(1, 3, 224, 224), upto="conv3")
    g = torch.autograd.grad(out[1].sum(), m.columns[0].conv1.weight)[0]
    assert torch.count_nonzero(g) > 0


def test_gather_backward_is_the_adjoint_of_gather():
    """What the threads strategy's backward uses (concurrent.Threads.backward) equals autograd through
    gather: each column gets the sum over readers of its channel slice; broadcast likewise."""
    from splitnet.model.exchange import LocalExchange, broadcast, broadcast_backward
    g = torch.Generator().manual_seed(0)
    ex = LocalExchange([torch.device("cpu")] * 3)
    outs = [torch.randn(2, 3, 4, 4, generator=g).requires_grad_(), None,
            torch.randn(2, 5, 4, 4, generator=g).requires_grad_()]
    readers = [0, 1, 2]
    with splitnet.record_exchanges() as log:
        ins = ex.gather("conv3", outs, readers)
    assert all(t.shape == (2, 8, 4, 4) for t in ins) and len(log) == 4  # 0->1, 0->2, 2->0, 2->1
    grads = [torch.randn(2, 8, 4, 4, generator=g) for _ in readers]
    auto = torch.autograd.grad(ins, [outs[0], outs[2]], grads)
    with splitnet.record_exchanges() as log:
        mine = ex.gather_backward([None if t is None else t.detach() for t in outs], grads)
    assert log == []  # gradients are not recorded as exchanges (the forward's events stand for both)
    assert mine[1] is None
    assert torch.allclose(mine[0], auto[0], rtol=0, atol=1e-6)
    assert torch.allclose(mine[2], auto[1], rtol=0, atol=1e-6)
    assert torch.equal(mine[0], grads[0][:, :3] + grads[1][:, :3] + grads[2][:, :3])
    x = torch.randn(2, 3, 8, 8, generator=g).requires_grad_()
    copies = broadcast(x, [torch.device("cpu")] * 3, local=(0, 2))
    assert copies[1] is None
    gs = [torch.randn(2, 3, 8, 8, generator=g), None, torch.randn(2, 3, 8, 8, generator=g)]
    assert torch.equal(broadcast_backward(gs, x.device), gs[0] + gs[2])
    assert broadcast_backward([None, None], x.device) is None
