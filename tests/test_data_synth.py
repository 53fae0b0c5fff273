"""The built-in synthetic set: deterministic, ImageNet-style, labelled as synthetic, quick to make."""
import collections

import pytest
from PIL import Image

from splitnet.cli import main
from splitnet.data import DataError, LoaderSpec, make_loader, make_synthetic, prepare
from splitnet.data.synth import DEFAULTS, class_specs


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_for_any_worker_count(tmp_path):
    a = make_synthetic(tmp_path / "a", seed=3, classes=4, train_per_class=3, val_per_class=1, workers=1)
    b = make_synthetic(tmp_path / "b", seed=3, classes=4, train_per_class=3, val_per_class=1, workers=2)
    fa, fb = _files(a), _files(b)
    assert fa == fb and len(fa) == 4 * 4 + 1  # 16 JPEGs + SYNTHETIC.txt
    c = make_synthetic(tmp_path / "c", seed=4, classes=4, train_per_class=3, val_per_class=1, workers=1)
    fc = _files(c)
    assert fc.keys() == fa.keys() and all(fc[k] != fa[k] for k in fa if k.endswith(".JPEG"))


def test_layout_names_sizes_and_marker(tmp_path):
    root = make_synthetic(tmp_path / "s", seed=0, classes=10, train_per_class=4, val_per_class=2, workers=1)
    names = sorted(p.name for p in (root / "train").iterdir())
    assert names == sorted(["red_disc", "red_square", "green_square", "green_triangle", "blue_triangle",
                            "blue_hstripes", "yellow_hstripes", "yellow_vstripes", "purple_vstripes", "purple_disc"])
    assert sorted(p.name for p in (root / "val").iterdir()) == names
    sizes = set()
    for p in root.rglob("*.JPEG"):
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.add(im.size)
    assert len(sizes) > 40 and (256, 256) not in sizes  # varied sizes and aspect ratios
    assert any(min(s) < 256 for s in sizes) and any(max(s) / min(s) > 1.3 for s in sizes)
    text = (root / "SYNTHETIC.txt").read_text()
    assert "SYNTHETIC DATA" in text and "none is a photograph" in text and '"seed": 0' in text


def test_every_colour_and_every_shape_belongs_to_two_classes():
    specs = class_specs(DEFAULTS["classes"])
    assert len({n for n, _, _ in specs}) == 10
    colours = collections.Counter(h for _, h, _ in specs)
    shapes = collections.Counter(s for _, _, s in specs)
    assert set(colours.values()) == {2} and set(shapes.values()) == {2}  # colour alone or shape alone: 50%
    with pytest.raises(DataError, match="classes"):
        class_specs(1)


def test_existing_folders(tmp_path):
    root = make_synthetic(tmp_path / "s", seed=1, classes=2, train_per_class=2, val_per_class=1, workers=1)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.JPEG")}
    make_synthetic(root, seed=1, classes=2, train_per_class=2, val_per_class=1, workers=1)  # same set: kept
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*.JPEG")}
    with pytest.raises(DataError, match="other parameters"):
        make_synthetic(root, seed=2, classes=2, train_per_class=2, val_per_class=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        make_synthetic(tmp_path / "busy")


def test_cli_synth_prepare_load(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--classes", "3", "--train-per-class", "3",
                 "--val-per-class", "1", "--seed", "7"]) == 0
    assert "SYNTHETIC.txt" in capsys.readouterr().out
    prepare(tmp_path / "s", tmp_path / "c", workers=1, progress=False)
    x, y = next(iter(make_loader(tmp_path / "c", LoaderSpec("train", 4, seed=0), workers=0)))
    assert x.shape == (4, 3, 224, 224) and y.max() < 3
    assert x.mean().abs() < 40 and 10 < x.std() < 120  # mean-subtracted, 0..255 scale
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--seed", "8", "--classes", "3"]) == 2
    assert "other parameters" in capsys.readouterr().err
