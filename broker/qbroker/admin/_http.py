"""The admin verbs' HTTP: GET (and POST) JSON from a broker, errors as one line."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode

DEFAULT_URL = "http://127.0.0.1:7733"
TIMEOUT = 10.0  #: seconds to connect and to get a reply


class AdminError(Exception):
    """What went wrong, in one line for the operator."""


class Http:
    """Args:
    url: the broker; default QBROKER_URL, else DEFAULT_URL.
    token: its bearer token; default QBROKER_TOKEN.
    ca: a PEM file of the CA that signed an https broker's certificate; default
        QBROKER_CA, else the system's CAs.
    """

    def __init__(
        self, url: str | None, token: str | None, ca: str | None = None
    ) -> None:
        self.url = (url or os.environ.get("QBROKER_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("QBROKER_TOKEN")
        self.ca = ca or os.environ.get("QBROKER_CA")

    def get(self, path: str, query: dict[str, str] | None = None) -> Any:
        """The decoded JSON reply of `GET path?query`.

        Raises:
            AdminError: unreachable, or an error reply (its status, reason, message).
        """
        return self.call("GET", path, query)

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: Any = None,
    ) -> Any:
        target = self.url + path
        if query:
            target += "?" + urlencode(query, quote_via=quote)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(target, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            context = None
            if self.ca and target.startswith("https:"):
                context = ssl.create_default_context(cafile=self.ca)
            with urllib.request.urlopen(req, timeout=TIMEOUT, context=context) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as exc:
            raise AdminError(_refusal(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(
                f"cannot reach the broker at {self.url} ({reason}); "
                "is it running? (--url or QBROKER_URL)"
            ) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise AdminError(
                f"{self.url} did not answer JSON; is it qbroker?"
            ) from None


def _refusal(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    reason = body.get("error", exc.reason)
    message = body.get("message", "")
    hint = ""
    if exc.code == 401:
        hint = " (pass --token or set QBROKER_TOKEN)"
    elif exc.code == 404 and reason == "not_found" and "no route" in message:
        hint = " (this broker is older than this command)"
    return f"the broker said {exc.code} {reason}: {message}{hint}"


def path_name(name: str) -> str:
    return quote(name, safe="")
