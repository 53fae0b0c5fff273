"""GPU placements: skipped cleanly without CUDA devices."""
import pytest
import torch

import splitnet
from reference import GROUPS, reference_forward, rel

pytestmark = pytest.mark.gpu
ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(autouse=True)
def _no_tf32():
    """Plain float32 unless a test asks for a mode (through precision.tf32 only: torch refuses to read
    TF32 flags set through both of its APIs)."""
    from splitnet.model.precision import tf32
    with tf32("fp32"):
        yield


def _check(devices):
    torch.manual_seed(0)
    m = splitnet.SplitAlexNet(num_classes=1000, layout="paper", devices=devices).eval()
    sd = m.grouped_state_dict()
    x = torch.randn(4, 3, 224, 224) * 60
    with torch.no_grad():
        got = m(x.to(devices[0])).cpu()
        ref = reference_forward(sd, x, GROUPS["paper"], 2)
    assert rel(got, ref) < 1e-4
    with splitnet.record_exchanges() as log, torch.no_grad():
        m(x.to(devices[0]))
    assert sum(e.nbytes for e in log) == 234_496 * 4


@pytest.mark.skipif(ngpu < 1, reason="needs a CUDA device")
def test_both_columns_on_cuda0():
    _check(("cuda:0", "cuda:0"))


@pytest.mark.skipif(ngpu < 2, reason="needs two CUDA devices")
def test_columns_on_cuda0_and_cuda1():
    _check(("cuda:0", "cuda:1"))


@pytest.mark.skipif(ngpu < 2, reason="needs two CUDA devices")
def test_two_gpu_gradients_match_cpu():
    torch.manual_seed(0)
    gpu = splitnet.SplitAlexNet(num_classes=10, devices=("cuda:0", "cuda:1")).eval()
    cpu = splitnet.SplitAlexNet(num_classes=10, devices=("cpu", "cpu")).eval()
    cpu.load_grouped_state_dict(gpu.grouped_state_dict())
    x = torch.randn(2, 3, 224, 224) * 60
    gpu(x.cuda()).sum().backward()
    cpu(x).sum().backward()
    for cg, cc in zip(gpu.parameters(), cpu.parameters()):
        assert rel(cg.grad.cpu(), cc.grad) < 1e-4


def _train_grads(m, x, y):
    m.zero_grad(set_to_none=True)
    logits = m(x)
    torch.nn.functional.cross_entropy(logits.float(), y).backward()
    return logits.detach().float().cpu(), [p.grad.float().cpu() for p in m.parameters()]


@pytest.mark.skipif(ngpu < 1, reason="needs a CUDA device")
@pytest.mark.parametrize("mode,tol", [("fp32", 1e-4), ("bf16", 5e-2), ("bf16_cl", 5e-2)])
def test_fast_paths_on_one_gpu_match_the_cpu(mode, tol):
    """Both columns on cuda:0, sequential and on two CUDA streams, in each numeric mode the benchmark
    times: logits and every gradient against the CPU model (fp32), to that mode's tolerance."""
    from splitnet.model.precision import memory_format, precision
    torch.manual_seed(0)
    cpu = splitnet.SplitAlexNet(num_classes=10, devices="cpu", concurrency="sequential").eval()
    x = torch.randn(8, 3, 224, 224) * 60
    y = torch.randint(0, 10, (8,))
    ref_logits, ref_grads = _train_grads(cpu, x, y)
    for strategy in ("sequential", "streams"):
        m = splitnet.SplitAlexNet(num_classes=10, devices="cuda:0", concurrency=strategy).eval()
        m.load_state_dict(cpu.state_dict())
        fmt = memory_format(mode)
        m.to(memory_format=fmt)
        with precision(mode, "cuda"):
            logits, grads = _train_grads(m, x.cuda().contiguous(memory_format=fmt), y.cuda())
        assert rel(logits, ref_logits) < tol, strategy
        for g, r in zip(grads, ref_grads):
            assert rel(g, r) < tol, strategy


@pytest.mark.skipif(ngpu < 1, reason="needs a CUDA device")
def test_streams_overlap_is_measured_on_the_gpu():
    from splitnet.bench.model import column_overlap
    m = splitnet.SplitAlexNet(num_classes=10, devices="cuda:0", concurrency="streams")
    res = column_overlap(m, torch.randn(16, 3, 224, 224, device="cuda:0") * 60, steps=2)
    assert res["lanes"] >= 2 and res["busy_s"] > 0  # kernels on two streams (how much they overlap: bench)


@pytest.mark.skipif(ngpu < 1, reason="needs a CUDA device")
def test_device_input_batches_equal_the_cpu_loader(tmp_path):
    from splitnet.data import DataConfig, DeviceBatches, LoaderSpec, ensure_cache, make_loader, make_synthetic
    root = make_synthetic(tmp_path / "syn", seed=1, classes=4, train_per_class=6, val_per_class=1)
    cache = ensure_cache(root, tmp_path)
    cfg = DataConfig(workers=1)
    spec = LoaderSpec("train", 8, seed=2, epoch=0)
    ref = list(make_loader(cache, spec, cfg))
    got = list(DeviceBatches(make_loader(cache, spec, cfg, raw=True, pin_memory=True),
                             "cuda:0", cfg=cfg))
    assert len(got) == len(ref) == 3
    for (x, y), (rx, ry) in zip(got, ref):
        assert x.is_cuda and torch.equal(x.cpu(), rx) and torch.equal(y.cpu(), ry)


@pytest.mark.skipif(ngpu < 1, reason="needs a CUDA device")
def test_training_on_one_gpu_calibrates_and_tracks_the_cpu(tmp_path, monkeypatch):
    """A run with both columns on cuda:0 times sequential against streams before its first step
    (tune.py), trains in bf16 + channels_last from the device input path, and follows the CPU fp32
    run's losses to bf16 accuracy (the same dropout masks: drawn on the CPU in both)."""
    import json
    from helpers import dropout_masks_on_cpu
    from splitnet.data import ensure_cache, make_synthetic
    from splitnet.train.config import load_config
    from splitnet.train.loop import read_metrics, train
    root = make_synthetic(tmp_path / "syn", seed=1, classes=4, train_per_class=8, val_per_class=2)
    cache = ensure_cache(root, tmp_path / "home")
    dropout_masks_on_cpu(monkeypatch)
    losses = {}
    for name, sets in (("cpu", ['devices=["cpu", "cpu"]']),
                       ("gpu", ['devices=["cuda:0", "cuda:0"]', 'precision="bf16_cl"'])):
        base = [f'data.root="{cache}"', "batch_size=8", "data.workers=1", "max_steps=3", "eval_batch_size=8"]
        out = tmp_path / name
        train(load_config(None, base + sets), out, progress=False)
        losses[name] = [m["loss"] for m in read_metrics(out) if m["kind"] == "train"]
    info = json.loads((tmp_path / "gpu" / "run.json").read_text())
    assert set(info["concurrency"]["calibration_step_s"]) == {"sequential", "streams"}
    assert info["concurrency"]["strategy"] in ("sequential", "streams")
    assert len(losses["gpu"]) == len(losses["cpu"]) == 3
    assert all(abs(a - b) < 0.05 * b for a, b in zip(losses["gpu"], losses["cpu"])), losses


@pytest.mark.skipif(ngpu < 1, reason="needs a CUDA device")
def test_fp32_training_on_one_gpu_equals_the_cpu_run_with_the_same_masks(tmp_path, monkeypatch):
    """With the dropout masks drawn on the CPU (a CUDA generator draws others from the same seed),
    fp32 training on cuda:0 (TF32 off) follows the CPU run's losses to 1e-4: the same function, not
    only the same statistics (the bf16 test above allows 5%)."""
    from helpers import dropout_masks_on_cpu
    from splitnet.data import ensure_cache, make_synthetic
    from splitnet.train.config import load_config
    from splitnet.train.loop import read_metrics, train
    dropout_masks_on_cpu(monkeypatch)
    root = make_synthetic(tmp_path / "syn", seed=1, classes=4, train_per_class=8, val_per_class=2)
    cache = ensure_cache(root, tmp_path / "home")
    losses = {}
    for name, devices in (("cpu", '["cpu", "cpu"]'), ("gpu", '["cuda:0", "cuda:0"]')):
        sets = [f'data.root="{cache}"', "batch_size=8", "data.workers=0", "max_steps=4", "eval_batch_size=8",
                f"devices={devices}", 'precision="fp32"', 'concurrency="sequential"']
        train(load_config(None, sets), tmp_path / name, progress=False)
        losses[name] = [m["loss"] for m in read_metrics(tmp_path / name) if m["kind"] == "train"]
    assert len(losses["gpu"]) == 4
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(losses["gpu"], losses["cpu"])), losses


@pytest.mark.skipif(ngpu < 1, reason="needs a CUDA device")
def test_streams_equal_sequential_with_each_columns_work_delayed():
    """Both columns on cuda:0 on two streams, column 1's work (then column 0's) delayed by a GPU sleep
    before each of its segments, so an exchange that does not wait for the other stream reads maps
    not yet written: logits and gradients equal sequential's to its own run-to-run noise, fp32 and
    bf16_cl (bench/gpu_check.py, which the device check also runs)."""
    from splitnet.bench.gpu_check import streams_vs_sequential
    res = streams_vs_sequential("cuda:0", batch=16)
    assert res["ok"], res
