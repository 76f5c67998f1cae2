"""Socket-free tests of the job-control maths: rate strings and GCRA."""

from __future__ import annotations

import random

import pytest
from qbroker import gcra
from qclient.rates import format_rate, parse_rate


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
