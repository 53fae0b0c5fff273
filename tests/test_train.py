"""Training runs end to end on a tiny synthetic set: resume is exact, signals save, NaN stops cleanly,
checkpoints load with weights_only=True, evaluation averages probabilities."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cpuenv import cpu_env
from helpers import CIFAR, EXPERIMENTS, ROOT, losses, tiny_sets
from splitnet.train import checkpoint as ckpt
from splitnet.cli import main
from splitnet.data import ensure_cache, make_synthetic
from splitnet.train.evaluate import ensemble, predict_probs, topk_errors
from splitnet.train.config import load_config
from splitnet.train.loop import TrainingError, read_metrics, train

SMOKE = EXPERIMENTS / "smoke.toml"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    home = tmp_path_factory.mktemp("data")
    root = make_synthetic(home / "syn", seed=1, classes=10, train_per_class=8, val_per_class=3)
    cache = ensure_cache(root, home)
    os.environ["SPLITNET_DATA"] = str(home)
    return cache


def _sets(cache, *extra):
    return tiny_sets(cache, *extra, threads=2, eval_batch_size=16)


@pytest.fixture(scope="session")
def straight_run(tiny_cache, tmp_path_factory):
    """An uninterrupted run of 6 steps (80 images, batch 8: 10 steps per epoch)."""
    out = tmp_path_factory.mktemp("straight")
    train(load_config(SMOKE, _sets(tiny_cache, "max_steps=6")), out, progress=False)
    return out


def _sets32(cache32, *extra):
    return tiny_sets(cache32, *extra, threads=2)


@pytest.fixture(scope="session")
def straight32(cache32, tmp_path_factory):
    """The same at the CIFAR scale (experiments/cifar.toml; 80 images, batch 8), for the tests of the
    run machinery that need not pay for the full-size network."""
    out = tmp_path_factory.mktemp("straight32")
    train(load_config(CIFAR, _sets32(cache32, "max_steps=6")), out, progress=False)
    return out


def test_run_directory_contents(straight_run):
    for name in ("config.toml", "run.json", "metrics.jsonl", "checkpoint.pt"):
        assert (straight_run / name).is_file(), name
    info = json.loads((straight_run / "run.json").read_text())
    assert info["commit"] and info["devices"] == ["cpu", "cpu"] and len(info["classes"]) == 10
    assert info["cudnn_benchmark"] is torch.backends.cudnn.benchmark  # on for CUDA training only
    recs = read_metrics(straight_run)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "epoch", "loss", "lr", "step_s", "time"} <= set(r) for r in train_recs)
    times = [r["time"] for r in train_recs]
    assert times == sorted(times) and times[-1] - times[0] >= sum(r["step_s"] for r in train_recs[1:])
    ev = [r for r in recs if r["kind"] == "eval"]
    assert ev and {"val_top1_err", "val_top5_err"} <= set(ev[-1])
    # The resolved config is what load_config reads back.
    import tomllib
    assert load_config(None, base=tomllib.loads((straight_run / "config.toml").read_text())).max_steps == 6


def test_checkpoint_loads_weights_only(straight_run):
    ck = torch.load(straight_run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 6 and ck["model"]["fc8.weight"].shape == (10, 4096)
    assert set(ck["velocity"]) == set(ck["model"])
    model, cfg, classes = ckpt.model_from_checkpoint(ck, devices="cpu")
    assert torch.equal(model.grouped_state_dict()["conv3.weight"], ck["model"]["conv3.weight"])


def test_resume_is_exact(tiny_cache, straight_run, tmp_path):
    out = tmp_path / "run"
    s = train(load_config(SMOKE, _sets(tiny_cache, "max_steps=3")), out, progress=False)
    assert s["status"] == "max_steps" and s["step"] == 3
    s = train(out=out, resume=True, sets=["max_steps=6"], progress=False)
    assert s["step"] == 6
    assert losses(out) == losses(straight_run)  # bitwise, on the CPU
    a, b = ckpt.load(out / "checkpoint.pt"), ckpt.load(straight_run / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_device_input_path_trains_the_same_run(cache32, straight32, tmp_path):
    """Batches finished on the model's device from the uint8 cache (here the CPU, in the main process)
    are bitwise the workers' batches: the same losses and weights as the default path, and resumable
    mid-run across the two paths."""
    out = tmp_path / "run"
    train(load_config(CIFAR, _sets32(cache32, "max_steps=3", 'input_device="device"')), out, progress=False)
    train(out=out, resume=True, sets=["max_steps=6", 'input_device="cpu"'], progress=False)
    assert losses(out) == losses(straight32)
    a, b = ckpt.load(out / "checkpoint.pt"), ckpt.load(straight32 / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_evaluation_on_the_device_path_equals_the_cpu_path(cache32, straight32):
    """Validation patches cut by DeviceBatches (centre and ten patches) give the same errors and
    probabilities as the workers' float batches."""
    from splitnet.config import replace
    from splitnet.data import PackedDataset
    from splitnet.train.evaluate import evaluate_split
    model, cfg, _ = ckpt.model_from_checkpoint(ckpt.load(straight32 / "checkpoint.pt"), devices="cpu")
    ds = PackedDataset(cache32, "val")
    for ten in (False, True):
        got = [evaluate_split(model, cache32, ds, replace(cfg, input_device=where), ten=ten)
               for where in ("device", "cpu")]
        assert got[0] == got[1] and 0 <= got[0]["val_top5_err"] <= got[0]["val_top1_err"] <= 1, got


def test_bf16_channels_last_run_tracks_fp32_and_resumes(cache32, tmp_path):
    """precision="bf16_cl" (the GPU fast path; autocast runs on the CPU too): the losses follow the
    fp32 run's to bf16 accuracy without being equal (autocast is on), the checkpoint holds float32
    weights, and the run resumes. At the CIFAR scale, where bf16 on a CPU takes seconds."""
    train(load_config(CIFAR, _sets32(cache32, "max_steps=3")), tmp_path / "fp32", progress=False)
    out = tmp_path / "run"
    train(load_config(CIFAR, _sets32(cache32, "max_steps=3", 'precision="bf16_cl"')), out, progress=False)
    ref = losses(tmp_path / "fp32")
    got = losses(out)
    assert got != ref
    assert all(abs(a - b) < 0.02 * b for a, b in zip(got, ref)), (got, ref)
    ck = ckpt.load(out / "checkpoint.pt")
    assert all(t.dtype == torch.float32 for t in ck["model"].values())
    info = json.loads((out / "run.json").read_text())
    assert info["precision"] == "bf16_cl" and info["concurrency"]["strategy"] in ("threads", "sequential")
    s = train(out=out, resume=True, sets=["max_steps=5"], progress=False)
    assert s["step"] == 5 and len(losses(out)) == 5 and all(l == l for l in losses(out))


def test_device_batches_match_the_cpu_loader(tiny_cache):
    from splitnet.data import DataConfig, DeviceBatches, LoaderSpec, make_loader
    for train_mode, ten, workers in ((True, False, 0), (True, False, 1), (False, False, 0), (False, True, 1)):
        cfg = DataConfig(workers=workers)  # workers=1: the raw batches travel through shared memory
        spec = LoaderSpec("train", 8, seed=4, epoch=1, train=train_mode, ten_patches=ten, start_batch=1)
        ref = list(make_loader(tiny_cache, spec, cfg))
        got = list(DeviceBatches(make_loader(tiny_cache, spec, cfg, raw=True), "cpu", cfg=cfg,
                                 train=train_mode, ten_patches=ten))
        assert len(got) == len(ref) > 0
        for (x, y), (rx, ry) in zip(got, ref):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_sigint_saves_and_resume_continues(cache32, tmp_path):
    """SIGINT lands mid-run (a long run, stopped after its first logged step): the step finishes, the
    run saves and exits 130; resumed to k + 2 steps it equals a straight run of k + 2 steps bitwise."""
    out = tmp_path / "run"
    env = cpu_env(PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "splitnet", "train", "--config", str(CIFAR), "--out", str(out)]
    for s in _sets32(cache32, "max_steps=100000", "epochs=100000", "log_every=1"):
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and losses(out):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume with" in err
    k = ckpt.load(out / "checkpoint.pt")["step"]
    assert k >= 1 and k == len(losses(out))
    train(out=out, resume=True, sets=[f"max_steps={k + 2}"], progress=False)
    straight = train(load_config(CIFAR, _sets32(cache32, f"max_steps={k + 2}", "epochs=100000")), tmp_path / "s",
                     progress=False)
    assert straight["step"] == k + 2 and losses(out) == losses(tmp_path / "s")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cache32, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(CIFAR, _sets32(cache32, "max_steps=6", "optim.lr=1e8", "checkpoint_every=1"))
    with pytest.raises(TrainingError, match="loss is (nan|inf).*step"):
        train(cfg, out, progress=False)
    ck = ckpt.load(out / "checkpoint.pt")
    assert ck["step"] >= 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_steps_read_the_loss_only_every_log_every_steps(cache32, straight32, tmp_path, monkeypatch):
    """No host read of the loss or error inside a step (on a GPU it would stall the queue), except at
    every log_every-th step, where the pending steps are read in one transfer; the metrics are
    bitwise those of the run that read at every step (straight32, log_every 10 > 6 steps: all read at
    the end, and here log_every 4: reads at step 4 and at the stop)."""
    from splitnet.train import epochs
    reads, step_reads = [], []
    for name in ("item", "tolist", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _r=real, **k: (reads.append(1), _r(t, *a, **k))[1])
    real_step = epochs.train_step

    def counted(run, x, y):
        before = len(reads)
        why = real_step(run, x, y)
        step_reads.append(len(reads) - before)
        return why

    monkeypatch.setattr(epochs, "train_step", counted)
    out = tmp_path / "run"
    train(load_config(CIFAR, _sets32(cache32, "max_steps=6", "log_every=4")), out, progress=False)
    assert step_reads == [0, 0, 0, 1, 0, 0]
    strip = [{k: v for k, v in m.items() if k not in ("time", "step_s", "images_per_s")} for m in read_metrics(out)]
    ref = [{k: v for k, v in m.items() if k not in ("time", "step_s", "images_per_s")}
           for m in read_metrics(straight32)]
    assert strip == ref


def test_bad_config_key_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(SMOKE), "--out", str(tmp_path / "r"), "--set", "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown key" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.toml" in capsys.readouterr().err


class _PatchModel(torch.nn.Module):
    """Returns fixed logits per patch index (pixel [0,0,0] holds the patch index)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def test_ten_patch_prediction_averages_probabilities_not_logits():
    # Two patches say B mildly, one says "not B" extremely: mean probabilities pick B, mean logits A.
    table = [[0.0, 2.0], [0.0, 2.0], [0.0, -100.0]]
    x = torch.zeros(1, 3, 3, 4, 4)
    for p in range(3):
        x[0, p, 0, 0, 0] = p
    probs, labels = predict_probs(_PatchModel(table), [(x, torch.tensor([1]))])
    expect = torch.softmax(torch.tensor(table), 1).mean(0)
    assert torch.allclose(probs[0], expect)
    assert probs[0].argmax() == 1
    assert torch.tensor(table).mean(0).argmax() == 0  # what averaging logits would have said
    assert topk_errors(probs, labels, ks=(1,))["top1_err"] == 0.0


def test_ten_patches_go_through_the_model_in_passes_of_the_batch_size():
    """B images x P patches are P passes of B rows (the cache-sized pass of a centre batch), and the
    probabilities are those of one pass over all B x P rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    rows = []
    model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    x, y = torch.randn(6, 10, 3, 4, 4), torch.randint(0, 5, (6,))
    probs, _ = predict_probs(model, [(x, y)])
    assert rows == [6] * 10
    with torch.no_grad():
        whole = torch.softmax(model(x.flatten(0, 1)), 1).view(6, 10, 5).mean(1)
    assert torch.allclose(probs, whole, atol=1e-6)


def test_ensemble_is_the_mean_of_probabilities():
    p1 = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    p2 = torch.tensor([[0.2, 0.8], [0.4, 0.6]])
    e = ensemble([p1, p2])
    assert torch.allclose(e, torch.tensor([[0.4, 0.6], [0.3, 0.7]]))
    assert topk_errors(e, torch.tensor([1, 0]), ks=(1,))["top1_err"] == 0.5
    with pytest.raises(ValueError):
        ensemble([p1, torch.zeros(3, 2)])


def test_eval_command_with_ensemble(straight32, capsys, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(straight32), "--ten-crop", "--ensemble", str(straight32),
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    kinds = [(r["model"].startswith("ensemble"), r["patches"]) for r in rows]
    assert kinds == [(False, 1), (False, 10), (False, 1), (False, 10), (True, 1), (True, 10)]
    # An ensemble of a model with itself is that model.
    assert rows[4]["top1_err"] == rows[0]["top1_err"] and rows[5]["top5_err"] == rows[1]["top5_err"]
    assert all(r["images"] == 20 for r in rows)


def test_reproduce_writes_a_report_with_all_figures(cache32, tmp_path):
    """The whole pipeline (train, both evaluations, every figure, the tables), at the CIFAR scale so
    that it takes seconds; test_cifar_scale and the train tests above cover the full-size network."""
    out = tmp_path / "rep"
    args = ["reproduce", "--out", str(out), "--config", str(CIFAR), "--set", f'data.root="{cache32}"',
            "--set", "batch_size=8", "--set", "max_steps=2", "--set", "data.workers=0", "--set", "eval_batch_size=20"]
    assert main(args) == 0
    text = (out / "report.md").read_text()
    for fig in ("figure3_conv1_kernels.png", "figure4_predictions_neighbours.png", "training_curves.png"):
        assert (out / "figures" / fig).stat().st_size > 1000, fig
        assert fig in text
    for needle in ("40.7", "37.5", "chance on our data", "Colour specificity", "bytes per image", "cifar",
                   "The best validation evaluation during training (`best.pt`"):
        assert needle in text, needle
    # Running it again reuses the trained run instead of training again.
    mtime = (out / "run" / "checkpoint.pt").stat().st_mtime
    assert main(args) == 0
    assert (out / "run" / "checkpoint.pt").stat().st_mtime == mtime
