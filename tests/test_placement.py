"""Devices: explicit, replicated, automatic, and the errors for devices that do not exist."""
import logging

import pytest
import torch

import splitnet
from splitnet.model.placement import DeviceError, resolve_devices


def test_explicit_and_replicated():
    assert resolve_devices(("cpu", "cpu"), 2) == (torch.device("cpu"),) * 2
    assert resolve_devices("cpu", 4) == (torch.device("cpu"),) * 4


def test_wrong_number_of_devices():
    with pytest.raises(DeviceError, match="2 column.*3 device"):
        resolve_devices(("cpu", "cpu", "cpu"), 2)


def test_missing_gpu_is_a_clear_error():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DeviceError, match=f"column 1: device cuda:{n + 1}.*{n} CUDA"):
        splitnet.SplitAlexNet(num_classes=10, devices=("cpu", f"cuda:{n + 1}"))


def test_not_a_device_name():
    with pytest.raises(DeviceError, match="column 0"):
        resolve_devices(("gpu-zero", "cpu"), 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_none_falls_back_to_cpu_with_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="splitnet"):
        m = splitnet.SplitAlexNet(num_classes=10)
    assert m.devices == (torch.device("cpu"),) * 2
    lines = [r.getMessage() for r in caplog.records if r.name == "splitnet"]
    assert len(lines) == 1 and "CPU emulation" in lines[0]


def test_cpu_meant_tests_run_on_the_cpu_even_with_a_gpu():
    """conftest.py hides any GPU from tests not marked gpu (tests/cpuenv.py): devices left unset are
    the CPU here on every machine, and subprocesses are given no GPU either."""
    from cpuenv import cpu_env
    assert splitnet.SplitAlexNet(num_classes=10, geometry="cifar").devices == (torch.device("cpu"),) * 2
    assert cpu_env()["CUDA_VISIBLE_DEVICES"] == ""


def test_cudnn_autotune_is_on_for_cuda_devices_only(monkeypatch):
    from splitnet.model.placement import cudnn_autotune
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert cudnn_autotune(("cpu", "cpu")) is False and not torch.backends.cudnn.benchmark
    assert cudnn_autotune((torch.device("cpu"), "cuda:0")) is True and torch.backends.cudnn.benchmark
