"""The group-commit writer, in process: what happens when its thread itself fails.

A ROLLBACK that fails (an I/O error) cannot be provoked through the wire; a call that
closes the connection under the writer fails the same way. Before, the thread died
silently and every write, then and later, waited forever.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import NoReturn

import pytest
import trio
from qbroker import errors
from qbroker.store.sqlite.schema import open_writer
from qbroker.store.sqlite.sweep import sweep
from qbroker.store.sqlite.writer import Writer
from qbroker.store.sqlite.writes import Writes


def test_a_dead_writer_fails_every_call_instead_of_hanging(tmp_path: Path) -> None:
    conn = open_writer(tmp_path / "qbroker.db", synchronous="OFF")
    writer = Writer(conn, Writes(conn).rolled_back)

    def break_the_connection() -> NoReturn:
        conn.close()
        raise RuntimeError("boom")

    async def main() -> None:
        writer.start()
        assert (await writer.call(sweep, conn, 0.0)).next_due is None
        with trio.fail_after(5):
            with pytest.raises(errors.InternalError, match="writer thread failed"):
                await writer.call(break_the_connection)
            await writer.died.wait()
            with pytest.raises(errors.InternalError, match="writer thread failed"):
                await writer.call(sweep, conn, 0.0)

    trio.run(main)
    assert isinstance(writer.error, sqlite3.Error)
    writer.stop()  # returns: the thread has ended
