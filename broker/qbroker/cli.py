"""`qbroker serve`: parse flags and QBROKER_* variables into a Config, then serve.
`qbroker backup DEST`: copy the database of a data dir, running broker or not.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from qbroker import (
    __version__,
    admin,
    auth,
    config as cfg,
    control_cli,
    errors,
    logs,
    schedule_cli,
    tls,
)
from qbroker.datadir import DataDirInUse
from qbroker.server import serve
from qbroker.store.sqlite import schema

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
        "--token",
        help="require 'Authorization: Bearer TOKEN'; it has the admin role"
        " (QBROKER_TOKEN)",
    )
    s.add_argument(
        "--tokens-file",
        help="tokens with roles, one 'role:token' a line; roles: producer, worker,"
        " read, admin (QBROKER_TOKENS_FILE; or QBROKER_TOKENS='role:token ...')",
    )
    s.add_argument(
        "--tls-cert", help="PEM certificate chain: serve HTTPS (QBROKER_TLS_CERT)"
    )
    s.add_argument("--tls-key", help="its PEM private key (QBROKER_TLS_KEY)")
    s.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="QBROKER_LOG_LEVEL, default info",
    )
    admin.add_parsers(sub)
    control_cli.add_parsers(sub)
    b = sub.add_parser(
        "backup",
        help="copy the database, consistent, while the broker runs",
        description="Copy the database of a data dir into DEST (a new file, or a"
        " directory to hold qbroker.db), as of one moment, while the broker runs."
        " Restore: start a broker with --data-dir on a directory holding the copy"
        " as qbroker.db.",
    )
    b.add_argument("dest", help="a new file, or a directory to hold qbroker.db")
    b.add_argument(
        "--data-dir",
        help=f"the broker's data dir (QBROKER_DATA_DIR, default {cfg.DEFAULT_DATA_DIR})",
    )
    schedule_cli.add_parser(sub)
    return parser


def _tokens(ns: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The (role, token) pairs of --tokens-file (or QBROKER_TOKENS_FILE) and
    QBROKER_TOKENS.

    Raises:
        SystemExit: a file that cannot be read or a bad line (one line, no token).
    """
    pairs: list[tuple[str, str]] = []
    path = ns.tokens_file if ns.tokens_file is not None else _env("TOKENS_FILE", None)
    try:
        if path:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise SystemExit(
                    f"qbroker: cannot read tokens file {path}: {why}"
                ) from None
            pairs += auth.parse_tokens(text, path)
            if not pairs:
                raise SystemExit(f"qbroker: tokens file {path} holds no token")
        pairs += auth.parse_tokens(_env("TOKENS", "") or "", "QBROKER_TOKENS")
    except auth.TokensError as exc:
        raise SystemExit(f"qbroker: {exc}") from None
    if len({t for _, t in pairs}) < len(pairs):
        raise SystemExit("qbroker: a token is given twice (file and QBROKER_TOKENS)")
    return tuple(pairs)


def config_from(ns: argparse.Namespace) -> cfg.Config:
    """Flags beat QBROKER_* environment variables beat defaults."""

    def pick(flag: object, env: str, default: str) -> str:
        if flag is not None:
            return str(flag)
        return _env(env, default) or default

    ready = ns.ready_file if ns.ready_file is not None else _env("READY_FILE", None)
    cert = ns.tls_cert if ns.tls_cert is not None else _env("TLS_CERT", None)
    key = ns.tls_key if ns.tls_key is not None else _env("TLS_KEY", None)
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
        tokens=_tokens(ns),
        tls_cert=Path(cert) if cert else None,
        tls_key=Path(key) if key else None,
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
        scheme = "https" if config.tls_cert is not None else "http"
        print(f"qbroker listening on {scheme}://{config.host}:{port}", flush=True)
        if config.ready_file is not None:
            tmp = config.ready_file.with_name(config.ready_file.name + ".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(config.ready_file)


def _check_tls(config: cfg.Config) -> None:
    """Refuse to start with half a TLS setup or files it cannot use (one line)."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise SystemExit("qbroker: TLS needs both --tls-cert and --tls-key")
    if config.tls_cert is not None and config.tls_key is not None:
        try:
            tls.server_context(config.tls_cert, config.tls_key)
        except tls.TLSConfigError as exc:
            raise SystemExit(f"qbroker: {exc}") from None


def backup(ns: argparse.Namespace) -> int:
    """`qbroker backup DEST`: write the copy beside DEST, then rename it into place,
    so DEST is never half written. Returns the exit status."""
    data_dir = Path(ns.data_dir or _env("DATA_DIR", None) or cfg.DEFAULT_DATA_DIR)
    source = data_dir / cfg.DB_FILENAME
    dest = Path(ns.dest)
    if dest.is_dir():
        dest = dest / cfg.DB_FILENAME
    if not source.is_file():
        raise SystemExit(f"qbroker: no database at {source}; pass --data-dir")
    if dest.exists():
        raise SystemExit(f"qbroker: {dest} exists; give a new file or an empty dir")
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        jobs = schema.backup(source, partial)
        os.replace(partial, dest)
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable
        finally:
            os.close(fd)
    except (errors.QBrokerError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise SystemExit(f"qbroker: backup failed: {exc}") from None
    print(f"qbroker: backed up {jobs} jobs to {dest}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "schedules":
        return schedule_cli.main(ns)
    if ns.command in admin.VERBS:
        return admin.main(ns)
    if ns.command in control_cli.COMMANDS:
        return control_cli.main(ns)
    if ns.command == "backup":
        return backup(ns)
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
    _check_tls(config)
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
