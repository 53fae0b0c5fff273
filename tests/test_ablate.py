"""The ablations: every experiment file builds its model; the runner fills its table and resumes;
Figure 1's measurement on a tiny case."""
import dataclasses
import json
import math
import platform
import resource
import shutil
from pathlib import Path

import pytest
import torch

import splitnet
from splitnet.config import ConfigError
from splitnet.experiments.ablate import experiment_names, load_experiment, run_ablations
from splitnet.train.loop import train_or_resume
from splitnet.data import ensure_cache, make_synthetic
from splitnet.experiments.fig1 import FourLayerCNN, epochs_to, figure1
from splitnet.model.columns import model_layout

EXPECTED = {"paper", "dense", "towers", "conv5-cross", "four-columns", "one-gpu", "one-column", "no-lrn",
            "lrn-code", "lrn-all", "pool-2x2", "tanh", "no-dropout", "inverted-dropout", "no-lighting",
            "no-crops-flips", "caffe227"}


def test_every_experiment_parses_and_builds():
    names = experiment_names()
    assert set(names) == EXPECTED and names[0] == "paper"
    for n in names:
        cfg, meta = load_experiment(n)
        assert meta["group"] and cfg.name == n
        # On the meta device: every layer's shapes are checked as on the CPU, without initialising and
        # running 17 full-size networks (the arithmetic of each layout is tested in test_model.py).
        with torch.device("meta"):
            m = splitnet.SplitAlexNet(num_classes=10, config=cfg.model, devices="meta").eval()
            side = cfg.data.crop_size
            assert m(torch.zeros(1, 3, side, side)).shape == (1, 10), n


def test_experiment_changes_are_what_they_say():
    assert load_experiment("no-lrn")[0].model.lrn is False
    assert load_experiment("no-lighting")[0].data.lighting is False
    lay = model_layout(load_experiment("conv5-cross")[0].model.layout, load_experiment("conv5-cross")[0].model)
    assert lay.row("conv5").cross and "conv5" in lay.exchange_bytes_per_image()
    lay = model_layout("paper", load_experiment("pool-2x2")[0].model)
    assert lay.row("conv1").pool == (2, 2) and lay.params() == 60_965_224  # 2/2 pooling also gives 6x6 pool5


def test_tanh_starts_biases_at_zero_because_bias_1_starves_conv1_of_gradient():
    """The paper's bias 1 (§5) is for ReLUs; tanh units with bias 1 saturate near tanh(1) and pass
    0.42 of the gradient each, which left the CIFAR-scale tanh run at chance. Checked at both scales."""
    for data, suite in ((None, "ablations"), ("x", "cifar")):
        cfg = load_experiment("tanh", data=data, suite=suite)[0]
        assert cfg.model.activation == "tanh" and cfg.model.init_bias == 0.0
    side = cfg.data.crop_size
    x, y = torch.randn(16, 3, side, side) * 50, torch.arange(16) % 10
    norms = {}
    for bias in (0.0, 1.0):
        torch.manual_seed(0)
        m = splitnet.SplitAlexNet(num_classes=10, config=dataclasses.replace(cfg.model, init_bias=bias),
                                  devices="cpu")
        torch.nn.functional.cross_entropy(m(x), y).backward()
        norms[bias] = sum(p.grad.norm() for n, p in m.named_parameters() if "conv1" in n and "weight" in n)
    assert norms[0.0] > 10 * norms[1.0], norms


def test_lrn_across_all_columns_equals_the_single_device_lrn():
    """lrn-all: the split model normalises across all 96 maps, as one dense LRN over the concatenation."""
    from splitnet.model.grouped import GroupedAlexNet
    torch.manual_seed(0)
    cfg = load_experiment("lrn-all")[0].model
    m = splitnet.SplitAlexNet(num_classes=10, config=cfg, devices=("cpu", "cpu")).eval()
    g = GroupedAlexNet(splitnet.config.replace(cfg, num_classes=10)).eval()
    g.load_state_dict(m.grouped_state_dict())
    x = torch.randn(2, 3, 224, 224) * 60
    with splitnet.record_exchanges() as log, torch.no_grad():
        a = m(x)
    assert torch.allclose(a, g(x), rtol=1e-4, atol=1e-5)
    assert {e.layer for e in log} >= {"conv1", "conv2"}
    assert sum(e.nbytes for e in log) // 2 == sum(m.layout.exchange_bytes_per_image().values())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    home = tmp_path_factory.mktemp("abl")
    root = make_synthetic(home / "syn", seed=3, classes=10, train_per_class=6, val_per_class=2)
    return ensure_cache(root, home)


def test_step_time_column_times_the_runs_own_step(monkeypatch):
    """The step-time column times what training runs: the whole PaperSGD step, in the experiment's
    precision and memory format (channels_last for the CIFAR suite), interleaved with `paper`."""
    import splitnet.experiments.step_time as ab
    from splitnet.train.optim import PaperSGD
    seen = []
    step = ab.train_step

    def recording(net, opt, x, y, **kw):
        seen.append((type(opt) is PaperSGD, kw["mode"], x.is_contiguous(memory_format=torch.channels_last),
                     net.columns[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)))
        step(net, opt, x, y, **kw)

    monkeypatch.setattr(ab, "train_step", recording)
    cfgs = {n: load_experiment(n, data="x", suite="cifar")[0] for n in ("paper", "no-lrn")}
    assert cfgs["paper"].precision == "fp32_cl"
    cfgs = {n: dataclasses.replace(c, batch_size=8) for n, c in cfgs.items()}
    rel = ab.step_times(cfgs["paper"], cfgs, reps=2)
    assert rel["paper"] == 1.0 and rel["no-lrn"] > 0
    assert len(seen) == 6 and all(s == (True, "fp32_cl", True, True) for s in seen)  # warm-ups + 2 pairs


def test_runner_fills_every_column_and_resumes(cache32, tmp_path, monkeypatch):
    """At the CIFAR scale (seconds a run); the suites share this runner."""
    sets = ["batch_size=4", "max_steps=1", "data.workers=0", "eval_batch_size=20", "max_minutes=0"]
    kw = dict(data=str(cache32), time_reps=1, suite="cifar")
    rows = run_ablations(tmp_path, ["paper", "no-lrn"], sets=sets, **kw)
    data = json.loads((tmp_path / "ablations.json").read_text())
    assert [r["name"] for r in data] == ["paper", "no-lrn"]
    for r in data:
        for key in ("name", "params", "macs_per_image", "exchange_bytes_per_image", "top1_err", "top5_err",
                    "ten_top1_err", "ten_top5_err", "step_time_rel_paper"):
            assert r[key] is not None, (r["name"], key)
    assert rows[0]["step_time_rel_paper"] == 1.0 and rows[1]["step_time_rel_paper"] > 0
    assert rows[1]["paper_delta_top1"] == 1.4
    md = (tmp_path / "ablations.md").read_text()
    assert "no-lrn" in md and "+1.4 / +1.2" in md
    # The data line says what the runs trained on and with (the data given, --set's batch and budget).
    assert f"`{cache32}`" in md and "batch 4, 10 epochs, at most 1 steps" in md and "CIFAR-10 at 32x32" not in md
    import splitnet.experiments.ablate as ab  # an interrupted invocation names the rows it has not finished
    (tmp_path / "cut").mkdir()
    ab._write(tmp_path / "cut", {"paper": data[0]}, str(cache32), "cifar", None, ["paper", "no-lrn"])
    assert "Not finished (an interrupted invocation; the same command resumes them): no-lrn." in (
        tmp_path / "cut" / "ablations.md").read_text()
    assert (tmp_path / "curves_layer_splits.png").exists() and (tmp_path / "curves_components.png").exists()
    # Resume: finished experiments are kept, not retrained.
    mtime = (tmp_path / "runs" / "paper-seed0" / "checkpoint.pt").stat().st_mtime

    def boom(*a, **k):
        raise AssertionError("retrained a finished experiment")
    monkeypatch.setattr("splitnet.experiments.run_pool.train_or_resume", boom)
    run_ablations(tmp_path, ["paper", "no-lrn"], sets=sets, **kw)
    assert (tmp_path / "runs" / "paper-seed0" / "checkpoint.pt").stat().st_mtime == mtime
    # An experiment edited since its runs were trained: refused before any training, naming run and key.
    with pytest.raises(ConfigError, match=r"paper-seed0: trained with model.dropout = 0.5, but .* now sets 0.25"):
        run_ablations(tmp_path, ["paper", "no-lrn"], sets=sets + ["model.dropout=0.25"], **kw)
    # Done is what the run directories say: a deleted run is trained again although its row is kept.
    shutil.rmtree(tmp_path / "runs" / "no-lrn-seed0")
    trained = []
    monkeypatch.setattr("splitnet.experiments.run_pool.train_or_resume",
                        lambda cfg, run: trained.append(Path(run).name) or train_or_resume(cfg, run))
    run_ablations(tmp_path, ["paper", "no-lrn"], sets=sets, **kw)
    assert trained == ["no-lrn-seed0"] and (tmp_path / "runs" / "no-lrn-seed0" / "checkpoint.pt").exists()


def test_figure1_tiny(tiny, tmp_path):
    res = figure1(tiny, tmp_path, lrs=(0.01, 0.05), target=0.9, max_epochs=3, side=16)
    assert set(res["acts"]) == {"relu", "tanh"}
    for a in res["acts"].values():
        assert a["lr"] in (0.01, 0.05) and len(a["curve"]) >= 1
    assert (tmp_path / "figure1.png").stat().st_size > 1000
    r, t = res["acts"]["relu"]["epochs"], res["acts"]["tanh"]["epochs"]
    if math.isfinite(r) and math.isfinite(t):
        assert res["ratio_tanh_over_relu"] == t / r


def test_figure1_only_runs_figure1_and_no_ablation(tiny, tmp_path, monkeypatch):
    """`splitnet ablate --figure1-only` measures Figure 1 (what it writes lands in ablations.md) and
    trains no ablation run; with --no-figure1 it is refused."""
    from splitnet.cli import main
    import splitnet.experiments.ablate as ablate
    calls = []
    monkeypatch.setattr(ablate, "run_ablations", lambda *a, **k: calls.append("ablations"))
    monkeypatch.setattr(ablate, "run_figure1", lambda out, data, sets, suite: calls.append((data, suite))
                        or ablate._append_figure1(Path(out), figure1(tiny, out, lrs=(0.05,), target=0.9,
                                                                     max_epochs=1, side=16)))
    assert main(["ablate", "--figure1-only", "--data", str(tiny), "--out", str(tmp_path)]) == 0
    assert calls == [(str(tiny), "ablations")] and (tmp_path / "figure1.json").exists()
    assert "## Figure 1" in (tmp_path / "ablations.md").read_text() and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        main(["ablate", "--figure1-only", "--no-figure1", "--out", str(tmp_path)])


def test_epochs_to_counts_epochs_until_the_target():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # learnable from the red channel's mean
    res = epochs_to(x, y, 2, "relu", 0.05, target=0.2, max_epochs=30, batch=16, init="torch", measure="full")
    assert res["epochs"] == len(res["curve"]) and res["curve"][-1] <= 0.2
    assert all(c > 0.2 for c in res["curve"][:-1])
    assert FourLayerCNN("tanh", 2, 16)(x[:2]).shape == (2, 2) and FourLayerCNN("relu", 2, 16, "torch")(x[:2]).shape == (2, 2)


def test_parallel_runner_queues_nothing_ahead_so_ctrl_c_starts_no_more_runs(monkeypatch):
    """With --jobs N, only N runs are ever handed to the pool at once: when an interrupted run comes
    back (Ctrl-C reached it), no queued run starts afterwards."""
    from concurrent.futures import Future

    from splitnet.experiments import run_pool
    submitted = []

    class FakePool:
        _processes = {}

        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, cfg, run):
            submitted.append(run)
            f = Future()
            f.set_result("interrupted" if len(submitted) == 2 else "finished")
            return f
    monkeypatch.setattr(run_pool, "ProcessPoolExecutor", FakePool)
    cfg = run_pool.load_config(None, ["max_steps=1"])
    tasks = [(f"e{i}", cfg, f"run{i}") for i in range(5)]
    finished = []
    with pytest.raises(KeyboardInterrupt):
        run_pool.train_all(tasks, 2, finished.append)
    assert submitted[:2] == ["run0", "run1"] and len(submitted) <= 3 and "run4" not in submitted


STEP_BLOCKS, BLOCK_MB, STEPS = 2, 40, 10  # blocks above glibc's largest dynamic mmap threshold (32 MB)


def _page_faults_of_steps() -> int:
    """Minor page faults of STEPS 'steps' that each allocate STEP_BLOCKS blocks of BLOCK_MB, touch
    them and free them (a training step's activations in miniature), after 3 warm-up steps; run in a
    grid worker."""
    def step():
        return [torch.ones(BLOCK_MB << 20, dtype=torch.uint8) for _ in range(STEP_BLOCKS)]
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(STEPS):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_grid_workers_reuse_freed_memory_as_splitnet_train_does(monkeypatch):
    """`ablate --jobs N` trains in spawned workers, which run none of cli.main: each must take the
    allocator settings itself, or every step re-faults its freed activations (the grid ran 1.1-1.3x
    slower than `splitnet train`). Switched off (SPLITNET_MALLOC=default), the same worker faults
    every step's blocks afresh: glibc maps blocks above 32 MB anew each time. With the settings the
    heap keeps them; now and then it grows by a block or two inside the window (seen: 0 to 2 blocks
    in 28 runs), never a block per step."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages always on: fresh blocks fault a few 2 MB pages, not one per 4 KB")
    from splitnet.experiments import run_pool
    with run_pool.worker_pool(1) as pool:
        kept = pool.submit(_page_faults_of_steps).result()
    monkeypatch.setenv("SPLITNET_MALLOC", "default")
    with run_pool.worker_pool(1) as pool:
        default = pool.submit(_page_faults_of_steps).result()
    step_pages = STEP_BLOCKS * (BLOCK_MB << 20) // resource.getpagesize()
    assert kept < 3 * step_pages and default > (STEPS - 1) * step_pages, (kept, default, step_pages)


PAUSE_S = 3600.0


def test_a_runs_time_in_the_table_leaves_out_the_pause_before_its_resume(cache32, tmp_path):
    """train_minutes and train_images_per_s come from the checkpoint's elapsed_s: a run interrupted and
    resumed later is not charged for the wait (the CIFAR grid's resumed four-columns showed 47 minutes)."""
    from splitnet.experiments.ablation_rows import working_seconds
    from splitnet.train import checkpoint as ckpt
    from splitnet.train.loop import train
    from splitnet.train.rundir import read_metrics
    sets = ["batch_size=8", "max_steps=2", "data.workers=0", "eval_batch_size=20", "log_every=1"]
    run = tmp_path / "run"
    train(load_experiment("paper", str(cache32), sets, "cifar")[0], run, progress=False)
    # The pause: the first segment's records stamped an hour earlier, as if it had run an hour before
    # the resume (no wall-clock wait, and no margin that a busy machine could eat).
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({**m, "time": m["time"] - PAUSE_S} if "time" in m else m) + "\n"
                               for m in read_metrics(run)))
    train(out=run, resume=True, sets=["max_steps=4"], progress=False)
    stamps = [m["time"] for m in read_metrics(run) if m["kind"] == "train"]
    ck = ckpt.load(run / "checkpoint.pt")
    seconds = working_seconds(ck, read_metrics(run))
    assert len(stamps) == 4 and seconds == ck["state"]["elapsed_s"]
    assert stamps[-1] - stamps[0] > PAUSE_S and 0 < seconds < stamps[-1] - stamps[0] - PAUSE_S / 2, (seconds, stamps)
