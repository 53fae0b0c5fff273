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


def write_failure(e: BaseException) -> str:
    """Why a write failed, in a few words: the OSError's text ("No space left on device"), also where
    torch.save wrapped it in a RuntimeError ("unexpected pos 1384320 vs 1384208", the OSError in its
    context), else the error's first line."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
