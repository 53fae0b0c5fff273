"""`splitnet bench`: timing the split model against its grouped equivalent, the input path and the
distributed step (cli.py), and the step under torchrun (dist.py, `python -m splitnet.bench.dist`)."""
