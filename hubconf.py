"""torch.hub entry point: `torch.hub.load(DIR, "alexnet", source="local", ...)` (nothing is downloaded)."""
import sys
from pathlib import Path

dependencies = ["torch", "numpy", "PIL"]

try:
    import splitnet  # noqa: F401
except ImportError:  # a clone that was not installed: its src/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def alexnet(layout: str = "paper", checkpoint=None, devices=None, **model_options):
    """The two-column AlexNet (Krizhevsky et al. 2012, §3) in eval mode: a run's trained network
    (checkpoint: a run folder or its checkpoint.pt, trained or `splitnet import`ed), or a freshly
    initialised one of `layout` with ModelConfig options (num_classes=..., ...). devices: one per column."""
    import splitnet
    if checkpoint is not None:
        return splitnet.load(checkpoint, devices, need_mean=False)[0]
    cfg = splitnet.ModelConfig(layout=layout, **model_options)
    return splitnet.SplitAlexNet(config=cfg, devices=devices).eval()
