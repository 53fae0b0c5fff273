"""`splitnet` with a fault injected on one rank (test_distributed.py): FAULT_RANK's train_step raises
FAULT ("oom": torch.OutOfMemoryError, "shape": a shape bug) at its second step.

usage: FAULT_RANK=1 FAULT=oom python tests/fault_worker.py train --config ... (as `splitnet`)
"""
import os
import sys

import torch
import torch.nn.functional as F

from splitnet import cli
from splitnet.train import epochs

if os.environ.get("RANK") == os.environ.get("FAULT_RANK"):
    real = epochs.train_step

    def failing(run, x, y):
        if run.state.step == 1:
            if os.environ.get("FAULT") == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
            F.linear(torch.ones(2, 3), torch.ones(4, 5))  # mat1 and mat2 shapes cannot be multiplied
        return real(run, x, y)

    epochs.train_step = failing  # train_one_epoch's step

sys.exit(cli.main(sys.argv[1:]))
