"""The broker's settings: one frozen Config, built once by the CLI and passed down.

Precedence: command-line flags, then `QBROKER_*` environment variables, then these defaults.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"  #: loopback only unless asked
DEFAULT_PORT = 7733  #: TCP port
DEFAULT_DATA_DIR = "./qbroker-data"  #: holds qbroker.db (+ -wal, -shm)
DEFAULT_MAX_BODY = 1024 * 1024  #: bytes a request body may have
MAX_HEADER_BYTES = 16 * 1024  #: bytes a request head may have (431 beyond)
DEFAULT_MAX_CONNECTIONS = 4096  #: open connections; more get 429 and are closed
REQUEST_TIMEOUT = 10.0  #: seconds a request head+body may take to arrive (slowloris)
IDLE_TIMEOUT = 60.0  #: seconds a keep-alive connection may sit idle between requests
SHUTDOWN_GRACE = 10.0  #: seconds in-flight requests get after SIGTERM
DEFAULT_LEASE_SECONDS = 30.0  #: seconds a lease lasts unless the job/lease says
DEFAULT_MAX_RETRIES = 3  #: retries after the first attempt unless the job says
DEFAULT_RESULT_TTL = 7 * 86400.0  #: seconds a finished job and its result are kept
REAPER_MAX_SLEEP = 1.0  #: seconds the reaper sleeps at most between sweeps
CHECKPOINT_INTERVAL = 1.0  #: seconds between WAL checkpoints
WRITER_MAX_BATCH = 2000  #: store calls one group commit takes at most
METRICS_MAX_QUEUES = 1000  #: queues with /metrics series of their own; the rest summed
RESULTS_REPLY_BYTES = 4 * 1024 * 1024  #: bytes of records a /v1/results reply holds
DEFAULT_MIN_FREE_DISK = 50_000_000  #: bytes free below which enqueues get 507
DB_FILENAME = "qbroker.db"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    ready_file: Path | None = None
    max_body: int = DEFAULT_MAX_BODY
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    request_timeout: float = REQUEST_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    shutdown_grace: float = SHUTDOWN_GRACE
    default_lease_seconds: float = DEFAULT_LEASE_SECONDS
    default_max_retries: int = DEFAULT_MAX_RETRIES
    default_result_ttl: float = DEFAULT_RESULT_TTL
    token: str | None = None  #: when set, every request but /healthz needs it (admin)
    #: (role, token) pairs from --tokens-file / QBROKER_TOKENS (auth.py); with `token`,
    #: when any is set, every request but /healthz needs one, and its role decides
    tokens: tuple[tuple[str, str], ...] = ()
    tls_cert: Path | None = None  #: PEM certificate chain: serve HTTPS instead of HTTP
    tls_key: Path | None = None  #: its PEM private key
    synchronous: str = "FULL"  #: SQLite synchronous pragma; FULL makes 2xx durable
    max_db_bytes: int | None = None  #: quota on qbroker.db; writes past it get 507
    min_free_disk: int = DEFAULT_MIN_FREE_DISK  #: bytes; under it enqueues get 507
    log_level: str = "info"

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_FILENAME
