"""Each §4.1 transform against its definition (slicing, mirroring, the lighting covariance)."""
import itertools

import numpy as np
import pytest
import torch

from splitnet.config import ConfigError, from_dict
from splitnet.data import DataConfig
from splitnet.data import pipeline as P
from splitnet.data import transforms as T


def _images(b=4, s=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)


def _u(n, k, seed=0):
    return torch.rand(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_random_offsets_cover_0_to_32_inclusive():
    dy, dx = T.random_offsets(_u(20000, 2), 32)
    for d in (dy, dx):
        assert d.dtype == torch.int64 and d.min() == 0 and d.max() == 32
        counts = torch.bincount(d, minlength=33).float()
        assert counts.numel() == 33 and (counts / counts.mean() - 1).abs().max() < 0.15  # uniform


def test_crop_matches_slicing():
    x = _images()
    dy, dx = torch.tensor([0, 32, 5, 17]), torch.tensor([32, 0, 31, 16])
    out = T.crop(x, dy, dx, 224)
    assert out.shape == (4, 3, 224, 224) and out.dtype == torch.uint8
    for b in range(4):
        assert torch.equal(out[b], x[b, :, dy[b]:dy[b] + 224, dx[b]:dx[b] + 224])
    with pytest.raises(ValueError, match="offsets"):
        T.crop(x, torch.tensor([33, 0, 0, 0]), torch.zeros(4, dtype=torch.long), 224)


def test_center_patch_is_offset_16():
    x = _images()
    assert torch.equal(T.center_patch(x, 224), x[:, :, 16:240, 16:240])
    assert T.center_offset(256, 224) == 16


def test_ten_patches_positions_and_order():
    x = _images(b=2)
    out = T.ten_patches(x, 224)
    assert out.shape == (2, 10, 3, 224, 224)
    corners = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]  # TL, TR, BL, BR, centre
    assert list(T.patch_offsets(256, 224)) == corners
    for k, (y, xo) in enumerate(corners):
        ref = x[:, :, y:y + 224, xo:xo + 224]
        assert torch.equal(out[:, k], ref)
        assert torch.equal(out[:, 5 + k], ref.flip(-1))  # mirror images, same order
        # mirrored by hand: column j of the mirror is column 223-j of the patch
        assert torch.equal(out[:, 5 + k, :, :, 0], ref[:, :, :, 223])


def test_flip_mirrors_only_the_chosen_images():
    x = _images()
    mask = torch.tensor([True, False, True, False])
    out = T.flip(x, mask)
    idx = torch.arange(255, -1, -1)
    assert torch.equal(out[0], x[0][:, :, idx]) and torch.equal(out[2], x[2][:, :, idx])
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])
    assert abs(T.random_flips(_u(20000, 1, 1)[:, 0], 0.5).float().mean().item() - 0.5) < 0.02


def test_subtract_mean_gives_float_0_255_minus_mean():
    x = _images(b=2, s=8)
    mean = torch.rand(3, 8, 8) * 255
    out = T.subtract_mean(x, mean)
    assert out.dtype == torch.float32
    assert torch.allclose(out, x.double().sub(mean.double()).float())


def _known_cov():
    a = torch.tensor([[50.0, 10.0, 5.0], [-20.0, 30.0, 2.0], [4.0, -6.0, 12.0]], dtype=torch.float64)
    cov = a @ a.T  # a known, non-diagonal 3x3 covariance, 0..255 units
    vals, vecs = torch.linalg.eigh(cov)
    return cov, vals.flip(0), vecs.flip(1)


def test_lighting_shift_covariance_is_std2_times_data_covariance():
    """§4.1 with "cc2" units: shift = P (alpha * sqrt(lambda)), so Cov(shift) = P diag(0.01 lambda) P^T = 0.01 C."""
    cov, vals, vecs = _known_cov()
    alphas = T.random_alphas(_u(200000, 4), 0.1)
    assert abs(alphas.std().item() - 0.1) < 1e-3
    # Box-Muller: each of the three is N(0, 0.01), and they are uncorrelated
    assert (alphas.std(0) - 0.1).abs().max() < 1e-3 and alphas.mean(0).abs().max() < 1e-3
    assert (torch.corrcoef(alphas.T.double()) - torch.eye(3, dtype=torch.float64)).abs().max() < 0.01
    assert abs((alphas[:, 0].abs() < 0.1 * 1.96).double().mean().item() - 0.95) < 0.005  # normal, not just unit variance
    shifts = T.lighting_shift(alphas, vals, vecs, "cc2").double()
    sample = torch.cov(shifts.T)
    expected = vecs @ torch.diag(0.01 * vals) @ vecs.T
    assert torch.allclose(expected, 0.01 * cov, rtol=1e-9, atol=1e-9)
    assert torch.allclose(sample, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())
    assert shifts.mean(0).abs().max() < 0.05 * expected.diag().sqrt().max()


def test_lighting_unit_form_scales_by_lambda_over_255():
    """"unit": shift in 0..1 units is P (alpha * lambda/255^2); in pixel values 255x that."""
    _, vals, vecs = _known_cov()
    alphas = torch.randn(1000, 3, generator=torch.Generator().manual_seed(2)) * 0.1
    got = T.lighting_shift(alphas, vals, vecs, "unit").double()
    lam01 = vals / 255 ** 2
    ref = 255 * (vecs @ (alphas.double() * lam01).T).T
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_lighting_adds_one_rgb_triple_per_image():
    x = torch.zeros(2, 3, 4, 4)
    shift = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 5.0]])
    out = T.add_lighting(x, shift)
    for b in range(2):
        for ch in range(3):
            assert torch.all(out[b, ch] == shift[b, ch])


def _params(b, seed=3):
    return P.draw_params(_u(b, P.N_UNIFORMS, seed), 32)


def _ref_train(images, prm, mean, vals, vecs, cfg):
    """§4.1 spelled out one image at a time with numpy, for comparison."""
    out = []
    c = cfg.crop_size
    for b in range(images.shape[0]):
        y, x = (int(prm.dy[b]), int(prm.dx[b])) if cfg.random_crop else (16, 16)
        img = images[b].numpy().astype(np.float32)
        if cfg.mean_subtraction:
            img = img - mean.numpy()  # the whole 256x256 mean image before cropping ("aligned")
        p = img[:, y:y + c, x:x + c]
        if cfg.flip and bool(prm.flip[b]):
            p = p[:, :, ::-1]
        if cfg.lighting:
            s = vecs.numpy().astype(np.float64) @ (prm.alpha[b].numpy().astype(np.float64) * np.sqrt(vals.numpy()))
            p = p + s.astype(np.float32)[:, None, None]
        out.append(np.ascontiguousarray(p))
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("switches", list(itertools.product([True, False], repeat=4)))
def test_train_batch_matches_definition_for_every_ablation(switches):
    random_crop, flip, lighting, mean_sub = switches
    cfg = DataConfig(random_crop=random_crop, flip=flip, lighting=lighting, mean_subtraction=mean_sub)
    images = _images(b=6)
    mean = torch.rand(3, 256, 256) * 255
    _, vals, vecs = _known_cov()
    prm = _params(6)
    got = P.train_batch(images, prm, mean, vals.float(), vecs.float(), cfg)
    assert got.shape == (6, 3, 224, 224) and got.dtype == torch.float32
    ref = _ref_train(images, prm, mean, vals.float(), vecs.float(), cfg)
    assert torch.allclose(got, ref, atol=1e-3)
    # the fused CPU loop and the composition of the transforms agree bitwise
    shift = T.lighting_shift(prm.alpha, vals, vecs) if lighting else None
    dy, dx = (prm.dy, prm.dx) if random_crop else (torch.full((6,), 16), torch.full((6,), 16))
    fl = prm.flip if flip else torch.zeros(6, dtype=torch.bool)
    composed = P._composed(images, dy, dx, fl, mean if mean_sub else None, shift, cfg)
    assert torch.equal(got, composed)
    # and so does the batched gather of the device input path (run here on CPU tensors)
    gathered = P._gathered(images, dy, dx, fl, mean if mean_sub else None, shift, cfg)
    assert torch.equal(gathered, composed)


def test_center_mean_crop_option_subtracts_the_means_centre_patch():
    cfg = DataConfig(mean_crop="center", lighting=False)
    images = _images(b=3)
    mean = torch.rand(3, 256, 256) * 255
    prm = _params(3)
    got = P.train_batch(images, prm, mean, torch.ones(3), torch.eye(3), cfg)
    for b in range(3):
        y, x = int(prm.dy[b]), int(prm.dx[b])
        ref = images[b, :, y:y + 224, x:x + 224].float() - mean[:, 16:240, 16:240]
        if prm.flip[b]:
            ref = ref.flip(-1)
        assert torch.equal(got[b], ref)
    shift = T.lighting_shift(prm.alpha, torch.ones(3), torch.eye(3))
    assert torch.equal(P._gathered(images, prm.dy, prm.dx, prm.flip, mean, None, cfg), got)
    assert torch.equal(P._composed(images, prm.dy, prm.dx, prm.flip, mean, shift, cfg),
                       P._gathered(images, prm.dy, prm.dx, prm.flip, mean, shift, cfg))


def test_eval_batch_centre_and_ten_patches():
    cfg = DataConfig()
    images = _images(b=2)
    mean = torch.rand(3, 256, 256) * 255
    c1 = P.eval_batch(images, mean, cfg)
    assert torch.equal(c1, images[:, :, 16:240, 16:240].float() - mean[:, 16:240, 16:240])
    ten = P.eval_batch(images, mean, cfg, ten=True)
    assert ten.shape == (2, 10, 3, 224, 224)
    assert torch.equal(ten[:, T.CENTRE_PATCH], c1)  # the centre a ten-patch evaluation reads (evaluate.py)
    diff = images.float() - mean  # aligned: the mean is cropped and mirrored with each patch
    assert torch.equal(ten[:, 1], diff[:, :, 0:224, 32:256])
    assert torch.equal(ten[:, 8], diff[:, :, 32:256, 32:256].flip(-1))


def test_uniforms_are_each_positions_splitmix64_stream():
    """rng.uniforms (vectorised) against the scalar SplitMix64 generator written out in Python."""
    from splitnet.data import rng

    def scalar_stream(seed, k):  # SplitMix64: state += golden; output = finaliser(state)
        out = []
        for j in range(k):
            out.append((rng._splitmix64((seed + j * rng._GOLDEN) & rng._MASK) >> 11) * 2.0 ** -53)
        return out

    positions = [0, 1, 2, 49999, 123456789]
    u = rng.uniforms((7, 3, rng.STREAM_AUGMENT), positions, 5)
    assert u.dtype == torch.float64 and u.shape == (5, 5)
    for i, p in enumerate(positions):
        assert u[i].tolist() == scalar_stream(rng.derive_seed(7, 3, rng.STREAM_AUGMENT, p), 5)
    big = rng.uniforms((0, 0, rng.STREAM_AUGMENT), range(100000), 2)
    assert big.min() >= 0 and big.max() < 1
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002
    # neighbouring positions and the two numbers of a position are unrelated
    assert abs(torch.corrcoef(torch.stack([big[:-1, 0], big[1:, 0], big[:-1, 1]]))[0, 1:]).max() < 0.01


def test_sample_params_depend_only_on_seed_epoch_position():
    cfg = DataConfig()
    a = P.sample_params(7, 2, range(10, 20), cfg, 256)
    b = P.sample_params(7, 2, [15, 16, 17], cfg, 256)
    for f in ("dy", "dx", "flip", "alpha"):
        assert torch.equal(getattr(a, f)[5:8], getattr(b, f))
    c = P.sample_params(7, 3, range(10, 20), cfg, 256)
    assert not torch.equal(a.alpha, c.alpha)
    # switching one augmentation off leaves the other draws unchanged
    d = P.sample_params(7, 2, range(10, 20), DataConfig(flip=False, lighting=False), 256)
    assert torch.equal(a.dy, d.dy) and torch.equal(a.alpha, d.alpha)


def test_data_config_defaults_and_errors():
    cfg = DataConfig()
    assert (cfg.image_size, cfg.crop_size, cfg.max_offset, cfg.flip_p, cfg.lighting_std) == (256, 224, 32, 0.5, 0.1)
    assert from_dict(DataConfig, {"flip": False}).flip is False
    with pytest.raises(ConfigError, match="flipp"):
        from_dict(DataConfig, {"flipp": False})
    with pytest.raises(ConfigError, match="lighting_std"):
        from_dict(DataConfig, {"lighting_std": "big"})
    with pytest.raises(ConfigError, match="mean_crop"):
        DataConfig(mean_crop="left")
    with pytest.raises(ConfigError, match="crop_size"):
        DataConfig(crop_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transforms_run_on_the_gpu_and_match_the_cpu():
    cfg = DataConfig()
    images = _images(b=8)
    mean = torch.rand(3, 256, 256) * 255
    _, vals, vecs = _known_cov()
    prm = _params(8)
    cpu = P.train_batch(images, prm, mean, vals.float(), vecs.float(), cfg)
    gpu = P.train_batch(images.cuda(), prm, mean.cuda(), vals.float(), vecs.float(), cfg)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)  # the same float32 operations on the same operands
    ten = P.eval_batch(images.cuda(), mean.cuda(), cfg, ten=True)
    assert torch.equal(ten.cpu(), P.eval_batch(images, mean, cfg, ten=True))
