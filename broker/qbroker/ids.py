"""Lease tokens. (Job ids are `qclient.wire.new_job_id`, shared with the client.)"""

from __future__ import annotations

import secrets


def new_lease_prefix(request_id: str | None = None) -> str:
    """The start of a lease token, random; the store appends the job's row number.

    With a lease request's `request_id` the token starts `request_id:`, so the jobs a
    request leased can be found again by that prefix (`request_prefix`); the random
    part still makes each delivery's token its own, even if a client reuses an id.
    """
    random = secrets.token_hex(8) + "."
    return random if request_id is None else request_prefix(request_id) + random


def request_prefix(request_id: str) -> str:
    """How the tokens of a lease request with `request_id` start. (An id has no ':',
    so one id's prefix is never the start of another's.)"""
    return request_id + ":"
