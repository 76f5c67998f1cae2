"""`qbroker serve`: parse flags and QBROKER_* variables into a Config, then serve."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from qbroker import __version__, config as cfg, control_cli, errors, logs
from qbroker.datadir import DataDirInUse
from qbroker.server import serve

log = structlog.get_logger("qbroker.cli")


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"QBROKER_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbroker", description="A durable task broker."
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the broker")
    s.add_argument(
        "--host", help=f"address to bind (QBROKER_HOST, default {cfg.DEFAULT_HOST})"
    )
    s.add_argument(
        "--port",
        type=int,
        help=f"port; 0 picks a free one (QBROKER_PORT, default {cfg.DEFAULT_PORT})",
    )
    s.add_argument(
        "--data-dir",
        help=f"directory of the database (QBROKER_DATA_DIR, default {cfg.DEFAULT_DATA_DIR})",
    )
    s.add_argument(
        "--ready-file",
        help="write the bound port here once listening (QBROKER_READY_FILE)",
    )
    s.add_argument(
        "--max-body",
        type=int,
        help=f"bytes a request body may have (QBROKER_MAX_BODY, default {cfg.DEFAULT_MAX_BODY})",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        help=f"open connections allowed (QBROKER_MAX_CONNECTIONS, default {cfg.DEFAULT_MAX_CONNECTIONS})",
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        help=f"seconds a request may take to arrive (QBROKER_REQUEST_TIMEOUT, default {cfg.REQUEST_TIMEOUT})",
    )
    s.add_argument(
        "--idle-timeout",
        type=float,
        help=f"seconds an idle keep-alive connection is kept (QBROKER_IDLE_TIMEOUT, default {cfg.IDLE_TIMEOUT})",
    )
    s.add_argument(
        "--max-db-bytes",
        type=int,
        help="quota on the database file; writes past it get 507 disk_full, reads"
        " go on (QBROKER_MAX_DB_BYTES, default: none)",
    )
    s.add_argument(
        "--min-free-disk",
        type=int,
        help="bytes that must stay free on the data dir's disk; under it enqueues get"
        " 507 disk_low while leases, acks and cancels go on; 0: no floor"
        f" (QBROKER_MIN_FREE_DISK, default {cfg.DEFAULT_MIN_FREE_DISK})",
    )
    s.add_argument(
        "--token", help="require 'Authorization: Bearer TOKEN' (QBROKER_TOKEN)"
    )
    s.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="QBROKER_LOG_LEVEL, default info",
    )
    control_cli.add_parsers(sub)
    return parser


def config_from(ns: argparse.Namespace) -> cfg.Config:
    """Flags beat QBROKER_* environment variables beat defaults."""

    def pick(flag: object, env: str, default: str) -> str:
        if flag is not None:
            return str(flag)
        return _env(env, default) or default

    ready = ns.ready_file if ns.ready_file is not None else _env("READY_FILE", None)
    quota = (
        ns.max_db_bytes if ns.max_db_bytes is not None else _env("MAX_DB_BYTES", None)
    )
    return cfg.Config(
        host=pick(ns.host, "HOST", cfg.DEFAULT_HOST),
        port=int(pick(ns.port, "PORT", str(cfg.DEFAULT_PORT))),
        data_dir=Path(pick(ns.data_dir, "DATA_DIR", cfg.DEFAULT_DATA_DIR)),
        ready_file=Path(ready) if ready else None,
        max_body=int(pick(ns.max_body, "MAX_BODY", str(cfg.DEFAULT_MAX_BODY))),
        max_connections=int(
            pick(
                ns.max_connections, "MAX_CONNECTIONS", str(cfg.DEFAULT_MAX_CONNECTIONS)
            )
        ),
        request_timeout=float(
            pick(ns.request_timeout, "REQUEST_TIMEOUT", str(cfg.REQUEST_TIMEOUT))
        ),
        idle_timeout=float(
            pick(ns.idle_timeout, "IDLE_TIMEOUT", str(cfg.IDLE_TIMEOUT))
        ),
        max_db_bytes=int(quota) if quota else None,
        min_free_disk=int(
            pick(ns.min_free_disk, "MIN_FREE_DISK", str(cfg.DEFAULT_MIN_FREE_DISK))
        ),
        token=ns.token if ns.token is not None else _env("TOKEN", None),
        log_level=pick(ns.log_level, "LOG_LEVEL", "info"),
    )


def _check_data_dir(config: cfg.Config) -> None:
    """Refuse to start on a data dir that cannot hold the database (one-line reason)."""
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(
            f"qbroker: cannot create data dir {config.data_dir}: {exc.strerror}"
        ) from None
    if not os.access(config.data_dir, os.W_OK | os.X_OK):
        raise SystemExit(f"qbroker: data dir {config.data_dir} is not writable")
    db = config.db_path
    if db.exists() and not db.is_file():
        raise SystemExit(f"qbroker: {db} is not a regular file; move it away")
    if db.exists():
        with db.open("rb") as f:
            magic = f.read(16)
        if magic and magic != b"SQLite format 3\x00":
            raise SystemExit(
                f"qbroker: {db} is not an SQLite database; refusing to touch it"
            )


async def _run(config: cfg.Config, started: list[int]) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, config)
        started.append(port)
        print(f"qbroker listening on http://{config.host}:{port}", flush=True)
        if config.ready_file is not None:
            tmp = config.ready_file.with_name(config.ready_file.name + ".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(config.ready_file)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command in control_cli.COMMANDS:
        return control_cli.main(ns)
    config = config_from(ns)
    logs.configure(config.log_level)
    for name, seconds in (
        ("request timeout", config.request_timeout),
        ("idle timeout", config.idle_timeout),
    ):
        if not seconds > 0:  # NaN too
            raise SystemExit(f"qbroker: the {name} must be above 0 s, not {seconds:g}")
    if config.min_free_disk < 0:
        raise SystemExit("qbroker: --min-free-disk must be 0 (no floor) or more bytes")
    _check_data_dir(config)
    started: list[int] = []
    try:
        trio.run(_run, config, started)
    except BaseException as exc:
        # serve() runs in a nursery, so its errors arrive wrapped in ExceptionGroups;
        # once it served, any failure is a crash and keeps its traceback
        reason = None if started else _startup_failure(exc)
        if reason is None:
            raise
        print(f"qbroker: {reason}", file=sys.stderr)
        return 1
    return 0


def _startup_failure(exc: BaseException) -> str | None:
    """The one-line reason for a failure the operator must fix (a damaged database, a
    port in use), found inside any ExceptionGroup; None for anything else (a bug)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, errors.QBrokerError):
        return exc.message
    if isinstance(exc, DataDirInUse):
        return str(exc)
    if isinstance(exc, OSError):
        return str(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
