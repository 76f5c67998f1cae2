"""Scoped tokens: which role a bearer token has, and which roles each route allows.

Theory of operation: the broker holds a `Tokens` table built once from `--token`
(admin), `--tokens-file` and `QBROKER_TOKENS`. `Broker.authorize` finds the role of a
request's token before routing (no token, or a wrong one: 401); once routed,
`permit(role, route)` checks the role against `ROUTE_ROLES` (403 naming the roles that
may). A route missing from `ROUTE_ROLES` is admin-only, and the role test fails until
it is listed: adding an endpoint's roles is one line here.

Tokens are compared with `hmac.compare_digest`, every one of them every time, so the
time taken says nothing about how much of a token was right, nor which one matched.
Nothing here logs or repeats a token, not even in an error about a bad tokens file.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping

from qbroker import errors

PRODUCER, WORKER, READ, ADMIN = "producer", "worker", "read", "admin"
ROLES = (PRODUCER, WORKER, READ, ADMIN)  #: every role a token may have
#: the pseudo-role of a request without a token, where one is allowed (/healthz)
OPEN = "open"

#: route name -> the roles besides admin that may call it (admin may call every route)
ROUTE_ROLES: Mapping[str, tuple[str, ...]] = {
    "enqueue": (PRODUCER,),
    "get_job": (PRODUCER, READ),
    "job_result": (PRODUCER, READ),
    "results": (PRODUCER,),
    "cancel": (),
    "lease": (WORKER,),
    "ack": (WORKER,),
    "fail": (WORKER,),
    "extend": (WORKER,),
    "release": (WORKER,),
    "ack_many": (WORKER,),
    "fail_many": (WORKER,),
    "release_many": (WORKER,),
    "queues": (READ,),
    "queue": (READ,),
    "pause_queue": (),
    "resume_queue": (),
    # a queue's purge is "purge" below
    "limits": (READ,),
    # a worker puts the limits its tasks declare (@task(rate_limit=...)) at start
    "put_limit": (WORKER,),
    "delete_limit": (),
    "list_jobs": (READ,),
    "retry_job": (),
    "retry_jobs": (),
    "delete_job": (),
    "cancels": (WORKER,),
    "healthz": (PRODUCER, WORKER, READ, OPEN),
    "metrics": (READ,),
    "openapi": (READ,),
    "purge": (),
    # the key-value store holds Celery's results: producers read them and save
    # groups, workers store them
    "kv_get": (PRODUCER, WORKER),
    "kv_set": (PRODUCER, WORKER),
    "kv_incr": (PRODUCER, WORKER),
    "kv_expire": (PRODUCER, WORKER),
    "kv_delete": (PRODUCER, WORKER),
    "schedules": (READ,),
    "get_schedule": (READ,),
    "put_schedule": (WORKER,),  # a worker sends its code's schedules when it starts
    "delete_schedule": (),
    "pause_schedule": (),
    "resume_schedule": (),
    "run_schedule": (),
    "worker_beat": (WORKER,),
    "workers": (READ,),
}

#: RFC 6750 section 2.1's b64token: what a bearer token may hold (no space, no comma)
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")


class TokensError(ValueError):
    """A tokens file or variable the broker cannot use; the message is one line that
    names the source and line, never the token."""


def roles_for(route: str) -> tuple[str, ...]:
    """The roles that may call `route`, admin last."""
    return (*ROUTE_ROLES.get(route, ()), ADMIN)


def permit(role: str, route: str) -> None:
    """Check that `role` may call `route`.

    Raises:
        errors.Forbidden: it may not; the error names the roles that may.
    """
    if role == ADMIN:
        return
    allowed = ROUTE_ROLES.get(route, ())
    if role in allowed:
        return
    needed = tuple(r for r in roles_for(route) if r != OPEN)
    raise errors.Forbidden(
        f"a {role} token may not call {route}; it needs the {' or '.join(needed)} role",
        roles=needed,
    )


class Tokens:
    """The broker's tokens and their roles. Immutable; safe to share.

    Args:
        pairs: (role, token) pairs; the roles are checked by `parse_tokens`.
    """

    __slots__ = ("_pairs",)

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = tuple((token.encode(), role) for role, token in pairs)

    def role_of(self, given: bytes) -> str | None:
        """The role of the token `given`, or None if it is none of ours. Compares
        with every token, in constant time each (see the module docstring)."""
        found = None
        for token, role in self._pairs:
            if hmac.compare_digest(given, token):
                found = role
        return found


def parse_tokens(text: str, source: str) -> list[tuple[str, str]]:
    """The (role, token) pairs of a tokens file or `QBROKER_TOKENS`: one `role:token`
    per line (or, in the variable, separated by spaces or commas); blank lines and
    lines starting with `#` are skipped.

    Args:
        text: what the file or variable holds.
        source: its name, for error messages ("tokens.txt", "QBROKER_TOKENS").

    Raises:
        TokensError: a line that is not `role:token`, an unknown role, a token with
            characters a bearer token cannot carry, or one token given twice.
    """
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    if source.startswith("QBROKER_"):
        entries = [
            (f"entry {n}", e) for n, e in enumerate(re.split(r"[\s,]+", text), 1)
        ]
    else:
        entries = [(f"line {n}", e) for n, e in enumerate(text.splitlines(), 1)]
    for where, raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        role, sep, token = entry.partition(":")
        role = role.strip()
        token = token.strip()
        if not sep or not token:
            raise TokensError(f"{source}, {where}: expected role:token")
        if role not in ROLES:
            # the role is not repeated: a line written token:role would show the token
            raise TokensError(
                f"{source}, {where}: unknown role; use one of {', '.join(ROLES)}"
            )
        if not _TOKEN_RE.match(token):
            raise TokensError(
                f"{source}, {where}: a token may hold letters, digits and -._~+/ only"
            )
        if token in seen:
            raise TokensError(f"{source}, {where}: this token is given twice")
        seen.add(token)
        pairs.append((role, token))
    return pairs
