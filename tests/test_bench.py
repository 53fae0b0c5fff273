"""The benchmark runs end to end on a tiny batch and reports its documented keys (no timing asserted)."""
import json

from splitnet.cli import main


def test_bench_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--batch", "2", "--reps", "1", "--placements", "cpu", "--no-data", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    cpu = res["cpu"]
    for key in ("train_ratio_split_over_grouped", "infer_ratio_split_over_grouped", "train_mfu",
                "matmul_peak_gflops", "train_images_per_s_split"):
        assert cpu[key] > 0, key
    assert cpu["train_ratio_split_over_grouped"] == cpu["train_step_s_split"] / cpu["train_step_s_grouped"]
    assert cpu["strategies"] == ["threads", "sequential"]
    for st in cpu["strategies"]:
        assert cpu[f"train_ratio_split_{st}_over_grouped"] > 0, st
    # the default ("auto") is what a model built without asking gets, and its numbers are the headline
    assert cpu["train_step_s_split"] == cpu[f"train_step_s_split_{cpu['default_strategy']}"]
    assert cpu["best_strategy"] in cpu["strategies"]
    o = res["overlap"]["cpu_threads"]
    assert o["lanes"] == 2 and 0 < o["both_s"] <= o["busy_s"]
    printed = capsys.readouterr().out
    assert "/grouped" in printed and "[goals]" in printed
    g = {x["key"]: x for x in res["goals"]}
    assert g["cpu.train_ratio_split_over_grouped"]["value"] == cpu["train_ratio_split_over_grouped"]
    assert g["cpu.train_ratio_split_over_grouped"]["met"] == (cpu["train_ratio_split_over_grouped"] <= 1.05)
    assert g["cuda_bf16.train_images_per_s_split"]["met"] is None  # no GPU section: not measured, not failed


def test_busy_overlap_against_hand_computed_intervals():
    from splitnet.bench.model import busy_overlap
    r = busy_overlap({0: [(0, 4), (3, 6)], 1: [(5, 8)], 2: [(20, 21)]})
    assert (r["busy"], r["both"]) == (9, 1)  # busy 0..8 and 20..21; two lanes at once in 5..6
    assert busy_overlap({0: [(0, 1)], 1: [(1, 2)]})["overlap"] == 0  # back to back: no overlap
    assert busy_overlap({0: [(0, 2)], 1: [(0, 2)]})["overlap"] == 1


def test_precision_modes_restore_flags_and_autocast():
    import pytest
    import torch
    from splitnet.model.precision import precision
    before = torch.backends.cuda.matmul.allow_tf32
    with precision("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.backends.cuda.matmul.allow_tf32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu") and torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(ValueError, match="precision: 'fp8'"):
        with precision("fp8", "cpu"):
            pass


def test_distributed_bench_tiny():
    """2 gloo ranks under torchrun vs one process: both run, the exchanges are timed per layer."""
    from splitnet.bench.dist import distributed_vs_single
    d = distributed_vs_single(batch=2, steps=1)
    assert d["single_step_s"] > 0 and d["ranks2_step_s"] > 0
    assert set(d["exchange_share"]) == {"conv3", "fc6", "fc7", "fc8"}
    assert all(0 < v < 1 for v in d["exchange_share"].values())


def test_input_path_bench_tiny():
    """The cache-fed training measurement runs both input paths end to end (here on the CPU)."""
    from splitnet.bench.data import input_path
    r = input_path("cpu", batch=4, mode="fp32", workers=1, per_class=3, epochs=1)
    for key in ("train_images_per_s_on_device_batches", "train_images_per_s_device_input",
                "train_images_per_s_cpu_input", "train_loop_images_per_s"):
        assert r[key] > 0, key
    assert r["device_input_over_on_device"] == r["train_images_per_s_device_input"] / r["train_images_per_s_on_device_batches"]


def test_compiled_variants_run_and_are_reported():
    """--compile times torch.compile'd nets beside the others (backend "eager" here: dynamo's tracing
    without code generation, so the test stays fast)."""
    from splitnet.bench.model import compare
    r = compare("paper", "cpu", batch=2, reps=1, num_classes=10, compile_backend="eager")
    assert r["compile_backend"] == "eager"
    for name in ("split_sequential_compiled", "grouped_compiled"):
        assert r[f"train_step_s_{name}"] > 0 and r[f"infer_s_{name}"] > 0


def test_missing_gpu_is_one_line(capsys):
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--placements", "cuda", "--no-data"]) == 2
    assert "placement 'cuda' asked for, but only 0 CUDA device(s)" in capsys.readouterr().err
