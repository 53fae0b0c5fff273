"""Trained networks in and out: Caffe's bvlc_alexnet and torchvision's AlexNet imported, predicted,
exported; each against an independent reference written here (tests/caffe_files.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import splitnet
from caffe_files import caffe_forward, caffemodel, mean_binaryproto, random_weights
from helpers import ROOT, tiny_cfg
from reference import rel
from splitnet.cli import main
from splitnet.config import replace
from splitnet.data import DataConfig
from splitnet.model.grouped import GroupedAlexNet
from splitnet.pretrained import caffe
from splitnet.pretrained.errors import PretrainedError
from splitnet.pretrained.load import load
from splitnet.pretrained.runs import import_caffe, import_torchvision, write_run
from splitnet.train.config import TrainConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """bvlc_alexnet-shaped random weights, a BGR mean image, its binaryproto and a 256x256 image."""
    d = tmp_path_factory.mktemp("caffe")
    rng = np.random.default_rng(0)
    mean = rng.uniform(90, 140, (3, 256, 256)).astype(np.float32)
    (d / "mean.binaryproto").write_bytes(mean_binaryproto(mean))
    img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(img).save(d / "img.png")
    return {"dir": d, "w": random_weights(), "mean_bgr": mean, "img": img}


_RUNS = {}


def caffe_run(files, form, packed):
    """The imported run of a caffemodel in `form`, written and imported once per module."""
    key = (form, packed)
    if key not in _RUNS:
        model_file = files["dir"] / f"{form}-{packed}.caffemodel"
        model_file.write_bytes(caffemodel(files["w"], form, packed))
        _RUNS[key] = import_caffe(model_file, files["dir"] / f"run-{form}-{packed}", files["dir"] / "mean.binaryproto")
        model_file.unlink()  # 244 MB
    return _RUNS[key]


def caffe_reference(files):
    """Caffe's logits for the test image: BGR, minus the mean, the centre 227 patch (offset 14)."""
    bgr = torch.from_numpy(files["img"].transpose(2, 0, 1)[::-1].astype(np.float32).copy())
    x = (bgr - torch.from_numpy(files["mean_bgr"]))[None, :, 14:241, 14:241]
    return caffe_forward(files["w"], x)


@pytest.mark.parametrize("form,packed", [("v1", False), ("new", True)])
def test_imported_bvlc_alexnet_computes_caffes_function(files, form, packed):
    """Two columns on the CPU, from the image file through the run's preprocessing, equal Caffe's forward
    (groups=2, LRN over all maps with k=1, ceil-mode pooling, BGR minus the mean) to 1e-5; so does the
    single-device grouped network; with the LRN per column instead, they would not."""
    run = caffe_run(files, form, packed)
    model, prep = load(run, ("cpu", "cpu"))
    x = prep(files["dir"] / "img.png")[None]
    ref = caffe_reference(files)
    with torch.no_grad():
        ours = model(x)
        grouped = GroupedAlexNet(model.config, model.layout)
        grouped.load_state_dict(model.grouped_state_dict())
        single = grouped.eval()(x)
        per_column = GroupedAlexNet(replace(model.config, lrn_scope="column"))
        per_column.load_state_dict(model.grouped_state_dict())
        wrong = per_column.eval()(x)
    assert model.layout.rows[0].lrn_cross and ref.abs().max() > 10
    assert rel(ours, ref) < 1e-5 and rel(single, ref) < 1e-5
    assert rel(wrong, ref) > 1e-3
    # The LRN across the columns is an exchange of its own, counted in the table (each column sends its conv1 maps).
    assert model.layout.exchange_bytes_per_image()["conv1"] > 0


def test_imported_bvlc_alexnet_under_torchrun_two_ranks(files, tmp_path):
    run = caffe_run(files, "v1", False)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT / "tests"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={29500 + os.getpid() % 1000}", str(ROOT / "tests" / "pretrained_worker.py"),
           str(run), str(files["dir"] / "img.png"), str(tmp_path / "logits.pt")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt", weights_only=True)["logits"]
    assert rel(got, caffe_reference(files)) < 1e-5


@pytest.mark.parametrize("form", ["v1", "new"])
@pytest.mark.parametrize("packed", [True, False])
def test_reader_reads_every_form_of_a_blob(tmp_path, form, packed):
    rng = np.random.default_rng(1)
    w = {n: (rng.standard_normal((4, 3, 2, 2)).astype(np.float32), rng.standard_normal(4).astype(np.float32))
         for n in splitnet.model.layout.LAYER_NAMES}
    w["fc6"] = (rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal(5).astype(np.float32))
    (tmp_path / "m.caffemodel").write_bytes(caffemodel(w, form, packed))
    got = caffe.read_caffemodel(tmp_path / "m.caffemodel")
    assert list(got) == list(w)  # only the layers with blobs, in file order
    for n, (wt, b) in got.items():
        assert np.array_equal(wt.reshape(w[n][0].shape), w[n][0]) and np.array_equal(b.reshape(-1), w[n][1])
        assert wt.shape[-w[n][0].ndim:] == w[n][0].shape


def _cli(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_caffe_files_are_one_line_errors_naming_layer_and_shapes(files, tmp_path, capsys):
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(os.urandom(4096))
    code, _, err = _cli(capsys, "import", "caffe", junk, "--out", tmp_path / "r1")
    assert code == 2 and "not a Caffe model" in err and len(err.strip().splitlines()) == 1
    # Small files: the blobs are checked layer by layer in order, so a full-size conv1 and a wrong
    # conv2 are enough; the layers after conv2 are never reached and may be tiny.
    w = {n: (np.zeros((2, 2), np.float32), np.zeros(2, np.float32)) for n in splitnet.model.layout.LAYER_NAMES}
    w["conv1"] = (np.zeros((96, 3, 11, 11), np.float32), np.zeros(96, np.float32))
    good = caffemodel(w, "v1", True)
    (tmp_path / "cut.caffemodel").write_bytes(good[: len(good) // 2])
    code, _, err = _cli(capsys, "import", "caffe", tmp_path / "cut.caffemodel", "--out", tmp_path / "r2")
    assert code == 2 and "truncated" in err and len(err.strip().splitlines()) == 1
    bad = dict(w, conv2=(np.zeros((256, 96, 5, 5), np.float32), np.zeros(256, np.float32)))  # conv2 without groups
    (tmp_path / "shape.caffemodel").write_bytes(caffemodel(bad, "new", True))
    code, _, err = _cli(capsys, "import", "caffe", tmp_path / "shape.caffemodel", "--out", tmp_path / "r3")
    assert code == 2 and "layer conv2 weight" in err and "256x96x5x5" in err and "256x48x5x5" in err
    del bad["conv3"]
    (tmp_path / "missing.caffemodel").write_bytes(caffemodel(bad, "new", True))
    with pytest.raises(PretrainedError, match="layer conv3 missing"):
        caffe.read_layers(tmp_path / "missing.caffemodel")
    assert not (tmp_path / "r3").exists() or not any((tmp_path / "r3").iterdir())


def test_mean_defaults_to_caffes_channel_means_and_a_bad_mean_is_named(tmp_path, files):
    assert np.allclose(caffe.channel_mean(4)[:, 0, 0], (122.7, 116.7, 104.0))
    assert np.array_equal(caffe.read_mean(files["dir"] / "mean.binaryproto"), files["mean_bgr"][::-1])
    (tmp_path / "m.binaryproto").write_bytes(mean_binaryproto(np.zeros((3, 20, 10), np.float32)))
    with pytest.raises(PretrainedError, match=r"1x3x20x10"):
        caffe.read_mean(tmp_path / "m.binaryproto")
    with pytest.raises(PretrainedError, match="not a Caffe mean file"):
        (tmp_path / "x.binaryproto").write_bytes(b"\xff" * 64)
        caffe.read_mean(tmp_path / "x.binaryproto")


def test_shipped_class_names_are_ilsvrc_2012_in_caffes_order():
    from splitnet.pretrained import names
    ids, readable = names.imagenet()
    assert len(ids) == 1000 and ids == sorted(ids) and ids[0] == "n01440764" and readable[0] == "tench, Tinca tinca"
    assert readable[281] == "tabby, tabby cat" and ids[-1] == "n15075141"


# ---- torchvision ---------------------------------------------------------------------------------
def owt_reference():
    """torchvision's AlexNet, written out here as torchvision defines it (keys features.N, classifier.N)."""
    return nn.ModuleDict({
        "features": nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2)),
        "classifier": nn.Sequential(nn.Dropout(), nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(),
                                    nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))})


def test_imported_torchvision_alexnet_computes_torchvisions_function(files, tmp_path):
    torch.manual_seed(3)
    ref = owt_reference().eval()
    sd = {k: v * 3 if k.endswith("weight") else v for k, v in ref.state_dict().items()}  # livelier activations
    ref.load_state_dict(sd)
    torch.save(sd, tmp_path / "alexnet-owt.pth")
    run = import_torchvision(tmp_path / "alexnet-owt.pth", tmp_path / "run")
    model, prep = load(run, "cpu")
    assert model.layout.name == "owt" and model.layout.columns == 1
    img = torch.from_numpy(files["img"].transpose(2, 0, 1).astype(np.float32))[:, 16:240, 16:240] / 255
    x = (img - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        want = ref["classifier"](F.adaptive_avg_pool2d(ref["features"](x[None]), 6).flatten(1))
        got = model(prep(files["dir"] / "img.png")[None])
    assert want.abs().max() > 1 and rel(got, want) < 1e-5
    del sd["features.6.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(PretrainedError, match=r"layer conv3 missing \(key features.6.weight\)"):
        import_torchvision(tmp_path / "broken.pth", tmp_path / "run2")


# ---- predict, export, figures, eval, hub: on a small run -----------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory, cache32):
    """A run at CIFAR scale written as an import writes it (cache32's 10 classes, its own mean, paper dropout)."""
    from splitnet.data import PackedDataset
    d = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    cfg = TrainConfig(model=splitnet.ModelConfig(num_classes=10, geometry="cifar"),
                      data=DataConfig(image_size=32, crop_size=24, mean_file="mean.npy"))
    model = splitnet.SplitAlexNet(config=cfg.model, devices="cpu")
    classes = PackedDataset(cache32, "val").classes
    (d / "classes.txt").write_text("".join(f"{c} class number {i}\n" for i, c in enumerate(classes)))
    mean = np.random.default_rng(2).uniform(100, 150, (3, 32, 32)).astype(np.float32)
    run = write_run(d / "run", cfg, model.grouped_state_dict(), mean, d / "classes.txt", {"kind": "test"})
    imgs = d / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(4)
    for i, size in enumerate([(32, 32), (40, 60), (90, 50)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return run, imgs


def test_predict_json_equals_the_model_and_names_the_unreadable(small_run, capsys):
    run, imgs = small_run
    code, out, err = _cli(capsys, "predict", imgs, "--checkpoint", run, "--json", "--top", "3", "--ten-crop")
    res = json.loads(out)
    assert code == 1 and len(res) == 3 and "broken.jpg" in err and "skipped" in err
    model, prep = load(run, "cpu")
    for r in res:
        with torch.no_grad():
            p = F.softmax(model(prep(r["path"], ten=True)), 1).mean(0)
        top = p.topk(3)
        assert [t["index"] for t in r["top"]] == top.indices.tolist()
        assert np.allclose([t["prob"] for t in r["top"]], top.values.tolist(), atol=1e-6)
        assert r["top"][0]["name"] == f"class number {top.indices[0]}"
    code, out, _ = _cli(capsys, "predict", imgs / "im1.png", "--checkpoint", run)
    assert code == 0 and out.startswith(str(imgs / "im1.png"))


def test_export_pt2_reloads_and_equals_the_model_for_any_batch(small_run, tmp_path, capsys):
    run, _ = small_run
    code, _, _ = _cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "net.pt2")
    assert code == 0
    net = torch.export.load(tmp_path / "net.pt2").module()
    model, _ = load(run, "cpu")
    for b in (1, 5):
        x = torch.randn(b, 3, 24, 24) * 60
        with torch.no_grad():
            assert rel(net(x), model(x)) < 1e-5  # paper dropout's x0.5 folded into fc7 and fc8


def test_export_onnx_runs_in_onnxruntime(small_run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run, _ = small_run
    code, _, _ = _cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "net.onnx", "--format", "onnx")
    assert code == 0
    sess = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    model, _ = load(run, "cpu")
    x = torch.randn(3, 3, 24, 24) * 60
    with torch.no_grad():
        assert rel(torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]), model(x)) < 1e-5


def test_figures_of_an_imported_run(small_run, cache32, tmp_path, capsys):
    from splitnet.experiments.figures import colour_specificity
    run, _ = small_run
    code, out, _ = _cli(capsys, "figures", "--checkpoint", run, "--data", cache32, "--out", tmp_path)
    scores = json.loads((tmp_path / "figures.json").read_text())
    assert code == 0 and (tmp_path / "figure3_conv1_kernels.png").is_file()
    assert (tmp_path / "figure4_predictions_neighbours.png").is_file()
    model, _ = load(run, "cpu")
    for c, col in enumerate(model.columns):
        assert scores["figure3"][f"column_{c}_colour_specificity"] == pytest.approx(
            float(colour_specificity(col.conv1.weight.detach()).mean()))


def test_eval_of_an_imported_run_uses_its_mean_and_needs_data(small_run, cache32):
    from splitnet.data import PackedDataset
    from splitnet.data import pipeline as P
    from splitnet.train.evaluate import evaluate_checkpoints, topk_errors
    run, _ = small_run
    with pytest.raises(splitnet.ConfigError, match="give --data"):
        evaluate_checkpoints([run])
    rows = evaluate_checkpoints([run], data=cache32)
    model, prep = load(run, "cpu")
    ds = PackedDataset(cache32, "val")
    imgs, labels = ds.get_batch(list(range(len(ds))))
    with torch.no_grad():
        probs = F.softmax(model(P.eval_batch(imgs, prep.mean, prep.data)), 1)
    assert not torch.equal(prep.mean, ds.mean)
    assert rows[0]["top1_err"] == topk_errors(probs, torch.as_tensor(labels))["top1_err"]


def test_hub_loads_a_run_and_a_fresh_layout(small_run):
    run, _ = small_run
    m = torch.hub.load(str(ROOT), "alexnet", source="local", checkpoint=str(run), devices="cpu")
    model, _ = load(run, "cpu")
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(m(x), model(x))
    fresh = torch.hub.load(str(ROOT), "alexnet", source="local", layout="owt", num_classes=10, devices="cpu")
    assert fresh.layout.name == "owt" and not fresh.training


def test_squash_resize_keeps_the_whole_image_and_makes_its_own_cache(tmp_path):
    """Caffe's rule (resize = "squash"): the whole image to S x S, aspect lost; §2's rule crops the
    centre. A cache prepared one way is not reused for the other."""
    from splitnet.data import ensure_cache, make_synthetic
    from splitnet.data.decode import load_image
    img = np.random.default_rng(5).integers(0, 256, (60, 40, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    squashed, _ = load_image(tmp_path / "a.png", 32, "bilinear", resize="squash")
    want = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(squashed, want)
    assert not np.array_equal(load_image(tmp_path / "a.png", 32, "bilinear")[0], want)
    root = make_synthetic(tmp_path / "syn", seed=1, classes=2, train_per_class=2, val_per_class=1)
    a = ensure_cache(root, tmp_path, DataConfig(image_size=16, cache=str(tmp_path / "c")))
    b = ensure_cache(root, tmp_path, DataConfig(image_size=16, cache=str(tmp_path / "c"), resize="squash"))
    assert json.loads((b / "cache.json").read_text())["settings"]["resize"] == "squash" and a == b


def test_a_mean_file_of_the_wrong_shape_is_named(small_run, cache32):
    from splitnet.data import PackedDataset
    np.save(Path(small_run[0]).parent / "bad.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(splitnet.ConfigError, match=r"data.mean_file .*bad.npy: shape \[3, 8, 8\]"):
        PackedDataset(cache32, "val").with_mean(Path(small_run[0]).parent / "bad.npy")


def test_a_trained_run_loads_with_its_caches_mean_and_predicts(cache32, tmp_path, capsys):
    """splitnet.load on a run of `splitnet train`: the mean is its training cache's; predict reads it."""
    from splitnet.data import PackedDataset
    from splitnet.train.loop import train
    cfg = tiny_cfg(cache32, "max_steps=2")
    train(cfg, tmp_path / "run", progress=False)
    model, prep = splitnet.load(tmp_path / "run", "cpu")
    ds = PackedDataset(cache32, "val")
    assert torch.equal(prep.mean, ds.mean) and prep.crop == 24 and prep.classes == tuple(ds.classes)
    Image.fromarray(ds.get_batch([0])[0][0].permute(1, 2, 0).numpy()).save(tmp_path / "v0.png")
    code, out, _ = _cli(capsys, "predict", tmp_path / "v0.png", "--checkpoint", tmp_path / "run", "--json", "--top", "1")
    with torch.no_grad():
        p = F.softmax(model(_centre_batch(ds, prep)), 1)[0]
    assert code == 0 and json.loads(out)[0]["top"][0]["index"] == int(p.argmax())


def _centre_batch(ds, prep):
    from splitnet.data import pipeline as P
    return P.eval_batch(ds.get_batch([0])[0], ds.mean, prep.data)


def test_eval_refuses_a_folder_of_other_classes_before_preparing_it(small_run, tmp_path, capsys, monkeypatch):
    import splitnet.train.evaluate as ev
    from splitnet.data import make_synthetic
    root = make_synthetic(tmp_path / "syn", seed=1, classes=3, train_per_class=1, val_per_class=1)
    monkeypatch.setattr(ev, "resolve_data", lambda *a: pytest.fail("prepared before the classes were checked"))
    code, _, err = _cli(capsys, "eval", "--checkpoint", small_run[0], "--data", root)
    assert code == 2 and "holds 3 class folders" in err
