"""TLS end to end: `qbroker serve --tls-cert --tls-key` with a certificate made here
(trustme: a throwaway CA), through the blocking client, the async client on trio and
asyncio, and a `qworker` subprocess; a client or worker with the wrong CA is refused."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import qclient
import trio
import trustme

from tests.conftest import BrokerFactory, BrokerProcess, child_env
from tests.test_worker import TESTS_DIR, WorkerProc


@dataclass
class Pki:
    ca: Path  #: the CA that signed the broker's certificate
    other_ca: Path  #: a CA that did not
    cert: Path  #: the broker's certificate chain
    key: Path  #: its key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    paths = Pki(
        ca=tmp_path / "ca.pem",
        other_ca=tmp_path / "other-ca.pem",
        cert=tmp_path / "cert.pem",
        key=tmp_path / "key.pem",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    trustme.CA().cert_pem.write_to_path(str(paths.other_ca))
    issued.cert_chain_pems[0].write_to_path(str(paths.cert))
    for pem in issued.cert_chain_pems[1:]:
        pem.write_to_path(str(paths.cert), append=True)
    issued.private_key_pem.write_to_path(str(paths.key))
    return paths


@pytest.fixture
def tls_broker(broker_factory: BrokerFactory, pki: Pki) -> BrokerProcess:
    args = ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    return broker_factory(name="tls", args=args, ca=pki.ca).start()


def test_blocking_client_round_trip_over_tls(
    tls_broker: BrokerProcess, pki: Pki
) -> None:
    assert tls_broker.url.startswith("https://")
    big = "x" * 300_000  # many TLS records each way, and partial writes
    with qclient.Client(tls_broker.url, ca=str(pki.ca), timeout=10) as client:
        job = client.send("tls", {"text": big})
        for n in range(5):  # keep-alive: the pooled TLS connection serves them all
            client.send("tls", n)
        leased = client.lease(["tls"], max=10)
        assert leased[0].id == job.id
        for j in leased:
            client.ack(j.id, j.lease, len(str(j.kwargs or j.args)))
        assert job.result(timeout=10) > 300_000
        assert client.get_job(job.id).kwargs == {"text": big}


def test_wrong_or_missing_ca_is_refused_at_once(
    tls_broker: BrokerProcess, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QBROKER_CA", raising=False)
    for ca in (str(pki.other_ca), None):  # None: the system's CAs
        with qclient.Client(tls_broker.url, ca=ca, timeout=10) as client:
            start = time.monotonic()
            with pytest.raises(qclient.ProtocolError) as info:
                client.send("tls", 1)
            # not retried for ten seconds: resending cannot fix a certificate
            assert time.monotonic() - start < 5
        assert "failed verification" in str(info.value)
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    # the CA file from the environment works as ca= does
    monkeypatch.setenv("QBROKER_CA", str(pki.ca))
    with qclient.Client(tls_broker.url, timeout=10) as client:
        assert client.health().status == "ok"


def test_a_bad_ca_file_is_a_value_error(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CA file"):
        qclient.Client("https://127.0.0.1:1", ca=str(tmp_path / "missing.pem"))
    # an http URL needs no CA and makes no context
    qclient.Client("http://127.0.0.1:1", ca=str(tmp_path / "missing.pem")).close()


async def _async_round_trip(url: str, ca: str) -> object:
    async with qclient.AsyncClient(url, ca=ca, timeout=10) as client:
        job = await client.send("atls", {"n": 1})
        [leased] = await client.lease(["atls"], max=1)
        await client.ack(leased.id, leased.lease, "done")
        result = await job.result(timeout=10)
        assert await client.queue("atls")  # a second request on the pooled stream
        return result


async def _async_refused(url: str, ca: str) -> None:
    async with qclient.AsyncClient(url, ca=ca, timeout=10) as client:
        with pytest.raises(qclient.ProtocolError, match="failed verification"):
            await client.health()


def test_async_client_over_tls_on_trio_and_asyncio(
    tls_broker: BrokerProcess, pki: Pki
) -> None:
    url, ca, other = tls_broker.url, str(pki.ca), str(pki.other_ca)
    assert trio.run(_async_round_trip, url, ca) == "done"
    assert asyncio.run(_async_round_trip(url, ca)) == "done"
    trio.run(_async_refused, url, other)
    asyncio.run(_async_refused(url, other))


def test_worker_over_tls_and_refused_with_the_wrong_ca(
    tls_broker: BrokerProcess, pki: Pki, tmp_path: Path
) -> None:
    with qclient.Client(tls_broker.url, ca=str(pki.ca), timeout=10) as client:
        jobs = [client.send("send_email", {"name": f"n{i}"}) for i in range(5)]
        refused = WorkerProc(
            tls_broker.url, tmp_path / "wrong.log", ("--ca", str(pki.other_ca))
        )
        assert refused.wait(30) == 1, refused.output()
        [line] = refused.events("worker.tls_refused")
        assert "failed verification" in line["error"] and "--ca" in line["fix"]
        assert client.queue("send_email").counts["queued"] == 5

        worker = WorkerProc(
            tls_broker.url, tmp_path / "ok.log", ("--ca", str(pki.ca), "--burst")
        )
        assert worker.wait(60) == 0, worker.output()
        assert [j.result(timeout=10) for j in jobs] == ["success"] * 5


def test_broker_survives_plain_http_and_broken_handshakes(
    tls_broker: BrokerProcess, pki: Pki
) -> None:
    for junk in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",
    ):
        with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=10) as s:
            s.sendall(junk)
            s.settimeout(10)
            try:
                while s.recv(4096):  # the broker closes it (a TLS alert, then EOF)
                    pass
            except ConnectionResetError:
                pass
    with qclient.Client(tls_broker.url, ca=str(pki.ca), timeout=10) as client:
        assert client.health().status == "ok"


@pytest.mark.parametrize(
    ("which", "needle"),
    [
        ("missing-cert", "cannot read the TLS certificate"),
        ("key-mismatch", "cannot use the TLS certificate"),
        ("cert-only", "needs both --tls-cert and --tls-key"),
    ],
)
def test_broker_refuses_a_tls_setup_it_cannot_use(
    pki: Pki, tmp_path: Path, which: str, needle: str
) -> None:
    other = trustme.CA().issue_cert("127.0.0.1")
    other_key = tmp_path / "other-key.pem"
    other.private_key_pem.write_to_path(str(other_key))
    args = {
        "missing-cert": [
            "--tls-cert",
            str(tmp_path / "nope.pem"),
            "--tls-key",
            str(pki.key),
        ],
        "key-mismatch": ["--tls-cert", str(pki.cert), "--tls-key", str(other_key)],
        "cert-only": ["--tls-cert", str(pki.cert)],
    }[which]
    proc = subprocess.run(
        [sys.executable, "-m", "qbroker", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "d"), *args],
        env=child_env(), capture_output=True, text=True, timeout=60, cwd=TESTS_DIR,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_module_level_client_takes_a_ca(tls_broker: BrokerProcess, pki: Pki) -> None:
    qclient.configure(tls_broker.url, ca=str(pki.ca))
    try:
        assert qclient.send("tls", 1).info().state == "queued"
    finally:
        qclient.configure()  # back to the environment's default for other tests
