"""Unpickling a CIFAR-10 batch without running what a pickle names: pickle runs code named by the
file, so members are unpickled with an Unpickler that resolves only the few globals a numpy array
needs (find_class below) and refuses every other one, naming it and the member, before anything is
called (archive.py reads the members)."""
from __future__ import annotations

import io
import pickle

import numpy as np

from .config import DataError

try:  # numpy >= 2 (the old name still loads, through a deprecation shim)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct


class _Refused(Exception):
    """Raised inside the unpickler; turned into a DataError naming the member."""


def _latin1_encode(text, encoding="utf-8"):
    """codecs.encode as a Python 3 pickler of bytes (protocol < 3) calls it: `encode(str, "latin1")`.
    Python 2 pickles never use it; any other codec is refused (codecs can do more than re-encode)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# (module, name) as written in the pickle -> the object it may stand for. A Python 2 pickle of a numpy
# array names numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype (nothing else); numpy 2
# writes numpy._core.multiarray; a Python 3 pickler writes bytes at protocol 2 via _codecs.encode.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only _ALLOWED; keys and strings of Python 2 come back as bytes."""

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise _Refused(f"the global {module}.{name}")
        return obj


def unpickle(data: bytes, where: str):
    """The object pickled in `data` (a member's bytes; `where` names it in errors), numpy arrays only."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise DataError(f"{where}: refused to unpickle {e} (only numpy arrays, lists, numbers and strings "
                        f"are allowed; this is not a CIFAR-10 batch, and may be malicious)") from None
    except Exception as e:  # corrupt pickle data can raise almost any error type
        raise DataError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from None
