"""CPU-meant tests stay on the CPU on a machine with GPUs (issue 30 item 3).

With a GPU present, `devices` left unset picks cuda:0 (placement.resolve_devices) and torchrun ranks
take NCCL on it: the bitwise checks would then depend on cuDNN, and two ranks on one GPU fail under
NCCL. conftest.py hides the GPUs from every test not marked `gpu`; subprocesses get cpu_env()."""
import os

CPU_DEVICES = 'devices=["cpu", "cpu"]'  # the --set item that pins both columns on the CPU


def cpu_env(**extra) -> dict:
    """os.environ for a subprocess (torchrun ranks, `splitnet` commands) that must not see a GPU."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", **extra)
