"""qclient: the producer and worker client of qbroker, blocking and async.

    import qclient

    job = qclient.send("send_email", {"name": "mjtree"})   # kwargs of tasks.send_email
    print(job.result(timeout=10))
    print(qclient.results(jobs, timeout=60))             # many at once, in order

    with qclient.Client("http://broker:7733") as client:
        jobs = client.send_many("resize", [[path] for path in paths])   # args each
        client.send("report", {"day": date.today()}, eta=tomorrow_9am)   # aware datetime

    async with qclient.AsyncClient() as client:           # under trio or asyncio
        job = await client.send("send_email", {"name": "mjtree"})
        print(await job.result(timeout=10))

The wire shapes (JobRecord, LeasedJob, ...) live in `qclient.wire`; the common ones are
re-exported here. Arguments and results of types JSON lacks (datetime, Decimal, UUID,
set, bytes) travel tagged (`qclient.tags`) and arrive as they were sent. Importing
qclient loads neither trio, asyncio nor sqlite3.
"""

from qclient._admin import JobProgress as JobProgress
from qclient._api import (
    client_options as client_options,
    configure as configure,
    default_client as default_client,
    get_job as get_job,
    job as job,
    results as results,
    send as send,
    send_many as send_many,
)
from qclient._async import AsyncClient as AsyncClient, AsyncJob as AsyncJob
from qclient._errors import (
    BrokerError as BrokerError,
    DuplicateJob as DuplicateJob,
    InvalidRequest as InvalidRequest,
    JobCancelled as JobCancelled,
    JobExpired as JobExpired,
    JobNotFound as JobNotFound,
    JobNotSucceeded as JobNotSucceeded,
    ProtocolError as ProtocolError,
    QClientError as QClientError,
    StaleLease as StaleLease,
    TaskFailed as TaskFailed,
)
from qclient._options import (
    JobOptions as JobOptions,
    LeaseOptions as LeaseOptions,
    SendOptions as SendOptions,
    spec as spec,
)
from qclient._sync import Client as Client, Job as Job
from qclient.wire import (
    AckItem as AckItem,
    BatchResult as BatchResult,
    ExtendReply as ExtendReply,
    FailItem as FailItem,
    Health as Health,
    JobRecord as JobRecord,
    JobSpec as JobSpec,
    JobState as JobState,
    LeasedJob as LeasedJob,
    QueueStats as QueueStats,
    new_job_id as new_job_id,
)

__all__ = [
    "AckItem",
    "AsyncClient",
    "AsyncJob",
    "BatchResult",
    "BrokerError",
    "Client",
    "DuplicateJob",
    "ExtendReply",
    "FailItem",
    "Health",
    "InvalidRequest",
    "Job",
    "JobCancelled",
    "JobExpired",
    "JobNotFound",
    "JobNotSucceeded",
    "JobOptions",
    "JobProgress",
    "JobRecord",
    "JobSpec",
    "JobState",
    "LeaseOptions",
    "LeasedJob",
    "ProtocolError",
    "QClientError",
    "QueueStats",
    "SendOptions",
    "StaleLease",
    "TaskFailed",
    "client_options",
    "configure",
    "default_client",
    "get_job",
    "job",
    "new_job_id",
    "results",
    "send",
    "send_many",
    "spec",
]

__version__ = "0.1.0"
