"""Run by torchrun in test_distributed.py: one forward/backward of the distributed model, saved to a file.

usage: torchrun --nproc-per-node=N tests/dist_worker.py OUT_DIR BATCH
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from splitnet.train import distributed as D
from splitnet.train.grad_sync import make_reducer
from splitnet.model.convert import column_tensors
from splitnet.train.config import TrainConfig


def main(out, batch):
    mesh = D.init_mesh(2, timeout_s=60)
    torch.manual_seed(0)
    model = D.build_model(TrainConfig(), 10, mesh)
    model.train()
    # Small buckets: several all-reduces launched while backward runs (grad_sync.BucketReduce).
    reducer = make_reducer(model.parameters(), mesh.data_group, mesh.replicas, 4.0, D.count_sent)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=g) * 60
    y = torch.randint(0, 10, (batch,), generator=g)
    b = batch // mesh.replicas
    off = mesh.replica * b
    x, y = x[off:off + b].clone().requires_grad_(True), y[off:off + b]
    model.set_dropout_stream(7, batch, off)
    D.traffic.clear()
    logits = model(x)
    # Each replica's loss is the mean over its rows; averaging gradients over replicas gives the
    # gradient of the mean over the whole batch.
    loss = F.cross_entropy(logits, y) if logits is not None else None
    D.backward(model, loss)
    if reducer is not None:
        reducer.finish()
    sent = dict(D.traffic)
    xg = x.grad.clone()
    dist.all_reduce(xg, group=mesh.column_group)  # every column's conv1 contributes to dL/dx
    torch.save({"rank": mesh.rank, "column": mesh.column, "replica": mesh.replica, "offset": off,
                "logits": None if logits is None else logits.detach(), "x_grad": xg / mesh.replicas,
                "grads": column_tensors(model, lambda p: p.grad)[mesh.column], "sent": sent,
                "expected": D.expected_traffic(model.layout, mesh.replicas, mesh.column, b),
                "buckets": 0 if reducer is None else len(reducer.buckets)},
               Path(out) / f"rank{mesh.rank}.pt")
    D.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
