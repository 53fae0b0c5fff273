"""torchvision's trained AlexNet (alexnet-owt-7be5be79.pth), read without torchvision.

torchvision's network is Krizhevsky's "One weird trick" (2014) one-tower variant: conv 64-192-384-256-256,
no LRN, conv1 11x11/4 with pad 2 on 224 crops, an adaptive 6x6 average pool (the identity at 224), and
dropout before fc6 and fc7. Here it is the layout `owt` (model/layout.py) with input_mode
"torchvision". Its input is RGB in [0, 1], normalised by per-channel mean and std; splitnet feeds
0..255 pixels minus a mean, so the mean becomes the run's mean image (255 * mean) and 1/(255 * std)
is folded into conv1's weights per input channel: conv1(x_tv) = conv1'(x - 255 mean), zero padding
included (a zero of one is a zero of the other).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import PretrainedError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# torchvision's state dict keys -> splitnet's layers.
KEYS = {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3", "features.8": "conv4",
        "features.10": "conv5", "classifier.1": "fc6", "classifier.4": "fc7", "classifier.6": "fc8"}


def read_state(path) -> dict:
    """The .pth file's state dict (loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - another kind of file: say so in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PretrainedError(f"{path}: not a torch state dict or truncated ({first[:160]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PretrainedError(f"{path}: not a state dict of tensors")
    return sd


def num_outputs(sd: dict, path) -> int:
    if "classifier.6.bias" not in sd:
        raise PretrainedError(f"{path}: layer fc8 missing (key classifier.6.bias); not torchvision's AlexNet?")
    return int(sd["classifier.6.bias"].numel())


def grouped_state(sd: dict, shapes: dict, path) -> dict:
    """{conv1.weight: ..., fc8.bias: ...} of `shapes` (the owt layout's), the normalisation folded into conv1."""
    out = {}
    for tv, name in KEYS.items():
        for key in ("weight", "bias"):
            k = f"{tv}.{key}"
            if k not in sd:
                raise PretrainedError(f"{path}: layer {name} missing (key {k})")
            want = tuple(shapes[f"{name}.{key}"])
            if tuple(sd[k].shape) != want:
                raise PretrainedError(f"{path}: layer {name} {key} ({k}): shape "
                                      f"{'x'.join(map(str, sd[k].shape))} in the file, {'x'.join(map(str, want))} expected")
            out[f"{name}.{key}"] = sd[k].detach().float().clone()
    scale = 1.0 / (255.0 * torch.tensor(STD))
    out["conv1.weight"] = out["conv1.weight"] * scale[None, :, None, None]
    return out


def mean_image(side: int = 256) -> np.ndarray:
    """255 * torchvision's mean as an RGB mean image [3, side, side]."""
    rgb = 255.0 * np.array(MEAN, np.float32)
    return np.ascontiguousarray(np.broadcast_to(rgb[:, None, None], (3, side, side)))
