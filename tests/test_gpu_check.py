"""experiments/gpu_check.sh, the device check, on the CPU: valid bash, at most 8 files under $OUT, a
clean refusal without a GPU that still writes env.json, and its Python steps' plumbing (--dry-run)."""
import json
import re
import subprocess
import sys

import pytest

from cpuenv import cpu_env
from helpers import EXPERIMENTS

SCRIPT = EXPERIMENTS / "gpu_check.sh"


def test_the_script_is_valid_bash_and_writes_at_most_8_files():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    names = set(re.findall(r'\$OUT/([A-Za-z0-9_.]+)', SCRIPT.read_text()))
    assert 6 <= len(names) <= 8, names


def test_without_a_gpu_it_writes_its_env_file_and_refuses(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], env=cpu_env(OUT=str(tmp_path), PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stdout, r.stdout + r.stderr
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["cuda"] is False and env["torch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.json", "gpu_check.log"]


@pytest.mark.parametrize("what", ["streams", "speed"])
def test_its_measurements_run_on_the_cpu_with_dry_run(tmp_path, what):
    from splitnet.bench.gpu_check import main
    assert main([what, "--out", str(tmp_path / "x.json")]) == 2  # no GPU: nothing measured
    assert main([what, "--out", str(tmp_path / "x.json"), "--dry-run"]) == 0
    res = json.loads((tmp_path / "x.json").read_text())
    if what == "streams":
        assert res["ok"] and set(res["modes"]) == {"fp32", "bf16_cl"}
    else:
        assert {"split_sequential_images_per_s", "split_streams_images_per_s", "grouped_images_per_s"} <= set(
            res["rows"][0])


def test_a_step_past_the_budget_is_skipped_and_said(tmp_path):
    """Each step's timeout is cut to what is left of BUDGET: with none left, a step is skipped and the
    log says so (the summary then still comes within the device call)."""
    r = subprocess.run(["bash", str(SCRIPT)], env=cpu_env(OUT=str(tmp_path), PYTHON=sys.executable, BUDGET="5"),
                       capture_output=True, text=True, timeout=120)
    assert "== env: skipped, 5 s of the 5 s budget left" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 2 and not (tmp_path / "env.json").exists()
