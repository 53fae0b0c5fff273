"""The paper's network family at CIFAR-10 scale (model.geometry = "cifar"): the same table machinery,
only the geometry changed; its init keeps the paper's per-layer gain; the CIFAR ablation suite and
Figure 1's protocol on small data."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import splitnet
from reference import COLUMNS, GROUPS, reference_forward, rel
from splitnet.experiments.ablate import experiment_names, load_experiment, run_ablations
from splitnet.config import ConfigError
from splitnet.data import ensure_cache, make_synthetic
from splitnet.data.config import DataConfig
from splitnet.train.evaluate import evaluate_checkpoints
from splitnet.train.loop import train
from splitnet.experiments.fig1 import FourLayerCNN, balanced_indices, epochs_to, small_images, train_error
from splitnet.model.layout import LAYER_NAMES, get_layout, init_gain_factors

# The paper network's fan-ins (§3.5, Figure 2), typed from the paper: conv1 11*11*3, conv2 5*5*48,
# conv3 3*3*256, conv4 and conv5 3*3*192, fc6 6*6*256, fc7 and fc8 4096.
PAPER_FAN_IN = {"conv1": 363, "conv2": 1200, "conv3": 2304, "conv4": 1728, "conv5": 1728,
                "fc6": 9216, "fc7": 4096, "fc8": 4096}


@pytest.mark.parametrize("layout", ["paper", "towers"])
def test_cifar_model_equals_the_reference_network(layout):
    """Split model at CIFAR scale vs the independent grouped reference with conv1 5x5/1 pad 2."""
    torch.manual_seed(3)
    m = splitnet.SplitAlexNet(10, layout=layout, devices=("cpu",) * COLUMNS[layout], geometry="cifar",
                              concurrency="sequential").eval().double()
    sd = {k: v.clone().requires_grad_(True) for k, v in m.grouped_state_dict().items()}
    x1 = (torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(4)) * 60).double()
    x2 = x1.clone().requires_grad_(True)
    x1.requires_grad_(True)
    y = torch.tensor([1, 5, 9])
    logits = m(x1)
    F.cross_entropy(logits, y).backward()
    ref = reference_forward(sd, x2, GROUPS[layout], COLUMNS[layout], pad=(0, 0, 0, 0), conv1=(1, 2))
    F.cross_entropy(ref, y).backward()
    assert logits.shape == (3, 10)
    assert rel(logits.detach(), ref.detach()) < 1e-10 and rel(x1.grad, x2.grad) < 1e-10
    assert rel(m.columns[0].conv2.weight.grad, sd["conv2.weight"].grad[:32]) < 1e-10


def test_cifar_geometry_shapes_and_crossings():
    lay = get_layout("paper", 10, "cifar")
    shapes = {r.name: s.out_shapes for r, s in zip(lay.rows, lay.stats())}
    # 24 -> conv1 5x5/1 pad 2 -> 24 -> pool 3/2 -> 11 -> conv2 -> pool -> 5 -> conv3..5 -> pool -> 2.
    assert shapes["conv1"] == ((16, 11, 11),) * 2 and shapes["conv2"] == ((32, 5, 5),) * 2
    assert shapes["conv5"] == ((32, 2, 2),) * 2 and shapes["fc8"] == ((10,), None)
    assert [r.name for r in lay.rows if r.cross] == ["conv3", "fc6", "fc7", "fc8"]
    assert [r.name for r in lay.rows if r.lrn] == ["conv1", "conv2"]
    assert all(r.pool == (3, 2) for r in lay.rows if r.pool) and [r.name for r in lay.rows if r.dropout] == ["fc6", "fc7"]
    # conv3 reads both columns' pool2 maps: 2 x 32x5x5 floats cross per image, once each way.
    assert lay.exchange_bytes_per_image()["conv3"] == 2 * 32 * 5 * 5 * 4
    m = splitnet.SplitAlexNet(10, devices="cpu", geometry="cifar")
    assert m.input_side == 24 and m.layout.geometry == "cifar"
    with pytest.raises(ValueError, match=r"conv1: expected input \[B, 3, 24, 24\]"):
        m(torch.zeros(1, 3, 224, 224))


def test_init_keeps_the_paper_networks_gain_per_layer():
    assert set(init_gain_factors("imagenet").values()) == {1.0}
    torch.manual_seed(5)
    m = splitnet.SplitAlexNet(10, devices="cpu", geometry="cifar")
    sd = m.grouped_state_dict()
    for name in LAYER_NAMES:
        w = sd[f"{name}.weight"]
        fan = w[0].numel()
        want = 0.01 * math.sqrt(PAPER_FAN_IN[name] / fan)
        assert abs(w.std().item() - want) < 4 * want / math.sqrt(2 * w.numel()) + 1e-6, name
        bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(sd[f"{name}.bias"] == bias), name
    plain = splitnet.SplitAlexNet(10, devices="cpu", geometry="cifar", init_scaling="none").grouped_state_dict()
    assert abs(plain["fc6.weight"].std().item() - 0.01) < 1e-3


def test_cifar_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="input_mode"):
        splitnet.SplitAlexNet(10, devices="cpu", geometry="cifar", input_mode="caffe227")
    with pytest.raises(ConfigError, match="geometry"):
        splitnet.SplitAlexNet(10, devices="cpu", geometry="mnist")


def test_cifar_suite_has_every_twin_and_each_builds():
    names = experiment_names("cifar")
    assert names[0] == "paper" and "caffe227" not in names
    assert set(experiment_names("ablations")) - set(names) == {"caffe227"}
    for n in names:
        cfg, meta = load_experiment(n, data="x", suite="cifar")
        assert cfg.model.geometry == "cifar" and cfg.data.crop_size == 24 and cfg.data.image_size == 32
        m = splitnet.SplitAlexNet(10, config=cfg.model, devices="cpu").eval()
        with torch.no_grad():
            assert m(torch.zeros(1, 3, 24, 24)).shape == (1, 10), n
    with pytest.raises(ConfigError, match="--suite cifar needs --data"):
        load_experiment("paper", suite="cifar")


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A tiny 10-class set prepared at CIFAR's native 32x32."""
    home = tmp_path_factory.mktemp("c32")
    root = make_synthetic(home / "syn", seed=4, classes=10, train_per_class=8, val_per_class=2)
    return ensure_cache(root, home, DataConfig(image_size=32))


def test_cifar_suite_runner_two_jobs(tiny32, tmp_path):
    sets = ["batch_size=8", "max_steps=2", "data.workers=0", "eval_batch_size=20"]
    rows = run_ablations(tmp_path, ["paper", "no-lrn"], data=str(tiny32), seeds=2, sets=sets, time_reps=1,
                         suite="cifar", jobs=2)
    assert [r["name"] for r in rows] == ["paper", "no-lrn"]
    for r in rows:
        assert r["seeds_done"] == 2 and r["steps"] == [2, 2] and r["params"] == get_layout("paper", 10, "cifar").params()
        assert len(r["colour_specificity"]) == 2 and all(len(c) == 2 for c in r["colour_specificity"])
        assert r["train_images_per_s"] > 0 and all(t > 0 for t in r["train_minutes"])
        assert r["ten_top1_err_std"] == pytest.approx(np.std([p["ten_top1_err"] for p in r["per_seed"]], ddof=1))
    cfg = json.loads(json.dumps([load_experiment("paper", str(tiny32), sets, "cifar")[0].model.geometry]))
    assert cfg == ["cifar"]
    md = (tmp_path / "ablations.md").read_text()
    assert "CIFAR-10 scale" in md and "Figure 3's measure" in md
    # Each run recorded the geometry it was built with, and trained single-threaded beside the other.
    run_cfg = (tmp_path / "runs" / "paper-seed1" / "config.toml").read_text()
    assert 'geometry = "cifar"' in run_cfg and "threads = 1" in run_cfg and "seed = 1" in run_cfg
    # Each worker evaluated its own run; the table's errors are those of an evaluation made here.
    run = tmp_path / "runs" / "no-lrn-seed1"
    kept = json.loads((run / "final_eval.json").read_text())["rows"]
    here = {r["patches"]: r for r in evaluate_checkpoints([run], ten=True, batch_size=20)}
    assert [(r["top1_err"], r["top5_err"]) for r in kept] == [(here[p]["top1_err"], here[p]["top5_err"]) for p in (1, 10)]
    assert rows[1]["per_seed"][1]["ten_top1_err"] == here[10]["top1_err"]


def test_a_runs_final_evaluation_is_kept_until_its_checkpoint_changes(tiny32, tmp_path, monkeypatch):
    from splitnet.experiments import run_pool
    run = tmp_path / "run"
    sets = ["batch_size=8", "max_steps=1", "data.workers=0", "eval_batch_size=20"]
    train(load_experiment("paper", str(tiny32), sets, "cifar")[0], run)
    first = run_pool.final_eval(run, 20)
    assert set(first) == {1, 10} and (run / "final_eval.json").is_file()
    calls = []
    real = run_pool.evaluate_checkpoints
    monkeypatch.setattr(run_pool, "evaluate_checkpoints", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert run_pool.final_eval(run, 20) == first and not calls  # kept: the same checkpoint
    train(out=run, resume=True, sets=["max_steps=2"])  # trains on: a new checkpoint.pt
    again = run_pool.final_eval(run, 20)
    assert len(calls) == 1 and again[10]["top1_err"] == real([run], ten=True, batch_size=20)[1]["top1_err"]


def test_a_crop_that_is_not_the_models_input_is_refused(tiny32, tmp_path):
    cfg = load_experiment("paper", str(tiny32), ["max_steps=1", "data.crop_size=28", "data.workers=0"], "cifar")[0]
    with pytest.raises(ConfigError, match="data.crop_size = 28"):
        train(cfg, tmp_path / "run")
    cfg = load_experiment("paper", str(tiny32), ["max_steps=1", "data.image_size=256", "data.workers=0"], "cifar")[0]
    with pytest.raises(ConfigError, match="data.image_size = 256"):
        train(cfg, tmp_path / "run2")


def test_balanced_subsets_take_every_class_equally(tiny32):
    labels = np.repeat(np.arange(5), [10, 3, 8, 8, 8])  # class-sorted, like a cache
    idx = balanced_indices(labels, 15, 5)
    assert np.bincount(labels[idx], minlength=5).tolist() == [3] * 5
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        balanced_indices(labels, 20, 5)
    x, y, classes = small_images(tiny32, "train", 32, limit=30)
    assert classes == 10 and x.shape == (30, 3, 32, 32) and np.bincount(y.numpy()).tolist() == [3] * 10
    assert abs(x.mean().item()) < 1e-3  # mean-subtracted raw pixels (init "paper")


def _convnet_pool(x, op):
    """cuda-convnet's 3/2 pooling, typed from its definition: windows start at 0, 2, 4, ...; there are
    ceil((side - 3) / 2) + 1 of them, the last may hang over the edge, and an average divides by the
    pixels inside the image."""
    n = math.ceil((x.shape[-1] - 3) / 2) + 1
    out = x.new_empty(*x.shape[:2], n, n)
    for i in range(n):
        for j in range(n):
            win = x[..., 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            out[..., i, j] = win.amax((-2, -1)) if op == "max" else win.mean((-2, -1))
    return out


@pytest.mark.parametrize("act,side", [("relu", 32), ("tanh", 32), ("relu", 24)])
def test_figure1_network_is_layers_80sec(act, side):
    """FourLayerCNN against a reference typed from cuda-convnet's layers-80sec.cfg: conv1 then max
    pooling with the neuron after it, conv2 and conv3 with the neuron then average pooling, fc64 with
    the neuron, fc10; ceil-mode pool sizes (32 -> 16 -> 8 -> 4, 24 -> 12 -> 6 -> 3); init stds from
    the config."""
    torch.manual_seed(0)
    model = FourLayerCNN(act, 10, side).double()
    a = torch.relu if act == "relu" else torch.tanh
    p = {k: v for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, side, side, dtype=torch.float64) * 60
    h = a(_convnet_pool(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=2), "max"))
    h = _convnet_pool(a(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=2)), "avg")
    h = _convnet_pool(a(F.conv2d(h, p["conv3.weight"], p["conv3.bias"], padding=2)), "avg")
    last = {32: 4, 24: 3}[side]
    assert h.shape == (2, 64, last, last) and p["fc64.weight"].shape == (64, 64 * last * last)
    ref = a(h.flatten(1) @ p["fc64.weight"].T + p["fc64.bias"]) @ p["fc10.weight"].T + p["fc10.bias"]
    assert torch.allclose(model(x), ref, rtol=1e-10, atol=1e-12)
    # channels_last, as epochs_to trains it: the same function.
    cl = FourLayerCNN(act, 10, side).double().to(memory_format=torch.channels_last)
    cl.load_state_dict(model.state_dict())
    assert torch.allclose(cl(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-10, atol=1e-12)
    for name, std in {"conv1": 1e-4, "conv2": 0.01, "conv3": 0.01, "fc64": 0.1, "fc10": 0.1}.items():
        w = p[f"{name}.weight"]
        assert abs(w.std().item() / std - 1) < 0.15, name  # >= 640 weights each: within 15%
        assert not p[f"{name}.bias"].any(), name


def test_running_training_error_counts_the_batches_as_computed(tiny32):
    """With lr 0 nothing changes during the epoch, so the running error equals a full pass's."""
    x, y, classes = small_images(tiny32, "train", 32)
    for init in ("paper", "torch"):
        res = epochs_to(x, y, classes, "relu", 0.0, target=0.0, max_epochs=1, batch=16, init=init)
        torch.manual_seed(0)
        model = FourLayerCNN("relu", classes, 32, init)
        assert res["curve"] == [train_error(model, x, y)] and res["images_per_s"] > 0


def test_reproduce_and_eval_on_a_native_32_pixel_cache(tiny32, tmp_path):
    """Every command that reads a cache works at 32x32: reproduce (training, ten patches, Figures 3
    and 4 with 5x5 kernels and 24-pixel crops) and eval with ten patches."""
    from splitnet.train.evaluate import evaluate_checkpoints
    from splitnet.experiments.report import EXPERIMENTS, reproduce
    sets = ["max_steps=2", "batch_size=8", "eval_batch_size=20", "data.workers=0"]
    report = reproduce(tmp_path, data=str(tiny32), config=EXPERIMENTS / "cifar.toml", sets=sets)
    text = report.read_text()
    assert "CIFAR-10 scale" in text and (tmp_path / "figures" / "figure3_conv1_kernels.png").stat().st_size > 500
    assert (tmp_path / "figures" / "figure4_predictions_neighbours.png").stat().st_size > 1000
    rows = evaluate_checkpoints([tmp_path / "run"], split="val", ten=True, batch_size=20)
    assert {r["patches"] for r in rows} == {1, 10} and all(0 <= r["top1_err"] <= 1 for r in rows)


def test_ten_patch_evaluation_gives_the_centre_patch_from_the_same_pass(tiny32, tmp_path, monkeypatch):
    """evaluate_checkpoints(ten=True) reads the centre patch's prediction from the ten-patch pass
    (patch CENTRE_PATCH): the same probabilities as a centre-only pass, and 10 forward rows per image,
    not 11."""
    from splitnet.train import checkpoint as ckpt
    from splitnet.train.evaluate import input_batches, predict_probs
    from splitnet.data import LoaderSpec, PackedDataset, resolve_data
    run = tmp_path / "run"
    train(load_experiment("paper", str(tiny32), ["batch_size=8", "max_steps=3", "data.workers=0"], "cifar")[0], run)
    model, cfg, _ = ckpt.model_from_checkpoint(ckpt.load(run / "checkpoint.pt"))
    cache, _ = resolve_data(cfg.data)
    ds = PackedDataset(cache, "val")  # 20 images: batches of 8, 8 and 4
    centre_spec, ten_spec = (LoaderSpec("val", 8, train=False, ten_patches=ten) for ten in (False, True))
    alone, y1 = predict_probs(model, input_batches(model, cache, centre_spec, cfg, ds), mode=cfg.precision)
    mean, y10, centre = predict_probs(model, input_batches(model, cache, ten_spec, cfg, ds),
                                      mode=cfg.precision, centre=True)
    assert torch.equal(y1, y10)
    assert torch.allclose(centre, alone, rtol=0, atol=1e-6)
    # The other patches' predictions differ from the centre's (here by about 6e-4 on average over ten
    # patches after 3 steps): a wrong patch index would not pass the 1e-6 above.
    assert (mean - alone).abs().max() > 1e-5
    rows_seen, real_forward = [], splitnet.SplitAlexNet.forward

    def counting_forward(self, x, *args, **kwargs):
        rows_seen.append(len(x))
        return real_forward(self, x, *args, **kwargs)
    monkeypatch.setattr(splitnet.SplitAlexNet, "forward", counting_forward)
    rows = {r["patches"]: r for r in evaluate_checkpoints([run], ten=True, batch_size=8)}
    assert sum(rows_seen) == 10 * len(ds)
    assert rows[1]["top1_err"] == int((alone.argmax(1) != y1).sum()) / len(ds)
    assert rows[10]["top1_err"] == int((mean.argmax(1) != y10).sum()) / len(ds)
    with pytest.raises(ValueError, match="centre patch of 3 patches"):
        predict_probs(model, [(torch.zeros(2, 3, 3, 24, 24), torch.zeros(2, dtype=torch.long))], centre=True)
