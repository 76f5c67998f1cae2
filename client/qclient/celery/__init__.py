"""Celery on qbroker: a kombu transport and a result backend (`pip install "qbroker[celery]"`).

In a Celery app's settings:

    broker_url = "qbroker://127.0.0.1:7733"
    broker_transport = "qclient.celery:Transport"
    result_backend = "qbroker://127.0.0.1:7733"

Importing this module also registers the `qbroker` transport alias with kombu, so
`broker_url` alone works in a process that imports it first. See
docs/migrating-from-celery.md for what is supported.
"""

from qclient.celery._backend import ResultBackend as ResultBackend
from qclient.celery._transport import Channel as Channel, Transport as Transport

__all__ = ["Channel", "ResultBackend", "Transport"]
