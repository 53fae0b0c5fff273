"""Issue 31: runs that never lie. Each silent wrong result (A, B, E, H, I, M, N) has a test that
failed before its fix; each bad input or environment fault (C, D, F, G, J, K, L, O, P) is one line
on stderr, exit 2, naming the file or key, no traceback. The table is docs/faults.md. Tiny runs: the
CIFAR-scale network on the 32x32 synthetic cache (tests/conftest.py), 10 steps an epoch."""
import errno
import json
import math
import os
import shutil

import pytest
import torch

from splitnet.cli import main
from splitnet.train import checkpoint as ckpt
from splitnet.train.errors import CheckpointError
from splitnet.train.loop import train

from helpers import CIFAR, eval_recs, tiny_cfg, tiny_cli_sets, train_recs


def _one_line_error(capsys, *needles):
    """stderr holds one error line naming every needle (beside a run's progress lines), no traceback."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("splitnet "), err
    for n in needles:
        assert str(n) in lines[0], err
    return lines[0]


# ---- A: the lr a run trains with is the one its records say -------------------------------------
def test_an_lr_set_on_a_done_run_is_the_lr_it_trains_with_later(cache32, tmp_path):
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=2"), out, progress=False)
    assert train(out=out, resume=True, sets=["optim.lr=0.001"], progress=False)["step"] == 2  # done: no step
    train(out=out, resume=True, sets=["max_steps=4"], progress=False)
    assert [m["lr"] for m in train_recs(out)] == [0.02, 0.02, 0.001, 0.001]
    assert ckpt.load(out / "checkpoint.pt")["lr"] == 0.001


# ---- H: a resume that trains nothing keeps every record ------------------------------------------
@pytest.mark.parametrize("sets", [[], ['devices=["cpu", "cpu"]'], ["threads=1"]])
def test_a_resume_of_a_done_run_keeps_its_final_evaluation(cache32, tmp_path, sets):
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=3"), out, progress=False)  # mid-epoch: evaluated at the stop
    assert [m.get("at_stop") for m in eval_recs(out)] == [True]
    train(out=out, resume=True, sets=sets, progress=False)
    assert [m.get("at_stop") for m in eval_recs(out)] == [True]


# ---- B: non-finite weights are refused on load and never written --------------------------------
@pytest.mark.parametrize("key", ["model", "velocity"])
def test_a_checkpoint_with_a_nan_is_refused_naming_the_file_and_tensor(cache32, tmp_path, capsys, key):
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=1"), out, progress=False)
    path = out / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    ck[key]["fc7.weight"][3, 5] = math.nan
    torch.save(ck, path)
    assert main(["eval", "--checkpoint", str(out)]) == 2
    _one_line_error(capsys, path, "fc7.weight", "not finite")
    assert main(["train", "--resume", str(out), "--set", "max_steps=2"]) == 2
    _one_line_error(capsys, path, "fc7.weight")


def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path):
    path = tmp_path / "checkpoint.pt"
    payload = {"format": ckpt.FORMAT, "step": 7, "model": {"conv1.weight": torch.tensor([1.0, math.inf])}}
    with pytest.raises(CheckpointError, match=r"conv1\.weight.*not finite.*no earlier checkpoint.pt"):
        ckpt.save(payload, path)
    assert not path.exists() and not list(tmp_path.iterdir())


# ---- I: values a run cannot train with are refused naming the key -------------------------------
@pytest.mark.parametrize("bad, key", [("optim.lr=nan", "optim.lr"), ("optim.lr=inf", "optim.lr"),
                                      ("max_minutes=-1", "max_minutes"), ("optim.momentum=2", "optim.momentum"),
                                      ("optim.weight_decay=-1", "optim.weight_decay")])
def test_values_a_run_cannot_train_with_are_refused(tmp_path, capsys, bad, key):
    out = tmp_path / "r"
    assert main(["train", "--config", str(CIFAR), "--out", str(out), "--set", bad]) == 2
    _one_line_error(capsys, key)
    assert not out.exists()


def test_a_class_count_other_than_the_data_s_is_refused(cache32, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--config", str(CIFAR), "--out", str(out),
                 *tiny_cli_sets(cache32, "model.num_classes=3")]) == 2
    _one_line_error(capsys, "model.num_classes = 3", "10 classes")
    assert not out.exists()


def test_a_diverged_run_names_what_it_keeps(cache32, tmp_path, capsys):
    """eps 1e30: the first update throws the weights to inf, the next loss is not finite. No
    checkpoint exists yet, and the message says so (it said "the last good checkpoint (step none
    yet) is kept") and how to start again."""
    out = tmp_path / "r"
    assert main(["train", "--config", str(CIFAR), "--out", str(out), *tiny_cli_sets(cache32, "optim.lr=1e30")]) == 2
    _one_line_error(capsys, "No checkpoint was written yet: start again with --overwrite")


# ---- M: a run records where its data is, not how it was typed -----------------------------------
def test_a_relative_data_path_is_stored_resolved(cache32, tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "link").symlink_to(cache32)
    monkeypatch.chdir(tmp_path / "a")
    rel = os.path.relpath(cache32)
    sets = tiny_cli_sets(cache32, "max_steps=1")[2:]  # all but data.root: --data gives it
    assert main(["train", "--config", str(CIFAR), "--out", "r", "--data", rel, *sets]) == 0
    monkeypatch.chdir(tmp_path / "b" / "c")  # elsewhere: the recorded path still finds the data
    out = tmp_path / "a" / "r"
    assert main(["train", "--resume", str(out), "--set", "max_steps=2"]) == 0
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    # the same folder by another spelling (absolute, through a link) is not a change of data.root
    assert main(["train", "--resume", str(out), "--data", str(tmp_path / "link"), "--set", "max_steps=3"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--data", str(tmp_path), "--set", "max_steps=4"]) == 2
    _one_line_error(capsys, "data.root: cannot change on resume")


# ---- N, E, D: a run's data, resumed and evaluated -----------------------------------------------
def _image_folders(root, seed, classes, val, train=8):
    """ROOT/{train,val}/<class>/*.png: random 32x32 images (a real set in a fraction of a second)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)) if val else (("train", train),):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def other_caches(tmp_path_factory):
    """Small prepared sets: "ten" (10 classes, 8 train and 2 val images a class), "same" (the same
    counts, other images), "more_val" (3 val images a class), "five" (5 classes), "no_val" (no val/)."""
    from splitnet.data import DataConfig, ensure_cache
    home = tmp_path_factory.mktemp("others")
    return {name: ensure_cache(_image_folders(home / name, seed, classes, val), home / f"{name}-cache",
                               DataConfig(image_size=32, prepare_workers=1))
            for name, seed, classes, val in (("ten", 5, 10, 2), ("same", 6, 10, 2), ("more_val", 7, 10, 3),
                                             ("five", 8, 5, 2), ("no_val", 9, 10, 0))}


@pytest.mark.parametrize("other, change", [("same", "content digest"), ("more_val", "val images 20 -> 30")])
def test_a_resume_on_data_replaced_in_place_is_refused(other_caches, tmp_path, capsys, caplog, other, change):
    data = tmp_path / "data"
    shutil.copytree(other_caches["ten"], data)
    out = tmp_path / "r"
    train(tiny_cfg(data, "max_steps=1"), out, progress=False)
    shutil.rmtree(data)
    shutil.copytree(other_caches[other], data)
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    assert main(["train", "--resume", str(out), "--set", "max_steps=2"]) == 2
    _one_line_error(capsys, out, "trained on other data", change)
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0  # evaluates, and says so
    assert "trained on other data" in caplog.text and change in caplog.text


def test_an_ensemble_is_evaluated_on_one_data_set(other_caches, tmp_path, capsys):
    """Members trained on data sets of 20 and 30 validation images: every row on the first's 20 (an
    ensemble of each member on its own data averaged unrelated rows, or failed on their shapes)."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_cfg(other_caches["ten"], "max_steps=1"), a, progress=False)
    train(tiny_cfg(other_caches["more_val"], "max_steps=1"), b, progress=False)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(a), "--ensemble", str(b), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["images"] for r in rows] == [20, 20, 20]
    assert main(["eval", "--checkpoint", str(b), "--data", str(other_caches["ten"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0] == {**rows[1], "model": str(b)}


def test_evaluating_on_other_classes_is_one_line(other_caches, tmp_path, capsys):
    a, five = tmp_path / "a", tmp_path / "five"
    train(tiny_cfg(other_caches["ten"], "max_steps=1"), a, progress=False)
    train(tiny_cfg(other_caches["five"], "max_steps=1"), five, progress=False)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(a), "--data", str(other_caches["five"])]) == 2
    _one_line_error(capsys, a, "10 classes", "holds 5")
    assert main(["eval", "--checkpoint", str(a), "--ensemble", str(five)]) == 2
    _one_line_error(capsys, five, "5 classes", "holds 10")


# ---- C: a checkpoint that is not one says what it is -----------------------------------------------
@pytest.mark.parametrize("kind, what", [("text", "is a text file, not a checkpoint"),
                                        ("truncated", "is truncated or damaged"),
                                        ("random", "is not a checkpoint (not torch.save's zip format"),
                                        ("pickle", "is a plain pickle")])
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, capsys, kind, what):
    import pickle
    import random
    path = tmp_path / "checkpoint.pt"
    if kind == "text":
        path.write_text("epoch 3 done\n")
    elif kind == "truncated":
        torch.save({"format": ckpt.FORMAT, "model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "random":
        path.write_bytes(bytes([0x93]) + random.Random(1).randbytes(4999))
    else:
        path.write_bytes(pickle.dumps({"model": 1}))
    assert main(["eval", "--checkpoint", str(path)]) == 2
    _one_line_error(capsys, path, what)


# ---- L: a data set without val/ trains without evaluations, and says so ----------------------------
def test_a_data_set_without_validation_trains_without_evaluations(other_caches, tmp_path, caplog):
    out = tmp_path / "r"
    s = train(tiny_cfg(other_caches["no_val"], "max_steps=13"), out, progress=False)  # an epoch end, a stop mid-epoch
    assert s["status"] == "max_steps" and s["step"] == 13
    assert "no validation split: training without evaluations" in caplog.text
    assert not eval_recs(out) and not (out / "best.pt").exists()


# ---- J: a config file that cannot be read is one line ----------------------------------------------
@pytest.mark.parametrize("kind, what", [("latin1", "not UTF-8 text (byte 11 is 0xe9)"), ("folder", "is a folder")])
def test_an_unreadable_config_file_is_one_line(tmp_path, capsys, kind, what):
    path = tmp_path / "exp.toml"
    if kind == "latin1":
        path.write_bytes('note = "caf\u00e9"\n'.encode("latin-1"))
    else:
        path.mkdir()
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, path, what)


def test_a_run_whose_config_toml_is_not_utf8_is_one_line(cache32, tmp_path, capsys):
    out = tmp_path / "r"
    train(tiny_cfg(cache32, "max_steps=1"), out, progress=False)
    (out / "config.toml").write_bytes((out / "config.toml").read_bytes() + '# caf\u00e9\n'.encode("latin-1"))
    assert main(["train", "--resume", str(out), "--set", "max_steps=2"]) == 2
    _one_line_error(capsys, out / "config.toml", "not UTF-8")


# ---- O: --out naming a file ---------------------------------------------------------------------------
def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    assert main(["train", "--config", str(CIFAR), "--out", str(path)]) == 2
    _one_line_error(capsys, path, "is a file, not a run directory")
    assert main(["train", "--resume", str(path)]) == 2
    _one_line_error(capsys, path, "is a file, not a run directory")
    assert path.read_text() == "mine\n"


# ---- F, K: a full disk, a read-only or deleted run folder during training --------------------------
def _after_saves(monkeypatch, n, fault):
    """Call fault() before the n-th checkpoint write (from then on the folder misbehaves)."""
    real, calls = ckpt.atomic_save, []

    def save(obj, path):
        calls.append(path)
        if len(calls) == n:
            fault()
        return real(obj, path)
    monkeypatch.setattr(ckpt, "atomic_save", save)


def _refuse_writes(monkeypatch, folder, err):
    """Every write into `folder` (a checkpoint, a temporary's removal, run.json) raises OSError `err`."""
    import builtins
    import pathlib
    real_open, real_write, real_unlink = builtins.open, pathlib.Path.write_text, pathlib.Path.unlink

    def check(path):
        if pathlib.Path(path).parent == folder:
            raise OSError(err, os.strerror(err), str(path))

    def open_(path, mode="r", *a, **k):
        if "w" in mode:
            check(path)
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(ckpt, "open", open_, raising=False)
    monkeypatch.setattr(pathlib.Path, "write_text", lambda p, *a, **k: check(p) or real_write(p, *a, **k))
    monkeypatch.setattr(pathlib.Path, "unlink", lambda p, *a, **k: check(p) or real_unlink(p, *a, **k))


def test_a_full_disk_in_torch_save_says_the_disk_is_full(cache32, tmp_path, monkeypatch, capsys):
    """torch.save turns the file's ENOSPC into "unexpected pos N vs M"; and with the disk full,
    recording the segment's end in run.json fails too, which must not add a traceback."""
    out = tmp_path / "r"

    class FullFile:  # what torch.save writes into once the disk is full
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_save = torch.save

    def full():
        monkeypatch.setattr(ckpt.torch, "save", lambda obj, f: real_save(obj, FullFile(f)))
        _refuse_writes(monkeypatch, out, errno.ENOSPC)  # run.json too
    _after_saves(monkeypatch, 2, full)
    assert main(["train", "--config", str(CIFAR), "--out", str(out),
                 *tiny_cli_sets(cache32, "max_steps=4", "checkpoint_every=2")]) == 2
    _one_line_error(capsys, out / "checkpoint.pt", "(No space left on device)",
                    "the previous checkpoint.pt is intact")
    monkeypatch.undo()
    assert ckpt.load(out / "checkpoint.pt")["step"] == 2 and not list(out.glob(".*.tmp-*"))


def test_a_read_only_run_folder_is_one_line(cache32, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    _after_saves(monkeypatch, 2, lambda: _refuse_writes(monkeypatch, out, errno.EROFS))
    assert main(["train", "--config", str(CIFAR), "--out", str(out),
                 *tiny_cli_sets(cache32, "max_steps=4", "checkpoint_every=2")]) == 2
    _one_line_error(capsys, out / "checkpoint.pt", "Read-only file system")


def test_a_run_folder_deleted_during_training_stops_it(cache32, tmp_path, monkeypatch, capsys):
    """It ended with exit 0 and no word, and the save recreated the folder holding only checkpoints."""
    out = tmp_path / "r"
    _after_saves(monkeypatch, 2, lambda: shutil.rmtree(out))
    assert main(["train", "--config", str(CIFAR), "--out", str(out),
                 *tiny_cli_sets(cache32, "max_steps=4", "checkpoint_every=2")]) == 2
    _one_line_error(capsys, out, "no longer exists")
    assert not out.exists()


# ---- G: data prepare onto a full disk ---------------------------------------------------------------
def test_data_prepare_onto_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """The shards are written by worker processes (forked: they inherit the patched write), whose
    OSError reached the user as the pool's 36-line remote traceback."""
    from splitnet.data import cache as C
    src = _image_folders(tmp_path / "src", 1, 2, 2, train=4)

    def full(f, arr, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(C.np, "save", full)  # numpy's own: undone after the test
    assert main(["data", "prepare", "--src", str(src), "--out", str(tmp_path / "c"), "--workers", "2",
                 "--shard-size", "2", "--image-size", "32", "--no-progress"]) == 2
    _one_line_error(capsys, "shard-", "No space left on device", "run the same command again")
