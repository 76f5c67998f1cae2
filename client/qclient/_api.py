"""Module-level shortcuts (`qclient.send(...)`) over one lazily made default Client."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, Unpack

from qclient._http import DEFAULT_RETRIES, DEFAULT_TIMEOUT, Encoding
from qclient._options import SendOptions
from qclient._settings import django_options
from qclient._sync import Client, Job
from qclient.wire import JobRecord

__all__ = [
    "client_options",
    "configure",
    "default_client",
    "get_job",
    "job",
    "results",
    "send",
    "send_many",
]

_lock = threading.Lock()
_default: Client | None = None
_configured: dict[str, Any] | None = None  #: configure()'s arguments, once called


def default_client() -> Client:
    """The shared `Client` behind the module-level functions.

    Made on first use from `client_options()`: `configure()`'s values, else a Django
    project's QBROKER setting, else QBROKER_URL / QBROKER_TOKEN / QBROKER_CA.
    """
    global _default
    client = _default
    if client is None:
        with _lock:
            if _default is None:
                _default = Client(**client_options())
            client = _default
    return client


def client_options() -> dict[str, Any]:
    """The `Client` arguments the default client is made with: those given to
    `configure()`, else those of a Django project's `settings.QBROKER` dict, else
    none (the environment's QBROKER_URL and QBROKER_TOKEN apply). qworker's `Worker`
    takes its broker from here too.

    Raises:
        ValueError: settings.QBROKER is not a dict of URL, TOKEN, TIMEOUT, RETRIES,
            ENCODING.
    """
    if _configured is not None:
        return dict(_configured)
    return django_options()


def configure(
    url: str | None = None,
    token: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    encoding: Encoding = "msgpack",
    ca: str | None = None,
) -> Client:
    """Replace the default client with one made from these settings.

    The previous default client is closed: `Job` handles made through it stop
    working, so call this at start-up.

    Args:
        url: the broker's base URL; default: env QBROKER_URL, else
            http://127.0.0.1:7733.
        token: a bearer token; default: env QBROKER_TOKEN.
        timeout: as for `Client`.
        retries: as for `Client`.
        encoding: as for `Client`.
        ca: as for `Client`: the CA of an https broker; default: env QBROKER_CA.

    Returns:
        The new default client.
    """
    global _default, _configured
    options: dict[str, Any] = {"url": url, "token": token, "timeout": timeout}
    options.update(retries=retries, encoding=encoding, ca=ca)
    client = Client(**options)
    with _lock:
        old, _default, _configured = _default, client, options
    if old is not None:
        old.close()
    return client


def send(queue: str, payload: Any = None, **options: Unpack[SendOptions]) -> Job:
    """Enqueue one job through the default client; see `Client.send()`."""
    return default_client().send(queue, payload, **options)


def send_many(queue: str, items: Iterable[Any]) -> list[Job]:
    """Enqueue many jobs through the default client; see `Client.send_many()`."""
    return default_client().send_many(queue, items)


def results(
    jobs: Iterable[Job | str],
    timeout: float | None = None,
    *,
    return_exceptions: bool = False,
) -> list[Any]:
    """Wait for many jobs and return their results, in order, through the default
    client; see `Client.results()`."""
    return default_client().results(jobs, timeout, return_exceptions=return_exceptions)


def get_job(job_id: str) -> JobRecord:
    """A job's record through the default client; see `Client.get_job()`.

    Raises:
        JobNotFound: no such job.
    """
    return default_client().get_job(job_id)


def job(job_id: str) -> Job:
    """A `Job` handle on the default client for an id (no request is made)."""
    return default_client().job(job_id)
