"""Fuzz every endpoint from the broker's own OpenAPI document (schemathesis).

One real broker serves the whole module. schemathesis reads `/v1/openapi.json` and, for
each of its operations, sends (1) its deterministic coverage cases: boundary values,
wrong types, missing and extra fields of every parameter and body field; (2) up to
MAX_EXAMPLES hypothesis-drawn requests, schema-valid and schema-violating (JSON and
msgpack bodies, path and query parameters). Every reply must not be a 5xx, and must match
the document's schema for its status and content type. Some job-id cases are pointed at
a real job, and some lease tokens at its real lease, so the fuzzer reaches the ack,
fail, extend and release logic instead of stopping at 404.

The totals (requests sent, 5xx seen) print at the end: run with `-s` to see them.

schemathesis's own pytest plugin (`from_fixture(...).parametrize()`) breaks on pytest
9.2 (it sets `request.node._nodeid`), so the tests drive `APIOperation.as_strategy()`
with hypothesis directly.
"""

from __future__ import annotations

import collections
import zlib
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from qbroker import openapi
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.config import GenerationConfig

from tests.conftest import BrokerProcess
from tests.wirehttp import Wire

MAX_EXAMPLES = 50  #: examples per operation, half of them schema-violating at most
MAX_WAIT = 0.3  #: seconds a fuzzed long-poll may ask for; the schema allows 300
COUNTS: collections.Counter[str] = collections.Counter()
STATUSES: collections.Counter[int] = collections.Counter()


def _fit_msgpack(value: Any) -> Any:
    """msgpack has no integers past 64 bits: send those as floats."""
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return float(value)
    if isinstance(value, list):
        return [_fit_msgpack(v) for v in value]
    if isinstance(value, dict):
        return {k: _fit_msgpack(v) for k, v in value.items()}
    return value


@schemathesis.serializer("application/msgpack")
def _to_msgpack(ctx: Any, value: Any) -> bytes:
    return msgspec.msgpack.encode(_fit_msgpack(value))


@schemathesis.deserializer("application/msgpack")
def _from_msgpack(ctx: Any, response: Any) -> Any:
    return msgspec.msgpack.decode(response.content)


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path_factory.mktemp("fuzz") / "data").start()
    yield b
    assert b.stop() == 0, "the broker did not stop cleanly after the fuzzing"
    print(
        f"\nfuzz: {COUNTS['requests']} requests, {COUNTS['5xx']} 5xx,"
        f" {COUNTS['real_job']} aimed at a real job, {COUNTS['real_lease']} with its"
        f" real lease; by status: {dict(sorted(STATUSES.items()))}"
    )


@pytest.fixture(scope="module")
def api_schema(fuzz_broker: BrokerProcess) -> Any:
    return schemathesis.openapi.from_url(fuzz_broker.url + "/v1/openapi.json")


@pytest.fixture(scope="module")
def wire(fuzz_broker: BrokerProcess) -> Iterator[Wire]:
    w = Wire(fuzz_broker.url)
    yield w
    w.close()


#: every operation of the document the broker serves, known without a broker
OPERATIONS = [
    f"{method.upper()} {path}"
    for path, methods in openapi.document()["paths"].items()
    for method in methods
]


def _aim_at_a_real_job(case: Any, wire: Wire) -> None:
    """For about half the job-id cases, use a freshly leased job (and, for half of
    those, its real lease token), chosen from the case's own data so replays agree."""
    job_id = (case.path_parameters or {}).get("id")
    if not isinstance(job_id, str) or zlib.crc32(job_id.encode()) % 2:
        return
    wire.enqueue("fuzz-real", args=[1])
    [job] = wire.lease("fuzz-real", timeout=60)
    case.path_parameters["id"] = job["id"]
    COUNTS["real_job"] += 1
    body = case.body
    lease = body.get("lease") if isinstance(body, dict) else None
    if isinstance(lease, str) and zlib.crc32(lease.encode()) % 2 == 0:
        body["lease"] = job["lease"]
        COUNTS["real_lease"] += 1


def _bound_the_waits(case: Any) -> None:
    """Long-polls may ask for 300 s; keep fuzzed ones short (invalid values stay)."""
    for holder in (case.body, case.query):
        if isinstance(holder, dict):
            wait = holder.get("wait")
            if isinstance(wait, int | float) and not isinstance(wait, bool):
                if 0 <= wait <= 300:
                    holder["wait"] = min(wait, MAX_WAIT)
            elif isinstance(wait, str):
                try:
                    if 0 <= float(wait) <= 300:
                        holder["wait"] = str(min(float(wait), MAX_WAIT))
                except ValueError:
                    pass


def _send_and_check(case: Any, wire: Wire) -> None:
    _aim_at_a_real_job(case, wire)
    _bound_the_waits(case)
    response = case.call(timeout=10)
    COUNTS["requests"] += 1
    STATUSES[response.status_code] += 1
    if response.status_code >= 500:
        COUNTS["5xx"] += 1
    case.validate_response(
        response, checks=[not_a_server_error, response_schema_conformance]
    )


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_endpoint_answers_its_edge_cases_without_5xx_and_as_documented(
    label: str, api_schema: Any, wire: Wire
) -> None:
    """schemathesis's coverage cases: boundary values, wrong types, missing and extra
    fields, for every parameter and body field the document names (deterministic)."""
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served document"
    cases = api_schema.iter_coverage_cases(
        operation,
        generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        generation_config=GenerationConfig(),
    )
    for case in cases:
        _send_and_check(case, wire)


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_endpoint_answers_fuzzing_without_5xx_and_as_documented(
    label: str, api_schema: Any, wire: Wire
) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served document"
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def fuzz(case: Any) -> None:
        _send_and_check(case, wire)

    fuzz()


def test_the_fuzzed_broker_still_serves_and_counts_add_up(
    fuzz_broker: BrokerProcess, wire: Wire
) -> None:
    """After the fuzzing: healthy, and every queue's counts add up to its jobs."""
    assert wire.ok("GET", "/healthz")["status"] == "ok"
    for stats in wire.ok("GET", "/v1/queues")["queues"]:
        counts = stats["counts"]
        assert all(n >= 0 for n in counts.values())
    job_id = wire.enqueue("after-fuzz", args=[1])
    [job] = wire.lease("after-fuzz")
    wire.ok("POST", f"/v1/jobs/{job_id}/ack", {"lease": job["lease"], "result": 2})
    assert wire.job(job_id)["result"] == 2
