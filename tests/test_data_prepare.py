"""Preparation (§2) on tiny folders that hold every kind of bad input the issue lists; resumption."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from splitnet.cli import main
from splitnet.data import DataError, PackedDataset, prepare
from splitnet.data import preparation as prep_mod
from splitnet.data.decode import load_image, rescaled_size


def _noise(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 90, np.float32)], axis=2)
    return Image.fromarray(arr.astype(np.uint8))


def _save(img, path, fmt="JPEG", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def make_bad_source(root):
    """ROOT/train/{cat,dog,empty_class}, ROOT/val/{cat,dog}, with every bad input of the issue."""
    t = root / "train"
    _save(_gradient(300, 200), t / "cat" / "a_good.JPEG", quality=95)
    _save(_noise(200, 400, 1), t / "cat" / "b_good_portrait.JPEG")
    buf = io.BytesIO()
    _noise(300, 200, 2).save(buf, "JPEG", quality=95)
    (t / "cat" / "c_truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (t / "cat" / "d_zero.JPEG").write_bytes(b"")
    (t / "cat" / "e_text.JPEG").write_text("this is not an image\n")
    _save(Image.new("RGB", (280, 260), (10, 200, 30)), t / "cat" / "f_png_named.JPEG", fmt="PNG")
    _save(Image.new("CMYK", (300, 260), (0, 255, 255, 0)), t / "cat" / "g_cmyk.JPEG", quality=95)
    _save(Image.new("L", (260, 300), 77), t / "cat" / "h_gray.JPEG", quality=95)
    pal = Image.new("P", (270, 260), 1)
    pal.putpalette([0, 0, 0, 12, 34, 250] + [0] * 762)
    _save(pal, t / "dog" / "i_palette.png", fmt="PNG")
    rgba = Image.new("RGBA", (260, 260), (200, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 260, 130))  # top half fully transparent
    _save(rgba, t / "dog" / "j_rgba.png", fmt="PNG")
    _save(Image.new("RGB", (20, 30), (40, 50, 60)), t / "dog" / "k_tiny.JPEG", quality=95)
    _save(_noise(600, 500, 3), t / "dog" / "l_huge.JPEG")  # 300,000 px: over the tests' lowered limit
    (t / "dog" / "notes.txt").write_text("not an image extension: ignored, not counted as bad\n")
    (t / "dog" / ".DS_Store").write_bytes(b"\0\0hidden")
    (t / "empty_class").mkdir()
    _save(_noise(256, 300, 4), root / "val" / "cat" / "v1.JPEG")
    _save(_noise(330, 256, 5), root / "val" / "dog" / "v2.png", fmt="PNG")
    return root


UNREADABLE = {"train/cat/c_truncated.JPEG": "truncated", "train/cat/d_zero.JPEG": "empty file",
              "train/cat/e_text.JPEG": "not an image", "train/dog/l_huge.JPEG": "too large"}


@pytest.fixture(scope="module")
def bad_cache(tmp_path_factory):
    root = make_bad_source(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("cache")
    report = prepare(root, out, workers=1, max_bad_fraction=0.5, max_image_pixels=250_000, progress=False)
    return root, out, report


def test_every_bad_file_is_reported_by_name_with_a_reason(bad_cache):
    root, out, report = bad_cache
    assert report == json.loads((out / "report.json").read_text())
    tr = report["splits"]["train"]
    assert report["status"] == "complete"
    assert tr["files"] == 12 and tr["packed"] == 8
    skipped = {s["file"]: s["reason"] for s in tr["skipped"]}
    assert set(skipped) == set(UNREADABLE)
    for f, word in UNREADABLE.items():
        assert word in skipped[f], (f, skipped[f])
    notes = {n["file"]: n["note"] for n in tr["notes"]}
    assert "PNG data in a file named .JPEG" in notes["train/cat/f_png_named.JPEG"]
    assert "CMYK converted to RGB" in notes["train/cat/g_cmyk.JPEG"]
    assert "L converted to RGB" in notes["train/cat/h_gray.JPEG"]
    assert "palette" in notes["train/dog/i_palette.png"]
    assert "alpha composited over white" in notes["train/dog/j_rgba.png"]
    assert "upscaled from 20x30" in notes["train/dog/k_tiny.JPEG"]
    assert tr["ignored"] == [{"file": "train/dog/notes.txt", "reason": "extension '.txt' is not an image type"}]
    assert tr["empty_classes"] == ["empty_class"]
    assert report["splits"]["val"]["packed"] == 2 and not report["splits"]["val"]["skipped"]


def test_convertible_files_are_packed_as_rgb(bad_cache):
    root, out, _ = bad_cache
    ds = PackedDataset(out, "train")
    assert ds.classes == ["cat", "dog", "empty_class"]  # sorted train folders; the empty one keeps its index
    files = ds.files
    assert files == ["train/cat/a_good.JPEG", "train/cat/b_good_portrait.JPEG", "train/cat/f_png_named.JPEG",
                     "train/cat/g_cmyk.JPEG", "train/cat/h_gray.JPEG", "train/dog/i_palette.png",
                     "train/dog/j_rgba.png", "train/dog/k_tiny.JPEG"]
    assert ds.labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    px = {f: ds[i][0] for i, f in enumerate(files)}
    for f, img in px.items():
        assert img.shape == (3, 256, 256) and img.dtype.is_floating_point is False
    def colour(f):
        return px[f].float().mean(dim=(1, 2)).round().tolist()
    assert colour("train/cat/f_png_named.JPEG") == [10, 200, 30]
    r, g, b = colour("train/cat/g_cmyk.JPEG")
    assert r > 230 and g < 25 and b < 25  # CMYK (0,255,255,0) is red
    gray = px["train/cat/h_gray.JPEG"]
    assert torch_equal(gray[0], gray[1]) and torch_equal(gray[1], gray[2]) and abs(gray.float().mean() - 77) < 2
    assert colour("train/dog/i_palette.png") == [12, 34, 250]
    rgba = px["train/dog/j_rgba.png"].float()
    assert rgba[:, :100].mean(dim=(1, 2)).round().tolist() == [255, 255, 255]  # transparent -> white
    assert rgba[:, 160:].mean(dim=(1, 2)).round().tolist() == [200, 0, 0]
    assert abs(colour("train/dog/k_tiny.JPEG")[0] - 40) <= 2


def torch_equal(a, b):
    return bool((a == b).all())


def test_rescale_then_centre_crop_matches_pillow(bad_cache):
    """§2: shorter side -> 256 (300x200 -> 384x256), then the central 256x256."""
    root, out, _ = bad_cache
    assert rescaled_size(300, 200, 256) == (384, 256) and rescaled_size(200, 400, 256) == (256, 512)
    ref = Image.open(root / "train/cat/a_good.JPEG").convert("RGB").resize((384, 256), Image.Resampling.LANCZOS)
    ref = np.asarray(ref.crop((64, 0, 320, 256))).transpose(2, 0, 1)
    ds = PackedDataset(out, "train")
    assert np.array_equal(ds[0][0].numpy(), ref)
    arr, notes = load_image(root / "train/cat/b_good_portrait.JPEG")
    ref = Image.open(root / "train/cat/b_good_portrait.JPEG").resize((256, 512), Image.Resampling.LANCZOS)
    assert np.array_equal(arr, np.asarray(ref.crop((0, 128, 256, 384))).transpose(2, 0, 1))
    assert notes == ["upscaled from 200x400"]


def test_mean_image_and_rgb_covariance_are_those_of_the_packed_training_set(bad_cache):
    _, out, _ = bad_cache
    ds = PackedDataset(out, "train")
    allx = np.stack([ds[i][0].numpy() for i in range(len(ds))]).astype(np.float64)  # [N,3,256,256]
    assert np.allclose(ds.mean.numpy(), allx.mean(0), atol=1e-3)
    px = allx.transpose(1, 0, 2, 3).reshape(3, -1)
    cov = np.cov(px, bias=True)
    stats = json.loads((out / "stats.json").read_text())
    assert np.allclose(stats["rgb_cov"], cov, rtol=1e-9, atol=1e-6)
    assert np.allclose(stats["rgb_mean"], px.mean(1))
    vals, vecs = ds.eigvals.double().numpy(), ds.eigvecs.double().numpy()
    assert vals[0] >= vals[1] >= vals[2] >= 0
    assert np.allclose(vecs.T @ vecs, np.eye(3), atol=1e-5)
    assert np.allclose(vecs @ np.diag(vals) @ vecs.T, cov, rtol=1e-4, atol=1e-2)


def test_decompression_bomb_limit_is_configurable(tmp_path):
    src = tmp_path / "src"
    _save(_noise(600, 500, 3), src / "train" / "a" / "big.JPEG")
    with pytest.raises(DataError, match="1 of 1 files unreadable"):
        prepare(src, tmp_path / "c1", workers=1, max_image_pixels=250_000, progress=False)
    rep = json.loads((tmp_path / "c1" / "report.json").read_text())
    assert rep["status"].startswith("failed") and "too large: 600x500" in rep["splits"]["train"]["skipped"][0]["reason"]
    report = prepare(src, tmp_path / "c2", workers=1, max_image_pixels=0, progress=False)  # 0 = no limit
    assert report["splits"]["train"]["packed"] == 1


def test_missing_train_folder_and_unknown_val_class(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"train: missing"):
        prepare(tmp_path, tmp_path / "out", progress=False)
    assert main(["data", "prepare", "--src", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "train: missing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    _save(_noise(50, 50), tmp_path / "train" / "cat" / "x.JPEG")
    _save(_noise(50, 50), tmp_path / "val" / "zebra" / "y.JPEG")
    with pytest.raises(DataError, match="'zebra'"):
        prepare(tmp_path, tmp_path / "out", progress=False)


def test_flat_val_folder_is_a_clear_error(tmp_path):
    _save(_noise(50, 50), tmp_path / "train" / "cat" / "x.JPEG")
    _save(_noise(50, 50), tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match="no class folders"):
        prepare(tmp_path, tmp_path / "out", progress=False)


def test_too_many_unreadable_files_stops_and_strict_stops_at_the_first(tmp_path):
    root = make_bad_source(tmp_path / "src")
    with pytest.raises(DataError, match="max_bad_fraction"):
        prepare(root, tmp_path / "c1", workers=1, max_image_pixels=250_000, progress=False)  # default 0.01
    with pytest.raises(DataError, match="c_truncated.JPEG: truncated"):
        prepare(root, tmp_path / "c2", workers=1, strict=True, progress=False)
    assert not (tmp_path / "c2" / "cache.json").exists()


def _good_source(root, n_per_class=6, classes=("a", "b")):
    for c, name in enumerate(classes):
        for i in range(n_per_class):
            _save(_noise(40 + 3 * i, 30 + 2 * c, seed=10 * c + i), root / "train" / name / f"{i:03d}.JPEG")
        _save(_noise(33, 44, seed=99 + c), root / "val" / name / "v.JPEG")
    return root


def _arrays(out):
    ds = PackedDataset(out, "train")
    return np.stack([ds[i][0].numpy() for i in range(len(ds))]), ds.labels, ds.mean.numpy(), ds.eigvecs.numpy()


def test_interrupted_preparation_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    root = _good_source(tmp_path / "src")  # 12 train images -> 6 shards of 2, 2 val -> 1 shard
    out = tmp_path / "cache"
    real = prep_mod.pack_shard
    calls = []

    def interrupt_after_three(task):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((task.split, task.index))
        return real(task)

    monkeypatch.setattr(prep_mod, "pack_shard", interrupt_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, workers=1, shard_size=2, image_size=32, progress=False)
    assert not (out / "cache.json").exists()
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted"
    finished = {f"shard-{i:05d}.npy": os.stat(out / "train" / f"shard-{i:05d}.npy").st_mtime_ns for i in range(3)}
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3

    calls.clear()
    monkeypatch.setattr(prep_mod, "pack_shard", lambda task: calls.append((task.split, task.index)) or real(task))
    prepare(root, out, workers=1, shard_size=2, image_size=32, progress=False)
    assert calls == [("train", 3), ("train", 4), ("train", 5), ("val", 0)]  # only the unfinished ones
    for name, mtime in finished.items():
        assert os.stat(out / "train" / name).st_mtime_ns == mtime  # not rewritten
    fresh = tmp_path / "fresh"
    prepare(root, fresh, workers=1, shard_size=2, image_size=32, progress=False)
    for a, b in zip(_arrays(out), _arrays(fresh)):
        assert np.array_equal(a, b)

    # A lost shard file, and a changed source file: exactly those shards are redone.
    (out / "train" / "shard-00001.npy").unlink()
    _save(_noise(47, 33, seed=1234), root / "train" / "b" / "005.JPEG")  # shard 5 holds b/004, b/005
    calls.clear()
    prepare(root, out, workers=1, shard_size=2, image_size=32, progress=False)
    assert calls == [("train", 1), ("train", 5)]
    assert (out / "cache.json").exists()


def test_worker_processes_give_the_same_cache(tmp_path):
    root = _good_source(tmp_path / "src", n_per_class=5)
    prepare(root, tmp_path / "one", workers=1, shard_size=3, image_size=32, progress=False)
    prepare(root, tmp_path / "two", workers=2, shard_size=3, image_size=32, progress=False)
    for a, b in zip(_arrays(tmp_path / "one"), _arrays(tmp_path / "two")):
        assert np.array_equal(a, b)
    assert (tmp_path / "one" / "stats.json").read_text() == (tmp_path / "two" / "stats.json").read_text()


def test_cli_prepare_and_info(tmp_path, capsys):
    root = _good_source(tmp_path / "src", n_per_class=2)
    assert main(["data", "prepare", "--src", str(root), "--out", str(tmp_path / "c"), "--workers", "1",
                 "--image-size", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train: 4 of 4 images packed, 0 skipped" in out and "cache ready" in out
    assert main(["data", "info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "32x32 uint8, 2 classes" in out and "train: 4 images" in out
    assert main(["data", "info", str(tmp_path / "src")]) == 2  # not a cache: one clear line
    assert "not a complete splitnet cache" in capsys.readouterr().err


# ---- symbolic links, unreadable folders, hidden entries (issue 13, item 10) -------------------------
def _prep32(root, out, **kw):
    return prepare(root, out, workers=1, image_size=32, progress=False, **kw)


def test_symlink_loop_inside_a_class_is_walked_once_and_reported(tmp_path):
    root = _good_source(tmp_path / "src", n_per_class=3)
    a = root / "train" / "a"
    os.symlink(".", a / "loop")  # a -> a -> a ...: os.walk(followlinks=True) listed a's images 41 times
    os.symlink("..", a / "up")  # to train/: would pack b's images with a's label
    os.symlink("000.JPEG", a / "same.JPEG")  # a second link to a file: packed once
    (root / "train" / "b" / "more").mkdir()
    _save(_noise(40, 30, seed=77), root / "train" / "b" / "more" / "x.JPEG")  # a real subfolder is still read
    report = _prep32(root, tmp_path / "c")
    tr = report["splits"]["train"]
    assert tr["files"] == 7 and tr["packed"] == 7
    assert PackedDataset(tmp_path / "c", "train").labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    links = {s["file"]: s["reason"] for s in tr["links_skipped"]}
    assert set(links) == {"train/a/loop", "train/a/up", "train/a/same.JPEG"}
    assert "already listed as train/a/" in links["train/a/loop"] and "loop" in links["train/a/loop"]
    assert "already listed as train/" in links["train/a/up"]
    assert "same file as train/a/000.JPEG" in links["train/a/same.JPEG"]


def test_a_link_to_a_folder_outside_the_source_is_followed(tmp_path):
    root = _good_source(tmp_path / "src", n_per_class=2)
    extra = tmp_path / "elsewhere"
    _save(_noise(40, 30, seed=5), extra / "e.JPEG")
    os.symlink(extra, root / "train" / "a" / "extra")
    tr = _prep32(root, tmp_path / "c")["splits"]["train"]
    assert tr["packed"] == 5 and not tr["links_skipped"]


def test_a_dangling_image_link_counts_as_unreadable(tmp_path, capsys):
    root = _good_source(tmp_path / "src", n_per_class=3)
    os.symlink(tmp_path / "gone.JPEG", root / "train" / "a" / "zz_gone.JPEG")
    out = tmp_path / "c"
    with pytest.raises(DataError, match="1 of 7 files unreadable.*zz_gone.JPEG: broken symbolic link"):
        _prep32(root, out)  # the default max_bad_fraction 0.01: one bad file of 7 is too many
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"].startswith("failed")
    (bad,) = rep["splits"]["train"]["skipped"]
    assert bad["file"] == "train/a/zz_gone.JPEG" and "gone.JPEG" in bad["reason"] and "No such file" in bad["reason"]
    report = _prep32(root, out, max_bad_fraction=0.5)
    tr = report["splits"]["train"]
    assert report["status"] == "complete" and tr["packed"] == 6 and tr["files"] == 7
    assert [s["file"] for s in tr["skipped"]] == ["train/a/zz_gone.JPEG"]
    with pytest.raises(DataError, match="zz_gone.JPEG: broken symbolic link.*strict"):
        _prep32(root, tmp_path / "c2", strict=True, max_bad_fraction=0.5)
    assert main(["data", "prepare", "--src", str(root), "--out", str(tmp_path / "c3"), "--workers", "1",
                 "--image-size", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "zz_gone.JPEG" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("target", ["missing", "loop"])
def test_a_broken_class_folder_link_is_an_error_not_a_label_shift(tmp_path, target):
    root = _good_source(tmp_path / "src", n_per_class=1, classes=("a", "c"))
    link = root / "train" / "b"
    os.symlink(tmp_path / "nowhere" if target == "missing" else link, link)
    with pytest.raises(DataError, match=r"train/b: broken symbolic link.*shift the labels"):
        _prep32(root, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_an_unreadable_class_folder_is_an_error_naming_it(tmp_path, monkeypatch, capsys):
    root = _good_source(tmp_path / "src", n_per_class=2)
    denied = root / "train" / "b"
    real = os.scandir

    def scandir(path="."):  # tests run as root, where chmod 000 does not stop reading
        if os.fspath(path) == str(denied):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"train/b: cannot read this folder \(Permission denied\)"):
        _prep32(root, tmp_path / "c")
    assert main(["data", "prepare", "--src", str(root), "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train/b" in err and "Permission denied" in err and "Traceback" not in err


def test_hidden_files_and_folders_are_listed(tmp_path):
    root = _good_source(tmp_path / "src", n_per_class=1)
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    _save(_noise(40, 30), root / "train" / "a" / ".ipynb_checkpoints" / "x.JPEG")
    (root / "train" / "a" / "._000.JPEG").write_bytes(b"\0")
    (root / "val" / ".trash").mkdir()
    report = _prep32(root, tmp_path / "c")
    assert report["splits"]["train"]["hidden"] == {
        "count": 3, "paths": ["train/.DS_Store", "train/a/._000.JPEG", "train/a/.ipynb_checkpoints/"]}
    assert report["splits"]["val"]["hidden"] == {"count": 1, "paths": ["val/.trash/"]}
    assert report["splits"]["train"]["packed"] == 2
