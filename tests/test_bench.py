"""The benchmark runs end to end on a tiny batch and reports its documented keys (no timing asserted);
its derived figures are checked against independent computations: the FLOP count against forward
hooks and torch's own FLOP counter on the real model, the utilisation against the JSON's primitive
fields, the nominal peak against a hand-made /proc/cpuinfo."""
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitnet.cli import main
from splitnet.model.config import ModelConfig
from splitnet.model.columns import SplitAlexNet
from splitnet.model.layout import get_layout

PAPER_TRAIN_FLOPS = 4_135_610_496  # the paper layout's training FLOPs per image, as the hooks count them


def hooked_train_flops(model) -> int:
    """Training FLOPs of one image through `model`, counted on the modules as they run: a forward
    hook on every Conv2d / Linear takes the multiply-adds from the output it produced and its weight
    (output elements x weight fan-in, in_channels/groups x kh x kw or in_features), and counts 2 FLOPs
    a multiply-add for the forward, for the weight gradient (the weight requires grad) and for the
    input gradient (the input requires grad: every layer's but conv1's, whose input is the image).
    A forward and backward pass of one random image runs with the hooks in place."""
    counts = []

    def hook(mod, inp, out):
        macs = out[0].numel() * mod.weight[0].numel()  # out[0]: one image's [C, H, W] or [units]
        counts.append(2 * macs * (1 + mod.weight.requires_grad + inp[0].requires_grad))

    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        x = torch.randn(1, 3, model.input_side, model.input_side) * 60
        F.cross_entropy(model(x), torch.zeros(1, dtype=torch.long)).backward()
    finally:
        for h in handles:
            h.remove()
    assert len(counts) == len(mods) and all(m.weight.grad is not None for m in mods)
    return sum(counts)


def aten_train_flops(model) -> int:
    """The same by torch's FLOP counter on the aten ops that ran (convolution_backward counts only
    the gradients it was asked for), less the LRN's banded matrix product (bmm, not a conv/fc layer)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 3, model.input_side, model.input_side) * 60
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(1, dtype=torch.long)).backward()
    ops = counter.get_flop_counts()["Global"]
    return sum(n for op, n in ops.items() if str(op) != "aten.bmm")


@pytest.mark.parametrize("layout, geometry, concurrency", [
    ("paper", "imagenet", "sequential"), ("paper", "cifar", "sequential"), ("paper", "cifar", "threads"),
    ("one-gpu", "cifar", "sequential")])
def test_train_flops_per_image_counted_on_the_real_model(layout, geometry, concurrency):
    """Layout.train_flops_per_image (the table's count) equals the count on the modules that ran,
    also with the columns in worker threads (the CPU's training strategy); and for the paper's
    network torch's FLOP counter agrees (its dispatch mode sees this thread's ops only)."""
    torch.manual_seed(0)
    model = SplitAlexNet(10 if geometry == "cifar" else 1000, layout, config=ModelConfig(geometry=geometry),
                         devices="cpu", concurrency=concurrency)
    counted = model.layout.train_flops_per_image()
    assert hooked_train_flops(model) == counted
    if (layout, geometry) == ("paper", "imagenet"):
        assert aten_train_flops(model) == counted
        assert counted == PAPER_TRAIN_FLOPS == get_layout("paper").train_flops_per_image()
        assert round(counted / 1e9, 2) == 4.14  # the figure


def _assert_figures_follow_from_times(r: dict) -> None:
    """Every net's step time and ratio in a compare() result from its primitive times (all_times_s):
    the median of its rounds, and the median of its per-round ratios to the grouped step beside it."""
    times = r["all_times_s"]
    for net in [k[len("train_"):] for k in times if k.startswith("train_") and k != "train_grouped"]:
        for mode, key in (("train", "train_step_s"), ("infer", "infer_s")):
            ts, grouped = times[f"{mode}_{net}"], times[f"{mode}_grouped"]
            assert r[f"{key}_{net}"] == statistics.median(ts), (mode, net)
            ratio = statistics.median([a / b for a, b in zip(ts, grouped)])
            assert r[f"{mode}_ratio_{net}_over_grouped"] == pytest.approx(ratio), (mode, net)
    split = f"split_{r['default_strategy']}"  # the headline columns are the default strategy's
    assert r["infer_ratio_split_over_grouped"] == r[f"infer_ratio_{split}_over_grouped"]
    assert r["infer_s_split"] == r[f"infer_s_{split}"] and r["infer_s_grouped"] == statistics.median(times["infer_grouped"])


def _log_timed_work(monkeypatch) -> list:
    """Every matmul sample ("matmul") and training step (("step", PaperSGD?, train mode?, dropout
    streams set?)) that bench.model times, in order; the bf16 section at the CIFAR scale only (its
    own test: test_cpu_bf16_ratio_...)."""
    import splitnet.bench.cli as bcli
    import splitnet.bench.model as bm
    from splitnet.train.optim import PaperSGD
    events = []
    sample, step, full = bm.MatmulPeak.sample, bm.train_step, bcli.bf16_vs_fp32

    def logged_sample(self):
        events.append("matmul")
        return sample(self)

    def logged_step(net, opt, x, y, **kw):
        step(net, opt, x, y, **kw)
        cols = getattr(net, "columns", None)
        events.append(("step", type(opt) is PaperSGD, net.training,
                       cols is None or all(c.dropout_stream is not None for c in cols)))

    monkeypatch.setattr(bm.MatmulPeak, "sample", logged_sample)
    monkeypatch.setattr(bm, "train_step", logged_step)
    monkeypatch.setattr(bcli, "bf16_vs_fp32", lambda b, r, cifar_batch: full(b, 1, cifar_batch, geometries=("cifar",)))
    return events


def test_bench_tiny(tmp_path, capsys, monkeypatch):
    """The CPU section end to end (batch 2, 3 rounds), with every timed training step and matmul
    sample logged: they alternate, and the step is training's (PaperSGD, dropout streams, train mode)."""
    from splitnet.bench.peak import read_cpu_nominal_peak
    events = _log_timed_work(monkeypatch)
    out = tmp_path / "bench.json"
    reps = 3
    assert main(["bench", "--batch", "2", "--reps", str(reps), "--placements", "cpu", "--no-data",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    cpu = res["cpu"]
    nets = len(cpu["strategies"]) + 1  # + grouped
    # warm-up: one step per net, then one matmul; then every round: matmul, step, matmul, step, ...
    assert events[:nets + 1] == [events[0]] * nets + ["matmul"]
    timed = events[nets + 1:]
    assert timed[0::2] == ["matmul"] * reps * nets and len(timed) == 2 * reps * nets
    assert all(e[1:] == (True, True, True) for e in events if e != "matmul")
    assert cpu["strategies"] == ["threads", "sequential"]
    _assert_figures_follow_from_times(cpu)
    # the default ("auto") is what a model built without asking gets, and its numbers are the headline
    assert cpu["default_strategy"] == SplitAlexNet(10, devices="cpu").strategy
    assert cpu["train_step_s_split"] == cpu[f"train_step_s_split_{cpu['default_strategy']}"]
    assert cpu["best_strategy"] in cpu["strategies"]
    # ratios and rates from the primitive times: a split step over the grouped step of its round
    times = cpu["all_times_s"]
    split, grouped = times[f"train_split_{cpu['default_strategy']}"], times["train_grouped"]
    per_round = [a / b for a, b in zip(split, grouped)]
    assert cpu["train_ratio_split_over_grouped"] == pytest.approx(statistics.median(per_round))
    sp = cpu["train_ratio_split_over_grouped_spread"]
    assert (sp["min"], sp["max"], sp["n"]) == pytest.approx((min(per_round), max(per_round), reps))
    assert cpu["train_images_per_s_split"] == pytest.approx(2 / statistics.median(split))
    # the FLOP count is the hooks' count; utilisation = FLOPs x images/s over each peak
    assert cpu["train_flops_per_image"] == PAPER_TRAIN_FLOPS
    flop_rate = PAPER_TRAIN_FLOPS * cpu["train_images_per_s_split"]
    assert cpu["train_util_of_measured"] == pytest.approx(flop_rate / cpu["peak_flops_measured"])
    assert cpu["train_util_of_nominal"] == pytest.approx(flop_rate / cpu["peak_flops_nominal"])
    samples = cpu["peak_flops_measured_samples"]
    assert len(samples) == reps * nets and cpu["peak_flops_measured"] == max(samples)
    assert cpu["peak_flops_nominal"] == read_cpu_nominal_peak()["flops"]
    assert 0 < cpu["train_util_of_measured"] and 0 < cpu["train_util_of_nominal"] < 1
    o = res["overlap"]["cpu_threads"]
    assert o["lanes"] == 2 and 0 < o["both_s"] <= o["busy_s"]
    printed = capsys.readouterr().out
    assert "/grouped" in printed and "[goals]" in printed and "[cpu bf16] flags" in printed
    assert res["cpu_bf16"]["cifar"]["modes"] == ["fp32_cl", "bf16_cl"]
    assert "training FLOPs per image 4.136 G" in printed
    assert "utilisation of the measured float32 matmul peak" in printed and "utilisation of the nominal peak" in printed
    g = {x["key"]: x for x in res["goals"]}
    assert g["cpu.train_ratio_split_over_grouped"]["value"] == cpu["train_ratio_split_over_grouped"]
    assert g["cpu.train_ratio_split_over_grouped"]["spread"] == [sp["min"], sp["max"]]
    worst, best = max(per_round), min(per_round)
    want = "met" if worst <= 1.05 else ("not met" if best > 1.05 else "not resolved")
    assert g["cpu.train_ratio_split_over_grouped"]["verdict"] == want
    assert g["cuda_bf16.train_images_per_s_split"]["verdict"] == "not measured"  # no GPU section
    assert g["cuda_bf16.train_images_per_s_split"]["met"] is None
    assert "data.one_worker_over_train_step" not in g  # a goal that could not fail on a CPU machine


def test_goal_verdicts_judge_the_spread():
    """Met only beyond the spread of the rounds; too few rounds resolve nothing."""
    from splitnet.bench.cli import judge

    def s(*v):
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
    assert judge("<=", 1.05, 1.02, s(1.00, 1.02, 1.04)) == "met"
    assert judge("<=", 1.05, 1.04, s(1.00, 1.04, 1.08)) == "not resolved"  # the median meets it, one round not
    assert judge("<=", 1.05, 1.07, s(1.06, 1.07, 1.10)) == "not met"
    assert judge(">=", 0.45, 0.50, s(0.46, 0.50, 0.52)) == "met"
    assert judge(">=", 0.45, 0.44, s(0.40, 0.44, 0.47)) == "not resolved"
    assert judge(">=", 0.45, 0.30, s(0.30, 0.30, 0.31)) == "not met"
    assert judge("<=", 1.05, 1.00, s(1.00)) == "not resolved"  # one round: no spread to judge against
    assert judge("<=", 1.05, None, None) == "not measured"


def test_median_ci_is_the_sign_test_interval():
    """The interval's ends are the order statistics whose binomial tail gives >= 95% coverage
    (n=10: the 2nd and 9th values, 97.9%; n=24: 7th and 18th), and it covers the true median of a
    skewed distribution about as often as it claims."""
    from math import comb
    from splitnet.bench.timing import median_ci
    assert median_ci(range(5)) is None  # even [min, max] covers only 94% at n=5
    assert median_ci(range(1, 11)) == [2, 9] and median_ci(range(1, 25)) == [7, 18]
    n, k = 24, 7
    assert 1 - 2 * sum(comb(n, i) for i in range(k)) / 2 ** n >= 0.95
    assert 1 - 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n < 0.95  # the narrowest such pair
    g = torch.Generator().manual_seed(0)
    trials = 2000
    samples = torch.empty(trials, n).exponential_(1.0, generator=g)  # true median ln 2
    covered = sum(lo <= math.log(2) <= hi for lo, hi in (median_ci(r.tolist()) for r in samples))
    assert 0.95 <= covered / trials <= 0.995


def test_judge_uses_the_medians_interval_from_six_rounds():
    """Many rounds widen the extremes: with a CI of the median its ends decide, not min and max."""
    from splitnet.bench.cli import judge
    s = {"median": 0.98, "min": 0.81, "max": 1.12, "n": 24}
    assert judge("<=", 1.0, 0.98, s) == "not resolved"
    assert judge("<=", 1.0, 0.98, dict(s, ci95=[0.95, 0.99])) == "met"
    assert judge("<=", 1.0, 0.98, dict(s, ci95=[0.95, 1.01])) == "not resolved"
    assert judge("<=", 1.0, 1.05, dict(s, ci95=[1.02, 1.08])) == "not met"


def test_the_overlapped_reduction_goal_is_judged_from_the_distributed_section():
    from splitnet.bench.cli import goals
    key = "distributed.ratio_overlap_over_flat"
    pairs = {"median": 0.95, "min": 0.88, "max": 1.15, "n": 6}
    got = {g["key"]: g for g in goals({"distributed": {"ratio_overlap_over_flat": 0.95,
                                                       "ratio_overlap_over_flat_spread": pairs}})}
    assert got[key]["verdict"] == "not resolved" and got[key]["value"] == 0.95 and got[key]["rounds"] == 6
    assert {g["key"]: g for g in goals({})}[key]["verdict"] == "not measured"


FAKE_CPUINFO = """processor\t: 0
physical id\t: 0
core id\t\t: 0
cpu MHz\t\t: 2500.000
flags\t\t: fpu sse sse2 avx avx2 fma avx512f

processor\t: 1
physical id\t: 0
core id\t\t: 0
cpu MHz\t\t: 2500.000
flags\t\t: fpu sse sse2 avx avx2 fma avx512f

processor\t: 2
physical id\t: 0
core id\t\t: 1
cpu MHz\t\t: 2500.000
flags\t\t: fpu sse sse2 avx avx2 fma avx512f
"""


def test_cpu_nominal_peak_from_a_fake_cpuinfo():
    """Cores (hyper-threads share a core) x FLOP/cycle of the ISA x clock, by hand."""
    from splitnet.bench.peak import cpu_nominal_peak
    p = cpu_nominal_peak(FAKE_CPUINFO)  # processors 0 and 1 are one core: 2 cores
    assert (p["cores"], p["flop_per_cycle"], p["isa"]) == (2, 64, "avx512f")
    assert p["flops"] == 2 * 64 * 2.5e9 and "cpu MHz" in p["clock_source"]
    assert cpu_nominal_peak(FAKE_CPUINFO, max_freq_khz=3_000_000)["flops"] == 2 * 64 * 3.0e9
    assert cpu_nominal_peak(FAKE_CPUINFO, allowed={0, 1})["flops"] == 1 * 64 * 2.5e9
    avx2 = FAKE_CPUINFO.replace(" avx512f", "")
    assert cpu_nominal_peak(avx2)["flops"] == 2 * 32 * 2.5e9
    sse = avx2.replace(" avx2 fma", "")
    assert cpu_nominal_peak(sse)["flops"] == 2 * 8 * 2.5e9
    assert "2 FMA units" in cpu_nominal_peak(sse)["basis"]


def test_gpu_nominal_peak_from_the_datasheet_table():
    from splitnet.bench.peak import gpu_nominal_peak
    assert gpu_nominal_peak(["NVIDIA H200"], "bf16")["flops"] == 989.4e12
    assert gpu_nominal_peak(["NVIDIA H100 80GB HBM3"], "tf32")["flops"] == 494.7e12
    assert gpu_nominal_peak(["NVIDIA A100-SXM4-80GB"] * 2, "fp32")["flops"] == 2 * 19.5e12  # two GPUs: the sum
    assert gpu_nominal_peak(["NVIDIA A100-SXM4-80GB"], "bf16_cl")["flops"] == 312e12
    unknown = gpu_nominal_peak(["NVIDIA GeForce GTX 580"], "fp32")
    assert unknown["flops"] is None and "GTX 580" in unknown["basis"]


def test_busy_overlap_against_hand_computed_intervals():
    from splitnet.bench.model import busy_overlap
    r = busy_overlap({0: [(0, 4), (3, 6)], 1: [(5, 8)], 2: [(20, 21)]})
    assert (r["busy"], r["both"]) == (9, 1)  # busy 0..8 and 20..21; two lanes at once in 5..6
    assert busy_overlap({0: [(0, 1)], 1: [(1, 2)]})["overlap"] == 0  # back to back: no overlap
    assert busy_overlap({0: [(0, 2)], 1: [(0, 2)]})["overlap"] == 1


def test_precision_modes_restore_flags_and_autocast():
    from splitnet.model.precision import precision, tf32_allowed
    before = tf32_allowed()
    with precision("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and tf32_allowed()
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision("fp32", "cpu"):
        assert not tf32_allowed()
    assert not torch.is_autocast_enabled("cpu") and tf32_allowed() == before
    with pytest.raises(ValueError, match="precision: 'fp8'"):
        with precision("fp8", "cpu"):
            pass


def test_distributed_bench_tiny(monkeypatch):
    """2 gloo ranks and 4 (2 replicas x 2 columns) under torchrun vs one process: all run, the
    exchanges are timed per layer, overlapped and flat gradient reduction are both timed, and the
    bytes every rank sent equal the layout's count."""
    from splitnet.bench.dist import distributed_vs_single
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # its ranks are subprocesses: CPU ones (tests/cpuenv.py)
    d = distributed_vs_single(batch=4, steps=1, geometry="cifar", pairs=1)  # the machinery, not the big network's speed
    assert d["single_step_s"] > 0 and d["ranks2_step_s"] > 0
    assert set(d["exchange_share"]) == {"conv3", "fc6", "fc7", "fc8"}
    assert all(0 < v < 1 for v in d["exchange_share"].values())
    assert d["single_strategy"] == SplitAlexNet(10, devices="cpu").strategy  # as training would run it
    r = d["ranks4_reduce"]
    assert r["flat_step_s"] > 0 and r["overlap_step_s"] > 0 and r["buckets"] >= 1  # several: dist_worker.py
    assert r["ratio_overlap_over_flat"]["n"] == 1
    for ranks, sent in ((2, d["ranks2_sent"]), (4, d["ranks4_sent"])):
        assert sorted(s["rank"] for s in sent) == list(range(ranks))
        for s in sent:
            assert s["sent"]["exchange"] == s["expected"]["exchange"] > 0
            assert s["sent"].get("gradients", 0) == pytest.approx(s["expected"]["gradients"])
            assert (s["expected"]["gradients"] > 0) == (ranks == 4)


def test_input_path_bench_tiny():
    """The cache-fed training measurement runs both input paths end to end (here on the CPU, with the
    CIFAR-scale network on 32-pixel images: the machinery, not the big network's speed)."""
    from splitnet.bench.data import input_path
    r = input_path("cpu", batch=4, mode="fp32", workers=1, per_class=3, epochs=1, geometry="cifar")
    assert r["geometry"] == "cifar"
    for key in ("train_images_per_s_on_device_batches", "train_images_per_s_device_input",
                "train_images_per_s_cpu_input", "train_loop_images_per_s"):
        assert r[key] > 0, key
    assert r["device_input_over_on_device"] == r["train_images_per_s_device_input"] / r["train_images_per_s_on_device_batches"]
    sp = r["train_loop_over_on_device_spread"]
    assert sp["n"] >= 1 and sp["min"] <= sp["median"] <= sp["max"]


def test_compiled_variants_run_and_are_reported():
    """--compile times torch.compile'd nets beside the others (backend "eager" here: dynamo's tracing
    without code generation, and the CIFAR-scale network, so the test stays fast)."""
    from splitnet.bench.model import compare
    r = compare("paper", "cpu", batch=2, reps=1, num_classes=10, strategies=("sequential",), compile_backend="eager",
                geometry="cifar")
    assert r["compile_backend"] == "eager" and r["geometry"] == "cifar"
    assert {f"{m}_{n}" for m in ("train", "infer") for n in ("split_sequential_compiled", "grouped_compiled")} \
        <= set(r["all_times_s"])
    _assert_figures_follow_from_times(r)


def test_missing_gpu_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--placements", "cuda", "--no-data"]) == 2
    assert "placement 'cuda' asked for, but only 0 CUDA device(s)" in capsys.readouterr().err


def test_cpu_bf16_ratio_is_the_interleaved_rounds_ratio_and_flags_come_from_cpuinfo():
    from splitnet.bench.cpu_bf16 import bf16_vs_fp32, cpu_flags
    fake = "processor : 0\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n"
    assert cpu_flags(fake) == ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    assert cpu_flags("flags : sse avx2\n") == ["avx2"]
    r = bf16_vs_fp32(reps=3, cifar_batch=4, geometries=("cifar",))["cifar"]
    t = r["all_times_s"]
    per_round = [b / a for a, b in zip(t["fp32_cl"], t["bf16_cl"])]
    assert r["ratio"]["median"] == pytest.approx(statistics.median(per_round)) and r["ratio"]["n"] == 3
    assert r["step_s"]["bf16_cl"]["median"] == pytest.approx(statistics.median(t["bf16_cl"]))
