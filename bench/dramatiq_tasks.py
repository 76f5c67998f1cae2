"""Dramatiq + RabbitMQ and its `add` actor for bench/peers.py.

The worker runs as ``python -m dramatiq dramatiq_tasks ...`` with cwd bench/ and reads
its queue from QB_BENCH_QUEUE; the producer imports this module with the same value.
Results go to Redis db 15 (Dramatiq's Results middleware). Publisher confirms are off,
Dramatiq's default: a send returns before RabbitMQ has the message.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/15"
QUEUE = os.environ.get("QB_BENCH_QUEUE", "qbroker_bench")

broker = RabbitmqBroker(url=AMQP_URL)
results = RedisBackend(url=REDIS_URL)
broker.add_middleware(Results(backend=results))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, store_results=True, max_retries=0)
def add(x: int, y: int) -> int:
    return x + y
