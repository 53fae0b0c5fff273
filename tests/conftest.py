import sys
from pathlib import Path

# The tests import their independent reference network (tests/reference.py) by name.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache32(tmp_path_factory):
    """A tiny 10-class synthetic set prepared at CIFAR's native 32x32 (8 train, 2 val images a class):
    runs at the CIFAR scale (experiments/cifar.toml) take seconds where the full-size network takes minutes."""
    from splitnet.data import DataConfig, ensure_cache, make_synthetic
    home = tmp_path_factory.mktemp("cache32")
    root = make_synthetic(home / "syn", seed=5, classes=10, train_per_class=8, val_per_class=2)
    return ensure_cache(root, home, DataConfig(image_size=32))


@pytest.fixture(scope="session", autouse=True)
def _cpu_unless_marked_gpu():
    """Every test sees no GPU unless marked `gpu` (tests/cpuenv.py says why): devices left unset
    resolve to the CPU even on a GPU machine. Session-scoped, so the module- and session-scoped runs
    that CPU tests share are CPU runs too. Returns the real functions for the gpu tests."""
    import torch
    real = torch.cuda.is_available, torch.cuda.device_count
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        mp.setattr(torch.cuda, "device_count", lambda: 0)
        yield real


@pytest.fixture(autouse=True)
def _gpu_tests_see_the_gpu(request, _cpu_unless_marked_gpu, monkeypatch):
    if request.node.get_closest_marker("gpu") is not None:
        import torch
        monkeypatch.setattr(torch.cuda, "is_available", _cpu_unless_marked_gpu[0])
        monkeypatch.setattr(torch.cuda, "device_count", _cpu_unless_marked_gpu[1])


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Each test starts with the process's torch thread count: training sets it from its config
    (`threads = 1` in many tests), and a test that reads it (the concurrency strategy "auto" picks
    by it) must not depend on which tests ran before it in the same process (make test deals the
    files to several pytest processes, tests/shards.py)."""
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
