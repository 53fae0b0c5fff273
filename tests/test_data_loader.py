"""Loading the cache: deterministic shuffling and augmentation, resume at batch k, any worker count."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from splitnet.data import (DataConfig, LoaderSpec, PackedDataset, ensure_cache, epoch_order, eval_order, make_loader,
                           prepare)
from splitnet.data import pipeline as P
from splitnet.data import preparation


def _source(root, classes=("ant", "bee", "cow"), n=7, n_val=2):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        for split, count in (("train", n), ("val", n_val)):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(count):
                w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                arr[..., c] = 255  # a class colour, so labels are visible in the pixels
                Image.fromarray(arr).save(d / f"{i:03d}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = _source(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("cache")
    prepare(root, out, workers=1, shard_size=4, progress=False)  # 21 train images in 6 shards
    return out


def _all(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_packed_dataset(cache):
    ds = PackedDataset(cache, "train")
    assert len(ds) == 21 and ds.classes == ["ant", "bee", "cow"] and ds.image_size == 256
    img, label = ds[20]
    assert img.shape == (3, 256, 256) and img.dtype == torch.uint8 and label == 2
    assert ds.mean.shape == (3, 256, 256) and ds.mean.dtype == torch.float32
    assert ds.eigvals.shape == (3,) and ds.eigvecs.shape == (3, 3)
    assert ds.labels.tolist() == [0] * 7 + [1] * 7 + [2] * 7
    x, y = ds.get_batch([20, 3, 9])
    assert torch.equal(x[0], img) and y.tolist() == [2, 0, 1] and y.dtype == torch.int64
    for img_, c in zip(x, (2, 0, 1)):  # the class colour survived: its channel is the brightest
        m = img_.float().mean(dim=(1, 2))
        assert m.argmax() == c and m[c] > m.min() + 50
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        PackedDataset(cache, "test")


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a = epoch_order(100, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    assert torch.equal(a, epoch_order(100, seed=1, epoch=0))
    assert not torch.equal(a, epoch_order(100, seed=1, epoch=1))
    assert not torch.equal(a, epoch_order(100, seed=2, epoch=0))


def test_training_batches_are_the_defined_function_of_seed_epoch_position(cache):
    ds = PackedDataset(cache, "train")
    cfg = DataConfig()
    batches = _all(make_loader(cache, LoaderSpec("train", 4, seed=5, epoch=2), workers=0, dataset=ds))
    assert len(batches) == 21 // 4  # drop_last when training
    order = epoch_order(21, 5, 2)
    for k, (x, y) in enumerate(batches):
        idx = order[4 * k:4 * k + 4]
        assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
        assert torch.equal(y, torch.from_numpy(ds.labels[idx.numpy()]))
        images, _ = ds.get_batch(idx.numpy())
        prm = P.sample_params(5, 2, range(4 * k, 4 * k + 4), cfg, 256)
        assert torch.equal(x, P.train_batch(images, prm, ds.mean, ds.eigvals, ds.eigvecs, cfg))
    again = _all(make_loader(cache, LoaderSpec("train", 4, seed=5, epoch=2), workers=0))
    assert _same(batches, again)
    other = _all(make_loader(cache, LoaderSpec("train", 4, seed=5, epoch=3), workers=0))
    assert not _same(batches, other)


def test_resume_at_batch_k_sees_exactly_the_uninterrupted_batches(cache):
    full = _all(make_loader(cache, LoaderSpec("train", 3, seed=11, epoch=4), workers=0))
    for k in (0, 1, 4, len(full)):
        resumed = make_loader(cache, LoaderSpec("train", 3, seed=11, epoch=4, start_batch=k), workers=0)
        assert len(resumed) == len(full) - k
        assert _same(_all(resumed), full[k:])


def test_worker_processes_do_not_change_the_batches(cache):
    serial = _all(make_loader(cache, LoaderSpec("train", 4, seed=3, epoch=0), workers=0))
    parallel = _all(make_loader(cache, LoaderSpec("train", 4, seed=3, epoch=0), workers=2))
    assert _same(serial, parallel)
    resumed = _all(make_loader(cache, LoaderSpec("train", 4, seed=3, epoch=0, start_batch=2), workers=2))
    assert _same(resumed, serial[2:])


def test_evaluation_batches_centre_and_ten_patches(cache):
    ds = PackedDataset(cache, "val")
    centre = _all(make_loader(cache, LoaderSpec("val", 4, train=False), workers=0))
    assert [len(y) for _, y in centre] == [4, 2]  # no drop_last, cache order
    assert torch.cat([y for _, y in centre]).tolist() == [0, 0, 1, 1, 2, 2]
    img, _ = ds[0]
    assert torch.equal(centre[0][0][0], img[:, 16:240, 16:240].float() - ds.mean[:, 16:240, 16:240])
    ten = _all(make_loader(cache, LoaderSpec("val", 4, train=False, ten_patches=True), workers=0))
    assert ten[0][0].shape == (4, 10, 3, 224, 224)
    assert torch.equal(ten[0][0][:, 4], centre[0][0])
    assert torch.equal(ten[0][0][0, 5], (img[:, 0:224, 0:224].float() - ds.mean[:, 0:224, 0:224]).flip(-1))


def test_ablation_switches_reach_the_loader(cache):
    plain = DataConfig(random_crop=False, flip=False, lighting=False)
    x, _ = next(iter(make_loader(cache, LoaderSpec("train", 4, seed=0), plain, workers=0)))
    ds = PackedDataset(cache, "train")
    idx = epoch_order(len(ds), 0, 0)[:4].numpy()
    images, _ = ds.get_batch(idx)
    assert torch.equal(x, P.eval_batch(images, ds.mean, plain))  # = the centre patch minus the mean
    raw = DataConfig(random_crop=False, flip=False, lighting=False, mean_subtraction=False)
    x, _ = next(iter(make_loader(cache, LoaderSpec("train", 4, seed=0), raw, workers=0)))
    assert torch.equal(x, images[:, :, 16:240, 16:240].float())


def test_loader_argument_errors(cache):
    with pytest.raises(ValueError, match="crop_size 300"):
        make_loader(cache, LoaderSpec("train", 4), DataConfig(crop_size=300))
    with pytest.raises(ValueError, match="start_batch"):
        make_loader(cache, LoaderSpec("train", 4, start_batch=99))


def test_ensure_cache_prepares_once_then_reuses(tmp_path, cache, monkeypatch):
    root = _source(tmp_path / "src", classes=("x", "y"), n=2, n_val=1)
    got = ensure_cache(root, tmp_path / "work", DataConfig(prepare_workers=1))
    assert got.parent == tmp_path / "work" / "cache" and (got / "cache.json").exists()
    monkeypatch.setattr(preparation, "prepare", lambda *a, **k: pytest.fail("prepared twice"))
    assert ensure_cache(root, tmp_path / "work") == got
    assert ensure_cache(cache, tmp_path / "work") == cache  # a cache is used as it is
    with pytest.raises(FileNotFoundError, match="neither a prepared cache"):
        ensure_cache(tmp_path / "work", tmp_path / "work")


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_replica_builds_only_its_rows_of_each_batch(cache, monkeypatch, replicas):
    """share=(offset, rows): R replicas' slices of each training batch, put side by side, are the
    one-process batch bitwise (same images, same augmentation), and each replica reads only its rows
    (counted at PackedDataset.get_batch), on the worker path and on the raw (device input) path."""
    from splitnet.data import DeviceBatches
    batch, cfg = 6, DataConfig(workers=0)
    spec = LoaderSpec("train", batch, seed=3, epoch=1, train=True, start_batch=1)
    full = _all(make_loader(cache, spec, cfg))
    read = []
    real = PackedDataset.get_batch
    monkeypatch.setattr(PackedDataset, "get_batch", lambda self, idx, shared=False: (read.append(len(idx)),
                                                                                     real(self, idx, shared))[1])
    rows = batch // replicas
    for raw in (False, True):
        parts = []
        for r in range(replicas):
            read.clear()
            loader = make_loader(cache, replace(spec, share=(r * rows, rows)), cfg, raw=raw)
            parts.append(_all(DeviceBatches(loader, "cpu", cfg=cfg, train=True) if raw else loader))
            assert read == [rows] * len(full)  # batch / R images read (and augmented) per batch
        glued = [(torch.cat([p[k][0] for p in parts]), torch.cat([p[k][1] for p in parts])) for k in range(len(full))]
        assert _same(glued, full)


def test_device_input_path_computes_the_lighting_shift_on_the_device(cache, monkeypatch):
    """DeviceBatches moves each batch's random choices to the device (non_blocking, from pinned
    memory on a GPU) before augmenting, so the lighting shift is computed there, not on the CPU
    (which would make the side stream wait on the host). The "meta" device stands in for a GPU."""
    from splitnet.data import DeviceBatches
    from splitnet.data import transforms as T
    seen = []
    real = T.lighting_shift
    monkeypatch.setattr(T, "lighting_shift", lambda a, *rest: (seen.append(a.device.type), real(a, *rest))[1])
    loader = make_loader(cache, LoaderSpec("train", 4, seed=3, epoch=0, train=True), DataConfig(workers=0),
                         raw=True)
    x, y = next(iter(DeviceBatches(loader, "meta", "cpu", cfg=DataConfig(workers=0), train=True)))
    assert x.device.type == "meta" and seen and set(seen) == {"meta"}


def test_evaluation_shards_cover_the_validation_set(cache):
    """rows=(lo, hi): contiguous shards of the validation images, in cache order, that add up to the
    whole set (runtime.DistRuntime.eval_rows shards one per replica)."""
    ds = PackedDataset(cache, "train")  # 21 images: shards 7 / 7 / 7 and 10 / 11
    full = torch.cat([x for x, _ in make_loader(cache, LoaderSpec("train", 4, train=False), workers=0, dataset=ds)])
    for cuts in ((0, 7, 14, 21), (0, 10, 21)):
        got = [torch.cat([x for x, _ in make_loader(cache, LoaderSpec("train", 4, train=False, rows=(lo, hi)),
                                                     workers=0, dataset=ds)]) for lo, hi in zip(cuts, cuts[1:])]
        assert torch.equal(torch.cat(got), full)
    with pytest.raises(ValueError, match="evaluation only"):
        make_loader(cache, LoaderSpec("train", 4, train=True, rows=(0, 4)))
    with pytest.raises(ValueError, match="evaluation only"):
        make_loader(cache, LoaderSpec("train", 4, train=True, images=6))
    with pytest.raises(ValueError, match="rows outside a batch"):
        make_loader(cache, LoaderSpec("train", 4, share=(3, 2)))


def test_capped_evaluation_samples_every_class(cache):
    """images=n (eval_max_batches): n images spread evenly over the class-sorted split, every class in
    proportion, not the first n (the first class only); replica shards of them add up to them."""
    ds = PackedDataset(cache, "train")  # 21 images, class-sorted: 7 ants, 7 bees, 7 cows
    assert np.all(np.diff(ds.labels) >= 0)
    full = torch.cat([x for x, _ in make_loader(cache, LoaderSpec("train", 4, train=False), workers=0, dataset=ds)])
    for n in (3, 6, 12, 21):
        want = [i * 21 // n for i in range(n)]
        assert eval_order(21, n).tolist() == want
        loader = make_loader(cache, LoaderSpec("train", 4, train=False, images=n), workers=0, dataset=ds)
        assert len(loader) == -(-n // 4)  # n images' batches, none empty
        xs, ys = zip(*loader)
        assert torch.equal(torch.cat(xs), full[want])
        assert np.bincount(torch.cat(ys).numpy(), minlength=3).tolist() == [n // 3] * 3
        cuts = (0, n // 2, n)
        specs = [LoaderSpec("train", 4, train=False, images=n, rows=(lo, hi)) for lo, hi in zip(cuts, cuts[1:])]
        shards = [torch.cat([x for x, _ in make_loader(cache, spec, workers=0, dataset=ds)]) for spec in specs]
        assert torch.equal(torch.cat(shards), full[want])
    for bad in (0, 22):
        with pytest.raises(ValueError, match=f"evaluating {bad} of 21 images"):
            eval_order(21, bad)
