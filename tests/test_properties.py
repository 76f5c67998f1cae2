"""Property tests (hypothesis): the body decoders, and the job state machine.

Part 1 feeds protocol.decode (sans-IO, no server) random bodies: random bytes, random
JSON and msgpack values, JobSpec-shaped objects with wrong-typed values, truncated
bodies, under every content type. Whatever comes in, decode returns the asked-for type
or raises an errors.py error with status 400, 415 or 422, never anything else; and what
it accepts, the store can keep and the broker can send back as JSON and msgpack.

Part 2 is the store's contract suite: it drives the store through its interface only
(qbroker.store.Store, every verb awaited as the broker does; each backend of
tests/stores.py's `backend` fixture in turn) with a controllable `now`, against a small
Python model of the job state machine. Rules: enqueue, lease (and a resent lease),
ack, ack_many, fail, extend, release, cancel, advance the clock, sweep. Invariants
after every step: every row matches the model; attempts never exceed max_retries + 1;
counts by state add up; each queue says when a lease last named it; every verb
reports exactly the transitions the model made; a stale lease is rejected and changes
nothing (a resent ack, fail or release of the settling lease is answered ok and changes
nothing, too); leases come out by priority, then readiness, then FIFO.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from qbroker import errors, protocol
from qbroker.store import (
    LEASED_AT_STEP,
    Changes,
    Defaults,
    Snapshot,
    Store,
    Transition,
)
from qbroker.store.sqlite.sweep import SWEEP_BATCH
from qclient.wire import (
    MIN_LEASE_SECONDS,
    NAME_PATTERN,
    AckItem,
    AckManyRequest,
    AckRequest,
    ExtendRequest,
    FailManyRequest,
    FailRequest,
    JobSpec,
    JobState,
    LeaseRequest,
    ReleaseItem,
    ReleaseRequest,
)

from tests.stores import Driver, backend

__all__ = ["backend"]  # a fixture, used by name

# ------------------------------------------------------------------ helpers


def attempt(
    fn: Any, *args: Any, **kwargs: Any
) -> tuple[Any, errors.QBrokerError | None]:
    """(fn's value, None), or (None, the broker error it raised); others propagate."""
    try:
        return fn(*args, **kwargs), None
    except errors.QBrokerError as exc:
        return None, exc


# ------------------------------------------------------------------ part 1: decoders

BODY_TYPES: list[type[Any]] = [
    protocol.EnqueueBody,
    LeaseRequest,
    AckRequest,
    FailRequest,
    ExtendRequest,
    ReleaseRequest,
    AckManyRequest,
    FailManyRequest,
]
CONTENT_TYPES: list[bytes | None] = [
    None,
    b"application/json",
    b"application/json; charset=utf-8",
    b"application/msgpack",
    b"application/x-msgpack",
    b"APPLICATION/MSGPACK",
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"text/xml",
    b"multipart/form-data; boundary=x",
]
JSON_TYPES: set[bytes | None] = {
    None,
    b"application/json",
    b"application/json; charset=utf-8",
}
MSGPACK_TYPES: set[bytes | None] = {
    b"application/msgpack",
    b"application/x-msgpack",
    b"APPLICATION/MSGPACK",
}
SPEC_FIELDS = [f.name for f in msgspec.structs.fields(JobSpec)]
ALLOWED_STATUS = {400, 415, 422}

# JSON text can carry any integer; msgpack only 64-bit ones
_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
_msgpack_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=8)
    | st.builds(msgspec.msgpack.Ext, st.integers(0, 127), st.binary(max_size=4))
)
_msgpack_key = (
    st.text(max_size=8) | st.integers(-5, 5) | st.none() | st.booleans() | st.floats()
)
msgpack_values = st.recursive(
    _msgpack_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(_msgpack_key, inner, max_size=4)
    ),
    max_leaves=16,
)
# values near the edges of every JobSpec field, right and wrong
_plausible = st.one_of(
    st.sampled_from(
        [
            0,
            -1,
            1,
            3,
            1000,
            1001,
            1_000_000,
            1_000_001,
            -1_000_001,
            2**63,
            0.5,
            -0.5,
            1e300,
            315360000.0,
            315360001.0,
            604800.0,
            604801.0,
            "",
            "q",
            "a b",
            "x" * 201,
            "ok.id-1:@_",
            [],
            {},
            [1, "a"],
            {"k": [1]},
            None,
            True,
        ]
    ),
    json_values,
)


@st.composite
def jobspec_shaped(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> dict[Any, Any]:
    """A dict with some of JobSpec's keys (and maybe `jobs` or a stray key)."""
    keys = draw(st.lists(st.sampled_from([*SPEC_FIELDS, "jobs", "zzz"]), max_size=6))
    out: dict[Any, Any] = {}
    for k in keys:
        if k == "jobs":
            out[k] = draw(st.lists(st.dictionaries(st.sampled_from(SPEC_FIELDS), values,
                                                   max_size=3), max_size=3))  # fmt: skip
        else:
            out[k] = draw(values)
    return out


@st.composite
def payloads(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> dict[str, Any]:
    """Well-formed requests whose free-form parts (args, kwargs, headers, result) hold
    anything the encoding can carry: what the store must keep and send back."""
    free = {
        "args": draw(st.lists(values, max_size=3)),
        "kwargs": draw(st.dictionaries(st.text(max_size=6), values, max_size=3)),
        "headers": draw(st.dictionaries(st.text(max_size=6), values, max_size=2)),
        "result": draw(values),
        "lease": "t",
        "queues": ["q"],
    }
    if draw(st.booleans()):
        free["acks"] = [{"id": "j", "lease": "t", "result": draw(values)}]
        free["jobs"] = [{"args": draw(st.lists(values, max_size=3))}]
    return free


def _msgpack_or_skip(value: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except (OverflowError, TypeError, ValueError):
        return b"\xc1"  # never valid msgpack


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """(body, content type): mostly matching encodings, sometimes not, sometimes cut."""
    kind = draw(
        st.sampled_from(
            [
                "bytes",
                "json",
                "msgpack",
                "spec-json",
                "spec-msgpack",
                "payload-json",
                "payload-msgpack",
            ]
        )
    )
    if kind == "bytes":
        body = draw(st.binary(max_size=64))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    elif kind == "msgpack":
        body = _msgpack_or_skip(draw(msgpack_values))
    elif kind == "spec-json":
        body = json.dumps(draw(jobspec_shaped(_plausible))).encode()
    elif kind == "spec-msgpack":
        body = _msgpack_or_skip(
            draw(jobspec_shaped(st.one_of(_plausible, msgpack_values)))
        )
    elif kind == "payload-json":
        body = json.dumps(draw(payloads(json_values))).encode()
    else:
        body = _msgpack_or_skip(draw(payloads(msgpack_values)))
    if draw(st.integers(0, 9)) == 0 and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    # mostly the content type that matches the encoding, sometimes any
    matching = [
        t
        for t in CONTENT_TYPES
        if t in (MSGPACK_TYPES if "msgpack" in kind else JSON_TYPES)
    ]
    ctype = draw(
        st.sampled_from(matching if draw(st.integers(0, 3)) else CONTENT_TYPES)
    )
    return body, ctype


def _request(body: bytes, ctype: bytes | None, accept: bytes | None = None) -> Any:
    headers = {} if ctype is None else {b"content-type": ctype}
    if accept is not None:
        headers[b"accept"] = accept
    return protocol.Request("POST", "/v1/x", headers, body)


@pytest.fixture(scope="module")
def scratch(
    tmp_path_factory: pytest.TempPathFactory, backend: Any
) -> Iterator[tuple[Driver, Store]]:
    """One store for every decoder example (the examples use unique ids)."""
    driver = Driver(backend, tmp_path_factory.mktemp("decoders"))
    store = driver.open()
    yield driver, store
    driver.close()


def _lease_all(queue: str, n: int = 1000) -> LeaseRequest:
    return LeaseRequest(queues=[queue], max=n, worker="w")


DEFAULTS = Defaults(max_retries=3, lease_seconds=30.0, result_ttl=1000.0)
_counter = iter(range(10**9))


def _check_storable(driver: Driver, store: Store, value: Any) -> None:
    """What decode accepted can be stored and sent back in both encodings."""
    json_req = _request(b"", None, b"application/json")
    mp_req = _request(b"", None, b"application/msgpack")
    if isinstance(value, protocol.EnqueueBody):
        specs = value.jobs if value.jobs is not None else [value]
        queue = f"q{next(_counter)}"
        done, err = attempt(
            driver.run, store.enqueue_and_hand_off, queue, specs, [],
            defaults=DEFAULTS, now=1e9,
        )  # fmt: skip
        if err is not None:
            assert err.status in {409, 422}, err  # duplicate id/key; delay with eta
            return
        for job_id in done.ids:
            record = driver.run(store.get_job, job_id)
            protocol.encode(json_req, record)
            protocol.encode(mp_req, record)
        leased = driver.run(store.lease, _lease_all(queue), resend=False, now=1e9)
        protocol.encode(json_req, leased.leased.jobs)
        protocol.encode(mp_req, leased.leased.jobs)
    elif isinstance(value, AckRequest | AckManyRequest):
        results = [value.result] if isinstance(value, AckRequest) else [
            a.result for a in value.acks
        ]  # fmt: skip
        for result in results:
            queue = f"q{next(_counter)}"
            [job_id] = driver.run(
                store.enqueue_and_hand_off, queue, [JobSpec()], [],
                defaults=DEFAULTS, now=1e9,
            ).ids  # fmt: skip
            [job] = driver.run(
                store.lease, _lease_all(queue, 1), resend=False, now=1e9
            ).leased.jobs
            _, err = attempt(
                driver.run, store.ack, job_id, job.lease, result, watched=[], now=1e9
            )
            if err is not None:
                assert err.status == 422, err
                continue
            record = driver.run(store.get_job, job_id)
            protocol.encode(json_req, record)
            protocol.encode(mp_req, record)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(type_=st.sampled_from(BODY_TYPES), body=bodies())
def test_decode_raises_only_client_errors_and_what_it_accepts_can_be_stored(
    scratch: tuple[Driver, Store], type_: type[Any], body: tuple[bytes, bytes | None]
) -> None:
    data, ctype = body
    value, err = attempt(protocol.decode, _request(data, ctype), type_)
    if err is not None:
        assert err.status in ALLOWED_STATUS, (err.status, err.message)
        assert err.message
        if err.status == 415:
            assert ctype not in JSON_TYPES | MSGPACK_TYPES
        return
    assert isinstance(value, type_)
    _check_storable(*scratch, value)


# valid job specs: every field in range
names = st.from_regex(NAME_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 40)
_seconds = st.floats(0, 315360000.0, allow_nan=False)
valid_specs = st.fixed_dictionaries(
    {},
    optional={
        "id": names,
        "task": names,
        "args": st.lists(json_values, max_size=3),
        "kwargs": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        "headers": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        "priority": st.integers(-1_000_000, 1_000_000),
        "delay": _seconds,
        "expires": _seconds,
        "max_retries": st.integers(0, 1000),
        "timeout": st.floats(MIN_LEASE_SECONDS, 604800.0),
        "result_ttl": _seconds,
        "dedup_key": names,
    },
)


def _msgpack_safe(spec: dict[str, Any]) -> bool:
    try:
        msgspec.msgpack.encode(spec)
    except OverflowError:
        return False
    return True


@settings(max_examples=150, deadline=None)
@given(specs=st.lists(valid_specs, min_size=1, max_size=4), batch=st.booleans(),
       use_msgpack=st.booleans())  # fmt: skip
def test_valid_specs_round_trip(
    specs: list[dict[str, Any]], batch: bool, use_msgpack: bool
) -> None:
    if use_msgpack and not all(_msgpack_safe(s) for s in specs):
        use_msgpack = False
    payload: Any = {"jobs": specs} if batch else specs[0]
    enc = msgspec.msgpack.encode if use_msgpack else msgspec.json.encode
    ctype = b"application/msgpack" if use_msgpack else b"application/json"
    body = protocol.decode(_request(enc(payload), ctype), protocol.EnqueueBody)
    got = body.jobs if batch else [body]
    assert got is not None and len(got) == (len(specs) if batch else 1)
    defaults = msgspec.structs.asdict(JobSpec())
    for spec, decoded in zip(specs, got, strict=False):
        as_dict = msgspec.structs.asdict(decoded)
        as_dict.pop("jobs", None)
        assert as_dict == {**defaults, **spec}
        # and back: the decoded spec encodes to the fields it came from
        again = msgspec.json.decode(msgspec.json.encode(JobSpec(**as_dict)))
        assert again == msgspec.json.decode(msgspec.json.encode({**defaults, **spec}))


# a value of a type the field never accepts
_WRONG: dict[str, list[Any]] = {
    "id": [1, [], {}, True],
    "task": [1, ["t"], {}],
    "args": [1, "a", {"a": 1}, True],
    "kwargs": [1, "a", [1], True],
    "headers": [1, "a", [1]],
    "priority": ["high", 1.5, [], True, None],
    "delay": ["soon", [], {}, -1],
    "eta": ["now", [], -5],
    "expires": ["never", [], -0.5],
    "max_retries": ["3", 2.5, [], -1],
    "timeout": ["30", 0, -1, []],
    "result_ttl": ["1d", [], -1],
    "dedup_key": [1, [], "has space"],
}


@settings(max_examples=100, deadline=None)
@given(data=st.data(), use_msgpack=st.booleans())
def test_a_wrong_field_gets_422_naming_it(
    data: st.DataObject, use_msgpack: bool
) -> None:
    name = data.draw(st.sampled_from(sorted(_WRONG)))
    bad = data.draw(st.sampled_from(_WRONG[name]))
    good = data.draw(valid_specs)
    good.pop(name, None)
    spec = {**good, name: bad}
    if use_msgpack and not _msgpack_safe(spec):
        use_msgpack = False
    enc = msgspec.msgpack.encode if use_msgpack else msgspec.json.encode
    ctype = b"application/msgpack" if use_msgpack else b"application/json"
    with pytest.raises(errors.InvalidField) as info:
        protocol.decode(_request(enc(spec), ctype), protocol.EnqueueBody)
    assert info.value.status == 422
    assert info.value.field == name, (spec, info.value.message)


# ------------------------------------------------------------------ part 2: state machine

T0 = 1_000_000.0  #: the machine's clock starts here (unix seconds)
QUEUES = ["a", "b"]
UNFINISHED = {"scheduled", "queued", "active"}
FINAL = {"succeeded", "failed", "dead", "cancelled", "expired"}
# every duration is a multiple of 1/4 s, so sums of them are exact in binary floats and
# the model's arithmetic equals the store's
DELAYS = [None, None, 0.0, 0.5, 2.0, 5.0]
LEASES = [None, 0.5, 1.0, 3.0, 10.0]
REQUEST_IDS = ["req-one1", "req-two2"]  #: lease request ids (a client may reuse one)
#: short leases and result_ttl, so that leases run out and results get swept
SM_DEFAULTS = Defaults(max_retries=3, lease_seconds=2.0, result_ttl=15.0)


SPECS = st.fixed_dictionaries(
    {
        "id": st.sampled_from([None, None, None, "j1", "j2", "j3"]),
        "priority": st.sampled_from([0, 0, 0, 1, -1]),
        "delay": st.sampled_from(DELAYS),
        "max_retries": st.integers(0, 2),
        "expires": st.sampled_from([None, None, 0.0, 3.0, 20.0]),
        "timeout": st.sampled_from([None, 1.0, 5.0]),
        "result_ttl": st.sampled_from([None, 2.0, 10.0]),
        "dedup_key": st.sampled_from([None, None, None, "k"]),
    }
)


@dataclasses.dataclass
class MJob:
    """The model's view of one job row."""

    id: str
    queue: str
    priority: int
    order: int  #: insertion order
    max_retries: int
    timeout: float
    result_ttl: float
    available_at: float
    expires_at: float | None
    dedup_key: str | None
    state: str
    attempts: int = 0
    lease: str | None = None
    lease_seconds: float | None = None
    lease_expires_at: float | None = None
    finished_at: float | None = None
    released: bool = False  #: its last lease ended in a release (the token stays)

    @property
    def purge_at(self) -> float | None:
        if self.finished_at is None:
            return None
        return self.finished_at + self.result_ttl

    def finish(self, state: str, now: float, *, keep_lease: bool = False) -> None:
        """`keep_lease`: the row's lease token stays (an ack or fail keeps its own;
        an expiry leaves a scheduled retry's as it was)."""
        self.state = state
        self.finished_at = now
        if not keep_lease:
            self.lease = None
        self.lease_expires_at = None

    def row(self) -> tuple[Any, ...]:
        return (
            self.id, self.queue, self.state, self.attempts, self.priority,
            self.max_retries, self.available_at, self.expires_at, self.finished_at,
            self.purge_at, self.lease, self.lease_expires_at, self.dedup_key,
        )  # fmt: skip


def _t(job: MJob, old: str | None, new: str | None) -> Transition:
    return (
        job.id,
        job.queue,
        None if old is None else JobState(old),
        None if new is None else JobState(new),
    )


def _same(got: Changes, want: list[Transition]) -> None:
    """A verb reported exactly the transitions the model made (in any order)."""
    assert Counter(got.transitions) == Counter(want), (got.transitions, want)


class JobMachine(RuleBasedStateMachine):
    """The store against the model, one rule at a time, through the interface only."""

    def __init__(self, opener: Any) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="qbroker-sm-"))
        self.driver = Driver(opener, self.dir)
        self.store = self.driver.open()
        self.now = T0
        self.model: dict[str, MJob] = {}
        self.order = 0
        self.ids: list[str] = []  #: every job id ever stored (some since purged)
        self.tokens: list[tuple[str, str]] = []  #: every (job id, lease) handed out
        self.leased_at: dict[str, float] = {}  #: queue -> last time a lease named it
        self.made: set[str] = set()  #: queues enqueued to or leased from

    def teardown(self) -> None:
        self.driver.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -------------------------------------------------------- helpers

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.driver.run(fn, *args, **kwargs)

    def snapshot(self) -> Snapshot:
        snap: Snapshot = self.run(self.store.snapshot)
        return snap

    def lease_valid(self, job_id: str, token: str) -> bool:
        job = self.model.get(job_id)
        return (
            job is not None
            and job.state == "active"
            and job.lease == token
            and job.lease_expires_at is not None
            and job.lease_expires_at > self.now
        )

    def resent(self, job_id: str, token: str, kind: str) -> bool:
        """Whether an ack / fail / release with `token` repeats the one that settled
        the job's delivery."""
        job = self.model.get(job_id)
        states = {
            "ack": ("succeeded",),
            "fail": ("scheduled", "queued", "failed"),
            "release": ("queued",),
        }[kind]
        return (
            job is not None
            and job.lease == token
            and job.state in states
            and job.released == (kind == "release")
        )

    def expect_resent(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A resent ack, fail or release succeeds, reports no transition and changes
        nothing."""
        before = self.snapshot()
        got = self.run(fn, *args, **kwargs)
        assert self.snapshot() == before
        changes = got if isinstance(got, Changes) else got.changes
        assert changes.transitions == []
        event(f"{fn.__name__}: resend answered ok")
        return got

    def pick_lease(self, data: st.DataObject) -> tuple[str, str]:
        """Mostly a lease that is still valid, sometimes any lease ever handed out."""
        valid = [t for t in self.tokens if self.lease_valid(*t)]
        pool = valid if valid and data.draw(st.integers(0, 9)) < 7 else self.tokens
        pick: tuple[str, str] = data.draw(st.sampled_from(pool))
        return pick

    def expect_rejected(self, job_id: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """A call with a stale lease raises StaleLease (or JobNotFound) and changes nothing."""
        before = self.snapshot()
        want = errors.StaleLease if job_id in self.model else errors.JobNotFound
        with pytest.raises(want):
            self.run(fn, *args, **kwargs)
        assert self.snapshot() == before
        event(f"{fn.__name__}: stale lease rejected")

    def ready(self, queue: str) -> list[MJob]:
        """The jobs a lease of `queue` would take now, in lease order."""
        return sorted(
            (
                j
                for j in self.model.values()
                if j.queue == queue
                and j.state == "queued"
                and (j.expires_at is None or j.expires_at > self.now)
            ),
            key=lambda j: (-j.priority, j.available_at, j.order),
        )

    # -------------------------------------------------------- rules: producer

    @initialize(
        queue=st.sampled_from(QUEUES), specs=st.lists(SPECS, min_size=2, max_size=6)
    )
    def seed(self, queue: str, specs: list[dict[str, Any]]) -> None:
        self.enqueue(queue, specs)

    @rule(queue=st.sampled_from(QUEUES), specs=st.lists(SPECS, min_size=1, max_size=4))
    def enqueue(self, queue: str, specs: list[dict[str, Any]]) -> None:
        # a repeat inside the batch, else the first row that clashes with a stored
        # job decides the error (the INSERTs stop there)
        ids: set[str] = {j.id for j in self.model.values()}
        keys: set[str] = {
            j.dedup_key
            for j in self.model.values()
            if j.queue == queue and j.state in UNFINISHED and j.dedup_key is not None
        }
        clash: set[type[errors.QBrokerError]] = set()
        for name in ("id", "dedup_key"):  # a repeat inside the batch is bad input
            given = [s[name] for s in specs if s[name] is not None]
            if len(set(given)) < len(given):
                clash.add(errors.InvalidField)
        for s in specs:
            if clash:
                break
            if s["id"] is not None and s["id"] in ids:
                clash.add(errors.DuplicateId)
            if s["dedup_key"] is not None and s["dedup_key"] in keys:
                clash.add(errors.DuplicateDedupKey)
            if s["id"] is not None:
                ids.add(s["id"])
            if s["dedup_key"] is not None:
                keys.add(s["dedup_key"])
        wire_specs = [JobSpec(**s) for s in specs]
        call: tuple[Any, ...] = (self.store.enqueue_and_hand_off, queue, wire_specs, [])
        if clash:
            before = self.snapshot()
            with pytest.raises(errors.QBrokerError) as info:
                self.run(*call, defaults=SM_DEFAULTS, now=self.now)
            assert type(info.value) in clash, (info.value, clash)
            assert self.snapshot() == before  # all or nothing
            return
        done = self.run(*call, defaults=SM_DEFAULTS, now=self.now)
        assert len(done.ids) == len(specs)
        assert done.leased == []
        made = []
        for job_id, s in zip(done.ids, specs, strict=True):
            if s["id"] is not None:
                assert job_id == s["id"]
            available = self.now + (s["delay"] or 0.0)
            self.order += 1
            job = self.model[job_id] = MJob(
                id=job_id,
                queue=queue,
                priority=s["priority"],
                order=self.order,
                max_retries=s["max_retries"],
                timeout=s["timeout"] or SM_DEFAULTS.lease_seconds,
                result_ttl=SM_DEFAULTS.result_ttl
                if s["result_ttl"] is None
                else s["result_ttl"],
                available_at=available,
                expires_at=None if s["expires"] is None else self.now + s["expires"],
                dedup_key=s["dedup_key"],
                state="scheduled" if available > self.now else "queued",
            )
            made.append(_t(job, None, job.state))
            self.ids.append(job_id)
        _same(done.changes, made)
        due = [j.available_at for j in self.model.values()
               if j.id in done.ids and j.state == "scheduled"]  # fmt: skip
        due += [self.model[i].expires_at or math.inf for i in done.ids]
        assert done.changes.due == min(due)
        self.made.add(queue)

    @rule(
        queue=st.sampled_from(QUEUES),
        n_specs=st.integers(1, 3),
        max_jobs=st.sampled_from([1, 2]),
        lease_seconds=st.sampled_from(LEASES),
    )
    def enqueue_and_hand_off(
        self, queue: str, n_specs: int, max_jobs: int, lease_seconds: float | None
    ) -> None:
        """An enqueue that leases for a parked long-poll in the same unit: the
        hand-off gets what a lease right after the enqueue would."""
        request = LeaseRequest(
            queues=[queue], max=max_jobs, timeout=lease_seconds, worker="w"
        )
        specs = [JobSpec() for _ in range(n_specs)]
        done = self.run(
            self.store.enqueue_and_hand_off, queue, specs, [request],
            defaults=SM_DEFAULTS, now=self.now,
        )  # fmt: skip
        made = []
        for job_id in done.ids:
            self.order += 1
            job = self.model[job_id] = MJob(
                id=job_id, queue=queue, priority=0, order=self.order,
                max_retries=SM_DEFAULTS.max_retries,
                timeout=SM_DEFAULTS.lease_seconds, result_ttl=SM_DEFAULTS.result_ttl,
                available_at=self.now, expires_at=None, dedup_key=None, state="queued",
            )  # fmt: skip
            made.append(_t(job, None, "queued"))
            self.ids.append(job_id)
        [leased] = done.leased
        made += self.check_lease([queue], max_jobs, lease_seconds, None, leased)
        _same(done.changes, made)
        self.made.add(queue)
        event("enqueue: handed off")

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.ids))
        job = self.model.get(job_id)
        if job is None:
            with pytest.raises(errors.JobNotFound):
                self.run(self.store.cancel, job_id, watched=[], now=self.now)
            return
        done = self.run(self.store.cancel, job_id, watched=[job_id], now=self.now)
        if job.state in UNFINISHED:
            # an active job keeps its token, so its worker learns of it at extend
            _same(done.changes, [_t(job, job.state, "cancelled")])
            job.state, job.finished_at = "cancelled", self.now
            assert done.changes.records[job_id].state == "cancelled"
        else:
            _same(done.changes, [])
        assert done.state == job.state

    # -------------------------------------------------------- rules: worker

    def check_lease(
        self,
        queues: list[str],
        max_jobs: int,
        lease_seconds: float | None,
        request_id: str | None,
        got: Any,
    ) -> list[Transition]:
        """Check a fresh lease's jobs against the model and apply it; returns the
        transitions it must have reported."""
        want: list[MJob] = []
        for q in queues:
            ready = [j for j in self.ready(q) if j.id not in {w.id for w in want}]
            cut = ready[: max_jobs - len(want)]
            if len(ready) > len(cut) and cut:
                event("lease: more ready than asked for")
                fifo = sorted(ready, key=lambda j: (-j.priority, j.order))
                if fifo[: len(cut)] != cut:
                    event("lease: a later-enqueued job was ready first")
            want += cut
        # priority first, then the job ready first, then FIFO; queues in the order asked
        assert [g.id for g in got.jobs] == [j.id for j in want]
        assert not got.again
        for g in got.jobs:
            j = self.model[g.id]
            j.state, j.attempts, j.lease = "active", j.attempts + 1, g.lease
            j.released = False
            j.lease_seconds = lease_seconds or j.timeout
            j.lease_expires_at = self.now + j.lease_seconds
            assert g.attempt == j.attempts
            assert g.lease_expires_at == j.lease_expires_at
            assert j.attempts <= j.max_retries + 1
            if request_id is not None:
                assert g.lease.startswith(request_id + ":")
            self.tokens.append((g.id, g.lease))
        more = len(want) >= max_jobs and any(self.ready(q) for q in queues)
        assert got.more == more
        self.named(queues)
        return [_t(j, "queued", "active") for j in want]

    def named(self, queues: list[str]) -> None:
        """A lease request named `queues`."""
        for q in queues:
            self.leased_at[q] = self.now
        self.made.update(queues)

    def check_leased_at(self, queue: str, stored: float | None) -> None:
        """A queue says when a lease last named it, to within LEASED_AT_STEP."""
        last = self.leased_at.get(queue)
        if last is None:
            assert stored is None, queue
        else:
            assert stored is not None and last - LEASED_AT_STEP < stored <= last

    @rule(
        queues=st.lists(st.sampled_from(QUEUES), min_size=1, max_size=3),
        max_jobs=st.integers(1, 4),
        lease_seconds=st.sampled_from(LEASES),
        request_id=st.sampled_from([None, None, *REQUEST_IDS]),
    )
    def lease(
        self,
        queues: list[str],
        max_jobs: int,
        lease_seconds: float | None,
        request_id: str | None,
    ) -> None:
        request = LeaseRequest(
            queues=queues, max=max_jobs, timeout=lease_seconds, worker="w",
            request_id=request_id,
        )  # fmt: skip
        done = self.run(self.store.lease, request, resend=False, now=self.now)
        made = self.check_lease(
            queues, max_jobs, lease_seconds, request_id, done.leased
        )
        _same(done.changes, made)
        assert done.results == []

    @rule(
        request_id=st.sampled_from(REQUEST_IDS),
        queues=st.lists(st.sampled_from(QUEUES), min_size=1, max_size=3),
        max_jobs=st.integers(1, 4),
    )
    def resent_lease(self, request_id: str, queues: list[str], max_jobs: int) -> None:
        """A resent lease gets back the active, unexpired jobs leased under its
        request id, in lease order (queues as first named, priority, readiness, FIFO),
        changing nothing; with none, it leases afresh."""
        first: dict[str, int] = {}
        for i, q in enumerate(queues):
            first.setdefault(q, i)
        want = sorted(
            (
                j
                for j in self.model.values()
                if j.state == "active"
                and j.lease is not None
                and j.lease.startswith(request_id + ":")
                and j.lease_expires_at is not None
                and j.lease_expires_at > self.now
            ),
            key=lambda j: (
                first.get(j.queue, len(first)),
                -j.priority,
                j.available_at,
                j.order,
            ),
        )
        request = LeaseRequest(
            queues=queues, max=max_jobs, worker="w", request_id=request_id, resend=True
        )
        before = self.snapshot()
        done = self.run(self.store.lease, request, resend=True, now=self.now)
        if not want:
            made = self.check_lease(queues, max_jobs, None, request_id, done.leased)
            _same(done.changes, made)
            return
        event("resent lease: got its jobs again")
        got = done.leased
        assert got.again
        assert [(g.id, g.lease, g.attempt) for g in got.jobs] == [
            (j.id, j.lease, j.attempts) for j in want
        ]
        _same(done.changes, [])
        assert self.snapshot().jobs == before.jobs  # only last_leased_at may move
        self.named(queues)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        job_id, token = self.pick_lease(data)
        ack = self.store.ack
        if self.resent(job_id, token, "ack"):
            self.expect_resent(ack, job_id, token, 2, watched=[], now=self.now)
            return
        if not self.lease_valid(job_id, token):
            self.expect_rejected(
                job_id, ack, job_id, token, 1, watched=[], now=self.now
            )
            return
        changes = self.run(ack, job_id, token, {"r": 1}, watched=[job_id], now=self.now)
        job = self.model[job_id]
        _same(changes, [_t(job, "active", "succeeded")])
        job.finish("succeeded", self.now, keep_lease=True)
        assert changes.records[job_id].result == {"r": 1}
        assert self.run(self.store.get_job, job_id).result == {"r": 1}

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 4))
    def ack_many(self, data: st.DataObject, n: int) -> None:
        leases_ = [self.pick_lease(data) for _ in range(n)]
        items = [AckItem(id=i, lease=t, result=n) for n, (i, t) in enumerate(leases_)]
        want: list[str | None] = []
        acked: dict[str, str] = {}  #: job id -> the token this batch acked it with
        for i, t in leases_:
            if self.lease_valid(i, t) and i not in acked:
                acked[i] = t
                want.append(None)
            elif acked.get(i) == t or (i not in acked and self.resent(i, t, "ack")):
                want.append(None)  # a resend: of an item before it, or of a past ack
                event("ack_many: resend answered ok")
            else:
                want.append("stale_lease" if i in self.model else "job_not_found")
        done = self.run(
            self.store.settle_and_lease, items, [], None, resend=False, watched=[],
            now=self.now,
        )  # fmt: skip
        assert [(r.id, r.ok, r.error) for r in done.results] == [
            (i, e is None, e) for (i, _), e in zip(leases_, want, strict=True)
        ]
        _same(done.changes, [_t(self.model[i], "active", "succeeded") for i in acked])
        for i in acked:
            self.model[i].finish("succeeded", self.now, keep_lease=True)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), retry_in=st.sampled_from([None, 0.0, 0.5, 2.0]))
    def fail(self, data: st.DataObject, retry_in: float | None) -> None:
        job_id, token = self.pick_lease(data)
        fail = self.store.fail
        if self.resent(job_id, token, "fail"):
            done = self.expect_resent(
                fail, job_id, token, error="E: y", traceback=None, retry_in=retry_in,
                watched=[], now=self.now,
            )  # fmt: skip
            settled = self.model[job_id].state
            assert done.state == ("failed" if settled == "failed" else "scheduled")
            return
        if not self.lease_valid(job_id, token):
            self.expect_rejected(
                job_id, fail, job_id, token, error="E: x", traceback=None,
                retry_in=retry_in, watched=[], now=self.now,
            )  # fmt: skip
            return
        done = self.run(
            fail, job_id, token, error="E: x", traceback=None, retry_in=retry_in,
            watched=[job_id], now=self.now,
        )  # fmt: skip
        job = self.model[job_id]
        if retry_in is not None:
            job.available_at = self.now + retry_in
        if retry_in is not None and job.attempts <= job.max_retries:
            _same(done.changes, [_t(job, "active", "scheduled")])
            job.state, job.lease_expires_at = "scheduled", None  # the token stays
            assert done.changes.due == job.available_at
            assert done.changes.records == {}
        else:
            _same(done.changes, [_t(job, "active", "failed")])
            job.finish("failed", self.now, keep_lease=True)
            assert done.changes.records[job_id].state == "failed"
        assert done.state == job.state

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), lease_seconds=st.sampled_from(LEASES))
    def extend(self, data: st.DataObject, lease_seconds: float | None) -> None:
        job_id, token = self.pick_lease(data)
        job = self.model.get(job_id)
        extend = self.store.extend
        if self.lease_valid(job_id, token):
            assert job is not None
            done = self.run(
                extend, job_id, token, lease_seconds=lease_seconds, now=self.now
            )
            job.lease_seconds = lease_seconds or job.lease_seconds
            assert job.lease_seconds is not None
            job.lease_expires_at = self.now + job.lease_seconds
            assert (done.lease_expires_at, done.cancelled) == (
                job.lease_expires_at,
                False,
            )
            assert done.changes.due == job.lease_expires_at
            _same(done.changes, [])
        elif job is not None and job.state == "cancelled" and job.lease == token:
            before = self.snapshot()
            done = self.run(
                extend, job_id, token, lease_seconds=lease_seconds, now=self.now
            )
            assert (done.lease_expires_at, done.cancelled) == (self.now, True)
            assert self.snapshot() == before
        else:
            self.expect_rejected(
                job_id, extend, job_id, token, lease_seconds=lease_seconds, now=self.now
            )

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), many=st.booleans())
    def release(self, data: st.DataObject, many: bool) -> None:
        job_id, token = self.pick_lease(data)
        release = self.store.release
        if self.resent(job_id, token, "release"):
            self.expect_resent(release, job_id, token, now=self.now)
            return
        if not self.lease_valid(job_id, token):
            self.expect_rejected(job_id, release, job_id, token, now=self.now)
            return
        job = self.model[job_id]
        if many:
            done = self.run(
                self.store.release_many,
                [ReleaseItem(id=job_id, lease=token)],
                now=self.now,
            )
            assert [(r.id, r.ok) for r in done.results] == [(job_id, True)]
            changes = done.changes
        else:
            changes = self.run(release, job_id, token, now=self.now)
        _same(changes, [_t(job, "active", "queued")])
        job.state, job.attempts = "queued", max(job.attempts - 1, 0)
        job.lease_expires_at, job.released = None, True  # the token stays

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), token=st.sampled_from(["", "nope", "0123456789abcdef.1"]))
    def ack_with_a_made_up_token(self, data: st.DataObject, token: str) -> None:
        job_id = data.draw(st.sampled_from(self.ids))
        self.expect_rejected(
            job_id, self.store.ack, job_id, token, None, watched=[], now=self.now
        )

    # -------------------------------------------------------- rules: time

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0]))
    def advance_clock(self, dt: float) -> None:
        self.now += dt

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0, 10.0]))
    def advance_clock_then_sweep(self, dt: float) -> None:
        self.now += dt
        self.sweep()

    @precondition(lambda self: self.model)
    @rule()
    def sweep(self) -> None:
        now = self.now
        got = self.run(self.store.sweep, now=now)
        made: list[Transition] = []
        for j in self.model.values():
            if j.state == "scheduled" and j.available_at <= now:
                made.append(_t(j, "scheduled", "queued"))
                j.state = "queued"
        for j in self.model.values():
            if (
                j.state == "active"
                and j.lease_expires_at is not None
                and (j.lease_expires_at <= now)
            ):
                if j.attempts > j.max_retries:
                    made.append(_t(j, "active", "dead"))
                    j.finish("dead", now)
                else:
                    made.append(_t(j, "active", "queued"))
                    j.state, j.lease, j.lease_expires_at = "queued", None, None
        for j in self.model.values():
            if (
                j.state in ("queued", "scheduled")
                and j.expires_at is not None
                and (j.expires_at <= now)
            ):
                made.append(_t(j, j.state, "expired"))
                j.finish("expired", now, keep_lease=True)  # a failed try's token stays
        for job_id in [
            i
            for i, j in self.model.items()
            if j.purge_at is not None and j.purge_at <= now
        ]:
            gone = self.model.pop(job_id)
            made.append(_t(gone, gone.state, None))
        for t in made:
            event(f"sweep: {t[2]} -> {t[3]}")
        _same(got.changes, made)
        due = [
            t
            for j in self.model.values()
            for t in (
                j.available_at if j.state == "scheduled" else None,
                j.lease_expires_at if j.state == "active" else None,
                j.expires_at if j.state in ("queued", "scheduled") else None,
                j.purge_at,
            )
            if t is not None
        ]
        assert got.next_due == (min(due) if due else None)

    # -------------------------------------------------------- invariants

    @invariant()
    def rows_match_the_model(self) -> None:
        snap = self.snapshot()
        rows = [
            (
                r.record.id, r.record.queue, r.record.state, r.record.attempts,
                r.record.priority, r.record.max_retries, r.record.available_at,
                r.record.expires_at, r.record.finished_at, r.purge_at, r.lease,
                r.lease_expires_at, r.record.dedup_key,
            )
            for r in snap.jobs
        ]  # fmt: skip
        want = [j.row() for j in sorted(self.model.values(), key=lambda j: j.order)]
        assert rows == want
        # attempts never exceed max_retries + 1
        assert all(r.record.attempts <= r.record.max_retries + 1 for r in snap.jobs)
        # a queue's row is made by its first enqueue or lease, and says when a lease
        # last named it, to within LEASED_AT_STEP
        assert {q.name for q in snap.queues} == self.made
        for q in snap.queues:
            self.check_leased_at(q.name, q.last_leased_at)
            assert not q.paused

    @invariant()
    def counts_by_state_add_up(self) -> None:
        for q in QUEUES:
            stats = self.run(self.store.queue_stats, q, now=self.now)
            in_queue = [j for j in self.model.values() if j.queue == q]
            assert sum(stats.counts.values()) == len(in_queue)
            for state, n in stats.counts.items():
                assert n == sum(1 for j in in_queue if j.state == state), state
            ready = [j.available_at for j in in_queue if j.state == "queued"]
            assert stats.oldest_age == (
                max(0.0, self.now - min(ready)) if ready else None
            )
            self.check_leased_at(q, stats.last_leased_at)


SM_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_job_state_machine(backend: Any) -> None:
    class Machine(JobMachine):
        def __init__(self) -> None:
            super().__init__(backend)

    run_state_machine_as_test(Machine, settings=SM_SETTINGS)


@pytest.fixture
def driven(backend: Any, tmp_path: Path) -> Iterator[tuple[Driver, Store]]:
    driver = Driver(backend, tmp_path)
    store = driver.open()
    yield driver, store
    driver.close()


def test_lease_order_is_priority_then_ready_time_then_fifo(
    driven: tuple[Driver, Store],
) -> None:
    """The state machine checks this too, but only finds the retry/delay cases by luck."""
    driver, store = driven
    now = T0

    def enqueue(**spec: Any) -> str:
        done = driver.run(
            store.enqueue_and_hand_off, "q", [JobSpec(**spec)], [],
            defaults=SM_DEFAULTS, now=now,
        )  # fmt: skip
        return str(done.ids[0])

    def lease(n: int) -> list[Any]:
        done = driver.run(
            store.lease, LeaseRequest(queues=["q"], max=n, worker="w"), resend=False,
            now=now,
        )  # fmt: skip
        return list(done.leased.jobs)

    late = enqueue(delay=2.0)  # enqueued first, ready at T0 + 2
    retried = enqueue()  # ready at T0, fails, ready again at T0 + 1
    [job] = lease(1)
    assert job.id == retried
    driver.run(store.fail, retried, job.lease, error="E", traceback=None,
               retry_in=1.0, watched=[], now=now)  # fmt: skip
    now += 0.5
    plain = enqueue()  # ready at T0 + 0.5
    urgent = enqueue(priority=5)  # ready last, but a higher priority
    now += 3.0
    driver.run(store.sweep, now=now)
    # one at a time, so the store's order decides, not a sort of the reply
    assert [lease(1)[0].id for _ in range(4)] == [urgent, plain, retried, late]


def test_a_sweep_changes_at_most_one_batch_and_asks_for_the_next_at_once(
    tmp_path: Path,
) -> None:
    """A backlog falling due at once is worked off over several writer calls (SQLite's
    SWEEP_BATCH)."""
    from tests.stores import BACKENDS

    driver = Driver(BACKENDS["sqlite"], tmp_path)
    store = driver.open()
    n = SWEEP_BATCH * 2 + 5
    for start in range(0, n, 5000):
        specs = [JobSpec(eta=T0 + 1) for _ in range(min(5000, n - start))]
        driver.run(
            store.enqueue_and_hand_off, "q", specs, [], defaults=SM_DEFAULTS, now=T0
        )
    now = T0 + 2

    def queued() -> int:
        return int(driver.run(store.queue_stats, "q", now=now).counts["queued"])

    seen = []
    for _ in range(3):
        result = driver.run(store.sweep, now=now)
        seen.append(queued())
        if seen[-1] < n:  # more is due: the reaper is asked to sweep again at once
            assert result.next_due is not None and result.next_due <= now
    assert seen == [SWEEP_BATCH, 2 * SWEEP_BATCH, n]
    driver.close()
