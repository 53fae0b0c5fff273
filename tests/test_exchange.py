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
