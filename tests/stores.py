"""The store backends the contract tests run on, and a way to drive one from sync code.

`backend` is the one fixture to extend for a new backend (a PostgreSQL store adds an
entry to BACKENDS): tests/test_properties.py's state machine, and every test that takes
`backend`, then runs on it too (huey's StorageTests, River's riverdrivertest).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from qbroker.store import Store
from qbroker.store.sqlite import SQLiteStore

T = TypeVar("T")

#: name -> opens a store on a fresh, empty directory (the tests control `now`)
BACKENDS: dict[str, Callable[[Path], Awaitable[Store]]] = {
    "sqlite": lambda d: SQLiteStore.open(d / "qbroker.db", synchronous="OFF"),
}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Callable[[Path], Awaitable[Store]]:
    """Opens a store of one backend; every test that takes it runs on each."""
    opener: Callable[[Path], Awaitable[Store]] = BACKENDS[request.param]
    return opener


class Driver:
    """One store, served by a trio loop in a thread, for sync callers (hypothesis's
    state machines): `driver.run(store.verb, ...)` awaits the verb there.

    Start with `open`, end with `close`.
    """

    def __init__(self, opener: Callable[[Path], Awaitable[Store]], where: Path) -> None:
        self._opener = opener
        self._where = where
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.store: Store | None = None

    def open(self) -> Store:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        assert self.store is not None
        return self.store

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        self.store = await self._opener(self._where)
        try:
            self._ready.set()
            await self._stop.wait()
        finally:
            await self.store.aclose()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """`await fn(*args, **kwargs)` on the store's loop; returns or raises that."""

        async def call() -> T:
            return await fn(*args, **kwargs)

        return trio.from_thread.run(call, trio_token=self._token)

    def close(self) -> None:
        if self._stop is not None and self._token is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)
