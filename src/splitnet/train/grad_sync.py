"""Data-parallel gradient averaging over a column's replicas, overlapped with backward (as DDP does).

Under torchrun each rank holds one column (distributed.py); the R ranks holding the same column form
its data group, and after every backward pass each of them must hold the mean of their gradients.

  FlatReduce     after backward, one all-reduce of every gradient concatenated (the simple baseline);
  BucketReduce   the parameters are cut into buckets of about `bucket_mb` MB in the order backward
                 produces their gradients (the last layers' first); a gradient hook counts each
                 bucket's gradients in, and as soon as a bucket is complete its all-reduce is launched
                 asynchronously, so the communication of fc8..fc6 runs while conv5..conv1 still
                 backpropagate. finish() waits for the buckets and writes the means back.

Buckets are launched strictly in order (bucket k only after k - 1), so every rank of a data group
issues the same collectives in the same order whatever the timing of its backward pass. The sums are
elementwise, so both give the same gradients bitwise: the bucketing changes when bytes move, not
what arrives. `traffic` (distributed.count_sent) counts what the ring all-reduce sends.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class FlatReduce:
    """One all-reduce of all gradients after backward."""

    def __init__(self, params, group, replicas: int, count_sent=None):
        self.params = [p for p in params if p.requires_grad]
        self.group, self.replicas, self.count_sent = group, replicas, count_sent

    def finish(self) -> None:
        flat = _flatten(self.params)
        self._reduce(flat).wait()
        _write_back(flat, self.params, self.replicas)

    def _reduce(self, flat: torch.Tensor):
        """Launch the sum of `flat` over the data group; returns the work to wait on."""
        if self.count_sent is not None:  # the ring all-reduce sends 2 (R - 1) / R of the bytes
            self.count_sent("gradients", 2 * (self.replicas - 1) * flat.numel() * flat.element_size() / self.replicas)
        return dist.all_reduce(flat, group=self.group, async_op=True)


class BucketReduce(FlatReduce):
    """All-reduces launched bucket by bucket while backward runs; finish() completes them."""

    def __init__(self, params, group, replicas: int, bucket_mb: float = 25.0, count_sent=None):
        super().__init__(params, group, replicas, count_sent)
        limit = bucket_mb * 2 ** 20
        # Backward produces gradients roughly in reverse order of the parameters' registration.
        self.buckets, size = [[]], 0
        for p in reversed(self.params):
            if self.buckets[-1] and size + p.numel() * p.element_size() > limit:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {p: b for b, ps in enumerate(self.buckets) for p in ps}
        self.enabled = True
        self._reset()
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]

    def _reset(self) -> None:
        self.missing = [len(ps) for ps in self.buckets]
        self.next = 0  # the next bucket to launch
        self.launched = []  # (bucket, flat, work)

    def _ready(self, p) -> None:
        if not self.enabled:  # bench/dist.py times FlatReduce on the same model in between
            return
        b = self.bucket_of[p]
        self.missing[b] -= 1
        while self.next < len(self.buckets) and self.missing[self.next] <= 0:
            self._launch(self.next)

    def _launch(self, b: int) -> None:
        flat = _flatten(self.buckets[b])
        self.launched.append((b, flat, self._reduce(flat)))
        self.next = b + 1

    def finish(self) -> None:
        while self.next < len(self.buckets):  # buckets backward did not complete (a frozen layer)
            self._launch(self.next)
        for b, flat, work in self.launched:
            work.wait()
            _write_back(flat, self.buckets[b], self.replicas)
        self._reset()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _flatten(params) -> torch.Tensor:
    """The gradients of `params` concatenated (a copy); zeros for a parameter without one this step
    (none in the paper's columns), so every rank sends the same layout of bytes."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _write_back(flat: torch.Tensor, params, replicas: int) -> None:
    """Each parameter's gradient <- its slice of the summed `flat`, divided by the replicas (the mean)."""
    flat /= replicas
    off = 0
    for p in params:
        n = p.numel()
        if p.grad is not None:
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
        off += n


def make_reducer(params, group, replicas: int, bucket_mb: float, count_sent=None):
    """BucketReduce for bucket_mb > 0, FlatReduce for 0; None where there is nothing to average."""
    if replicas == 1:
        return None
    if bucket_mb > 0:
        return BucketReduce(params, group, replicas, bucket_mb, count_sent)
    return FlatReduce(params, group, replicas, count_sent)
