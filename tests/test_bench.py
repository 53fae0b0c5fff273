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
    assert "ratio" in capsys.readouterr().out


def test_distributed_bench_tiny():
    """2 gloo ranks under torchrun vs one process: both run, the exchanges are timed per layer."""
    from splitnet.bench import distributed_vs_single
    d = distributed_vs_single(batch=2, steps=1)
    assert d["single_step_s"] > 0 and d["ranks2_step_s"] > 0
    assert set(d["exchange_share"]) == {"conv3", "fc6", "fc7", "fc8"}
    assert all(0 < v < 1 for v in d["exchange_share"].values())
