"""Run by torchrun in test_pretrained.py: an imported run's network with its columns as ranks, one
forward pass of a preprocessed image; the head column's rank saves the logits.

usage: torchrun --nproc-per-node=2 tests/pretrained_worker.py RUN IMAGE OUT
"""
import sys

import torch

from splitnet.pretrained.load import load
from splitnet.train import checkpoint as ckpt
from splitnet.train import distributed as D


def main(run, image, out):
    _, prep = load(run, "cpu")  # the preprocessing (and the config) as one process reads them
    ck = ckpt.load(ckpt.checkpoint_path(run))
    cfg = ckpt.from_dict(ckpt.TrainConfig, ck["config"])
    mesh = D.init_mesh(2, timeout_s=60)
    model = D.build_model(cfg, len(ck["classes"]), mesh)
    ckpt.restore_model(model, ck)
    with torch.no_grad():
        logits = model.eval()(prep(image)[None])
    if logits is not None:
        torch.save({"rank": mesh.rank, "logits": logits}, out)
    D.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
