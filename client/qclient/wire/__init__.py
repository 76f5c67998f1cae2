"""The protocol's one vocabulary: every request, reply and error body of qbroker v1.

The broker, the client and the worker all import their shapes from here, so the wire
has exactly one definition. This package needs msgspec only (no trio, no sqlite3); its
modules hold one part of the protocol each, and everything is imported from
`qclient.wire` itself.

Schema evolution rules (msgspec docs, "schema evolution"): new fields get defaults and
go last; a field never changes type; decoders never forbid unknown fields, so an old
client keeps working against a newer broker.
"""

from qclient.wire import _control, _core, _kv, _schedules, _workers
from qclient.wire._control import *  # noqa: F403
from qclient.wire._core import *  # noqa: F403
from qclient.wire._kv import *  # noqa: F403
from qclient.wire._schedules import *  # noqa: F403
from qclient.wire._workers import *  # noqa: F403

__all__ = [
    *_core.__all__,
    *_schedules.__all__,
    *_control.__all__,
    *_workers.__all__,
    *_kv.__all__,
]
