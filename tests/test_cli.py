import json
import subprocess
import sys

from splitnet.cli import main


def test_layouts_lists_all(capsys):
    assert main(["layouts"]) == 0
    out = capsys.readouterr().out
    assert "paper" in out and "60,965,224" in out and "234,496" in out


def test_layouts_json(capsys):
    assert main(["layouts", "paper", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["paper"]["params"] == 60_965_224


def test_layouts_at_cifar_geometry(capsys):
    assert main(["layouts", "paper", "--json", "--geometry", "cifar", "--num-classes", "10"]) == 0
    data = json.loads(capsys.readouterr().out)
    # 2,432 (conv1 5x5x3x32) + 25,664 + 73,856 + 73,856 + 36,928 (conv2-5) + 131,584 (fc6 256->512) + 262,656 + 5,130
    assert data["paper"]["params"] == 612_106 and data["paper"]["exchange_bytes_per_image"]["conv3"] == 6_400


def test_unknown_layout_is_one_clear_line(capsys):
    assert main(["layouts", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown layout 'nope'" in err and "Traceback" not in err


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "splitnet", "layouts", "paper"], capture_output=True, text=True)
    assert r.returncode == 0 and "conv3" in r.stdout


def test_keep_freed_memory_takes_on_glibc_and_can_be_switched_off(monkeypatch):
    import platform
    from splitnet.train.memory import keep_freed_memory
    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory() is True
    monkeypatch.setenv("SPLITNET_MALLOC", "default")
    assert keep_freed_memory() is False
