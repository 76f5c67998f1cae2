"""The data dir's lock: one broker per data dir.

Two brokers on one database would each run its own reaper and long-polls over the
same rows: a job sent to one is run by a worker of the other, and a result long-poll
on the first is never woken. So `serve()` takes an exclusive `flock` on a lock file
beside the database for the whole life of the process. The kernel drops a flock when
its holder exits, however it ends (SIGKILL too), so a stale lock never blocks a
restart; the file itself is left in place (unlinking it would let two processes lock
two different files of that name). The holder writes its PID into the file, so a
second broker can say who holds the dir.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILENAME = "qbroker.lock"


class DataDirInUse(Exception):
    """Another process holds the data dir's lock; the message is one line for an operator."""


class DataDirLock:
    """An exclusive lock on a data dir, held until `release()` (or the process ends)."""

    def __init__(self, data_dir: Path) -> None:
        """Take the lock.

        Raises:
            DataDirInUse: another process holds it (the message names it where the
                lock file tells).
            OSError: the lock file cannot be opened.
        """
        self.path = data_dir / LOCK_FILENAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(self._fd)
            os.close(self._fd)
            self._fd = None
            who = f"by process {holder}" if holder else "by another process"
            raise DataDirInUse(
                f"data dir {data_dir} is in use {who} (another qbroker serve?);"
                " stop it or use another --data-dir"
            ) from None
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Give the lock up (closing the file drops the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    """The PID the lock's holder wrote, if the file holds one."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
