"""The broker's handlers: one async function per route, over the writer and the reader.

Writes go through the group-commit writer (their reply follows the commit); reads run on
reader connections in the reader threads (readers.py); long-polls park on `Waiters`, woken
inside the broker by the write that makes them worth retrying, and an enqueue may lease
jobs for parked lease long-polls in its own commit. Nothing here touches SQLite on the
trio loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
import prometheus_client
import trio
from qclient.wire import (
    FINAL_STATES,
    AckItem,
    AckManyRequest,
    AckRequest,
    BatchReply,
    BatchResult,
    CancelReply,
    EnqueueManyReply,
    EnqueueReply,
    ExtendReply,
    ExtendRequest,
    FailItem,
    FailManyRequest,
    FailRequest,
    Health,
    JobRecord,
    LeasedJob,
    LeaseReply,
    LeaseRequest,
    QueueList,
    ReleaseManyRequest,
    ReleaseRequest,
    ResultsRequest,
)

from qbroker import __version__, auth, errors, metrics, openapi
from qbroker.clock import Clock
from qbroker.config import RESULTS_REPLY_BYTES, Config
from qbroker.guards import FileGuard, FreeSpaceFloor
from qbroker.protocol import (
    BIG_BODY,
    EnqueueBody,
    Request,
    Response,
    decode,
    encode,
    query_float,
)
from qbroker.readers import ReadThreads
from qbroker.replies import results_reply
from qbroker.store import Defaults, Reader, Store
from qbroker.writer import Call, Writer

MAX_RESULT_WAIT = 300.0  #: seconds a result long-poll may ask for
_EMPTY: dict[str, Any] = {}  #: the reply of an ack or a release
T = TypeVar("T")


class Leased(NamedTuple):
    """What a lease got, and whether more was ready in its queues than it asked for."""

    jobs: list[LeasedJob]
    more: bool = False
    again: bool = False  #: the jobs a resent request leased before (counted then)


class Slot:
    """One parked task: its wake-up event, and what the notifier handed over, if any.

    A lease long-poll also carries its request; while it is `parked` an enqueue may
    `claim` it and lease jobs for it in the enqueue's own commit (`handoff` is set
    once that commit is done, `value` then holds the jobs).

    A slot parked under many keys (`many`) collects what each notify hands over in
    `values`, by key, instead; its owner drains them and swaps in a fresh `event`.
    """

    __slots__ = ("alive", "event", "handoff", "parked", "request", "value", "values")

    def __init__(
        self,
        request: LeaseRequest | None = None,
        many: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.values: dict[str, Any] | None = {} if many else None
        self.request = request
        self.alive = alive  #: whether the long-poll's client is still connected
        self.parked = False
        self.handoff: trio.Event | None = None


class Waiters:
    """Tasks parked until a key (a queue name or a job id) is notified.

    Not thread-safe: use from the trio thread only.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, dict[Slot, None]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def register(
        self,
        keys: Iterable[str],
        request: LeaseRequest | None = None,
        *,
        many: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> _Registration:
        """Park a slot under `keys` for a `with` block (which gets the Slot); register
        before checking state, so a notify between the check and the wait is not lost."""
        return _Registration(self._by_key, list(keys), Slot(request, many, alive))

    def notify(self, key: str, n: int | None = None, value: Any = None) -> None:
        """Wake up to `n` waiters of `key` (all when None), oldest first, handing
        each `value` (when not None).

        Counted against `n` are only the waiters that will act on the wake-up: not
        one an enqueue has claimed (it gets that enqueue's jobs anyway), nor one
        whose client has gone (woken to end, it leases nothing). Either would take
        the wake-up from a live long-poll behind it, leaving jobs ready and it asleep.
        """
        waiting = self._by_key.get(key)
        if not waiting:
            return
        for slot in waiting:
            if n is not None and n <= 0:
                break
            if slot.values is not None:
                slot.values[key] = value
                slot.event.set()
            elif not slot.event.is_set():
                if n is not None and slot.handoff is not None:
                    continue
                if value is not None:
                    slot.value = value
                slot.event.set()
                if n is not None and (slot.alive is None or slot.alive()):
                    n -= 1

    def claim(self, key: str, jobs: int) -> list[Slot]:
        """Parked lease long-polls of `key`, oldest first, enough to take `jobs`
        jobs; each is marked claimed (see Slot) and must be handed its jobs. A
        long-poll whose client has gone is woken to end instead: jobs leased for it
        would sit active until their lease ran out."""
        taken: list[Slot] = []
        for slot in self._by_key.get(key, ()):
            if jobs <= 0:
                break
            if slot.parked and slot.handoff is None and not slot.event.is_set():
                assert slot.request is not None
                if slot.alive is not None and not slot.alive():
                    slot.event.set()
                    continue
                slot.handoff = trio.Event()
                taken.append(slot)
                jobs -= slot.request.max
        return taken

    def notify_all(self) -> None:
        for waiting in self._by_key.values():
            for slot in waiting:
                slot.event.set()


class _Registration:
    """`Waiters.register`'s context manager: a plain class, as a lease or result
    request enters one each (the @contextmanager generator cost 0.6 us more)."""

    __slots__ = ("_by_key", "_keys", "_slot")

    def __init__(
        self, by_key: dict[str, dict[Slot, None]], keys: list[str], slot: Slot
    ) -> None:
        self._by_key = by_key
        self._keys = keys
        self._slot = slot

    def __enter__(self) -> Slot:
        for k in self._keys:
            self._by_key.setdefault(k, {})[self._slot] = None
        return self._slot

    def __exit__(self, *exc_info: object) -> None:
        for k in self._keys:
            waiting = self._by_key.get(k)
            if waiting is not None:
                waiting.pop(self._slot, None)
                if not waiting:
                    del self._by_key[k]


class Broker:
    """Everything a handler needs. Lives for one `serve()` run."""

    def __init__(
        self,
        config: Config,
        writer: Writer,
        reader: Reader,
        reads: ReadThreads,
        clock: Clock,
        *,
        guard: FileGuard | None = None,
        floor: FreeSpaceFloor | None = None,
    ) -> None:
        self.config = config
        self.guard = guard  #: fails /healthz once the database file is gone
        self.floor = floor  #: refuses enqueues while free disk space is low
        self.writer = writer
        self.store = writer.store
        self.reader = reader
        self.reads = reads
        self.clock = clock
        self.queue_waiters = Waiters()
        self.job_waiters = Waiters()
        self.closing = False
        self.reaper_wakeup = trio.Event()
        self.reaper_due: float = 0.0  #: when the reaper will next sweep (unix seconds)
        self.defaults = Defaults(
            max_retries=config.default_max_retries,
            lease_seconds=config.default_lease_seconds,
            result_ttl=config.default_result_ttl,
        )
        pairs = list(config.tokens)
        if config.token:
            pairs.append((auth.ADMIN, config.token))
        self._tokens = auth.Tokens(pairs) if pairs else None
        self._handlers: dict[str, Callable[[Request], Awaitable[Response]]] = {
            name[len("on_") :]: getattr(self, name)
            for name in dir(self)
            if name.startswith("on_")
        }

    def authorize(self, req: Request) -> None:
        """Find the role of the request's token (`req.role`), before it is routed:
        a client without a token learns nothing, not even which paths exist. With no
        token configured, every request is admin.

        Raises:
            errors.Unauthorized: no token, or none of the broker's.
        """
        if self._tokens is None:
            req.role = auth.ADMIN
            return
        # RFC 9110 section 11.1: the scheme is case-insensitive ("bearer" too)
        scheme, _, given = req.headers.get(b"authorization", b"").partition(b" ")
        role = None
        if scheme.lower() == b"bearer":
            role = self._tokens.role_of(given.strip(b" "))
        if role is None:
            if req.path == "/healthz" and req.method in ("GET", "HEAD"):
                req.role = auth.OPEN
                return
            raise errors.Unauthorized(
                "a valid 'Authorization: Bearer <token>' is needed"
            )
        req.role = role

    def start(self, req: Request) -> Awaitable[Response]:
        """Begin answering one routed, `authorize`d request; await the result for
        its reply.

        A small enqueue is decoded and its write submitted to the writer now, before
        this returns, so that pipelined enqueues commit in the order they came (the
        server starts a batch of them before it awaits the first). Other requests
        do all their work when awaited.

        Raises (here or when awaited):
            errors.Forbidden: the token's role may not call this route.
            errors.QBrokerError for error replies.
        """
        if req.role != auth.ADMIN:
            auth.permit(req.role, req.route)
        if req.route == "enqueue" and len(req.body) <= BIG_BODY:
            return self._enqueue(req, decode(req, EnqueueBody))
        return self._handlers[req.route](req)

    def poke_reaper(self, due: float) -> None:
        """Bring the reaper's next sweep forward to `due` if that is sooner."""
        if due < self.reaper_due:
            self.reaper_due = due
            self.reaper_wakeup.set()

    def finished(
        self, job_ids: Iterable[str], records: dict[str, JobRecord] | None = None
    ) -> None:
        """Wake the result long-polls of these jobs, handing over their final
        records where the writer read them (`watched`), which saves each a read."""
        for job_id in job_ids:
            record = records.get(job_id) if records else None
            self.job_waiters.notify(job_id, value=record)

    def watched(self, job_ids: Iterable[str]) -> list[str]:
        """The jobs among `job_ids` that a result long-poll waits for."""
        return [j for j in job_ids if j in self.job_waiters]

    # ---------------------------------------------------------------- producer

    async def on_enqueue(self, req: Request) -> Response:
        # a big batch takes long to decode: off the loop, so others are served
        # (`start` takes a small body the quick way)
        body = await trio.to_thread.run_sync(decode, req, EnqueueBody)
        return await self._enqueue(req, body)

    def _enqueue(self, req: Request, body: EnqueueBody) -> Awaitable[Response]:
        """Submit the enqueue's write now; the awaitable waits for its commit.

        Jobs ready at once may go straight to parked lease long-polls (`takers`),
        leased for them in the enqueue's own commit: one commit and no second
        writer round trip between a job's arrival and its delivery to an idle worker.
        """
        if self.floor is not None:
            self.floor.check()
        queue = req.params["queue"]
        specs = body.jobs if body.jobs is not None else [body]
        now = self.clock.now()
        ready = 0
        due: list[float] = []  #: when the reaper must look at these jobs
        for spec in specs:
            # the store's test, to the float: a delay too small to move `now` is none
            at = now + spec.delay if spec.delay is not None else spec.eta
            if at is not None and at > now:
                due.append(at)
            else:
                ready += 1
            if spec.expires is not None:
                due.append(now + spec.expires)
        takers = self.queue_waiters.claim(queue, ready) if ready else []
        requests: list[LeaseRequest] = []
        for t in takers:
            assert t.request is not None  # claim() takes lease long-polls only
            requests.append(t.request)

        def enqueue_and_lease() -> tuple[list[str], list[Leased]]:
            ids = self.store.enqueue(queue, specs, defaults=self.defaults, now=now)
            return ids, [self._lease_for(r, now)() for r in requests]

        call = self.writer.submit(enqueue_and_lease)
        return self._enqueued(req, body, call, takers, ready, due)

    async def _enqueued(
        self,
        req: Request,
        body: EnqueueBody,
        call: Call,
        takers: list[Slot],
        ready: int,
        due: list[float],
    ) -> Response:
        """The rest of `_enqueue`, once its write is durable."""
        queue = req.params["queue"]
        leased = [Leased([]) for _ in takers]
        try:
            ids, leased = await self.writer.wait(call)
        finally:  # on failure too: the long-polls go back to leasing on their own
            for slot, got in zip(takers, leased, strict=True):
                slot.value = got
                assert slot.handoff is not None
                slot.handoff.set()
                slot.event.set()
        metrics.jobs_enqueued(queue).inc(len(ids))
        if due:
            self.poke_reaper(min(due))
        handed = sum(len(t.value or ()) for t in takers)
        if ready > handed:
            self.queue_waiters.notify(queue, ready - handed)
        if body.jobs is not None:
            return encode(req, EnqueueManyReply(ids=ids), 201)
        return encode(req, EnqueueReply(id=ids[0]), 201)

    async def on_get_job(self, req: Request) -> Response:
        record = await self.reads.call(self.reader.get_job, req.params["id"])
        return encode(req, record)

    async def on_job_result(self, req: Request) -> Response:
        job_id = req.params["id"]
        wait = query_float(req, "wait", default=0.0, low=0.0, high=MAX_RESULT_WAIT)
        deadline = trio.current_time() + wait
        while True:
            with self.job_waiters.register([job_id]) as slot:
                record = await self.reads.call(self.reader.get_job, job_id)
                if record.state in FINAL_STATES or self.closing:
                    return encode(req, record)
                del record  # a parked wait holds the id, not the record
                with trio.move_on_at(deadline):
                    await slot.event.wait()
                if slot.value is not None:  # the final record, read by the writer
                    return encode(req, slot.value)
            if trio.current_time() >= deadline:
                record = await self.reads.call(self.reader.get_job, job_id)
                return encode(req, record)

    async def on_results(self, req: Request) -> Response:
        body = decode(req, ResultsRequest)
        req.body = b""  # what a parked wait holds: its ids, no bytes, no records
        deadline = trio.current_time() + body.wait
        ids = list(dict.fromkeys(body.ids))
        if body.wait > 0:
            with self.job_waiters.register(ids, many=True) as slot:
                if await self._wait_finished(ids, slot, deadline) and self.closing:
                    # cheap, where reading and sending a thousand waits' records
                    # took minutes; clients resend a 503 to the restarted broker
                    raise errors.ShuttingDown("the broker is stopping; ask again")
        records = await self.reads.call(self.reader.get_jobs, ids)
        return results_reply(req, ids, records, RESULTS_REPLY_BYTES)

    async def _wait_finished(self, ids: list[str], slot: Slot, deadline: float) -> bool:
        """Wait until every job of `ids` is final or gone, the deadline passes or the
        broker stops; `slot` is registered under `ids`. Returns whether some are
        still unfinished. Holds ids only: a thousand waits on the same thousand jobs
        held a record each (973 MiB)."""
        pending = await self.reads.call(self.reader.unfinished, ids)
        values = slot.values
        assert values is not None
        while pending and not self.closing and trio.current_time() < deadline:
            with trio.move_on_at(deadline):
                await slot.event.wait()
            slot.event = trio.Event()  # set again by what finishes during a read
            # What finished since the look: a final record the writer read for
            # others, or (None) ids to look at again.
            again = []
            for job_id, record in values.items():
                if job_id in pending:
                    if record is None or record.state not in FINAL_STATES:
                        again.append(job_id)
                    else:
                        pending.discard(job_id)
            values.clear()
            if again:
                pending.difference_update(again)
                pending |= await self.reads.call(self.reader.unfinished, again)
        return bool(pending)

    async def on_cancel(self, req: Request) -> Response:
        job_id = req.params["id"]
        counts: Counter[tuple[str, str]] = Counter()
        state = await self.writer.call(
            self.store.cancel, job_id, now=self.clock.now(), counts=counts
        )
        metrics.count_finished(counts)
        self.finished([job_id])
        return encode(req, CancelReply(id=job_id, state=state))

    # ---------------------------------------------------------------- worker

    async def on_lease(self, req: Request) -> Response:
        body = decode(req, LeaseRequest)
        req.body = b""  # a parked lease holds neither the bytes nor the results
        deadline = trio.current_time() + body.wait
        acks, fails = body.acks, body.fails
        settle = bool(acks or fails)
        if settle:
            body = msgspec.structs.replace(body, acks=[], fails=[])
        results: list[BatchResult] = []
        first = True
        while True:
            with self.queue_waiters.register(
                body.queues, body, alive=req.peer_alive
            ) as slot:
                now = self.clock.now()
                lease = self._lease_for(body, now, first=first)
                first = False
                if settle:  # the outcomes first, in the first pass's commit
                    settle = False
                    results, leased = await self._settle(acks, fails, now, lease)
                    acks, fails = [], []
                    got = leased or Leased([])
                else:
                    got = await self.writer.call(lease)
                if got.jobs or self.closing or trio.current_time() >= deadline:
                    break
                slot.parked = True
                with trio.move_on_at(deadline):
                    await slot.event.wait()
                slot.parked = False
                if slot.handoff is not None:
                    # An enqueue is leasing jobs for this request in its commit: they
                    # are ours whatever the deadline says, or they would be orphaned.
                    with trio.CancelScope(shield=True):
                        await slot.handoff.wait()
                    got = slot.value
                    if got.jobs:
                        break
                if not req.peer_alive():
                    break  # the client has gone: lease nothing more for it
        if got.jobs and not got.again:
            for queue, n in Counter(job.queue for job in got.jobs).items():
                metrics.jobs_leased(queue).inc(n)
            self.poke_reaper(min(j.lease_expires_at for j in got.jobs))
        return encode(req, LeaseReply(jobs=got.jobs, results=results, more=got.more))

    def _lease_for(
        self, body: LeaseRequest, now: float, *, first: bool = False
    ) -> Callable[[], Leased]:
        """The store call (for the writer thread) that leases what `body` asks for,
        and tells whether more was ready than it got. The `first` pass of a resend
        gives back what the request leased before, if its jobs are still active."""

        def lease() -> Leased:
            if first and body.resend and body.request_id is not None:
                again = self.store.leased_by(body.request_id, body.queues, now=now)
                if again:
                    return Leased(again, again=True)
            jobs = self.store.lease(
                body.queues,
                max_jobs=body.max,
                lease_seconds=body.timeout,
                worker=body.worker,
                now=now,
                request_id=body.request_id,
            )
            full = len(jobs) >= body.max
            return Leased(jobs, full and self.store.more_ready(body.queues, now=now))

        return lease

    async def on_ack(self, req: Request) -> Response:
        body = decode(req, AckRequest)
        job_id = req.params["id"]
        queue, records = await self.writer.call(
            _then_records(self.store.ack, self.watched([job_id]), self.store),
            job_id,
            body.lease,
            body.result,
            now=self.clock.now(),
        )
        if queue is not None:  # else a resent ack: counted the first time
            metrics.jobs_finished(queue, "succeeded").inc()
        self.finished([job_id], records)
        return encode(req, _EMPTY)

    async def on_fail(self, req: Request) -> Response:
        body = decode(req, FailRequest)
        job_id = req.params["id"]
        now = self.clock.now()
        (queue, state), records = await self.writer.call(
            _then_records(self.store.fail, self.watched([job_id]), self.store),
            job_id,
            body.lease,
            error=body.error,
            traceback=body.traceback,
            retry_in=body.retry_in,
            now=now,
        )
        if queue is not None:  # else a resent fail: counted the first time
            metrics.jobs_finished(queue, state).inc()
        if state in FINAL_STATES:
            self.finished([job_id], records)
        elif body.retry_in is not None:
            self.poke_reaper(now + body.retry_in)
        return encode(req, {"state": state})

    async def on_ack_many(self, req: Request) -> Response:
        body = decode(req, AckManyRequest)
        results, _ = await self._settle(body.acks, [], self.clock.now())
        return encode(req, BatchReply(results=results))

    async def on_fail_many(self, req: Request) -> Response:
        body = decode(req, FailManyRequest)
        results, _ = await self._settle([], body.fails, self.clock.now())
        return encode(req, BatchReply(results=results))

    async def _settle(
        self,
        acks: Sequence[AckItem],
        fails: Sequence[FailItem],
        now: float,
        then: Callable[[], T] | None = None,
    ) -> tuple[list[BatchResult], T | None]:
        """Ack and fail many jobs, each item on its own, then run `then` (a store
        call), all in one writer call; wake the result long-polls of the jobs that
        finished. Returns the items' results (acks, then fails) and `then`'s."""
        watched = self.watched([a.id for a in acks] + [f.id for f in fails])

        counts: Counter[tuple[str, str]] = Counter()

        def call() -> tuple[list[BatchResult], T | None, dict[str, JobRecord]]:
            results = self.store.ack_many(acks, now=now, counts=counts) if acks else []
            if fails:
                results += self.store.fail_many(fails, now=now, counts=counts)
            out = then() if then is not None else None
            return results, out, self.store.final_records(watched) if watched else {}

        results, out, records = await self.writer.call(call)
        metrics.count_finished(counts)
        self.finished((r.id for r in results if r.ok), records)
        retries = [f.retry_in for f in fails if f.retry_in is not None]
        if retries:
            self.poke_reaper(now + min(retries))
        return results, out

    async def on_extend(self, req: Request) -> Response:
        body = decode(req, ExtendRequest)
        expires_at, cancelled = await self.writer.call(
            self.store.extend,
            req.params["id"],
            body.lease,
            lease_seconds=body.timeout,
            now=self.clock.now(),
        )
        self.poke_reaper(expires_at)
        return encode(
            req, ExtendReply(lease_expires_at=expires_at, cancelled=cancelled)
        )

    async def on_release(self, req: Request) -> Response:
        body = decode(req, ReleaseRequest)
        queue = await self.writer.call(
            self.store.release, req.params["id"], body.lease, now=self.clock.now()
        )
        if queue is not None:
            self.queue_waiters.notify(queue, 1)
        return encode(req, _EMPTY)

    async def on_release_many(self, req: Request) -> Response:
        body = decode(req, ReleaseManyRequest)
        results, queues = await self.writer.call(
            self.store.release_many, body.releases, now=self.clock.now()
        )
        for queue, n in queues.items():
            self.queue_waiters.notify(queue, n)
        return encode(req, BatchReply(results=results))

    # ---------------------------------------------------------------- admin

    async def on_queues(self, req: Request) -> Response:
        def read() -> QueueList:
            now = self.clock.now()
            names = self.reader.queue_names()
            return QueueList(
                queues=[self.reader.queue_stats(n, now=now) for n in names]
            )

        return encode(req, await self.reads.call(read))

    async def on_queue(self, req: Request) -> Response:
        stats = await self.reads.call(
            lambda: self.reader.queue_stats(req.params["queue"], now=self.clock.now())
        )
        return encode(req, stats)

    async def on_healthz(self, req: Request) -> Response:
        if self.closing:
            raise errors.ShuttingDown("the broker is stopping")
        if self.guard is not None and (lost := self.guard.check()) is not None:
            raise lost
        await self.reads.call(self.reader.ping)
        return encode(req, Health(status="ok", version=__version__))

    async def on_metrics(self, req: Request) -> Response:
        epoch = metrics.QUEUES.begin_prune()
        queues = metrics.QUEUES.queues()
        holding = await self.reads.call(self.reader.queues_holding, queues)
        metrics.QUEUES.prune(epoch, holding)
        pieces = []
        for piece in metrics.render():  # about a millisecond each: let others run
            pieces.append(piece)
            await trio.lowlevel.checkpoint()
        text = b"".join(pieces)
        return Response(200, text, prometheus_client.CONTENT_TYPE_LATEST.encode())

    async def on_openapi(self, req: Request) -> Response:
        return Response(200, openapi.document_bytes())


def _then_records(
    fn: Callable[..., T], job_ids: list[str], store: Store
) -> Callable[..., tuple[T, dict[str, JobRecord]]]:
    """`fn` (a store call that may finish jobs), then, in the same writer call, the
    final records of those of `job_ids` it finished: what their result long-polls
    answer with. Nothing is read when no one waits."""

    def call(*args: Any, **kwargs: Any) -> tuple[T, dict[str, JobRecord]]:
        out = fn(*args, **kwargs)
        return out, store.final_records(job_ids) if job_ids else {}

    return call
