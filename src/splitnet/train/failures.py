"""A distributed run's failures: what happened, and on which rank (runtime.py turns them into one
DistributedError). A rank that fails with its own error posts it in the rendezvous store; the ranks it
strands, whose collectives then fail, read it there and name it. `mesh` below is distributed.Mesh
(its rank and world). Re-exported by distributed.py.
"""
from __future__ import annotations

import time

import torch.distributed as dist

from ..compat import default_store

_FAILED_KEY = "splitnet/failed/{}"
# How a collective reports a peer that died or hung: gloo raises plain RuntimeErrors from its transport
# ("Connection closed by peer", "Timed out waiting ... for recv", and "Application timeout caused pair
# closure" when the timeout fires inside a backward collective), NCCL DistBackendErrors.
_COLLECTIVE_MARKS = ("gloo/transport", "Connection closed by peer", "Timed out waiting", "pair closure", "NCCL",
                     "ProcessGroup")


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because of another rank, not this rank's own error
    (an out-of-memory error, a shape bug, a missing file)."""
    return isinstance(e, dist.DistError) or any(m in str(e) for m in _COLLECTIVE_MARKS)


def post_failure(mesh, e: BaseException) -> None:
    """Leave this rank's own error in the rendezvous store, where the ranks it strands can read it."""
    try:
        default_store().set(_FAILED_KEY.format(mesh.rank), f"{type(e).__name__}: {first_line(e)}")
    except Exception:  # the store may be gone with its host; the error itself is still raised
        pass


def peer_failures(mesh, wait_s: float = 2.0) -> dict:
    """{rank: "Type: message"} of the ranks that posted their own error (post_failure). A peer's
    connection closes as its process exits, just after it posted: wait a moment for the note."""
    deadline = time.time() + wait_s
    try:
        store = default_store()
        keys = [_FAILED_KEY.format(r) for r in range(mesh.world) if r != mesh.rank]
        while True:
            found = {int(k.rsplit("/", 1)[1]): store.get(k).decode() for k in keys if store.check([k])}
            if found or time.time() > deadline:
                return found
            time.sleep(0.1)
    except Exception:  # the store died with the rank that hosted it
        return {}


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
