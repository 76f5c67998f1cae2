"""Lease tokens. (Job ids are `qclient.wire.new_job_id`, shared with the client.)"""

from __future__ import annotations

import secrets


def new_lease_prefix() -> str:
    """The random part of a lease token; the store appends the job's row number."""
    return secrets.token_hex(8) + "."
