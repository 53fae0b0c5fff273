"""A reader of protobuf's wire format, enough for Caffe's files (no protobuf compiler, no dependency).

A message is a sequence of (tag, value) records, tag = field_number << 3 | wire_type: 0 varint,
1 fixed 64-bit, 2 length-delimited (bytes, a sub-message or a packed repeated field), 5 fixed 32-bit.
`fields(buf)` splits one message into {field_number: [value, ...]}; the caller knows each field's type.
A repeated float field written unpacked (one 5-byte record per value, 60 M of them in an AlexNet) is
read with numpy in one go (`float_runs`), not record by record.
"""
from __future__ import annotations

import numpy as np


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message; the message says where."""


def varint(buf, pos: int) -> tuple:
    """(value, next position) of the base-128 varint at buf[pos]."""
    out, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise WireError(f"truncated varint at byte {pos}")
        b = buf[pos]
        out |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return out, pos
        shift += 7
        if shift > 63:
            raise WireError(f"varint longer than 10 bytes at byte {pos}")


def _run_end(buf, pos: int, tag: int) -> int:
    """End of the run of whole 5-byte records (the byte `tag`, then a float32) from buf[pos] on."""
    n = (len(buf) - pos) // 5
    recs = np.frombuffer(buf, np.uint8, n * 5, pos).reshape(n, 5)
    off = np.flatnonzero(recs[:, 0] != tag)
    return pos + 5 * (int(off[0]) if len(off) else n)


def fields(buf, base: int = 0, runs: frozenset = frozenset()) -> dict:
    """{field_number: [value, ...]} of the message in `buf` (bytes or memoryview). Values: int (varint),
    bytes-like (length-delimited, fixed64 as 8 bytes), 4-byte bytes-like (fixed32); for a field in
    `runs` written as consecutive fixed32 records, one numpy float32 array for each run.
    `base` offsets the byte positions errors report (a sub-message's place in the file)."""
    buf = memoryview(buf)
    out, pos, end = {}, 0, len(buf)
    while pos < end:
        key, pos = varint(buf, pos)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise WireError(f"field number 0 at byte {base + pos}")
        if wt == 0:
            val, pos = varint(buf, pos)
        elif wt == 2:
            n, pos = varint(buf, pos)
            if pos + n > end:
                raise WireError(f"truncated: field {num} at byte {base + pos} needs {n} bytes, {end - pos} left")
            val, pos = buf[pos:pos + n], pos + n
        elif wt in (1, 5):
            size = 8 if wt == 1 else 4
            if wt == 5 and num in runs and key < 0x80:  # a one-byte tag: the run's records are 5 bytes
                start = pos - 1
                stop = _run_end(buf, start, key)
                if stop == start:
                    raise WireError(f"truncated: float field {num} at byte {base + pos}")
                val, pos = np.frombuffer(_floats_of_run(buf, start, stop), "<f4"), stop
            else:
                if pos + size > end:
                    raise WireError(f"truncated: fixed field {num} at byte {base + pos}")
                val, pos = buf[pos:pos + size], pos + size
        else:
            raise WireError(f"wire type {wt} (field {num}) at byte {base + pos}: not a protobuf message")
        out.setdefault(num, []).append(val)
    return out


def _floats_of_run(buf, start: int, stop: int) -> bytes:
    """The 4-byte payloads of the 5-byte records buf[start:stop], concatenated."""
    n = (stop - start) // 5
    recs = np.frombuffer(buf, np.uint8, n * 5, start).reshape(n, 5)
    return recs[:, 1:].tobytes()


def packed_varints(data) -> list:
    """The values of a packed repeated varint field."""
    out, pos = [], 0
    while pos < len(data):
        v, pos = varint(data, pos)
        out.append(v)
    return out


def string(data) -> str:
    return bytes(data).decode("utf-8", errors="replace")
