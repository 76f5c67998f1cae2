"""The store: all state, behind one interface of verbs (interface.py), with one
package per backend (sqlite/). Nothing outside store/ speaks SQL."""

from qbroker.store.interface import (
    LEASED_AT_STEP as LEASED_AT_STEP,
    NOTHING_LEASED as NOTHING_LEASED,
    Cancelled as Cancelled,
    Changes as Changes,
    Defaults as Defaults,
    Enqueued as Enqueued,
    Extended as Extended,
    Failed as Failed,
    Fired as Fired,
    JobRow as JobRow,
    Leased as Leased,
    Purged as Purged,
    QueueRow as QueueRow,
    Released as Released,
    Retried as Retried,
    Settled as Settled,
    Snapshot as Snapshot,
    Store as Store,
    Swept as Swept,
    Transition as Transition,
)
