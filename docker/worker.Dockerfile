# qworker image: the worker plus a tasks module. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t qbroker-worker .
# For your own tasks, start from this image and copy your code over the sample:
#   FROM qbroker-worker
#   COPY myapp/ /srv/tasks/myapp/
#   CMD ["qworker", "--module", "myapp.tasks", "--grace", "20"]
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker broker
COPY client client
COPY worker worker
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home qworker
COPY docker/sample_tasks.py /srv/tasks/sample_tasks.py
WORKDIR /srv/tasks
USER qworker
# The broker and the token come from the environment: QBROKER_URL, QBROKER_TOKEN (a
# worker-role token), QBROKER_CA for a broker with a private CA.
# SIGTERM (docker stop) stops leasing, lets running tasks finish within --grace, hands
# back unstarted jobs and exits 0; compose gives it stop_grace_period 30s > --grace 20.
STOPSIGNAL SIGTERM
CMD ["qworker", "--module", "sample_tasks", "--grace", "20"]
