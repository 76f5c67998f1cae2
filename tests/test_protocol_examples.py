"""Every curl example in protocol.md runs against a real broker and gets a 2xx."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, BrokerProcess
from tests.wirehttp import Wire

EXAMPLES = re.findall(r"```sh\n(.*?)```", (ROOT / "protocol.md").read_text(), re.S)


def test_protocol_md_has_an_example_per_endpoint() -> None:
    text = "\n".join(EXAMPLES)
    for path in ("/send_email/jobs", "/v1/lease", "/ack", "/fail", "/extend", "/release", "/cancel",
                 "/result?wait", "/v1/results", "/v1/queues/send_email", "/healthz", "/metrics", "openapi",
                 "/purge", "/v1/kv/get", "/v1/kv/set", "/v1/kv/incr", "/v1/kv/expire",
                 "/v1/kv/delete", "/pause", "/resume", "/v1/limits/", "/v1/jobs?",
                 "/retry", "-X DELETE http://127.0.0.1:7733/v1/jobs/", "/v1/cancels"):  # fmt: skip
        assert path in text, path


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.split("\n")[0][:60])
def test_curl_example_succeeds(broker: BrokerProcess, example: str) -> None:
    w = Wire(broker.url)
    w.enqueue("send_email", kwargs={"to": "a@b.c"})
    [job] = w.lease("send_email")
    w.close()
    script = example.replace("http://127.0.0.1:7733", broker.url).replace(
        "curl -s", "curl -sf"
    )
    script = "\n".join(line for line in script.splitlines() if not line.startswith("#"))
    env = {**os.environ, "ID": job["id"], "LEASE": job["lease"]}
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, timeout=30, cwd=Path.cwd()
    )
    assert done.returncode == 0, (script, done.stdout[-500:], done.stderr[-500:])
    assert done.stdout
