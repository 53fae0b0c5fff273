"""The split model against an independent single-device grouped network, and its connectivity."""
import pytest
import torch
import torch.nn.functional as F

import splitnet
from reference import COLUMNS, GROUPS, reference_forward, rel

B = 2


def _input(seed=0, side=224):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, side, side, generator=g) * 60.0  # mean-subtracted 0..255 scale


def _grouped_grads(model):
    """The split model's parameter gradients, stacked per layer in column order (grouped form)."""
    out = {}
    for row in model.layout.rows:
        mods = [getattr(col, row.name) for c, col in enumerate(model.columns) if row.widths[c]]
        out[f"{row.name}.weight"] = torch.cat([m.weight.grad for m in mods], 0)
        out[f"{row.name}.bias"] = torch.cat([m.bias.grad for m in mods], 0)
    return out


@pytest.mark.parametrize("concurrency", ["sequential", "threads"])
@pytest.mark.parametrize("layout", ["paper", "towers", "dense", "four-columns"])
def test_equals_independent_grouped_network(layout, concurrency):
    # float64: two correct implementations that round differently in float32 can still disagree by a
    # whole unit's gradient where a ReLU input or a max-pooling tie sits within rounding of zero.
    torch.manual_seed(1)
    m = splitnet.SplitAlexNet(num_classes=1000, layout=layout, devices=("cpu",) * COLUMNS[layout],
                              concurrency=concurrency).eval().double()
    assert m.strategy == concurrency
    sd = {k: v.clone().requires_grad_(True) for k, v in m.grouped_state_dict().items()}
    target = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(2))

    x1 = _input().double().requires_grad_(True)
    logits = m(x1)
    F.cross_entropy(logits, target).backward()

    x2 = _input().double().requires_grad_(True)
    ref = reference_forward(sd, x2, GROUPS[layout], COLUMNS[layout])
    F.cross_entropy(ref, target).backward()

    assert logits.shape == (B, 1000)
    assert rel(logits.detach(), ref.detach()) < 1e-10
    assert rel(x1.grad, x2.grad) < 1e-10
    grads = _grouped_grads(m)
    assert set(grads) == set(sd)
    for key, p in sd.items():
        assert p.grad is not None and p.grad.norm() > 0, key
        assert rel(grads[key], p.grad) < 1e-10, key


def test_grouped_state_dict_keys_and_shapes_paper():
    m = splitnet.SplitAlexNet(num_classes=1000, layout="paper", devices=("cpu", "cpu"))
    sd = m.grouped_state_dict()
    expect = {"conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
              "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 9216),
              "fc7": (4096, 4096), "fc8": (1000, 4096)}
    assert list(sd) == [f"{n}.{k}" for n in expect for k in ("weight", "bias")]
    for n, shape in expect.items():
        assert tuple(sd[f"{n}.weight"].shape) == shape
        assert tuple(sd[f"{n}.bias"].shape) == (shape[0],)
    # Channel order: column 0's maps first. fc6 inputs: pool5 maps of column 0 then column 1.
    assert torch.equal(sd["conv2.weight"][:128], m.columns[0].conv2.weight)
    assert torch.equal(sd["conv2.weight"][128:], m.columns[1].conv2.weight)
    assert torch.equal(sd["fc8.weight"], m.columns[0].fc8.weight)


def test_load_grouped_state_dict_roundtrip_and_errors():
    torch.manual_seed(3)
    a = splitnet.SplitAlexNet(num_classes=10, devices="cpu")
    torch.manual_seed(4)
    b = splitnet.SplitAlexNet(num_classes=10, devices="cpu")
    sd = a.grouped_state_dict()
    b.load_grouped_state_dict(sd)
    for k, v in b.grouped_state_dict().items():
        assert torch.equal(v, sd[k]), k
    bad = dict(sd)
    del bad["conv3.bias"]
    with pytest.raises(KeyError, match="conv3.bias"):
        b.load_grouped_state_dict(bad)
    bad = dict(sd, **{"fc6.weight": torch.zeros(4096, 100)})
    with pytest.raises(ValueError, match="fc6.weight"):
        b.load_grouped_state_dict(bad)


def _layer_grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def test_non_crossing_layers_do_not_read_the_other_column():
    torch.manual_seed(5)
    m = splitnet.SplitAlexNet(num_classes=10, devices=("cpu", "cpu")).eval()
    x = _input()
    # conv2 does not cross: column 1's conv2 output has exactly zero gradient w.r.t. column 0.
    out = m.forward_columns(x, upto="conv2")
    for p, g in zip(m.columns[0].parameters(), _layer_grads(out[1].sum(), list(m.columns[0].parameters()))):
        assert g is None or torch.count_nonzero(g) == 0
    # conv4 does not cross either: column 0's conv3/conv4 weights cannot reach column 1's conv4 ...
    out = m.forward_columns(x, upto="conv4")
    c0 = m.columns[0]
    grads = _layer_grads(out[1].sum(), [c0.conv3.weight, c0.conv4.weight, c0.conv1.weight])
    assert grads[0] is None or torch.count_nonzero(grads[0]) == 0
    assert grads[1] is None or torch.count_nonzero(grads[1]) == 0
    # ... but column 0's conv1 does, through the conv3 exchange (the test can fail both ways).
    assert grads[2] is not None and torch.count_nonzero(grads[2]) > 0


def test_towers_never_meet_before_fc6():
    torch.manual_seed(6)
    m = splitnet.SplitAlexNet(num_classes=10, layout="towers", devices=("cpu", "cpu")).eval()
    out = m.forward_columns(_input(), upto="conv5")
    grads = _layer_grads(out[1].sum(), list(m.columns[0].parameters()))
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    logits = m(_input())
    g = torch.autograd.grad(logits.sum(), m.columns[1].conv1.weight)[0]
    assert torch.count_nonzero(g) > 0


def test_layer_output_shapes_match_the_table():
    m = splitnet.SplitAlexNet(num_classes=1000, devices=("cpu", "cpu")).eval()
    x = _input()
    expect = {"conv1": (48, 27, 27), "conv2": (128, 13, 13), "conv3": (192, 13, 13),
              "conv4": (192, 13, 13), "conv5": (128, 6, 6), "fc6": (2048,), "fc7": (2048,)}
    with torch.no_grad():
        for name, shape in expect.items():
            outs = m.forward_columns(x, upto=name)
            assert [tuple(o.shape[1:]) for o in outs] == [shape, shape], name
        outs = m.forward_columns(x, upto="fc8")
    assert tuple(outs[0].shape) == (B, 1000) and outs[1] is None
    stats = {s.name: s.out_shapes for s in m.layout.stats()}
    for name, shape in expect.items():
        assert stats[name] == (shape, shape)


def test_neurons_before_pooling_match_the_paper():
    """Fig. 2 caption (with its first figure corrected: 55*55*96 = 290,400)."""
    m = splitnet.SplitAlexNet(num_classes=1000, devices=("cpu", "cpu")).eval()
    seen = []  # appended to (atomic), not read-modify-written: the hooks run in the columns' threads
    hooks = [getattr(col, row.name).register_forward_hook(
        lambda mod, i, o, n=row.name: seen.append((n, o[0].numel())))
        for col in m.columns for row in m.layout.rows if hasattr(col, row.name)]
    with torch.no_grad():
        m(_input())
    for h in hooks:
        h.remove()
    names = [r.name for r in m.layout.rows]
    measured = tuple(sum(k for n2, k in seen if n2 == n) for n in names)
    assert measured == (290400, 186624, 64896, 64896, 43264, 4096, 4096, 1000)
    assert m.layout.neurons() == measured


@pytest.mark.parametrize("mode,side", [("pad3", 224), ("caffe227", 227), ("torchvision", 224)])
def test_input_modes(mode, side):
    m = splitnet.SplitAlexNet(num_classes=10, devices="cpu", input_mode=mode).eval()
    with torch.no_grad():
        out = m.forward_columns(_input(side=side), upto="conv1")
    assert out[0].shape[1:] == (48, 27, 27)
    with pytest.raises(ValueError, match="conv1"):
        m(_input(side=side + 1))


def test_pad3_is_the_cuda_convnet_right_bottom_pad():
    """224 + zero pad right/bottom 3 == a 227 input whose last 3 rows/columns are zero (§1 of spec)."""
    torch.manual_seed(7)
    a = splitnet.SplitAlexNet(num_classes=10, devices="cpu").eval()
    b = splitnet.SplitAlexNet(num_classes=10, devices="cpu", input_mode="caffe227").eval()
    b.load_grouped_state_dict(a.grouped_state_dict())
    x = _input()
    x227 = torch.zeros(B, 3, 227, 227)
    x227[:, :, :224, :224] = x
    with torch.no_grad():
        assert torch.allclose(a(x), b(x227))


def test_init_follows_the_paper():
    torch.manual_seed(8)
    m = splitnet.SplitAlexNet(num_classes=1000, devices=("cpu", "cpu"))
    sd = m.grouped_state_dict()
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        w = sd[f"{name}.weight"]
        tol = 4 * 0.01 / (2 * w.numel()) ** 0.5  # 4 sigma of the sample std's sampling error
        assert abs(w.std().item() - 0.01) < max(tol, 1e-4), name
        assert abs(w.mean().item()) < 4 * 0.01 / w.numel() ** 0.5, name
        bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(sd[f"{name}.bias"] == bias), name
    # The same seed gives the same network whatever the placement.
    torch.manual_seed(8)
    again = splitnet.SplitAlexNet(num_classes=1000, devices="cpu").grouped_state_dict()
    assert all(torch.equal(again[k], v) for k, v in sd.items())


def test_caffe_bias_option():
    m = splitnet.SplitAlexNet(num_classes=10, devices="cpu", init_bias=0.1)
    assert torch.all(m.columns[1].fc6.bias == 0.1) and torch.all(m.columns[1].conv3.bias == 0.0)


def test_paper_dropout_halves_fc6_and_fc7_outputs_at_test_time():
    torch.manual_seed(9)
    m = splitnet.SplitAlexNet(num_classes=10, devices="cpu").eval()
    inv = splitnet.SplitAlexNet(num_classes=10, devices="cpu", dropout_mode="inverted").eval()
    inv.load_grouped_state_dict(m.grouped_state_dict())
    x = _input()
    with torch.no_grad():
        fc6 = m.forward_columns(x, upto="fc6")[0]
        fc6_inv = inv.forward_columns(x, upto="fc6")[0]  # inverted dropout: identity at test time
        assert torch.allclose(fc6, 0.5 * fc6_inv)
        m.train()
        fc6_train = m.forward_columns(x, upto="fc6")[0]
    # At train time each unit is either dropped (0) or passed unscaled.
    active = fc6_inv > 0  # units the ReLU lets through
    kept = (fc6_train != 0) & active
    assert 0.45 < kept.sum() / active.sum() < 0.55
    assert torch.allclose(fc6_train[kept], fc6_inv[kept], rtol=1e-5, atol=1e-6)


def test_features_are_fc7_concatenated():
    m = splitnet.SplitAlexNet(num_classes=10, devices=("cpu", "cpu")).eval()
    x = _input()
    with torch.no_grad():
        f = m.features(x, "fc7")
        outs = m.forward_columns(x, upto="fc7")
    assert f.shape == (B, 4096)
    assert torch.equal(f, torch.cat(outs, 1))
