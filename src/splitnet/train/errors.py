"""Errors a user sees as one line (cli.py), not as a traceback: a run that cannot start or go on."""


class RunError(RuntimeError):
    """A run directory cannot be used as asked (it holds another run, is locked, or its files are
    unreadable); nothing in it was changed."""


class RunLockedError(RunError):
    """Another process is training into this run directory."""


class CheckpointError(RunError, ValueError):
    """A checkpoint cannot be read or written; the message names the file and what is wrong."""


class EvalError(RunError):
    """Checkpoints that cannot be evaluated as asked: trained on other classes than the data holds."""
