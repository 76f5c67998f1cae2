"""Socket-free tests of job control: rate strings, GCRA, and the worker's pieces
(progress bookkeeping, the retry policy's names, declared limits)."""

from __future__ import annotations

import functools
import multiprocessing
import random

import pytest
from qbroker import errors, gcra
from qbroker.jobfilter import RETRYABLE, parse_filter
from qclient.rates import format_rate, parse_rate
from qclient.wire import JobState, LeasedJob, RateSpec
from qworker import JobContext, Retry, Task
from qworker._book import PROGRESS_EVERY, SlotBook, runnable
from qworker._context import MAX_NOTE_CHARS, Progress
from qworker._limits import declared_limits
from qworker.pools._progress import ProgressArea
from qworker.registry import Registry


@pytest.mark.parametrize(
    ("text", "limit", "per"),
    [
        ("10/s", 10, 1.0),
        ("100/m", 100, 60.0),
        ("1000/h", 1000, 3600.0),
        ("5/d", 5, 86400.0),
        ("3/10s", 3, 10.0),
        ("10", 10, 1.0),
        (" 7 / m ", 7, 60.0),
        ("0.5/s", 1, 2.0),
    ],
)
def test_celery_rate_strings_parse(text: str, limit: int, per: float) -> None:
    assert parse_rate(text) == (limit, per)


@pytest.mark.parametrize("text", ["", "x/s", "10/y", "10/", "-1/s", "0/s", "1e3/s"])
def test_unknown_rate_strings_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_rates_format_back() -> None:
    assert format_rate(10, 60.0) == "10/m"
    assert format_rate(3, 10.0) == "3/10s"
    assert parse_rate(format_rate(3, 10.0)) == (3, 10.0)


def starts_in_any_window(times: list[float], window: float) -> int:
    most = 0
    for i, t in enumerate(times):
        most = max(most, sum(1 for u in times[i:] if u < t + window))
    return most


@pytest.mark.parametrize("burst", [0, 2])
def test_gcra_never_admits_more_than_the_rate_and_burst(burst: int) -> None:
    rng = random.Random(7)
    limit, per = 5, 1.0
    tat: float | None = None
    now = 1000.0
    starts: list[float] = []
    while now < 1030.0:
        n = gcra.allowed(tat, now, limit=limit, per=per, burst=burst)
        want = rng.randint(1, 4)
        took = min(n, want)
        if took:
            tat = gcra.take(tat, now, took, limit=limit, per=per)
            starts += [now] * took
        now += rng.choice([0.01, 0.03, 0.05, 0.13])
    assert starts_in_any_window(starts, per) <= limit + burst
    # and it is no stingier than the rate: 30 s of steady demand got nearly 150
    assert len(starts) >= 30 * limit * 0.8


def test_gcra_a_fresh_key_admits_its_burst_then_spaces_starts() -> None:
    assert gcra.allowed(None, 0.0, limit=5, per=1.0, burst=2) == 3
    tat = gcra.take(None, 0.0, 3, limit=5, per=1.0)
    assert gcra.allowed(tat, 0.0, limit=5, per=1.0, burst=2) == 0
    assert gcra.next_start(tat, 0.0, limit=5, per=1.0, burst=2) == pytest.approx(0.2)
    assert gcra.allowed(tat, 0.2, limit=5, per=1.0, burst=2) == 1
    # an idle key fills back up to its burst, no further
    assert gcra.allowed(tat, 100.0, limit=5, per=1.0, burst=2) == 3


# ---------------------------------------------------------------- worker side


def _fn(x: int = 0) -> int:
    return x


def _leased(n: int) -> LeasedJob:
    return LeasedJob(
        id=f"j{n}", queue="q", task="t", args=[], kwargs={}, headers={},
        lease=f"l{n}", attempt=1, max_retries=3, timeout=30.0, lease_expires_at=0.0,
    )  # fmt: skip


def test_reported_progress_makes_a_heartbeat_due_at_most_once_a_second() -> None:
    book = SlotBook(2)
    reg = Registry()
    reg.register(Task(_fn, name="t"))
    admitted = book.admit([_leased(1)], 0.0, functools.partial(runnable, reg))
    assert admitted is not None
    (ex,) = admitted.to_run
    assert book.heartbeats_due(1.0) == []  # nothing reported, lease far from due
    ex.context.progress(0.25, "a quarter")
    assert book.heartbeats_due(1.0) == [ex]
    ex.progress_sent, ex.progress_sent_at = ex.context.last_progress, 1.0
    assert book.heartbeats_due(1.5) == []  # sent: nothing new
    ex.context.progress(0.5, "half")
    assert book.heartbeats_due(1.5) == []  # new, but the last went out 0.5 s ago
    assert book.heartbeats_due(1.0 + PROGRESS_EVERY) == [ex]


def test_a_pool_childs_progress_crosses_shared_memory_once() -> None:
    area = ProgressArea(multiprocessing.get_context("spawn"))
    assert area.take() is None
    area.write(3, 1, Progress(0.4, "resized 40 of 100 ✓", 0.0))
    got = area.take()
    assert got is not None
    run, index, progress = got
    assert (run, index, progress.fraction, progress.note) == (
        3, 1, 0.4, "resized 40 of 100 ✓",
    )  # fmt: skip
    assert area.take() is None  # taken: not again
    area.write(3, 1, Progress(1.0, "x" * MAX_NOTE_CHARS, 0.0))
    again = area.take()
    assert again is not None and again[2].note == "x" * MAX_NOTE_CHARS


def test_progress_outside_zero_to_one_is_refused() -> None:
    ctx = JobContext("j", "q", "t", 1, {})
    with pytest.raises(ValueError, match="between 0 and 1"):
        ctx.progress(1.5)
    assert ctx.last_progress is None


class Flaky(Exception):
    pass


class Permanent(Flaky):
    pass


def test_retry_policy_names_and_celerys_are_the_same_options() -> None:
    ours = Task(
        _fn, name="a", retry_for=(Flaky,), dont_retry_for=(Permanent,),
        backoff=2.0, backoff_max=5.0, jitter=False,
    )  # fmt: skip
    celery = Task(
        _fn, name="b", autoretry_for=(Flaky,), dont_autoretry_for=(Permanent,),
        retry_backoff=2.0, retry_backoff_max=5.0, retry_jitter=False,
    )  # fmt: skip
    for t in (ours, celery):
        assert t.should_retry(Flaky())
        assert not t.should_retry(Permanent())  # dont_retry_for beats retry_for
        assert t.should_retry(Retry())  # Retry always asks
        assert not t.should_retry(ValueError())
        assert [t.backoff(n) for n in (1, 2, 3)] == [2.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="not both"):
        Task(_fn, name="c", backoff=1.0, retry_backoff=2.0)


def test_task_limits_parse_and_bad_ones_are_refused() -> None:
    t = Task(_fn, name="limited", rate_limit="100/m", concurrency=5)
    assert t.rate_limit == (100, 60.0) and t.concurrency == 5
    reg = Registry()
    reg.register(t)
    reg.register(Task(_fn, name="free"))
    assert declared_limits(reg) == {
        "task:limited": (5, RateSpec(limit=100, per=60.0, burst=0))
    }
    with pytest.raises(ValueError, match="unknown rate"):
        Task(_fn, name="d", rate_limit="lots")
    with pytest.raises(ValueError, match="concurrency"):
        Task(_fn, name="e", concurrency=0)


# ---------------------------------------------------------------- job filters


def test_a_listing_query_reads_as_filters() -> None:
    f = parse_filter(
        {"state": "dead", "queue": "q", "kwargs.user_id": "42", "args.0": "x",
         "kwargs.user.name": '"ann"', "limit": "5", "cursor": "1234"}
    )  # fmt: skip
    assert (f.state, f.queue, f.limit, f.before) == (JobState.DEAD, "q", 5, 1234)
    assert f.matches_arguments(["x"], {"user_id": 42, "user": {"name": "ann"}}, {})
    assert not f.matches_arguments(
        ["x"], {"user_id": "42", "user": {"name": "ann"}}, {}
    )
    assert not f.matches_arguments([], {"user_id": 42, "user": {"name": "ann"}}, {})
    # a value that is not JSON is a string
    g = parse_filter({"kwargs.email": "a@b.c"})
    assert g.matches_arguments([], {"email": "a@b.c"}, {})
    assert not parse_filter({"kwargs.flag": "1"}).matches_arguments(
        [], {"flag": True}, {}
    )


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"state": "sleeping"}, "state"),
        ({"queue": "a b"}, "queue"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "-1"}, "cursor"),
        ({"colour": "red"}, "colour"),
        ({"kwargs.": "1"}, "kwargs."),
        ({"args.name": "1"}, "args.name"),
    ],
)
def test_a_malformed_filter_is_refused_naming_it(
    query: dict[str, str], field: str
) -> None:
    with pytest.raises(errors.InvalidField) as info:
        parse_filter(query)
    assert info.value.field == field


def test_a_bulk_retry_takes_no_paging_and_only_retryable_states() -> None:
    with pytest.raises(errors.InvalidField) as info:
        parse_filter({"state": "queued"}, paging=False, states=RETRYABLE)
    assert info.value.field == "state"
    with pytest.raises(errors.InvalidField) as info:
        parse_filter({"limit": "5"}, paging=False)
    assert info.value.field == "limit"
