"""The tests' own writer of Caffe files (protobuf wire format), independent of splitnet's reader,
and a reference forward pass with Caffe's semantics (bvlc_alexnet's deploy.prototxt)."""
import numpy as np
import torch
import torch.nn.functional as F

# bvlc_alexnet's blobs: (weight shape, bias size, groups, stride, pad), BGR input.
CAFFE_SHAPES = {
    "conv1": ((96, 3, 11, 11), 96, 1, 4, 0), "conv2": ((256, 48, 5, 5), 256, 2, 1, 2),
    "conv3": ((384, 256, 3, 3), 384, 1, 1, 1), "conv4": ((384, 192, 3, 3), 384, 2, 1, 1),
    "conv5": ((256, 192, 3, 3), 256, 2, 1, 1), "fc6": ((4096, 9216), 4096, 1, 0, 0),
    "fc7": ((4096, 4096), 4096, 1, 0, 0), "fc8": ((1000, 4096), 1000, 1, 0, 0)}
V1_TYPES = {"conv": 4, "fc": 14, "relu": 18, "pool": 17, "lrn": 15}


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num: int, wt: int, payload: bytes) -> bytes:
    head = varint(num << 3 | wt)
    return head + (varint(len(payload)) + payload if wt == 2 else payload)


def blob(arr: np.ndarray, packed: bool, legacy: bool) -> bytes:
    arr = np.asarray(arr, np.float32)
    if legacy:  # num/channels/height/width, right-aligned as Caffe's old files store them
        dims = [1] * (4 - arr.ndim) + list(arr.shape)
        shape = b"".join(field(i + 1, 0, varint(d)) for i, d in enumerate(dims))
    else:
        shape = field(7, 2, field(1, 2, b"".join(varint(d) for d in arr.shape)))
    flat = arr.reshape(-1).astype("<f4")
    if packed:
        data = field(5, 2, flat.tobytes())
    else:  # one record per value: tag 0x2D then the float
        rec = np.empty((flat.size, 5), np.uint8)
        rec[:, 0] = 5 << 3 | 5
        rec[:, 1:] = flat.view(np.uint8).reshape(-1, 4)
        data = rec.tobytes()
    return data + shape  # data first: the reader must not depend on the order


def caffemodel(weights: dict, form: str = "v1", packed: bool = True) -> bytes:
    """A NetParameter with the data layer, every layer of bvlc_alexnet (ReLU, LRN, pooling without
    blobs) in `form` "v1" (layers, field 2) or "new" (layer, field 100)."""
    layers = [("data", "Data", None)]
    for n in (n for n in CAFFE_SHAPES if n in weights):
        layers.append((n, "Convolution" if n.startswith("conv") else "InnerProduct", weights[n]))
        layers.append((n.replace("conv", "relu").replace("fc", "relu"), "ReLU", None))
        if n in ("conv1", "conv2"):
            layers.append((n.replace("conv", "norm"), "LRN", None))
    out = field(1, 2, b"AlexNet")
    for name, kind, wb in layers:
        blobs = [] if wb is None else [blob(wb[0], packed, form == "v1"), blob(wb[1], packed, form == "v1")]
        if form == "v1":
            t = {"Convolution": 4, "InnerProduct": 14, "ReLU": 18, "LRN": 15, "Data": 5}[kind]
            body = field(4, 2, name.encode()) + field(5, 0, varint(t)) + b"".join(field(6, 2, b) for b in blobs)
            out += field(2, 2, body)
        else:
            body = field(1, 2, name.encode()) + field(2, 2, kind.encode()) + b"".join(field(7, 2, b) for b in blobs)
            out += field(100, 2, body)
    return out


def mean_binaryproto(mean_bgr: np.ndarray) -> bytes:
    return blob(mean_bgr[None], packed=True, legacy=True)


def random_weights(seed: int = 0) -> dict:
    """Weights at bvlc_alexnet's shapes with a gain that keeps activations in the hundreds (as a trained
    network's): the LRN (k = 1, alpha/n = 2e-5) then changes the maps by a visible factor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, (shape, nb, *_) in CAFFE_SHAPES.items():
        fan = int(np.prod(shape[1:]))
        w = torch.randn(shape, generator=g) * (2.0 / fan) ** 0.5
        out[n] = (w.numpy(), (torch.randn(nb, generator=g) * 0.1).numpy())
    return out


@torch.no_grad()
def caffe_forward(weights: dict, x_bgr: torch.Tensor) -> torch.Tensor:
    """bvlc_alexnet's forward: x_bgr [B, 3, 227, 227] (BGR, mean subtracted) -> fc8 logits."""
    x = x_bgr
    for n, (_, _, groups, stride, pad) in CAFFE_SHAPES.items():
        w, b = (torch.from_numpy(a) for a in weights[n])
        if n.startswith("conv"):
            x = F.relu(F.conv2d(x, w, b, stride, pad, groups=groups))
            if n in ("conv1", "conv2"):
                x = F.local_response_norm(x, 5, alpha=1e-4, beta=0.75, k=1.0)  # over all maps of the layer
            if n in ("conv1", "conv2", "conv5"):
                x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        else:
            x = F.linear(x.flatten(1), w, b)
            if n != "fc8":
                x = F.relu(x)  # dropout: the identity at test in Caffe
    return x
