"""precision = "fp16" / "fp16_cl" (float16 autocast with a loss scaler, train/scaler.py) on the CPU: the
losses follow fp32's, an overflowing step is skipped and logged but not applied, the scaler's state
resumes exactly, and weights, velocities and checkpoints stay float32. At the CIFAR scale (seconds)."""
import logging
import math

import pytest
import torch

from cpuenv import CPU_DEVICES, cpu_env
from helpers import CIFAR, ROOT, dropout_masks_on_cpu, losses, tiny_cfg, tiny_sets, train_recs
from splitnet.config import ConfigError
from splitnet.train import checkpoint as ckpt
from splitnet.train.config import load_config
from splitnet.train import start
from splitnet.train.loop import train
from splitnet.train.runtime import DistRuntime, LocalRuntime
from splitnet.train.scaler import MIN_SCALE, LossScaler

# fp16's losses against fp32's over the first 6 steps (batch 8, eps 0.02): measured at most 0.04%
# relative apart on the CPU (fp16 0.036%, fp16_cl 0.041%); asserted below 0.2%. They drift apart as
# any two differently rounded SGD runs do: 0.9% (fp16) and 1.2% (fp16_cl) after 20 steps.
TOLERANCE = 2e-3
STEPS = 6


def _cfg(cache32, *extra):
    return tiny_cfg(cache32, CPU_DEVICES, *extra, threads=2)  # one process: pinned on the CPU


def _same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fp32_run(cache32, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    train(_cfg(cache32, f"max_steps={STEPS}", 'precision="fp32"'), out, progress=False)
    return out


@pytest.fixture(scope="module")
def fp16_run(cache32, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    train(_cfg(cache32, f"max_steps={STEPS}", 'precision="fp16"'), out, progress=False)
    return out


@pytest.mark.parametrize("mode", ["fp16", "fp16_cl"])
def test_fp16_losses_follow_fp32(cache32, fp32_run, fp16_run, tmp_path, mode):
    out = fp16_run
    if mode != "fp16":
        out = tmp_path / mode
        train(_cfg(cache32, f"max_steps={STEPS}", f'precision="{mode}"'), out, progress=False)
    ref, got = losses(fp32_run), losses(out)
    assert len(got) == len(ref) == STEPS
    assert got != ref  # autocast is on: float16 convolutions and fc layers
    worst = max(abs(a - b) / b for a, b in zip(got, ref))
    assert worst < TOLERANCE, (worst, got, ref)
    recs = train_recs(out)
    assert all(r["loss_scale"] == 2.0 ** 16 and "skipped" not in r for r in recs)  # no overflow at 2**16 here
    assert all("loss_scale" not in r for r in train_recs(fp32_run))  # fp32 records are as before


def test_fp32_channels_last_is_fp32_in_another_memory_order(cache32, fp32_run, tmp_path, monkeypatch):
    """fp32_cl (experiments/cifar.toml's mode, for CPU speed): the same float32 arithmetic as fp32, so
    the same losses up to the convolutions' summation order, with the conv weights in NHWC."""
    formats = []

    class Recording(start.PaperSGD):  # what the update sees: the conv weights' memory order
        def step(self, closure=None):
            formats.extend(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                           for g in self.param_groups for p in g["params"] if p.dim() == 4)
            return super().step(closure)

    monkeypatch.setattr(start, "PaperSGD", Recording)  # what build_run makes
    out = tmp_path / "fp32_cl"
    train(_cfg(cache32, f"max_steps={STEPS}", 'precision="fp32_cl"'), out, progress=False)
    ref, got = losses(fp32_run), losses(out)
    assert len(got) == len(ref) == STEPS
    assert max(abs(a - b) / b for a, b in zip(got, ref)) < 1e-5, (got, ref)
    assert formats and all(formats)


def test_checkpoints_and_optimiser_stay_float32(fp16_run):
    for name in ("checkpoint.pt", "best.pt"):
        ck = ckpt.load(fp16_run / name)  # weights_only=True
        assert ck["model"] and all(t.dtype == torch.float32 for t in ck["model"].values()), name
        if name == "checkpoint.pt":
            assert all(t.dtype == torch.float32 for t in ck["velocity"].values())
            assert ck["state"]["scaler"] == {"scale": 2.0 ** 16, "growth_tracker": STEPS}
    model, cfg, _ = ckpt.model_from_checkpoint(ckpt.load(fp16_run / "checkpoint.pt"), devices="cpu")
    assert cfg.precision == "fp16" and all(p.dtype == torch.float32 for p in model.parameters())


def test_an_overflow_step_is_skipped_logged_and_not_applied(cache32, tmp_path, monkeypatch, caplog):
    """A gradient made infinite at step 3 (as a float16 overflow leaves it): the step is not applied
    (weights and velocities are bitwise those after step 2), it counts as a step, the metrics record
    says skipped, a line is logged, and the scale is halved."""
    two = tmp_path / "two"
    train(_cfg(cache32, "max_steps=2", 'precision="fp16"'), two, progress=False)
    unscale, calls = LossScaler.unscale_and_check, []

    def poisoned(self, params):
        params = list(params)
        calls.append(1)
        if len(calls) == 3:
            params[0].grad.view(-1)[0] = math.inf
        return unscale(self, params)

    monkeypatch.setattr(LossScaler, "unscale_and_check", poisoned)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="splitnet"):
        s = train(_cfg(cache32, "max_steps=3", 'precision="fp16"'), out, progress=False)
    assert s["step"] == 3 and len(calls) == 3
    recs = train_recs(out)
    assert [r.get("skipped", False) for r in recs] == [False, False, True]
    assert [r["loss_scale"] for r in recs] == [2.0 ** 16] * 3  # the scale each step's backward used
    assert losses(out)[:2] == losses(two) and math.isfinite(recs[2]["loss"])
    a, b = ckpt.load(out / "checkpoint.pt"), ckpt.load(two / "checkpoint.pt")
    assert _same_tensors(a["model"], b["model"]) and _same_tensors(a["velocity"], b["velocity"])
    assert any(v.abs().sum() > 0 for v in a["velocity"].values())  # the momentum was there to disturb
    assert a["step"] == 3 and a["state"]["scaler"] == {"scale": 2.0 ** 15, "growth_tracker": 0}
    assert any("step 3: fp16 gradients overflow at loss scale 65536; update skipped, scale -> 32768"
               in r.getMessage() for r in caplog.records)


def test_a_huge_initial_scale_backs_off_without_touching_the_weights(cache32, tmp_path):
    """optim.loss_scale_init = 2**40: float16's backward overflows for real; the steps are skipped,
    the scale halves each time, and the weights are the initial ones, the velocities zero."""
    cfg = _cfg(cache32, "max_steps=2", 'precision="fp16"', f"optim.loss_scale_init={2.0 ** 40}")
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    recs = train_recs(out)
    assert [(r["loss_scale"], r["skipped"]) for r in recs] == [(2.0 ** 40, True), (2.0 ** 39, True)]
    assert all(math.isfinite(r["loss"]) for r in recs)  # the unscaled loss
    torch.manual_seed(cfg.seed)  # as train() builds the model
    init = ckpt.model_payload(LocalRuntime().build_model(cfg, 10))["model"]
    ck = ckpt.load(out / "checkpoint.pt")
    assert _same_tensors(ck["model"], init)
    assert all(not v.any() for v in ck["velocity"].values())
    assert ck["state"]["scaler"]["scale"] == 2.0 ** 38


def test_fp16_resume_is_exact_with_the_scaler_state(cache32, tmp_path):
    """Interrupted after 2 of 6 steps and resumed: the same losses, scales, skips, weights and
    velocities as an uninterrupted run, bitwise. The initial scale 2**19 overflows the first steps, so
    the resume must continue at the backed-off scale the checkpoint holds, not at 2**19."""
    sets = ('precision="fp16"', f"optim.loss_scale_init={2.0 ** 19}")
    straight = tmp_path / "straight"
    train(_cfg(cache32, "max_steps=6", *sets), straight, progress=False)
    out = tmp_path / "run"
    train(_cfg(cache32, "max_steps=2", *sets), out, progress=False)
    cut = ckpt.load(out / "checkpoint.pt")["state"]["scaler"]
    assert cut["scale"] < 2.0 ** 19  # what a resume must restore
    s = train(out=out, resume=True, sets=["max_steps=6"], progress=False)
    assert s["step"] == 6
    flags = [r.get("skipped", False) for r in train_recs(straight)]
    assert flags[0] and not all(flags[2:]), flags  # skips before the cut, updates after it
    keys = ("step", "loss", "loss_scale", "skipped", "train_top1_err")
    assert [{k: r.get(k) for k in keys} for r in train_recs(out)] == \
        [{k: r.get(k) for k in keys} for r in train_recs(straight)]
    a, b = ckpt.load(out / "checkpoint.pt"), ckpt.load(straight / "checkpoint.pt")
    assert _same_tensors(a["model"], b["model"]) and _same_tensors(a["velocity"], b["velocity"])
    assert a["state"]["scaler"] == b["state"]["scaler"]


@pytest.mark.slow
def test_torchrun_ranks_skip_the_same_steps_as_one_process(cache32, tmp_path):
    """Two gloo ranks (one column each, each checking its own column's gradients) with the initial
    scale 2**19: the same skipped steps, scales and losses as the one-process run (to float
    summation order, as test_distributed's runs)."""
    import os
    import socket
    import subprocess
    import sys
    sets = tiny_sets(cache32, "max_steps=5", 'precision="fp16"', f"optim.loss_scale_init={2.0 ** 19}", threads=2)
    single = tmp_path / "single"
    train(load_config(CIFAR, [*sets, CPU_DEVICES]), single, progress=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={port}", "-m", "splitnet", "train", "--config", str(CIFAR), "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    env = cpu_env(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = train_recs(out), train_recs(single)
    assert [(x["loss_scale"], x.get("skipped")) for x in a] == [(x["loss_scale"], x.get("skipped")) for x in b]
    assert any(x.get("skipped") for x in b) and not all(x.get("skipped") for x in b)
    assert all(abs(x["loss"] - y["loss"]) <= 1e-5 * y["loss"] for x, y in zip(a, b)), (a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_a_gpu_tracks_the_cpu_fp32_run(cache32, fp32_run, tmp_path, monkeypatch):
    """Both columns on cuda:0 in fp16_cl (the fused unscale-and-check kernel on the GPU): the losses
    follow the CPU fp32 run's to float16 accuracy (the same dropout masks, drawn on the CPU), and the
    checkpoint is float32."""
    dropout_masks_on_cpu(monkeypatch)
    out = tmp_path / "gpu"
    train(_cfg(cache32, f"max_steps={STEPS}", 'precision="fp16_cl"', 'devices=["cuda:0", "cuda:0"]'), out,
          progress=False)
    ref, got = losses(fp32_run), losses(out)
    assert len(got) == STEPS and all(abs(a - b) < 0.02 * b for a, b in zip(got, ref)), (got, ref)
    assert all(r["loss_scale"] == 2.0 ** 16 and "skipped" not in r for r in train_recs(out))
    ck = ckpt.load(out / "checkpoint.pt")
    assert all(t.dtype == torch.float32 for d in ("model", "velocity") for t in ck[d].values())


def test_loss_scaler_rules():
    s = LossScaler(init_scale=8.0, growth_interval=3)
    w = torch.nn.Parameter(torch.ones(3))
    loss = s.scale_loss((w * torch.tensor([1.0, 2.0, 3.0])).sum())
    loss.backward()
    assert not s.unscale_and_check([w]) and torch.equal(w.grad, torch.tensor([1.0, 2.0, 3.0]))
    for _ in range(3):
        s.update(False)
    assert (s.scale, s.growth_tracker) == (16.0, 0)  # grown after growth_interval clean steps
    w.grad = torch.tensor([1.0, math.nan, 0.0])
    assert s.unscale_and_check([w, torch.nn.Parameter(torch.ones(1))])  # a parameter without a gradient too
    s.update(False)
    s.update(True)
    assert (s.scale, s.growth_tracker) == (8.0, 0)  # halved, the count restarts
    t = LossScaler(init_scale=1.0)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == {"scale": 8.0, "growth_tracker": 0}
    s.scale = MIN_SCALE
    s.update(True)
    assert s.exhausted  # the loop stops the run (TrainingError) rather than skip every step
    # disabled (fp32, tf32, bf16): nothing is touched, nothing is saved
    off = LossScaler(enabled=False)
    x = torch.tensor(2.0)
    w.grad = torch.tensor([math.inf, 1.0, 1.0])
    assert off.scale_loss(x) is x and not off.unscale_and_check([w]) and w.grad[1] == 1.0
    off.update(True)
    assert off.state_dict() == {} and not off.exhausted and off.scale_loss(None) is None


def test_any_ranks_overflow_makes_every_rank_skip():
    """DistRuntime.agree: the overflow flag rides in the step's one all-reduce; one rank's overflow
    (its column's gradients) is every rank's."""
    class Mesh:
        replicas, world = 1, 2

    class D:
        calls = []

        @classmethod
        def reduce_scalars(cls, values, mesh):  # the sum with a peer rank (no loss: not the head column)
            cls.calls.append(values)
            peer = [0.0, 0.0, 0.0, 10.0, cls.peer_overflow]
            return [a + b for a, b in zip(values, peer)]

    rt = object.__new__(DistRuntime)
    rt.D, rt.mesh = D, Mesh()
    for mine, peer, expect in ((False, 0.0, False), (False, 1.0, True), (True, 0.0, True)):
        D.peer_overflow = peer
        assert rt.agree(2.5, 0.5, False, 20.0, mine) == (2.5, 0.5, False, 15.0, expect)
    assert len(D.calls) == 3  # one collective per step
    assert LocalRuntime().agree(2.5, 0.5, False, 1.0, True)[4] is True


def test_loss_scale_init_must_be_positive():
    with pytest.raises(ConfigError, match="loss_scale_init: must be > 0"):
        load_config(None, ["optim.loss_scale_init=0"])
