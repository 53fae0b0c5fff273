"""Columns as gloo ranks (torchrun, CPU) against the single-process model: same function, same training."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import splitnet
from cpuenv import cpu_env
from helpers import CIFAR, ROOT, cli_sets, eval_recs, losses, tiny_cfg, tiny_sets
from reference import rel
from splitnet.train import checkpoint as ckpt
from splitnet.model.convert import column_tensors, grouped_from_columns
from splitnet.train.evaluate import evaluate_split
from splitnet.train.loop import train

ENV = cpu_env(PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT / "tests"), OMP_NUM_THREADS="1")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
           f"--master-port={_port()}", *args]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_compute_the_single_process_function(tmp_path, ranks):
    batch = 4
    _torchrun(ranks, str(ROOT / "tests" / "dist_worker.py"), str(tmp_path), str(batch))
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(ranks)]

    torch.manual_seed(0)
    m = splitnet.SplitAlexNet(num_classes=10, devices="cpu").train()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(batch, 3, 224, 224, generator=g) * 60).requires_grad_(True)
    y = torch.randint(0, 10, (batch,), generator=g)
    m.set_dropout_stream(7, batch, 0)
    logits = m(x)
    F.cross_entropy(logits, y).backward()

    heads = sorted((r for r in res if r["logits"] is not None), key=lambda r: r["offset"])
    assert len(heads) == ranks // 2
    assert rel(torch.cat([h["logits"] for h in heads]), logits.detach()) < 1e-5
    assert rel(torch.cat([r["x_grad"] for r in sorted(res, key=lambda r: r["offset"]) if r["column"] == 0]),
               x.grad) < 1e-5
    ref = grouped_from_columns(m.layout, column_tensors(m, lambda p: p.grad))
    for replica in range(ranks // 2):
        cols = [next(r["grads"] for r in res if r["replica"] == replica and r["column"] == c) for c in (0, 1)]
        got = grouped_from_columns(m.layout, cols)
        for k, v in ref.items():
            assert rel(got[k], v) < 1e-5, (replica, k)
    # The bytes each rank sent (counted at the collectives: all-gather / reduce-scatter where both
    # columns read, gather / scatter for fc8, bucketed gradient all-reduces) are the layout's count.
    for r in res:
        sent = {"exchange": r["sent"]["exchange"], "gradients": r["sent"].get("gradients", 0)}
        assert sent == pytest.approx(r["expected"], rel=1e-9), r["rank"]
        assert sent["exchange"] > 0 and (sent["gradients"] > 0) == (ranks == 4)
        assert r["buckets"] > 3 if ranks == 4 else r["buckets"] == 0  # 4 MB buckets: several launched


# The runs below are at the CIFAR scale (cache32, experiments/cifar.toml): the ranks' start-up, not the
# network, is their cost; the full-size network's distributed function is
# test_ranks_compute_the_single_process_function. The config's thread count is kept (threads=None).
@pytest.fixture(scope="module")
def single_run(cache32, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train(tiny_cfg(cache32, "max_steps=3", threads=None), out, progress=False)
    return out


@pytest.mark.parametrize("ranks", [2, 4])
def test_torchrun_training_equals_one_process(cache32, single_run, tmp_path, ranks):
    out = tmp_path / "run"
    args = ["-m", "splitnet", "train", "--config", str(CIFAR), "--out", str(out)]
    args += cli_sets(tiny_sets(cache32, "max_steps=3", threads=None))
    _torchrun(ranks, *args)
    a, b = losses(out), losses(single_run)
    assert len(a) == len(b) == 3
    assert all(abs(u - v) <= 1e-5 * abs(v) for u, v in zip(a, b)), (a, b)
    assert len(list(out.glob("metrics*.jsonl"))) == 1
    # The checkpoint loads in one process and evaluates exactly as the ranks did: with 4 ranks each
    # of the 2 replicas evaluated half of the validation set and the miss counts were summed.
    ck = ckpt.load(out / "checkpoint.pt")
    model, cfg, _ = ckpt.model_from_checkpoint(ck, devices="cpu")
    from splitnet.data import PackedDataset
    errs = evaluate_split(model, cache32, PackedDataset(cache32, "val"), cfg)
    logged = eval_recs(out)[-1]
    assert (errs["val_top1_err"], errs["val_top5_err"]) == (logged["val_top1_err"], logged["val_top5_err"])
    if ranks == 2:
        # Same weights as the one-process run, up to float summation order (biases initialised at 0,
        # conv1/conv3/fc8, are after 3 steps 1e-6-sized sums of updates and compare only to ~1e-3).
        single = ckpt.load(single_run / "checkpoint.pt")
        for k, v in single["model"].items():
            zero_init = k in ("conv1.bias", "conv3.bias", "fc8.bias")
            assert rel(ck["model"][k], v) < (1e-2 if zero_init else 1e-4), k


def test_single_process_checkpoint_resumes_under_torchrun(cache32, single_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(single_run, out)
    _torchrun(2, "-m", "splitnet", "train", "--resume", str(out), "--set", "max_steps=4")
    got = losses(out)
    assert len(got) == 4 and got[:3] == losses(single_run)


def _two_ranks(cache, out, timeout_s, main=("-m", "splitnet"), **env_extra):
    port = _port()
    procs = []
    for rank in range(2):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **env_extra)
        cmd = [sys.executable, *main, "train", "--config", str(CIFAR), "--out", str(out)]
        cmd += cli_sets(tiny_sets(cache, "max_steps=100000", "epochs=100000", "log_every=1",
                                  f"dist_timeout_s={timeout_s}", threads=None))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    if "FAULT" in env_extra:
        return procs
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and losses(out)):
        time.sleep(0.2)
    assert losses(out), "the run never started"
    return procs


def test_a_hung_rank_ends_the_run_within_the_timeout(cache32, tmp_path):
    procs = _two_ranks(cache32, tmp_path / "run", timeout_s=8)
    procs[1].send_signal(signal.SIGSTOP)  # hangs: alive, connected, silent
    try:
        t0 = time.time()
        _, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode not in (0, None)
        assert time.time() - t0 < 60
        assert "rank 0" in err and "dist_timeout_s=8" in err and "Traceback" not in err, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_killed_rank_ends_the_run_with_an_error(cache32, tmp_path):
    procs = _two_ranks(cache32, tmp_path / "run", timeout_s=20)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    _, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode not in (0, None)
    assert time.time() - t0 < 60
    assert "rank 0" in err and "Traceback" not in err, err[-2000:]


def test_columns_of_unequal_width_are_refused_at_build_naming_the_layer():
    """all-gather / reduce-scatter exchange equal slices: a layout whose columns feed a crossing layer
    maps of different widths is refused before any collective runs; every built-in layout passes."""
    from splitnet.model.layout import get_layout, layouts, make_layout, with_rows
    from splitnet.train.distributed import DistributedError, check_equal_slices
    for name in layouts():
        check_equal_slices(get_layout(name, 10, geometry="cifar"))
        check_equal_slices(get_layout(name))
    lopsided = make_layout("lopsided", 2, widths={"conv2": (160, 96)}, num_classes=10)
    with pytest.raises(DistributedError, match=r"layer conv3 of layout 'lopsided'.*column 0: \(160, 13, 13\)"):
        check_equal_slices(lopsided)
    # A crossing layer whose own LRN also crosses: both exchanges are checked, the input's first.
    with pytest.raises(DistributedError, match=r"layer conv3 of layout 'lopsided'.*column 0: \(160, 13, 13\)"):
        check_equal_slices(with_rows(lopsided, conv3={"lrn": True, "lrn_cross": True}))
    lrn = with_rows(make_layout("lrn-lopsided", 2, widths={"conv1": (64, 32)}, num_classes=10),
                    conv1={"lrn_cross": True})
    with pytest.raises(DistributedError, match="layer conv1"):
        check_equal_slices(lrn)


def test_own_errors_and_collective_failures_are_told_apart():
    """What runtime.failure decides on: a rank's own error (a shape bug, out of memory, a missing file)
    against a collective that failed because of a peer (gloo's transport errors, torch's DistError)."""
    from splitnet.train.distributed import is_collective_failure
    try:
        F.linear(torch.ones(2, 3), torch.ones(4, 5))
    except RuntimeError as e:
        shape_bug = e
    own = [shape_bug, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
           FileNotFoundError("no such file: /data/val")]
    peer = [RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"),
            RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv"),
            RuntimeError("Application timeout caused pair closure"),  # a hung peer, seen in reduce_scatter's backward
            torch.distributed.DistBackendError("NCCL error in: ..., remote process exited or there was a network error")]
    assert not any(map(is_collective_failure, own)) and all(map(is_collective_failure, peer))


@pytest.mark.parametrize("fault", ["oom"])  # a shape bug takes the same path (the test above)
def test_a_ranks_own_error_is_reported_as_that(cache32, tmp_path, fault):
    """Rank 1 runs out of memory at its second step (tests/fault_worker.py can also inject a shape
    bug): rank 1 shows that error with its traceback; rank 0, stranded in a collective, names rank 1
    and its error, not "died or hung", and stops at once rather than after the timeout."""
    procs = _two_ranks(cache32, tmp_path / "run", timeout_s=100, main=(str(ROOT / "tests" / "fault_worker.py"),),
                       FAULT_RANK="1", FAULT=fault)
    t0 = time.time()
    try:
        outs = [p.communicate(timeout=150) for p in procs]
        assert time.time() - t0 < 60  # not dist_timeout_s (100 s): rank 1's exit closes the connections
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    (_, err0), (_, err1) = outs
    assert procs[0].returncode == 2 and procs[1].returncode not in (0, None)
    what = "OutOfMemoryError: CUDA out of memory" if fault == "oom" else "shapes cannot be multiplied"
    assert "Traceback" in err1 and what in err1 and "rank 1 (replica 0, column 1) failed here" in err1, err1[-3000:]
    assert "Traceback" not in err0 and "rank 1 failed first" in err0 and what.split(":")[-1].strip() in err0, err0[-3000:]
    assert "died or hung" not in err0


def test_ranks_sharing_a_gpu_are_refused_before_any_collective():
    """NCCL refuses two ranks on one GPU only at the first collective, in its own words: init_mesh
    names the cause and the ways out first (rank_device). CPU ranks, and gloo asked for, need no GPU."""
    from splitnet.train.distributed import DistributedError, rank_device
    with pytest.raises(DistributedError, match="2 ranks on this node but 1 GPU.*one process with both columns"):
        rank_device(1, 2, 1)
    assert rank_device(1, 2, 2) == torch.device("cuda", 1)
    assert rank_device(1, 2, 0) == torch.device("cpu") == rank_device(1, 2, 1, backend="gloo")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_the_exchange_collectives_keep_the_memory_format(monkeypatch, fmt):
    """The all-gather and reduce-scatter of _GatherColumns move one flat buffer in the maps' own
    memory order: channels_last maps stay channels_last (no copy to NCHW), and the concatenation is
    in column order. Two ranks emulated: the other column's maps are 10x this one's, and both ranks
    send the same gradient."""
    import splitnet.train.distributed as D

    def gather(buf, flat, group=None):  # as torch's: the ranks' tensors one after another along dim 0
        b = flat.shape[0]
        buf[:b].copy_(flat)
        buf[b:].copy_(flat * 10)

    def reduce_scatter(out, inp, group):  # rank 0's rows of the sum over two ranks sending inp
        out.copy_(2 * inp[:out.shape[0]])

    monkeypatch.setattr(D.dist, "all_gather_into_tensor", gather)
    monkeypatch.setattr(D, "_reduce_scatter", reduce_scatter)
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=fmt)
    full = D._gather_columns(x, None, 2)
    assert torch.equal(full, torch.cat([x, 10 * x], 1)) and full.is_contiguous(memory_format=fmt)
    g = torch.randn(2, 6, 4, 5).contiguous(memory_format=fmt)
    mine = D._reduce_scatter_columns(g, None, 2, fmt == torch.channels_last)
    assert torch.equal(mine, 2 * g[:, :3]) and mine.is_contiguous(memory_format=fmt)
    fc = torch.randn(2, 7)
    assert torch.equal(D._gather_columns(fc, None, 2), torch.cat([fc, 10 * fc], 1))
    assert torch.equal(D._reduce_scatter_columns(torch.cat([fc, fc], 1), None, 2, False), 2 * fc)
