"""Training and evaluating a run: the paper's SGD (§5) on the split model, and its errors (§4.1, §6).

    config.py       TrainConfig: the run's TOML over the paper's defaults
    optim.py        the paper's SGD and learning-rate schedules
    loop.py         `splitnet train`: the run directory, the loop, resume; start.py: a run's start
                    (checks, resume, run.json), epochs.py: its epochs (steps, evaluations, checkpoints)
    evaluate.py     `splitnet eval`: top-1/top-5 on the centre patch, ten patches, ensembles; the input batches
    checkpoint.py   atomic, placement-independent checkpoints
    runtime.py      one process or a torchrun mesh; distributed.py: the collectives
    memory.py       keeping freed memory for reuse (glibc)

Imports splitnet.model, splitnet.data and splitnet.config; never splitnet.experiments or splitnet.bench.
"""
