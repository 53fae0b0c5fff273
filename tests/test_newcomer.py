"""What a new user meets first (issue 13, "newcomer snags"): --version, ablate --list, eval's output,
evaluation progress, the experiments folder outside a checkout, and the Makefile's dependency check."""
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import splitnet
from helpers import ROOT
from splitnet.cli import main
from splitnet.experiments import ablate, locate, report
from splitnet.train import evaluate


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"splitnet {splitnet.__version__}"


def test_setup_cfg_takes_the_version_from_the_package():
    assert "version = attr: splitnet.__version__" in (ROOT / "setup.cfg").read_text()


@pytest.mark.parametrize("verbose", [True, False])
def test_verbose_turns_on_splitnets_debug_lines_only(verbose, monkeypatch):
    """-v: splitnet's loggers (children included) at DEBUG; every other library's stays at INFO, so
    matplotlib's font search does not flood a figure-drawing command. The root logger is emptied as
    in a fresh process (pytest's own handlers would make basicConfig a no-op)."""
    import logging
    root, ours = logging.getLogger(), logging.getLogger("splitnet")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(ours, "level", ours.level)
    assert main((["-v"] if verbose else []) + ["ablate", "--list"]) == 0
    assert logging.getLogger("matplotlib.font_manager").getEffectiveLevel() == logging.INFO
    want = logging.DEBUG if verbose else logging.INFO
    assert logging.getLogger("splitnet.data.cache").getEffectiveLevel() == want


def test_ablate_list_needs_no_out(capsys):
    assert main(["ablate", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names[0] == "paper" and "one-column" in names


# ---- eval: the table, or the JSON, never both on stdout -------------------------------------------
ROWS = [{"model": "run", "patches": 1, "images": 30, "top1_err": 0.5, "top5_err": 0.25}]


@pytest.fixture
def fake_eval(monkeypatch):
    calls = []

    def fake(paths, *args):
        calls.append(args)
        return ROWS

    monkeypatch.setattr(evaluate, "evaluate_checkpoints", fake)
    return calls


def test_eval_prints_the_table_alone(fake_eval, capsys):
    assert main(["eval", "--checkpoint", "run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | patches |") and "| run | centre | 30 | 50.00% | 25.00% |" in out
    assert "{" not in out


def test_eval_json_prints_the_json_alone(fake_eval, capsys):
    assert main(["eval", "--checkpoint", "run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ROWS  # the whole of stdout is one JSON document


@pytest.mark.parametrize("flag", ["--json-out", "--json"])
def test_eval_json_to_a_file_keeps_the_table_on_stdout(fake_eval, capsys, tmp_path, flag):
    path = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", "run", flag, str(path)]) == 0
    assert json.loads(path.read_text()) == ROWS
    out = capsys.readouterr().out
    assert out.startswith("| model |") and "{" not in out


# ---- evaluation progress --------------------------------------------------------------------------
def _tiny_eval(n_batches=5):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
    batches = [(torch.randn(3, 3, 2, 2), torch.randint(0, 4, (3,))) for _ in range(n_batches)]
    return model, batches


def test_evaluation_shows_progress_when_asked(caplog):
    model, batches = _tiny_eval()
    with caplog.at_level(logging.INFO, logger="splitnet"):
        probs, labels = evaluate.predict_probs(model, batches, progress=True, desc="eval run")
    assert probs.shape == (15, 4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval run:")]
    assert lines and lines[-1].startswith("eval run: 5/5 batches")


def test_evaluation_is_quiet_off_a_terminal_unless_asked(caplog, monkeypatch):
    model, batches = _tiny_eval()
    with caplog.at_level(logging.INFO, logger="splitnet"):
        evaluate.predict_probs(model, batches)
    assert not caplog.records
    monkeypatch.setattr(evaluate.sys.stderr, "isatty", lambda: False, raising=False)
    assert evaluate.show_progress(None) is False and evaluate.show_progress(True) is True
    monkeypatch.setattr(evaluate.sys.stderr, "isatty", lambda: True, raising=False)
    assert evaluate.show_progress(None) is True and evaluate.show_progress(False) is False


def test_eval_command_passes_progress_through(fake_eval):
    assert main(["eval", "--checkpoint", "run", "--progress"]) == 0
    assert main(["eval", "--checkpoint", "run", "--no-progress"]) == 0
    assert main(["eval", "--checkpoint", "run"]) == 0
    assert [args[-1] for args in fake_eval] == [True, False, None]


# ---- the experiments folder -----------------------------------------------------------------------
def test_reproduce_and_ablate_share_one_experiments_folder(monkeypatch):
    monkeypatch.delenv(locate.ENV, raising=False)
    assert locate.experiments_dir() == ROOT / "experiments"  # run from this checkout
    assert report.EXPERIMENTS == ablate.EXPERIMENTS == locate.experiments_dir()
    assert ablate.ABLATIONS == ablate.EXPERIMENTS / "ablations"


def test_the_environment_variable_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(locate.ENV, str(tmp_path))
    assert locate.experiments_dir() == tmp_path
    monkeypatch.setenv(locate.ENV, str(tmp_path / "typo"))  # wrong, but explicit: never silently replaced
    assert locate.experiments_dir() == tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match=r"SPLITNET_EXPERIMENTS=.*typo is not a folder"):
        locate.require_experiments_dir()


def test_an_install_without_a_checkout_uses_the_installed_copy(monkeypatch, tmp_path):
    monkeypatch.delenv(locate.ENV, raising=False)
    # As in site-packages: no experiments/ three levels up.
    monkeypatch.setattr(locate, "__file__", str(tmp_path / "lib" / "site" / "splitnet" / "experiments" / "locate.py"))
    prefix = tmp_path / "prefix"
    monkeypatch.setattr(locate.sys, "prefix", str(prefix))
    monkeypatch.setattr(locate.sysconfig, "get_path", lambda name, *a, **k: str(prefix))
    monkeypatch.setattr(locate.site, "getuserbase", lambda: str(tmp_path / "user"))
    assert locate.experiments_dir() == locate.NOT_FOUND
    assert "SPLITNET_EXPERIMENTS" in str(locate.NOT_FOUND / "paper.toml")  # every "not found" names it
    with pytest.raises(FileNotFoundError, match="set SPLITNET_EXPERIMENTS"):
        locate.require_experiments_dir()
    installed = prefix / "share" / "splitnet" / "experiments"
    (installed / "ablations").mkdir(parents=True)
    assert locate.experiments_dir() == installed


def test_the_wheel_ships_every_experiment_file():
    """setup.cfg's data_files must list every file of experiments/ (one folder per line), where
    locate.py looks for them: a new subfolder or file type would otherwise be missing from installs."""
    config = pytest.importorskip("setuptools.config.setupcfg")
    data_files = config.read_configuration(str(ROOT / "setup.cfg"))["options"]["data_files"]
    shipped = {str(Path(dest) / Path(f).name) for dest, files in data_files for f in files}
    prefix = locate.INSTALLED
    expected = {str(prefix / p.relative_to(ROOT / "experiments")) for p in (ROOT / "experiments").rglob("*")
                if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.parts)}
    assert shipped == expected


# ---- the Makefile's dependency check --------------------------------------------------------------
def _fake_python(tmp_path, prints: str) -> Path:
    """A stand-in for python3 that answers the Makefile's check with `prints` (and runs nothing else)."""
    path = tmp_path / "python3"
    path.write_text(f"#!/bin/sh\necho '{prints}'\n")
    path.chmod(0o755)
    return path


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_checks_tqdm_and_matplotlib_before_running_anything(tmp_path):
    py = _fake_python(tmp_path, "tqdm matplotlib")  # torch, numpy, PIL, pytest present; these two not
    r = subprocess.run(["make", "-s", "test", "NO_INSTALL=1", f"SYS_PYTHON={py}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "lacks: tqdm matplotlib" in r.stderr and "passed" not in r.stdout  # stopped before the tests
    r = subprocess.run(["make", "-n", "test", f"SYS_PYTHON={py}", f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert "lacks tqdm matplotlib; installing everything" in r.stdout + r.stderr
    assert f"{py} -m venv" in r.stdout  # not PYTHONPATH=src with a python that would fail later


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_uses_a_python_that_has_everything(tmp_path):
    py = _fake_python(tmp_path, "-")  # the check's answer when nothing is missing
    r = subprocess.run(["make", "-n", "test", f"SYS_PYTHON={py}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={k: v for k, v in os.environ.items() if k != "NO_INSTALL"})
    assert r.returncode == 0 and f"PYTHONPATH={ROOT}/src {py} tests/shards.py" in r.stdout
