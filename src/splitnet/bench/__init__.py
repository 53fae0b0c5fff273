"""`splitnet bench` (cli.py: what it measures, the JSON keys and the goals).

    timing.py   the synchronised clock and the training step as `splitnet train` takes it
    peak.py     the utilisation denominators: matmul samples between the steps, the nominal peak
    model.py    the split model against the grouped network (compare); the columns' overlap
    data.py     the input path: decode vs cache, and on a GPU, training fed from the cache
    dist.py     the step under torchrun against one process (`python -m splitnet.bench.dist`)
"""
