"""Celery app + no-op task used by bench/peers.py (the Celery peer harness).

The worker is started as ``python -m celery -A celery_tasks worker ...`` with
bench/ on PYTHONPATH; it reads its configuration from the environment:

    QB_BENCH_BROKER_URL   broker URL: redis://127.0.0.1:6379/15
                          or amqp://guest:guest@127.0.0.1:5672//
    QB_BENCH_BACKEND_URL  result backend URL (default redis://127.0.0.1:6379/15)
    QB_BENCH_QUEUE        queue name (unique per run: runs never share messages)

The producer side (peers.py) calls :func:`make_app` with the same values, so
both sides share exactly one configuration.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = "redis://127.0.0.1:6379/15"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
BACKEND_URL = REDIS_URL
NOOP_NAME = "qbroker_bench.noop"


def make_app(broker_url: str, queue: str, backend_url: str = BACKEND_URL) -> Celery:
    app = Celery("qbroker_bench", broker=broker_url, backend=backend_url)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=False,  # results are stored: we wait for every one
        result_expires=3600,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Stock Celery defaults otherwise (prefetch multiplier 4, early ack,
        # no acks_late): this is how people run it.
        broker_connection_retry_on_startup=True,
        # Keep the broker footprint small (no pidbox / event exchanges).
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )

    @app.task(name=NOOP_NAME, shared=False)
    def noop() -> None:
        return None

    return app


app = make_app(
    os.environ.get("QB_BENCH_BROKER_URL", REDIS_URL),
    os.environ.get("QB_BENCH_QUEUE", "qbroker_bench"),
    os.environ.get("QB_BENCH_BACKEND_URL", BACKEND_URL),
)
noop = app.tasks[NOOP_NAME]
