"""The paper's non-standard layers: local response normalisation (§3.3) and dropout (§4.2)."""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn


class LocalResponseNorm(nn.Module):
    """Local response normalisation across channels, over ONE column's maps (§3.3).

    Paper (printed formula): b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta,
    with k=2, n=5, alpha=1e-4, beta=0.75: alpha multiplies the plain sum (convention "paper").
    The original code, Caffe and torch divide alpha by n (convention "code"): the same as the paper's
    formula with alpha/n. Input [B, C, H, W] of one column; the window never crosses into another
    column's maps because this module only ever sees one column (N = that column's C).
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                 convention: str = "paper"):
        super().__init__()
        if convention not in ("paper", "code"):
            raise ValueError(f"lrn_convention: {convention!r} is not 'paper' or 'code'")
        self.size, self.alpha, self.beta, self.k, self.convention = size, alpha, beta, k, convention

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """groups: x [B, C, H, W] holds `groups` columns' maps side by side (the grouped network);
        each window stays inside its own column's C // groups channels."""
        if x.shape[1] % groups:
            raise ValueError(f"LRN: {x.shape[1]} channels do not split into {groups} columns")
        # The per-element coefficient of the window sum: the paper's alpha, or the code's alpha / n.
        a = self.alpha if self.convention == "paper" else self.alpha / self.size
        return _LRN.apply(x, self.size, a, self.beta, self.k, groups)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, convention={self.convention}"


def band_matrix(c: int, before: int, after: int, scale: float, groups: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """band[i, j] = scale * [i - before <= j <= i + after and i, j in the same group of c // groups
    channels], [c, c]. groups > 1 is block-diagonal: the grouped network's per-column LRN (§3.3)
    without folding the columns into the batch, which would copy a channels_last tensor to NCHW."""
    i = torch.arange(c, device=device)
    off = i[None, :] - i[:, None]  # off[i, j] = j - i
    same = (i[:, None] // (c // groups)) == (i[None, :] // (c // groups))
    return ((off >= -before) & (off <= after) & same).to(dtype) * scale


# Built once per shape and reused (a CUDA step would otherwise launch its few kernels on every LRN
# call, forward and backward). Callers never write into it.
_band = functools.lru_cache(maxsize=64)(band_matrix)


def _window_sum(t: torch.Tensor, before: int, after: int, scale: float = 1.0, groups: int = 1) -> torch.Tensor:
    """s[:, i] = scale * sum of t[:, j] for j in [i - before, i + after] inside i's group of channels
    (zero beyond its edges).

    One matrix product with the banded matrix _band, taken along the channel axis in the tensor's
    own memory order ([B, HW, C] @ band^T for channels_last, band @ [B, C, HW] otherwise); the scale
    rides on the tiny band, not on a pass over t. It replaced a loop of shifted slice additions:
    about 2x faster on a CPU for 16 to 48 channels per column, where the window sum dominated the
    LRN's time."""
    c = t.shape[1]
    band = _band(c, before, after, float(scale), groups, t.dtype, t.device)
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.matmul(t.permute(0, 2, 3, 1), band.t()).permute(0, 3, 1, 2)
    return torch.matmul(band, t.reshape(t.shape[0], c, -1)).view_as(t)


def _neg_pow(d: torch.Tensor, beta: float) -> torch.Tensor:
    """d^-beta. For the paper's beta = 0.75 as d^-1/2 * d^-1/4 (rsqrt and sqrt): within 1 ulp of pow,
    about 3.5x faster on a CPU, where pow was a tenth of a small network's training step."""
    if beta == 0.75:
        r = d.rsqrt()
        return r.mul_(r.sqrt())
    return d.pow(-beta)


class _LRN(torch.autograd.Function):
    """b_i = a_i d_i^-beta, d_i = k + alpha * sum_{j in N(i)} a_j^2, N(i) = [i - n//2, i + (n-1)//2] (§3.3).

    Written out with its backward because torch's local_response_norm (a 3-d average pooling over a
    padded copy, and that pooling's backward) took about a third of a CPU training step; this takes
    about 40% less time (bench). Backward: dL/da_j = g_j d_j^-beta
    - 2 beta alpha a_j sum_{i: j in N(i)} g_i a_i d_i^(-beta-1), the inner sum over the mirrored window.
    The constants alpha and 2 beta alpha scale the window sums' bands, and the backward's last step
    is one addcmul: one pass over the maps fewer forward and two fewer backward than writing each
    product out.
    Tests hold it to the formula, to torch's version (values and gradients) and to gradcheck.
    """

    @staticmethod
    def forward(ctx, x, size: int, alpha: float, beta: float, k: float, groups: int = 1):
        # float16 ends at 65,504: conv1 maps of a few hundred (a trained network's magnitudes) square
        # past it, the window sums turn inf and the output NaN. So the squares, window sums and power
        # are float32 under any autocast, CPU or CUDA (autocast would also send the window sum's
        # matmul back to float16), and only the output returns to x's dtype for the next layer.
        with _full_precision(x.device.type):
            xw = _wide(x)
            d = _window_sum(xw * xw, size // 2, (size - 1) // 2, alpha, groups).add_(k)
            dpow = _neg_pow(d, beta)
            out = (xw * dpow).to(x.dtype)
        ctx.save_for_backward(x, d, dpow)
        ctx.size, ctx.alpha, ctx.beta, ctx.groups = size, alpha, beta, groups
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, d, dpow = ctx.saved_tensors
        with _full_precision(x.device.type):  # float32, as the forward
            xw = _wide(x)
            q = _wide(g) * dpow
            t = _window_sum((q * xw).div_(d), (ctx.size - 1) // 2, ctx.size // 2, 2 * ctx.beta * ctx.alpha,
                            ctx.groups)
            dx = q.addcmul_(t, xw, value=-1.0).to(x.dtype)
        return dx, None, None, None, None, None


def _full_precision(device_type: str):
    """Autocast off on `device_type`; nothing to switch off where autocast does not exist (the meta
    device the tests build models on)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32 when it is a half type (float16, bfloat16); float32 and float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class PaperDropout(nn.Module):
    """Dropout as §4.2 describes it, with the inverted form as an option.

    "paper": at train time each output is zeroed with probability p (kept as is otherwise); at test
    time all neurons are used and their outputs multiplied by 1-p (0.5 in the paper).
    "inverted": what torch.nn.Dropout does, kept outputs scaled by 1/(1-p) at train time, identity at
    test time. The same in expectation, not the same SGD dynamics from a fixed init.
    """

    def __init__(self, p: float = 0.5, mode: str = "paper"):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout: p must be in [0, 1), got {p}")
        if mode not in ("paper", "inverted"):
            raise ValueError(f"dropout_mode: {mode!r} is not 'paper' or 'inverted'")
        self.p, self.mode = p, mode
        self._generators = {}  # device -> this layer's generator, reseeded per call (see _generator)

    def _generator(self, device: torch.device) -> torch.Generator:
        """One generator per device for this module, reseeded on every call: creating one (a CUDA
        generator especially) on every dropout call of every step is host work the step waits for.
        Not shared between modules: two columns' threads or streams may draw at the same time."""
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        return g

    def forward(self, x: torch.Tensor, stream: tuple | None = None) -> torch.Tensor:
        """stream: None draws the mask from the global RNG; (seed, full_batch, offset) draws the mask
        of a batch of `full_batch` rows from a generator seeded `seed` and keeps rows offset..offset+B,
        so a data-parallel replica holding a slice of the batch gets exactly its rows of the mask that
        one process would draw for the whole batch (placement-independent, resumable)."""
        if self.p == 0.0:
            return x
        keep = 1.0 - self.p
        if self.training:
            if stream is None:
                mask = torch.empty_like(x).bernoulli_(keep)
            else:
                mask = self.stream_mask(x, keep, *stream)
            if self.mode == "inverted":
                mask.div_(keep)
            return x * mask
        return x * keep if self.mode == "paper" else x

    def stream_mask(self, x: torch.Tensor, keep: float, seed: int, full: int, offset: int) -> torch.Tensor:
        """The keep mask of x's rows offset..offset+B of a `full`-row batch, drawn on x's device from
        this module's generator seeded `seed`. All `full` rows, though a replica keeps only its own:
        which value row r draws depends on the generator's whole sequence (on a GPU, on the kernel's
        launch shape), so only the full draw gives every replica exactly its rows of the one-process
        mask. A CPU and a CUDA generator draw different masks from one seed (the GPU tests draw on
        the CPU through this method to compare a GPU run with a CPU one tightly)."""
        g = self._generator(x.device)
        g.manual_seed(seed)
        mask = torch.empty((full, *x.shape[1:]), device=x.device, dtype=x.dtype)
        return mask.bernoulli_(keep, generator=g)[offset:offset + x.shape[0]]

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def activation(name: str) -> nn.Module:
    """ReLU (§3.1) or tanh (the saturating nonlinearity of Figure 1), in place where safe."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"activation: {name!r} is not 'relu' or 'tanh'")
