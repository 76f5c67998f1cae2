"""Replies bounded in bytes, whatever the request asks for.

`POST /v1/results` may name 1,000 jobs; with big results that was a reply of a gigabyte
(1,000 times one 1 MB result: 1 GB, 1.9 GiB of RSS, a stalled loop; issue 21 item 1).
The reply takes records in order until the next would pass the budget; the ids left
are listed in `omitted`, for the client to ask again.

Each record is encoded once. They are encoded CHUNK at a time (a list each: a call per
record cost 2.7 times the plain encode of 1,000 small records), a chunk that would pass
the budget one record at a time, and the parts are joined into the `jobs` array by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
from qclient.wire import JobRecord

from qbroker.protocol import Request, Response, encode

CHUNK = 15  #: records encoded in one call; 15 keeps msgpack's array header one byte
_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


def results_reply(
    req: Request, ids: Sequence[str], records: Mapping[str, JobRecord], budget: int
) -> Response:
    """The `ResultsReply` for distinct `ids`: their records (null for an id not in
    `records`) while they fit in `budget` bytes, at least one; the rest `omitted`."""
    msgpack = req.wants_msgpack
    enc = _msgpack if msgpack else _json
    parts: list[bytes] = []  #: encoded records, without their list's framing
    used = taken = 0
    while taken < len(ids):
        chunk = [records.get(i) for i in ids[taken : taken + CHUNK]]
        data = enc.encode(chunk)
        if used + len(data) <= budget:
            parts.append(data[1:] if msgpack else data[1:-1])
            used += len(data)
            taken += len(chunk)
            continue
        for record in chunk:  # the last chunk that fits, if any, one at a time
            data = enc.encode(record)
            used += len(data)
            if used > budget and taken:
                break
            parts.append(data)
            taken += 1
        break
    jobs = _array(parts, taken) if msgpack else b"[" + b",".join(parts) + b"]"
    return encode(req, {"jobs": msgspec.Raw(jobs), "omitted": ids[taken:]})


def _array(parts: list[bytes], n: int) -> bytes:
    """A msgpack array of `n` items encoded in `parts` (the msgpack spec's formats)."""
    if n < 16:
        head = bytes([0x90 | n])
    elif n < 1 << 16:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(parts)
