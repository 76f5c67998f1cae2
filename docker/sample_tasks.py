"""The sample tasks the compose file's workers run (`qworker --module sample_tasks`).

Send them from anywhere that reaches the broker, with a producer token:

    import qclient
    client = qclient.Client("http://127.0.0.1:7733", token="dev-producer-token")
    print(client.send("add", [2, 3]).result(timeout=10))   # 5
"""

from __future__ import annotations

import time

from qworker import task


@task
def add(a: float, b: float) -> float:
    return a + b


@task(max_retries=5, timeout=60)
def send_email(to: str, subject: str, body: str = "") -> str:
    time.sleep(0.05)  # stands in for the SMTP round trip
    return f"sent {subject!r} to {to}"
