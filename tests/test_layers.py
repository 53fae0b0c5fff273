"""LRN against hand-computed values of the printed formula (§3.3), paper dropout (§4.2)."""
import math

import pytest
import torch

from reference import lrn_formula
from splitnet.model.layers import LocalResponseNorm, PaperDropout


def test_lrn_paper_formula_by_hand():
    a = torch.arange(1.0, 8.0).view(1, 7, 1, 1)  # channels 1..7
    out = LocalResponseNorm(5, alpha=0.1, beta=0.75, k=2.0)(a).flatten().tolist()
    # b_0: window j = 0..2 -> 1 + 4 + 9 = 14; b_3: j = 1..5 -> 4+9+16+25+36 = 90; b_6: j = 4..6 -> 25+36+49
    assert out[0] == pytest.approx(1 / (2 + 0.1 * 14) ** 0.75, rel=1e-6)
    assert out[3] == pytest.approx(4 / (2 + 0.1 * 90) ** 0.75, rel=1e-6)
    assert out[6] == pytest.approx(7 / (2 + 0.1 * 110) ** 0.75, rel=1e-6)


def test_lrn_code_convention_divides_alpha_by_n():
    a = torch.arange(1.0, 8.0).view(1, 7, 1, 1)
    out = LocalResponseNorm(5, alpha=0.1, beta=0.75, k=1.0, convention="code")(a).flatten().tolist()
    assert out[3] == pytest.approx(4 / (1 + 0.1 / 5 * 90) ** 0.75, rel=1e-6)
    # torch's own module is the code convention
    ref = torch.nn.LocalResponseNorm(5, alpha=0.1, beta=0.75, k=1.0)(a).flatten().tolist()
    assert out == pytest.approx(ref, rel=1e-6)


def test_lrn_defaults_are_the_papers_and_match_the_formula():
    lrn = LocalResponseNorm()
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k, lrn.convention) == (5, 1e-4, 0.75, 2.0, "paper")
    x = torch.randn(2, 48, 5, 5) * 100
    assert torch.allclose(lrn(x), lrn_formula(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [5, 4, 1, 9])
def test_lrn_gradient_against_gradcheck_and_torch(size):
    """The hand-written backward: gradcheck in float64 (odd and even windows, a window wider than the
    channels), and torch's own local_response_norm's gradients in float32."""
    x = (torch.randn(2, 7, 3, 2, dtype=torch.float64) * 30).requires_grad_(True)
    lrn = LocalResponseNorm(size, alpha=1e-3, beta=0.75, k=2.0)
    assert torch.autograd.gradcheck(lrn, (x,))
    xf = (torch.randn(3, 48, 6, 6) * 50).requires_grad_(True)
    g = torch.randn(3, 48, 6, 6)
    lrn = LocalResponseNorm(size, alpha=1e-4, beta=0.75, k=2.0, convention="code")
    ours = torch.autograd.grad(lrn(xf), xf, g)[0]
    ref = torch.autograd.grad(torch.nn.functional.local_response_norm(xf, size, 1e-4, 0.75, 2.0), xf, g)[0]
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-7)


def test_lrn_same_in_channels_last_order():
    """The window sum runs along the channel axis in the tensor's own memory order (NCHW or NHWC):
    values and gradients must not depend on which, and match the printed formula."""
    x = torch.randn(2, 12, 5, 4, dtype=torch.float64) * 40
    g = torch.randn(2, 12, 5, 4, dtype=torch.float64)
    lrn = LocalResponseNorm()
    res = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.contiguous(memory_format=fmt).requires_grad_(True)
        y = lrn(xi)
        res.append((y, torch.autograd.grad(y, xi, g.contiguous(memory_format=fmt))[0]))
    assert res[1][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(res[0][0], lrn_formula(x), rtol=1e-12)
    assert torch.allclose(res[0][0], res[1][0], rtol=1e-12) and torch.allclose(res[0][1], res[1][1], rtol=1e-12)


def test_lrn_bad_convention():
    with pytest.raises(ValueError, match="lrn_convention"):
        LocalResponseNorm(convention="caffe")


def test_paper_dropout_eval_scales_by_half():
    d = PaperDropout(0.5).eval()
    x = torch.randn(1000)
    assert torch.equal(d(x), x * 0.5)
    assert torch.equal(PaperDropout(0.5, "inverted").eval()(x), x)


def test_paper_dropout_train_masks_without_scaling():
    torch.manual_seed(0)
    x = torch.rand(100_000) + 1.0
    y = PaperDropout(0.5).train()(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept])
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    yi = PaperDropout(0.5, "inverted").train()(x)
    assert torch.allclose(yi[yi != 0], 2 * x[yi != 0])
    # Same expectation at train and test time in both modes.
    assert abs(y.mean().item() - PaperDropout(0.5).eval()(x).mean().item()) < 0.01
    assert math.isclose(yi.mean().item(), x.mean().item(), rel_tol=0.01)


def test_dropout_zero_is_identity():
    x = torch.randn(10)
    assert torch.equal(PaperDropout(0.0).train()(x), x)
    assert torch.equal(PaperDropout(0.0).eval()(x), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lrn_under_half_autocast_computes_in_float32(dtype):
    """conv1 maps in the hundreds (a trained network's): in float16 their squares pass 65,504 and the
    window sums go inf. Under CPU autocast the LRN (conv1 -> LRN as in the model) must match the
    float32 result to the half type's rounding, values and gradients, with finite output."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 48, 11, 4)
    x = torch.randn(2, 3, 59, 59) * 150  # conv1 outputs of a few hundred
    lrn = LocalResponseNorm()
    ref_in = conv(x).detach().requires_grad_(True)
    assert ref_in.abs().max() > 300
    ref = lrn(ref_in)
    g = torch.randn_like(ref)
    ref_grad = torch.autograd.grad(ref, ref_in, g)[0]
    with torch.autocast("cpu", dtype=dtype):
        half_in = conv(x).detach().requires_grad_(True)
        assert half_in.dtype == dtype
        out = lrn(half_in)
    assert out.dtype == dtype and torch.isfinite(out).all()
    grad = torch.autograd.grad(out, half_in, g.to(dtype))[0]
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    tol = 1e-2 if dtype == torch.float16 else 5e-2  # the input's own rounding (conv in the half type)
    assert torch.allclose(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert torch.allclose(grad.float(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


def test_lrn_groups_keep_windows_in_their_column_and_the_memory_order():
    """groups=2 (the grouped network's per-column LRN) equals the LRN of each half on its own, values
    and gradients, and a channels_last input stays channels_last (no copy to NCHW)."""
    x = torch.randn(2, 12, 5, 4, dtype=torch.float64) * 40
    g = torch.randn(2, 12, 5, 4, dtype=torch.float64)
    lrn = LocalResponseNorm()
    xs = x.clone().requires_grad_(True)
    halves = torch.cat([lrn(h) for h in xs.split(6, dim=1)], 1)
    ref_grad = torch.autograd.grad(halves, xs, g)[0]
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.contiguous(memory_format=fmt).requires_grad_(True)
        y = lrn(xi, groups=2)
        assert y.is_contiguous(memory_format=fmt)
        assert torch.allclose(y, halves, rtol=1e-12)
        assert torch.allclose(torch.autograd.grad(y, xi, g.contiguous(memory_format=fmt))[0], ref_grad, rtol=1e-12)
    with pytest.raises(ValueError, match="7 channels"):
        lrn(torch.randn(1, 7, 2, 2), groups=2)


def test_grouped_network_lrn_sees_channels_last_maps():
    """The grouped baseline in channels_last: its LRN takes and gives channels_last maps, as the split
    model's columns do (a copy to NCHW there would flatter the split model in the _cl modes)."""
    from splitnet.model.config import ModelConfig
    from splitnet.model.grouped import GroupedAlexNet
    net = GroupedAlexNet(ModelConfig(num_classes=10, geometry="cifar")).to(memory_format=torch.channels_last)
    seen = []
    net.lrn.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    net(torch.randn(2, 3, net.input_side, net.input_side).contiguous(memory_format=torch.channels_last))
    assert seen and all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                        for pair in seen for t in pair)


def test_stream_dropout_reuses_its_generator_and_draws_the_same_masks():
    """The (seed, full, offset) stream: one generator per module and device, reseeded each call, so
    the masks are those of a fresh generator of that seed, and a replica's rows are its rows of the
    whole batch's mask."""
    d = PaperDropout(0.5).train()
    x = torch.ones(6, 10)
    a = d(x, (11, 6, 0))
    g = d._generators[torch.device("cpu")]
    fresh = torch.empty(6, 10).bernoulli_(0.5, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, fresh) and torch.equal(d(x, (11, 6, 0)), a)
    assert d._generators[torch.device("cpu")] is g
    assert torch.equal(d(x[:2], (11, 6, 4)), a[4:])
