"""Caffe's trained AlexNet (bvlc_alexnet.caffemodel) and its mean (imagenet_mean.binaryproto).

Caffe's proto (BVLC/caffe src/caffe/proto/caffe.proto), the fields read here:
  NetParameter      layer 100 (LayerParameter), layers 2 (V1LayerParameter, the 2014 files)
  LayerParameter    name 1, type 2 (string), blobs 7
  V1LayerParameter  name 4, type 5 (enum), blobs 6
  BlobProto         num/channels/height/width 1-4 (legacy 4-d shape), data 5 (float, packed or not),
                    shape 7 (BlobShape: dim 1), double_data 8
bvlc_alexnet is the paper's two-group network: conv2, conv4, conv5 with `group: 2`, LRN over all maps
of a layer, so its blobs have exactly the grouped shapes of splitnet's `paper` layout (model/convert.py).
Blob shapes decide; layer parameters are not needed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..model.layout import LAYER_NAMES
from .errors import PretrainedError
from .protobuf import WireError, fields, packed_varints, string

log = logging.getLogger(__name__)

# Caffe's per-channel ImageNet means (B, G, R), what its examples use without a mean file.
BGR_MEANS = (104.0, 116.7, 122.7)


def _floats(blob: dict, where: str) -> np.ndarray:
    parts = []
    for v in blob.get(5, []):  # packed chunks (bytes-like) or unpacked runs (float32 arrays)
        parts.append(v if isinstance(v, np.ndarray) else np.frombuffer(v, "<f4"))
    for v in blob.get(8, []):
        parts.append((v if isinstance(v, np.ndarray) else np.frombuffer(v, "<f8")).astype(np.float32))
    if not parts:
        raise PretrainedError(f"{where}: a blob without data")
    return np.concatenate(parts).astype(np.float32, copy=False)  # a new, writable array already


def _dims(blob: dict) -> list:
    if 7 in blob:
        shape = fields(blob[7][-1])
        dims = []
        for v in shape.get(1, []):
            dims += [v] if isinstance(v, int) else packed_varints(v)
        return dims
    legacy = [blob[k][-1] if k in blob else 0 for k in (1, 2, 3, 4)]
    return [d for d in legacy if d] if any(legacy) else []


def read_blob(buf, where: str) -> np.ndarray:
    """One BlobProto as a float32 array of its recorded shape (legacy shapes keep their leading 1s)."""
    blob = fields(buf, runs=frozenset({5}))
    data = _floats(blob, where)
    dims = _dims(blob) or [data.size]
    if int(np.prod(dims)) != data.size:
        raise PretrainedError(f"{where}: shape {'x'.join(map(str, dims))} but {data.size:,} values (truncated?)")
    return data.reshape(dims)


def _layers(net: dict) -> list:
    """[(name, [blob bytes, ...]), ...] in file order, from either form."""
    out = []
    for rec, (name_f, blobs_f) in ((net.get(100, []), (1, 7)), (net.get(2, []), (4, 6))):
        for buf in rec:
            layer = fields(buf)
            name = string(layer[name_f][-1]) if name_f in layer else ""
            out.append((name, layer.get(blobs_f, [])))
    return out


def read_caffemodel(path) -> dict:
    """{layer name: [weight, bias]} of the layers with blobs; PretrainedError for another kind of file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        layers = _layers(fields(data))
        if not layers:
            raise PretrainedError(f"{path}: not a Caffe model (no NetParameter layers, fields 100 or 2)")
        return {name: [read_blob(b, f"{path}: layer {name} blob {i}") for i, b in enumerate(blobs)]
                for name, blobs in layers if blobs}
    except (WireError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: not a Caffe model or truncated ({e})") from None


def _fit(arr: np.ndarray, want: tuple, where: str) -> np.ndarray:
    """`arr` in the shape `want`: legacy 4-d shapes are right-aligned (a bias 1x1x1xN, an fc weight
    1x1xMxK), so leading 1s go; anything else must match exactly."""
    dims = list(arr.shape)
    while len(dims) > len(want) and dims[0] == 1:
        dims.pop(0)
    if tuple(dims) != tuple(want):
        raise PretrainedError(f"{where}: shape {'x'.join(map(str, arr.shape))} in the file, "
                              f"{'x'.join(map(str, want))} expected")
    return arr.reshape(want)


def _pick_layers(blobs: dict, path) -> dict:
    """The eight weighted layers, by splitnet's names or, if the file names them otherwise, in order."""
    if all(n in blobs for n in LAYER_NAMES):
        return {n: blobs[n] for n in LAYER_NAMES}
    if len(blobs) == len(LAYER_NAMES):
        log.info("import: %s names its layers %s; taken in order as %s", path, ", ".join(blobs), ", ".join(LAYER_NAMES))
        return dict(zip(LAYER_NAMES, blobs.values()))
    missing = next(n for n in LAYER_NAMES if n not in blobs)
    raise PretrainedError(f"{path}: layer {missing} missing (layers with weights: {', '.join(blobs) or 'none'})")


def read_layers(path) -> dict:
    """{conv1: [weight, bias], ..., fc8: [...]}: the caffemodel's eight weighted layers (_pick_layers)."""
    return _pick_layers(read_caffemodel(path), path)


def num_outputs(layers: dict) -> int:
    """Outputs of fc8 (1000 for bvlc_alexnet; other for a fine-tuned model)."""
    return int(np.prod(layers["fc8"][-1].shape))


def grouped_state(layers: dict, shapes: dict, path) -> dict:
    """The layers' weights as a grouped state dict {conv1.weight: tensor, ...} of `shapes`
    (model/convert.grouped_shapes of the paper layout); conv1's input channels reversed, BGR to RGB,
    so the network reads RGB like every splitnet model."""
    import torch
    out = {}
    for name, blobs in layers.items():
        if len(blobs) != 2:
            raise PretrainedError(f"{path}: layer {name} has {len(blobs)} blobs, expected 2 (weight, bias)")
        for key, arr in zip(("weight", "bias"), blobs):
            want = tuple(shapes[f"{name}.{key}"])
            out[f"{name}.{key}"] = torch.from_numpy(_fit(arr, want, f"{path}: layer {name} {key}"))
    out["conv1.weight"] = out["conv1.weight"].flip(1).contiguous()
    return out


def read_mean(path) -> np.ndarray:
    """imagenet_mean.binaryproto (a BlobProto 1x3x256x256, BGR) as an RGB float32 mean image [3, S, S]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        arr = read_blob(path.read_bytes(), f"{path}")
    except (WireError, KeyError, IndexError) as e:
        raise PretrainedError(f"{path}: not a Caffe mean file (BlobProto) or truncated ({e})") from None
    dims = [d for d in arr.shape]
    while len(dims) > 3 and dims[0] == 1:
        dims.pop(0)
    if len(dims) != 3 or dims[0] != 3 or dims[1] != dims[2]:
        raise PretrainedError(f"{path}: mean of shape {'x'.join(map(str, arr.shape))}, expected 1x3xSxS (BGR)")
    return np.ascontiguousarray(arr.reshape(dims)[::-1])


def channel_mean(side: int = 256) -> np.ndarray:
    """Caffe's per-channel means (BGR_MEANS) as an RGB mean image [3, side, side]."""
    rgb = np.array(BGR_MEANS[::-1], np.float32)
    return np.ascontiguousarray(np.broadcast_to(rgb[:, None, None], (3, side, side)))
