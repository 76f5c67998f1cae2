"""The reaper's unit: promote due jobs, expire leases and jobs, delete old results.

Each step changes at most SWEEP_BATCH rows, so a backlog falling due at once is worked
off over several writer calls and other writes get their turn between them; `next_due`
then asks for the next sweep at once.
"""

from __future__ import annotations

import json
import sqlite3

from qclient.wire import JobState

from qbroker.store.interface import Changes, Swept
from qbroker.store.sqlite.rows import append_error_sql
from qbroker.store.sqlite.schema import translate_errors

SWEEP_BATCH = 10_000  #: rows one sweep changes at most in each of its steps
_SCHEDULED, _QUEUED, _ACTIVE = JobState.SCHEDULED, JobState.QUEUED, JobState.ACTIVE
_DEAD, _EXPIRED = JobState.DEAD, JobState.EXPIRED
_EXPIRED_ERROR = (
    "'LeaseExpired: the lease ran out before an ack (attempt '"
    " || (attempts - attempt_base) || ' of ' || (max_retries + 1) || ')'"
)
_APPEND_EXPIRED = append_error_sql(_EXPIRED_ERROR, "?1")


def sweep(conn: sqlite3.Connection, now: float) -> Swept:
    """One sweep (see the module docstring); one atomic unit for the writer."""
    changes = Changes()
    made = changes.transitions
    with translate_errors():
        for job_id, queue in conn.execute(
            "UPDATE jobs SET state = 'queued' WHERE seq IN (SELECT seq FROM jobs"
            " WHERE state = 'scheduled' AND available_at <= ? LIMIT ?)"
            " RETURNING id, queue",
            (now, SWEEP_BATCH),
        ).fetchall():
            made.append((job_id, queue, _SCHEDULED, _QUEUED))
        for job_id, queue, state in conn.execute(
            "UPDATE jobs SET"
            " state = CASE WHEN attempts - attempt_base > max_retries"
            "   THEN 'dead' ELSE 'queued' END,"
            " finished_at = CASE WHEN attempts - attempt_base > max_retries"
            "   THEN ?1 ELSE NULL END,"
            " purge_at = CASE WHEN attempts - attempt_base > max_retries"
            "   THEN ?1 + result_ttl END,"
            f" error = {_EXPIRED_ERROR}, errors = {_APPEND_EXPIRED},"
            " lease = NULL, lease_expires_at = NULL"
            " WHERE seq IN (SELECT seq FROM jobs"
            "   WHERE state = 'active' AND lease_expires_at <= ?1 LIMIT ?2)"
            " RETURNING id, queue, state",
            (now, SWEEP_BATCH),
        ).fetchall():
            made.append((job_id, queue, _ACTIVE, _DEAD if state == "dead" else _QUEUED))
        # read first: an UPDATE's RETURNING sees only the new state, not the old
        expiring = conn.execute(
            "SELECT seq, id, queue, state FROM jobs WHERE expires_at <= ?1"
            " AND expires_at IS NOT NULL AND state IN ('queued', 'scheduled') LIMIT ?2",
            (now, SWEEP_BATCH),
        ).fetchall()
        if expiring:
            conn.execute(
                "UPDATE jobs SET state = 'expired', finished_at = ?1,"
                " purge_at = ?1 + result_ttl"
                " WHERE seq IN (SELECT value FROM json_each(?2))",
                (now, json.dumps([r[0] for r in expiring])),
            )
            for _, job_id, queue, state in expiring:
                made.append((job_id, queue, JobState(state), _EXPIRED))
        for job_id, queue, state in conn.execute(
            "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs"
            " WHERE purge_at IS NOT NULL AND purge_at <= ? LIMIT ?)"
            " RETURNING id, queue, state",
            (now, SWEEP_BATCH),
        ).fetchall():
            made.append((job_id, queue, JobState(state), None))
        due = conn.execute(
            "SELECT min(t) FROM ("
            " SELECT min(available_at) AS t FROM jobs WHERE state = 'scheduled'"
            " UNION ALL SELECT min(lease_expires_at) FROM jobs WHERE state = 'active'"
            " UNION ALL SELECT min(expires_at) FROM jobs WHERE expires_at IS NOT NULL"
            "   AND state IN ('queued', 'scheduled')"
            " UNION ALL SELECT min(purge_at) FROM jobs WHERE purge_at IS NOT NULL)"
        ).fetchone()[0]
    return Swept(changes, None if due is None else float(due))
