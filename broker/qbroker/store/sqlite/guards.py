"""Checks against what happens to the data dir behind the broker's back.

`FileGuard`: the database file deleted or replaced while the broker runs. SQLite goes on
writing to the inode it has open, so every write still succeeds, and all of it is gone
at the next start (issue 21, item 3). The guard notices (the open file's link count is
0, or the path names another inode) before and after each group commit and on
`/healthz`; from then on every write fails with 503 `database_gone` and `/healthz` with
it. It does not heal:
what was committed since is in the unlinked file, and a restart is what an operator
needs to decide on.

`FreeSpaceFloor`: the disk of the data dir running low (RabbitMQ's `disk_free_limit`).
Under the floor enqueues are refused with 507 `disk_low`, while leases, acks, fails,
cancels and checkpoints go on in the room left, so workers drain the queue and space
comes back (item 8).

Both are cheap (a few µs of stat calls). The writer thread and the trio thread may both
call `FileGuard.check`; a race between them at most logs the loss twice.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import structlog

from qbroker import errors

log = structlog.get_logger("qbroker.guards")
FREE_SPACE_RECHECK = 0.1  #: seconds a free-space reading is used before the next


class FileGuard:
    """Watches the database file (and its WAL) by an fd of its own. `close()` at the end."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.lost: str | None = None  #: what happened, once it has; never cleared
        self._fds: list[tuple[Path, int]] = []
        for path in (db_path, db_path.with_name(db_path.name + "-wal")):
            # no WAL yet: the main file is what matters
            with contextlib.suppress(FileNotFoundError):
                self._fds.append((path, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))

    def check(self) -> errors.DatabaseGone | None:
        """The error every write gets from now on, if the file is gone; else None."""
        if self.lost is None:
            for path, fd in self._fds:
                why = _gone(path, fd)
                if why is not None:
                    self._lose(path, fd, why)
                    break
        # a fresh error each time: a raised one keeps its traceback, which would grow
        return None if self.lost is None else errors.DatabaseGone(self.lost)

    def _lose(self, path: Path, fd: int, why: str) -> None:
        hint = ""
        if why == "deleted" and Path(f"/proc/{os.getpid()}/fd/{fd}").exists():
            hint = f"; until the broker stops, its content is at /proc/{os.getpid()}/fd/{fd}"
        log.critical("db.gone", path=str(path), change=why,
                     action="writes refused; restart the broker" + hint)  # fmt: skip
        self.lost = (
            f"the database file {path} was {why} while the broker ran; writes are"
            " refused (nothing written now would survive a restart): restart the broker"
        )

    def close(self) -> None:
        for _, fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _gone(path: Path, fd: int) -> str | None:
    """How `path` stopped naming the file open as `fd` ("deleted", "moved away",
    "replaced"), or None if it still does."""
    mine = os.fstat(fd)
    if mine.st_nlink == 0:
        return "deleted"
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return "moved away"
    except OSError:  # unreadable for a moment (EACCES, EIO): no verdict on that
        return None
    if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
        return "replaced"
    return None


class FreeSpaceFloor:
    """Refuses enqueues while the data dir's disk has less than `floor` bytes free."""

    def __init__(self, directory: Path, floor: int) -> None:
        self.directory = directory
        self.floor = floor
        self._free = 0
        self._read_at = -float("inf")
        self._low = False  #: the last reading was under the floor (logged on change)

    def check(self) -> None:
        """Raises errors.DiskLow if the free space is under the floor (0: no floor)."""
        if self.floor <= 0:
            return
        now = time.monotonic()
        if now - self._read_at >= FREE_SPACE_RECHECK:
            self._read_at = now
            self._free = free_bytes(self.directory)
            low = self._free < self.floor
            if low != self._low:
                self._low = low
                if low:
                    log.warning("disk.low", free=self._free, floor=self.floor)
                else:
                    log.info("disk.ok", free=self._free, floor=self.floor)
        if self._free < self.floor:
            raise errors.DiskLow(
                f"{self._free:,} bytes free on the disk of {self.directory}, under"
                f" --min-free-disk ({self.floor:,}): enqueues are refused until space"
                " is freed or workers drain the queues (leases, acks, fails and"
                " cancels still work)"
            )


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write on `directory`'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
