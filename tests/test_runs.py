"""Runs that keep their word: one "done" rule, budgets as run totals, resume-exact schedules, what a
resume may change, run directories that are never clobbered, best weights, and faults (kills,
full disks, corrupt checkpoints, two processes on one folder). The network is the CIFAR-scale
family on 32x32 synthetic images: the run machinery is the same at every geometry, and fast here."""
import json
import os
import random
import signal
import subprocess
import sys
import time
import tomllib

import pytest
import torch

from cpuenv import cpu_env
from helpers import CIFAR, ROOT, eval_recs, losses, run_json, tiny_cfg, tiny_cli_sets, train_recs
from splitnet.cli import main
from splitnet.train import checkpoint as ckpt
from splitnet.train.errors import CheckpointError
from splitnet.train.loop import train, train_or_resume
from splitnet.train.rundir import RunDir, read_metrics


# ---- 1, 2: one "done" rule; budgets are run totals ------------------------------------------------
def test_a_run_stopped_by_its_step_budget_is_done_and_kept(cache32, tmp_path):
    cfg = tiny_cfg(cache32, "max_steps=3")
    assert train_or_resume(cfg, tmp_path / "r")["status"] == "max_steps"
    mtime = (tmp_path / "r" / "checkpoint.pt").stat().st_mtime_ns
    assert train_or_resume(cfg, tmp_path / "r")["status"] == "done"
    assert (tmp_path / "r" / "checkpoint.pt").stat().st_mtime_ns == mtime and len(train_recs(tmp_path / "r")) == 3
    # a larger budget continues the same run
    assert train_or_resume(tiny_cfg(cache32, "max_steps=5"), tmp_path / "r")["step"] == 5


def test_max_minutes_is_a_run_total_kept_in_the_checkpoint(cache32, tmp_path):
    out = tmp_path / "r"
    s = train(tiny_cfg(cache32, "max_minutes=0.0001"), out, progress=False)  # 6 ms: stops after its first step
    assert s["status"] == "max_minutes" and s["step"] == 1
    st = ckpt.load(out / "checkpoint.pt")["state"]
    assert st["elapsed_s"] >= 0.006 and st["status"] == "max_minutes"
    # resumed, the budget is spent: nothing is trained, nothing rewritten; the shared rule says done
    mtime = (out / "checkpoint.pt").stat().st_mtime_ns
    assert train(out=out, resume=True, progress=False)["step"] == 1
    assert (out / "checkpoint.pt").stat().st_mtime_ns == mtime
    assert train_or_resume(tiny_cfg(cache32, "max_minutes=0.0001"), out)["status"] == "done"


# ---- 3: the plateau schedule resumes exactly with eval_every > 1 -----------------------------------
def test_plateau_drops_resume_exactly_with_eval_every_2(cache32, tmp_path):
    sets = ['optim.schedule="plateau"', "optim.patience=1", "optim.min_delta=1.0", "eval_every=2", "epochs=6"]
    straight = tmp_path / "straight"
    train(tiny_cfg(cache32, *sets), straight, progress=False)
    cut = tmp_path / "cut"
    train(tiny_cfg(cache32, *sets, "max_steps=30"), cut, progress=False)  # stops at an epoch end (epoch 3)
    train(out=cut, resume=True, sets=["max_steps=0"], progress=False)
    lrs = [m["lr"] for m in train_recs(straight)]
    assert [m["lr"] for m in train_recs(cut)] == lrs
    # min_delta=1: only the first evaluation (epoch 1) improves on "none yet"; with patience 1 the
    # next one (epoch 3) drops eps. Epochs 2 and 4 have no evaluation and count for nothing.
    assert lrs == pytest.approx([0.02] * 40 + [0.002] * 20)


# ---- 4, 9: what a resume may change; a refused resume or a failed start changes nothing ------------
def test_resume_refuses_unsafe_changes_and_leaves_the_run_intact(cache32, tmp_path, capsys):
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=2"), out, progress=False)
    before = {f: (out / f).read_bytes() for f in ("config.toml", "run.json", "metrics.jsonl", "checkpoint.pt")}
    for bad, key in (("batch_size=16", "batch_size"), ("seed=3", "seed"), ("model.lrn=false", "model.lrn"),
                     ('data.root="/elsewhere"', "data.root")):
        assert main(["train", "--resume", str(out), "--set", bad]) == 2
        err = capsys.readouterr().err
        assert f"{key}: cannot change on resume" in err and "Traceback" not in err, err
    assert {f: (out / f).read_bytes() for f in before} == before
    # the model was built with the data's 10 classes, and config.toml says so
    assert tomllib.loads((out / "config.toml").read_text())["model"]["num_classes"] == 10


def test_resume_with_an_explicit_lr_applies_and_logs_it(cache32, tmp_path):
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=2"), out, progress=False)
    train(out=out, resume=True, sets=["max_steps=4", "optim.lr=0.005"], progress=False)
    recs = read_metrics(out)
    assert [m["lr"] for m in recs if m["kind"] == "train"] == [0.02, 0.02, 0.005, 0.005]
    assert [m["changes"] for m in recs if m["kind"] == "resume"] == [{"max_steps": [2, 4], "optim.lr": [0.02, 0.005]}]


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--config", str(CIFAR), "--out", str(out), "--data", str(tmp_path / "no-such-data")]) == 2
    assert "no-such-data" in capsys.readouterr().err
    assert not out.exists()


def test_batch_larger_than_the_training_set_is_one_line(cache32, tmp_path, capsys):
    sets = tiny_cli_sets(cache32, "batch_size=500")
    assert main(["train", "--config", str(CIFAR), "--out", str(tmp_path / "r"), *sets]) == 2
    err = capsys.readouterr().err
    assert "batch_size = 500 is larger than the training set (80 images" in err and "Traceback" not in err


# ---- 5: an existing run is never clobbered; run.json keeps every segment ---------------------------
def test_train_into_an_existing_run_refuses_unless_overwrite(cache32, tmp_path, capsys):
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=2"), out, progress=False)
    metrics = (out / "metrics.jsonl").read_bytes()
    assert main(["train", "--config", str(CIFAR), "--out", str(out), *tiny_cli_sets(cache32, "max_steps=2")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == metrics
    sets = tiny_cli_sets(cache32, "max_steps=1")
    assert main(["train", "--config", str(CIFAR), "--out", str(out), "--overwrite", *sets]) == 0
    assert len(train_recs(out)) == 1 and len(run_json(out)["segments"]) == 1


def test_run_json_keeps_the_history_of_segments(cache32, tmp_path):
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=2"), out, progress=False)
    train(out=out, resume=True, sets=["max_steps=3"], progress=False)
    info = run_json(out)
    segs = info["segments"]
    assert [s["from_step"] for s in segs] == [0, 2] and [s["step"] for s in segs] == [2, 3]
    assert all(s["commit"] and s["started"] and s["ended"] and s["status"] == "max_steps" for s in segs)
    assert info["classes"] and info["layout"] == "paper"


# ---- 6: best weights beside the last ---------------------------------------------------------------
def test_best_checkpoint_holds_the_best_evaluation(cache32, tmp_path):
    out = tmp_path / "r"
    s = train(tiny_cfg(cache32, "epochs=3"), out, progress=False)
    evals = eval_recs(out)
    best = min(evals, key=lambda m: m["val_top1_err"])
    b = ckpt.load(out / "best.pt")
    assert b["step"] == best["step"] and b["state"]["best"]["val_top1_err"] == best["val_top1_err"]
    assert s["best"]["val_top1_err"] == best["val_top1_err"]
    model, _, _ = ckpt.model_from_checkpoint(b, devices="cpu")  # loads like a checkpoint
    assert "velocity" not in b and model.layout.name == "paper"


# ---- 8 and faults: leftovers, kills, full disks, corrupt checkpoints, two processes ---------------
def test_sigkill_at_random_moments_then_resume_equals_the_straight_run(cache32, tmp_path):
    """Killed (SIGKILL: no handler runs) at random moments, checkpointing every step so that kills
    land in writes too; each resume continues from the last complete checkpoint."""
    straight = tmp_path / "straight"
    train(tiny_cfg(cache32, "epochs=2", "checkpoint_every=1"), straight, progress=False)
    out = tmp_path / "killed"
    env = cpu_env(PYTHONPATH=str(ROOT / "src"))
    rng = random.Random(0)
    cmd = [sys.executable, "-m", "splitnet", "train", "--config", str(CIFAR), "--out", str(out),
           *tiny_cli_sets(cache32, "epochs=2", "checkpoint_every=1")]
    for kill in range(2):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, target = time.time() + 120, rng.randint(3, 8) + 8 * kill
        while time.time() < deadline and len(train_recs(out)) < target and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cmd = [sys.executable, "-m", "splitnet", "train", "--resume", str(out)]
    (out / ".checkpoint.pt.tmp-99999").write_bytes(b"half a checkpoint")  # a kill's leftover
    s = train(out=out, resume=True, progress=False)
    assert s["status"] == "finished" and not list(out.glob(".*.tmp-*"))
    assert losses(out) == losses(straight)


def test_sigterm_to_ablate_alone_stops_both_parallel_runs_saved(cache32, tmp_path):
    """A scheduler's SIGTERM (or a `kill -INT`) to the `ablate --jobs 2` process alone reaches both runs,
    which save and stop; none trains on. Before, the parent died at once and its workers trained on,
    orphaned and unsaved."""
    out = tmp_path / "abl"
    runs = [out / "runs" / f"{n}-seed0" for n in ("paper", "no-lrn")]
    cmd = [sys.executable, "-m", "splitnet", "ablate", "--suite", "cifar", "--data", str(cache32), "--out", str(out),
           "--only", "paper", "no-lrn", "--jobs", "2", "--time-reps", "1",
           *tiny_cli_sets(cache32, "epochs=1000", "log_every=1")]
    proc = subprocess.Popen(cmd, env=cpu_env(PYTHONPATH=str(ROOT / "src")), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not all((r / "metrics.jsonl").exists() for r in runs):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    steps = [len(train_recs(r)) for r in runs]
    for r in runs:
        assert ckpt.load(r / "checkpoint.pt")["step"] == train_recs(r)[-1]["step"], r
    time.sleep(2)
    assert [len(train_recs(r)) for r in runs] == steps  # nothing left training


def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(cache32, tmp_path, monkeypatch):
    out = tmp_path / "r"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second write: half of it lands, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"could not write .*checkpoint.pt \(No space left on device\); "
                                              r"the previous checkpoint.pt is intact"):
        train(tiny_cfg(cache32, "max_steps=4", "checkpoint_every=2"), out, progress=False)
    assert not list(out.glob(".*.tmp-*"))
    assert ckpt.load(out / "checkpoint.pt")["step"] == 2
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert train(out=out, resume=True, progress=False)["step"] == 4


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "other-classes", "other-layout"])
def test_bad_checkpoints_are_one_line_errors(cache32, tmp_path, capsys, kind):
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=1"), out, progress=False)
    path = out / "checkpoint.pt"
    data = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "random":
        path.write_bytes(random.Random(1).randbytes(5000))
    else:
        ck = ckpt.load(path)
        if kind == "other-classes":
            ck["classes"] = ck["classes"][:5]
        else:
            ck["model"]["conv3.weight"] = ck["model"]["conv3.weight"][:, :10]
        torch.save(ck, path)
    assert main(["train", "--resume", str(out), "--set", "max_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and "Traceback" not in err and "weights_only=False" not in err, err
    assert len(err.splitlines()) == 1, err


def test_a_second_process_on_the_same_run_is_refused(cache32, tmp_path):
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=1"), out, progress=False)
    holder = RunDir(out).lock()
    try:
        env = cpu_env(PYTHONPATH=str(ROOT / "src"))
        p = subprocess.run([sys.executable, "-m", "splitnet", "train", "--resume", str(out), "--set", "max_steps=2"],
                           env=env, capture_output=True, text=True, timeout=120)
    finally:
        holder.unlock()
    assert p.returncode == 2 and f"is in use by pid {os.getpid()}" in p.stderr and "Traceback" not in p.stderr
    assert len(train_recs(out)) == 1


def test_metrics_truncation_drops_a_cut_line_and_later_steps(cache32, tmp_path):
    """A kill after step 4 was logged but before its checkpoint, in the middle of a line: the resume
    drops both and logs each step once."""
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=3"), out, progress=False)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 4, "loss": 9.0}) + "\n" + '{"kind": "train", "step": 5, "lo')
    s = train(out=out, resume=True, sets=["max_steps=5"], progress=False)
    recs = train_recs(out)
    assert s["step"] == 5 and [m["step"] for m in recs] == [1, 2, 3, 4, 5] and recs[3]["loss"] != 9.0


# ---- 7: a capped run ends at a small eps --------------------------------------------------------
def test_budget_drops_divide_eps_as_the_budget_runs_out(cache32, tmp_path):
    out = tmp_path / "r"
    cfg = tiny_cfg(cache32, "max_steps=10", "optim.budget_drops=[0.5, 0.8]", 'optim.schedule="none"')
    train(cfg, out, progress=False)
    assert [m["lr"] for m in train_recs(out)] == pytest.approx([0.02] * 5 + [0.002] * 3 + [0.0002] * 2)
    assert ckpt.load(out / "checkpoint.pt")["state"]["budget_drops"] == 2
    # The same run with drop_velocity "scale": the same eps history, other weights (the velocity is
    # divided at each drop; test_optim.py holds the rule to torch.optim.SGD).
    scaled = tmp_path / "scaled"
    train(tiny_cfg(cache32, "max_steps=10", "optim.budget_drops=[0.5, 0.8]", 'optim.schedule="none"',
                   'optim.drop_velocity="scale"'), scaled, progress=False)
    assert [m["lr"] for m in train_recs(scaled)] == [m["lr"] for m in train_recs(out)]
    assert [m["loss"] for m in train_recs(scaled)][:6] == [m["loss"] for m in train_recs(out)][:6]
    assert [m["loss"] for m in train_recs(scaled)][6:] != [m["loss"] for m in train_recs(out)][6:]
    with pytest.raises(Exception, match="budget_drops: increasing fractions"):
        tiny_cfg(cache32, "optim.budget_drops=[0.9, 0.5]")


def test_budget_drops_count_the_drops_the_schedule_made(cache32, tmp_path):
    """A schedule drop before a budget fraction stands in for that fraction's drop (no stacking):
    milestone after epoch 0 (step 10), budget fractions 0.6 and 0.8 of 20 steps (steps 12 and 16)."""
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=20", "optim.budget_drops=[0.6, 0.8]", 'optim.schedule="milestones"',
                   "optim.milestones=[1]"), out, progress=False)
    assert [m["lr"] for m in train_recs(out)] == pytest.approx([0.02] * 10 + [0.002] * 6 + [0.0002] * 4)
    assert ckpt.load(out / "checkpoint.pt")["state"]["budget_drops"] == 1


def test_train_state_round_trips_through_a_checkpoint():
    from splitnet.train.state import TrainState
    st = TrainState(step=7, epoch=2, batch=3, lr=0.5, elapsed_s=12.5, schedule={"best": 0.3, "bad_epochs": 1,
                    "drops": 0}, budget_drops=1, last_eval={"val_top1_err": 0.4}, best={"val_top1_err": 0.3,
                    "epoch": 1, "step": 5}, status="max_minutes")
    assert TrainState.from_checkpoint(st.to_checkpoint()) == st
