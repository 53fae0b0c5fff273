"""splitnet/compat.py: each shim over a private torch API works on the installed torch, and says
plainly (or falls back) when its API is taken away."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from splitnet import compat
from splitnet.compat import PrivateAPIError, default_store, profile_all_threads, unscale_and_check_
from splitnet.train.scaler import LossScaler


def test_unscale_and_check_divides_and_flags_non_finite():
    grads = [torch.tensor([2.0, 4.0]), torch.tensor([8.0])]
    inf = torch.zeros(1)
    unscale_and_check_(grads, inf, torch.full((1,), 0.5))
    assert grads[0].tolist() == [1.0, 2.0] and grads[1].tolist() == [4.0] and inf.item() == 0
    unscale_and_check_([torch.tensor([1.0, float("inf")])], inf, torch.full((1,), 0.5))
    assert inf.item() == 1


def test_unscale_and_check_without_the_kernel_names_it(monkeypatch):
    monkeypatch.delattr(torch, "_amp_foreach_non_finite_check_and_unscale_")
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(PrivateAPIError, match="_amp_foreach_non_finite_check_and_unscale_"):
        LossScaler().unscale_and_check([p])  # the scaler's one use of it
    assert LossScaler(enabled=False).unscale_and_check([p]) is False  # fp32 never needs it


def test_default_store_is_the_process_groups_store(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        store = default_store()
        store.set("splitnet/test", "x")
        assert store.get("splitnet/test") == b"x"
    finally:
        dist.destroy_process_group()


def test_default_store_without_the_accessor_names_it(monkeypatch):
    monkeypatch.delattr(distributed_c10d, "_get_default_store")
    with pytest.raises(PrivateAPIError, match="_get_default_store"):
        default_store()


def test_profile_all_threads_or_nothing(monkeypatch):
    extra = profile_all_threads()
    assert set(extra) == {"experimental_config"}  # torch >= 2.6 has it
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], **extra):
        torch.ones(2).sum()
    monkeypatch.delattr(torch._C._profiler, "_ExperimentalConfig")
    assert compat.profile_all_threads() == {}  # falls back to the calling thread only
