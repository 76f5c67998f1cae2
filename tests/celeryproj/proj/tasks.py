# Tasks as Celery's tutorials write them.
import os
import time

from .celery import app


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def xsum(numbers):
    return sum(numbers)


@app.task
def send_email(to):
    return "success"


@app.task
def ran_at():
    return time.time()


@app.task
def fail(message):
    raise ValueError(message)


@app.task(bind=True)
def retry_twice(self):
    if self.request.retries < 2:
        raise self.retry(countdown=1)
    return self.request.retries


@app.task(
    bind=True,
    autoretry_for=(ConnectionError,),
    retry_kwargs={"max_retries": 5, "countdown": 0.2},
)
def flaky(self):
    if self.request.retries < 2:
        raise ConnectionError("try again")
    return self.request.retries


@app.task
def wait_for_file(path, timeout=30):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(path)
        time.sleep(0.02)
    return "opened"


@app.task(acks_late=True)
def slow_mark(path, seconds):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return "done"


@app.task
def count_call(path, value, seconds=0.0):
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


@app.task
def record_sum(numbers, path):
    with open(path, "a") as f:
        f.write(f"{sum(numbers)}\n")
    return sum(numbers)
