"""The broker's handlers: one `on_<name>` per route of routes.py, over the store.

Each handler calls one store verb (store/interface.py), hands the Changes it returns
to transitions.py, and encodes its reply struct. Long-polls park on `Waiters`, woken
by transitions.py; an enqueue leases jobs for parked lease long-polls in its own unit
(`enqueue_and_hand_off`). Nothing here knows which database holds the state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal

import msgspec
import prometheus_client
import trio
from qclient.wire import (
    FINAL_STATES,
    AckItem,
    AckManyRequest,
    AckReply,
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
    FailReply,
    FailRequest,
    Health,
    JobState,
    LeaseReply,
    LeaseRequest,
    QueueList,
    ReleaseManyRequest,
    ReleaseReply,
    ReleaseRequest,
    ResultsRequest,
    WorkerBeat,
    WorkerBeatReply,
    WorkerList,
)

from qbroker import __version__, auth, errors, metrics, openapi, ui
from qbroker.clock import Clock
from qbroker.config import RESULTS_REPLY_BYTES, Config
from qbroker.control_api import ControlHandlers
from qbroker.kvapi import KVHandlers
from qbroker.protocol import (
    BIG_BODY,
    EnqueueBody,
    Request,
    Response,
    decode,
    encode,
    is_ui_path,
    query_float,
)
from qbroker.replies import results_reply
from qbroker.routes import OPTIONAL_BODY, ROUTES
from qbroker.schedule_api import ScheduleHandlers
from qbroker.store import NOTHING_LEASED, Defaults, Enqueued, Leased, Store
from qbroker.transitions import Effects
from qbroker.waiters import Slot, Waiters

MAX_RESULT_WAIT = 300.0  #: seconds a result long-poll may ask for
_ACKED = AckReply()
_RELEASED = ReleaseReply()
_BEAT_TAKEN = WorkerBeatReply()
Handler = Callable[[Request, Any], Awaitable[Response]]


class Broker(ControlHandlers, KVHandlers, ScheduleHandlers):
    """Everything a handler needs. Lives for one `serve()` run."""

    def __init__(self, config: Config, store: Store, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.queue_waiters = Waiters()
        self.job_waiters = Waiters()
        self.effects = Effects(self.queue_waiters, self.job_waiters, self.poke_reaper)
        self.closing = False
        self.cancel_notes = {}
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
        #: route name -> (handler, the struct its body decodes to)
        self._routes: dict[str, tuple[Handler, Any]] = {
            r.name: (getattr(self, "on_" + r.name), r.request) for r in ROUTES
        }

    def authorize(self, req: Request) -> None:
        """Find the role of the request's token (`req.role`), before it is routed:
        a client without a token learns nothing, not even which paths exist. With no
        token configured, every request is admin. The dashboard's pages check the
        token themselves (ui/), to answer a browser without it with a login form.

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
            if is_ui_path(req.path) or (
                req.path == "/healthz" and req.method in ("GET", "HEAD")
            ):
                req.role = auth.OPEN
                return
            raise errors.Unauthorized(
                "a valid 'Authorization: Bearer <token>' is needed"
            )
        req.role = role

    @property
    def needs_token(self) -> bool:
        """Whether requests need a bearer token (the broker has some)."""
        return self._tokens is not None

    def start(self, req: Request) -> Awaitable[Response]:
        """Begin answering one routed, `authorize`d request; await the result for
        its reply.

        The body is decoded now, as its route says. A small enqueue's write is
        submitted now too, before this returns, so that pipelined enqueues commit in
        the order they came (the server starts a batch of them before it awaits the
        first). Other requests do the rest of their work when awaited.

        Raises (here or when awaited):
            errors.Forbidden: the token's role may not call this route.
            errors.QBrokerError for error replies.
        """
        if req.route == "ui":  # the dashboard's pages check each call they make
            return ui.respond(self, req)
        if req.role != auth.ADMIN:
            auth.permit(req.role, req.route)
        handler, body_type = self._routes[req.route]
        if body_type is None:
            return handler(req, None)
        if req.route in OPTIONAL_BODY:  # no body, or null: the struct's defaults
            body = decode(req, body_type | None) if req.body else None
            return handler(req, body_type() if body is None else body)
        if body_type is EnqueueBody and len(req.body) > BIG_BODY:
            return self._enqueue_big(req)
        return handler(req, decode(req, body_type))

    def poke_reaper(self, due: float) -> None:
        """Bring the reaper's next sweep forward to `due` if that is sooner."""
        if due < self.reaper_due:
            self.reaper_due = due
            self.reaper_wakeup.set()

    def watched(self, job_ids: Iterable[str]) -> list[str]:
        """The jobs among `job_ids` that a result long-poll waits for."""
        return [j for j in job_ids if j in self.job_waiters]

    # ---------------------------------------------------------------- producer

    async def _enqueue_big(self, req: Request) -> Response:
        # a big batch takes long to decode: off the loop, so others are served
        body = await trio.to_thread.run_sync(decode, req, EnqueueBody)
        return await self.on_enqueue(req, body)

    def on_enqueue(self, req: Request, body: EnqueueBody) -> Awaitable[Response]:
        """Submit the enqueue's write now; the awaitable waits for its commit.

        Jobs ready at once may go straight to parked lease long-polls (`takers`),
        leased for them in the enqueue's own unit: one commit and no second writer
        round trip between a job's arrival and its delivery to an idle worker.
        """
        queue = req.params["queue"]
        specs = body.jobs if body.jobs is not None else [body]
        now = self.clock.now()
        ready = 0
        for spec in specs:
            # the store's test, to the float: a delay too small to move `now` is none
            at = now + spec.delay if spec.delay is not None else spec.eta
            if at is None or at <= now:
                ready += 1
        takers = self.queue_waiters.claim(queue, ready) if ready else []
        requests: list[LeaseRequest] = []
        for t in takers:
            assert t.request is not None  # claim() takes lease long-polls only
            requests.append(t.request)
        try:  # the store may refuse at once (disk low): before anything is submitted
            pending = self.store.enqueue_and_hand_off(
                queue, specs, requests, defaults=self.defaults, now=now
            )
        except BaseException:
            _hand_over(takers, [NOTHING_LEASED] * len(takers))
            raise
        return self._enqueued(req, body, pending, takers)

    async def _enqueued(
        self,
        req: Request,
        body: EnqueueBody,
        pending: Awaitable[Enqueued],
        takers: list[Slot],
    ) -> Response:
        """The rest of `on_enqueue`, once its write is durable."""
        leased: list[Leased] = [NOTHING_LEASED] * len(takers)
        try:
            done = await pending
            leased = done.leased
        finally:  # on failure too: the long-polls go back to leasing on their own
            _hand_over(takers, leased)
        self.effects.apply(done.changes)
        if body.jobs is not None:
            return encode(req, EnqueueManyReply(ids=done.ids), 201)
        return encode(req, EnqueueReply(id=done.ids[0]), 201)

    async def on_get_job(self, req: Request, _: None) -> Response:
        record = await self.store.get_job(req.params["id"], now=self.clock.now())
        return encode(req, record)

    async def on_job_result(self, req: Request, _: None) -> Response:
        job_id = req.params["id"]
        wait = query_float(req, "wait", default=0.0, low=0.0, high=MAX_RESULT_WAIT)
        deadline = trio.current_time() + wait
        while True:
            with self.job_waiters.register([job_id]) as slot:
                record = await self.store.get_job(job_id)
                if record.state in FINAL_STATES or self.closing:
                    return encode(req, record)
                del record  # a parked wait holds the id, not the record
                with trio.move_on_at(deadline):
                    await slot.event.wait()
                if slot.value is not None:  # the final record, read by the writer
                    return encode(req, slot.value)
            if trio.current_time() >= deadline:
                return encode(req, await self.store.get_job(job_id))

    async def on_results(self, req: Request, body: ResultsRequest) -> Response:
        req.body = b""  # what a parked wait holds: its ids, no bytes, no records
        deadline = trio.current_time() + body.wait
        ids = list(dict.fromkeys(body.ids))
        if body.wait > 0:
            with self.job_waiters.register(ids, many=True) as slot:
                if await self._wait_finished(ids, slot, deadline) and self.closing:
                    # cheap, where reading and sending a thousand waits' records
                    # took minutes; clients resend a 503 to the restarted broker
                    raise errors.ShuttingDown("the broker is stopping; ask again")
        records = await self.store.get_jobs(ids)
        return results_reply(req, ids, records, RESULTS_REPLY_BYTES)

    async def _wait_finished(self, ids: list[str], slot: Slot, deadline: float) -> bool:
        """Wait until every job of `ids` is final or gone, the deadline passes or the
        broker stops; `slot` is registered under `ids`. Returns whether some are
        still unfinished. Holds ids only: a thousand waits on the same thousand jobs
        held a record each (973 MiB)."""
        pending = await self.store.unfinished(ids)
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
                pending |= await self.store.unfinished(again)
        return bool(pending)

    async def on_cancel(self, req: Request, _: None) -> Response:
        job_id = req.params["id"]
        done = await self.store.cancel(
            job_id, watched=self.watched([job_id]), now=self.clock.now()
        )
        self.effects.apply(done.changes)
        if any(old is JobState.ACTIVE for _, _, old, _ in done.changes.transitions):
            # its worker's parked cancel poll, if any, hears it now
            record = await self.store.get_job(job_id)
            self.cancelled_active(job_id, record.worker)
        return encode(req, CancelReply(id=job_id, state=done.state))

    # ---------------------------------------------------------------- worker

    async def on_lease(self, req: Request, body: LeaseRequest) -> Response:
        req.body = b""  # a parked lease holds neither the bytes nor the results
        deadline = trio.current_time() + body.wait
        acks, fails = body.acks, body.fails
        settle = bool(acks or fails)
        if settle:
            body = msgspec.structs.replace(body, acks=[], fails=[])
        results: list[BatchResult] = []
        resend = body.resend
        while True:
            with self.queue_waiters.register(
                body.queues, body, alive=req.peer_alive
            ) as slot:
                if settle:  # the outcomes first, in the first pass's unit
                    settle = False
                    results, got = await self._settle(acks, fails, body, resend=resend)
                    acks, fails = [], []
                else:
                    done = await self.store.lease(
                        body, resend=resend, now=self.clock.now()
                    )
                    self.effects.apply(done.changes)
                    got = done.leased
                resend = False  # only the first pass looks for a resend's jobs
                if got.jobs or self.closing or trio.current_time() >= deadline:
                    break
                if got.held is not None:  # woken when a held job's key frees
                    self.effects.held.update(body.queues)
                slot.parked = True
                with trio.move_on_at(self.held_deadline(got, deadline)):
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
        return encode(req, LeaseReply(jobs=got.jobs, results=results, more=got.more))

    async def on_ack(self, req: Request, body: AckRequest) -> Response:
        job_id = req.params["id"]
        changes = await self.store.ack(
            job_id,
            body.lease,
            body.result,
            watched=self.watched([job_id]),
            now=self.clock.now(),
        )
        self.effects.apply(changes)
        return encode(req, _ACKED)

    async def on_fail(self, req: Request, body: FailRequest) -> Response:
        job_id = req.params["id"]
        done = await self.store.fail(
            job_id,
            body.lease,
            error=body.error,
            traceback=body.traceback,
            retry_in=body.retry_in,
            watched=self.watched([job_id]),
            now=self.clock.now(),
        )
        self.effects.apply(done.changes)
        state: Literal["scheduled", "failed"] = (
            "failed" if done.state is JobState.FAILED else "scheduled"
        )
        return encode(req, FailReply(state=state))

    async def on_ack_many(self, req: Request, body: AckManyRequest) -> Response:
        results, _ = await self._settle(body.acks, [], None)
        return encode(req, BatchReply(results=results))

    async def on_fail_many(self, req: Request, body: FailManyRequest) -> Response:
        results, _ = await self._settle([], body.fails, None)
        return encode(req, BatchReply(results=results))

    async def _settle(
        self,
        acks: Sequence[AckItem],
        fails: Sequence[FailItem],
        request: LeaseRequest | None,
        *,
        resend: bool = False,
    ) -> tuple[list[BatchResult], Leased]:
        """Ack and fail many jobs, each item on its own, then lease for `request`,
        in one unit. Returns the items' results (acks, then fails) and the lease's."""
        watched = self.watched([a.id for a in acks] + [f.id for f in fails])
        done = await self.store.settle_and_lease(
            acks, fails, request, resend=resend, watched=watched, now=self.clock.now()
        )
        self.effects.apply(done.changes)
        return done.results, done.leased

    async def on_extend(self, req: Request, body: ExtendRequest) -> Response:
        done = await self.store.extend(
            req.params["id"],
            body.lease,
            lease_seconds=body.timeout,
            now=self.clock.now(),
            progress=body.progress,
            progress_note=body.progress_note,
        )
        self.effects.apply(done.changes)
        return encode(
            req,
            ExtendReply(
                lease_expires_at=done.lease_expires_at, cancelled=done.cancelled
            ),
        )

    async def on_release(self, req: Request, body: ReleaseRequest) -> Response:
        changes = await self.store.release(
            req.params["id"], body.lease, now=self.clock.now()
        )
        self.effects.apply(changes)
        return encode(req, _RELEASED)

    async def on_release_many(self, req: Request, body: ReleaseManyRequest) -> Response:
        done = await self.store.release_many(body.releases, now=self.clock.now())
        self.effects.apply(done.changes)
        return encode(req, BatchReply(results=done.results))

    # ---------------------------------------------------------------- admin

    async def on_queues(self, req: Request, _: None) -> Response:
        stats = await self.store.queues(now=self.clock.now())
        return encode(req, QueueList(queues=stats))

    async def on_queue(self, req: Request, _: None) -> Response:
        stats = await self.store.queue_stats(req.params["queue"], now=self.clock.now())
        return encode(req, stats)

    async def on_worker_beat(self, req: Request, body: WorkerBeat) -> Response:
        await self.store.beat_worker(body, now=self.clock.now())
        return encode(req, _BEAT_TAKEN)

    async def on_workers(self, req: Request, _: None) -> Response:
        found = await self.store.workers(now=self.clock.now())
        return encode(req, WorkerList(workers=found))

    async def on_healthz(self, req: Request, _: None) -> Response:
        if self.closing:
            raise errors.ShuttingDown("the broker is stopping")
        await self.store.ping()
        return encode(req, Health(status="ok", version=__version__))

    async def on_metrics(self, req: Request, _: None) -> Response:
        epoch = metrics.QUEUES.begin_prune()
        holding = await self.store.queues_holding(metrics.QUEUES.queues())
        metrics.QUEUES.prune(epoch, holding)
        pieces = []
        for piece in metrics.render():  # about a millisecond each: let others run
            pieces.append(piece)
            await trio.lowlevel.checkpoint()
        text = b"".join(pieces)
        return Response(200, text, prometheus_client.CONTENT_TYPE_LATEST.encode())

    async def on_openapi(self, req: Request, _: None) -> Response:
        return Response(200, openapi.document_bytes())


def _hand_over(takers: list[Slot], leased: list[Leased]) -> None:
    """Hand claimed lease long-polls what an enqueue leased for them, and wake them."""
    for slot, got in zip(takers, leased, strict=True):
        slot.value = got
        assert slot.handoff is not None
        slot.handoff.set()
        slot.event.set()
