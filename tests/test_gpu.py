"""GPU placements: skipped cleanly without CUDA devices."""
import pytest
import torch

import splitnet
from reference import GROUPS, reference_forward, rel

pytestmark = pytest.mark.gpu
ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check(devices):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    m = splitnet.SplitAlexNet(num_classes=1000, layout="paper", devices=devices).eval()
    sd = m.grouped_state_dict()
    x = torch.randn(4, 3, 224, 224) * 60
    with torch.no_grad():
        got = m(x.to(devices[0])).cpu()
        ref = reference_forward(sd, x, GROUPS["paper"], 2)
    assert rel(got, ref) < 1e-4
    with splitnet.record_exchanges() as log, torch.no_grad():
        m(x.to(devices[0]))
    assert sum(e.nbytes for e in log) == 234_496 * 4


@pytest.mark.skipif(ngpu < 1, reason="needs a CUDA device")
def test_both_columns_on_cuda0():
    _check(("cuda:0", "cuda:0"))


@pytest.mark.skipif(ngpu < 2, reason="needs two CUDA devices")
def test_columns_on_cuda0_and_cuda1():
    _check(("cuda:0", "cuda:1"))


@pytest.mark.skipif(ngpu < 2, reason="needs two CUDA devices")
def test_two_gpu_gradients_match_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    gpu = splitnet.SplitAlexNet(num_classes=10, devices=("cuda:0", "cuda:1")).eval()
    cpu = splitnet.SplitAlexNet(num_classes=10, devices=("cpu", "cpu")).eval()
    cpu.load_grouped_state_dict(gpu.grouped_state_dict())
    x = torch.randn(2, 3, 224, 224) * 60
    gpu(x.cuda()).sum().backward()
    cpu(x).sum().backward()
    for cg, cc in zip(gpu.parameters(), cpu.parameters()):
        assert rel(cg.grad.cpu(), cc.grad) < 1e-4
