"""A pool child's progress, handed to its parent through a little shared memory.

A task in a child process calls `current_job().progress(...)`; the child writes it
into its slot's area, and the parent's upkeep reads the latest from there about once
a second, for the next heartbeat. No message on the pipe (the parent reads it only for
outcomes), no thread in the child.

Layout: a header `seq, run, index, fraction, note length` then the note's UTF-8
bytes. `seq` is a sequence lock (the Linux kernel's seqlock): odd while the child
writes, so the parent retries a read that saw it odd or saw it change. `run` and
`index` say which call of which run of calls the progress belongs to, so a late
report is never taken for the next job's.
"""

from __future__ import annotations

import ctypes
import struct
import time
from multiprocessing.context import BaseContext
from typing import Any

from qworker._context import MAX_NOTE_CHARS, Progress

__all__ = ["ProgressArea"]

_HEADER = struct.Struct("<qiidI")
_NOTE_BYTES = MAX_NOTE_CHARS * 4  #: a note of 1,000 characters, each up to 4 bytes
_READ_TRIES = 5


class ProgressArea:
    """One slot's shared progress area; the parent makes it, its children write it."""

    def __init__(self, ctx: BaseContext) -> None:
        self.raw: Any = ctx.RawArray(ctypes.c_char, _HEADER.size + _NOTE_BYTES)
        self.seen = 0  #: the parent: the last seq it took

    def write(self, run: int, index: int, progress: Progress) -> None:
        """The child: publish `progress` for call `index` of run `run`."""
        note = progress.note.encode()[:_NOTE_BYTES]
        view = memoryview(self.raw).cast("B")
        seq = struct.unpack_from("<q", view)[0]
        struct.pack_into("<q", view, 0, seq + 1)  # odd: being written
        _HEADER.pack_into(view, 0, seq + 1, run, index, progress.fraction, len(note))
        view[_HEADER.size : _HEADER.size + len(note)] = note
        struct.pack_into("<q", view, 0, seq + 2)

    def take(self) -> tuple[int, int, Progress] | None:
        """The parent: (run, index, progress) if the child wrote since the last take."""
        view = memoryview(self.raw).cast("B")
        for _ in range(_READ_TRIES):
            seq, run, index, fraction, length = _HEADER.unpack_from(view)
            if seq == self.seen:
                return None
            if seq % 2:
                continue
            note = bytes(view[_HEADER.size : _HEADER.size + min(length, _NOTE_BYTES)])
            if struct.unpack_from("<q", view)[0] != seq:
                continue
            self.seen = seq
            text = note.decode(errors="ignore")
            return run, index, Progress(fraction, text, time.time())
        return None
