"""What an operation asks for (`Request`), and the one retry policy of every call.

Theory of operation: an operation (`_ops`) yields a `Request`; the client's driver
makes a `Retry` for it and loops: try once on some connection, hand what happened (a
`Response`, or a `Failure` when no reply came) to `Retry.decide(outcome, now)`, and do
what it says: return the reply, sleep some seconds and resend, or raise its error.
The policy never touches a socket or a clock; `now` is `time.monotonic()`.

The rules (the same for the blocking and the async client):

- A connection that could not be made sent nothing: resend after a backoff; but a
  broker certificate that fails verification is an error at once (resending cannot help).
- A connection lost before a whole reply may have carried the request to the broker:
  resend after a backoff, and mark the final reply `retried` (a 409 to an enqueue
  may then be the first attempt's success). A pooled keep-alive socket the broker had
  closed while idle gets one resend at once, not counted as a retry.
- No reply within the timeout is not retried: the broker may be busy applying the
  request, and waiting again would double the caller's deadline.
- 408, 429 and 503 mean "nothing was done, try later": resend after a backoff.
- The retries end after `retries` of them, or when the next one would end past
  `timeout` plus the request's long-poll wait from the call's start (one connect that
  hangs on a full listen backlog must not take `timeout` per retry).
- A long-poll resent waits only what is left of its wait (`Request.rebuild`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

from qclient._errors import ProtocolError, QClientError
from qclient._http import Codec, Response
from qclient._tls import is_certificate_error

__all__ = ["BACKOFF_INITIAL", "BACKOFF_MAX", "Failure", "Request", "Retry", "backoff"]

BACKOFF_INITIAL: Final = 0.05  #: seconds before the first retry; doubles each time
BACKOFF_MAX: Final = 2.0  #: seconds; the cap of one backoff sleep

#: Replies that mean "nothing was done, try again later" (protocol.md section 4).
RETRY_STATUSES: Final = frozenset({408, 429, 503})
_EMPTY = b""


class Request:
    """One HTTP request an operation needs answered.

    Attributes:
        method: b"GET" or b"POST".
        path: below the client's base URL, e.g. "/v1/lease".
        body: the encoded body (b"" for none).
        wait: seconds the broker may hold the reply (a long-poll), beyond `timeout`.
        rebuild: for a long-poll, makes the request anew for a resend, given the
            seconds left of `wait` (a lease also says it is a resend).
    """

    __slots__ = ("body", "method", "path", "rebuild", "wait")

    def __init__(
        self,
        method: bytes,
        path: str,
        body: bytes = _EMPTY,
        wait: float = 0.0,
        rebuild: Callable[[float], Request] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.body = body
        self.wait = wait
        self.rebuild = rebuild


class Failure:
    """An attempt that got no reply.

    Attributes:
        error: the exception the transport raised.
        sent: the request may have reached the broker (False: no connection was made).
        stale: it went out on a pooled socket and not one byte came back: the broker
            had closed the socket while it sat idle.
    """

    __slots__ = ("error", "sent", "stale")

    def __init__(
        self, error: BaseException, *, sent: bool = False, stale: bool = False
    ) -> None:
        self.error = error
        self.sent = sent
        self.stale = stale


def backoff(attempt: int) -> float:
    """Seconds to sleep before retry number `attempt` (0-based).

    Exponential from BACKOFF_INITIAL, capped at BACKOFF_MAX, with "equal jitter"
    (half fixed, half random) so that many clients cut off by one broker restart
    don't come back in lockstep.
    """
    delay = min(BACKOFF_MAX, BACKOFF_INITIAL * (2.0**attempt))
    return delay / 2 + random.random() * delay / 2


class Retry:
    """The retry policy of one request: see the module docstring.

    `head`, `body` and `reply_timeout` are what the next attempt sends and how long
    it waits for the reply; `decide()` updates them for a resend.

    Args:
        codec: the client's codec (request heads, error replies).
        request: what to send.
        url: the broker's URL, for error messages.
        timeout: the client's timeout, seconds.
        retries: the client's retry budget.
        now: `time.monotonic()` at the start of the call.
    """

    __slots__ = (
        "_attempt",
        "_codec",
        "_free",
        "_give_up",
        "_maybe_applied",
        "_request",
        "_retries",
        "_start",
        "_timeout",
        "_url",
        "body",
        "head",
        "reply_timeout",
    )

    def __init__(
        self,
        codec: Codec,
        request: Request,
        *,
        url: str,
        timeout: float,
        retries: int,
        now: float,
    ) -> None:
        self._codec = codec
        self._request = request
        self._url = url
        self._timeout = timeout
        self._retries = retries
        self._start = now
        self._give_up = now + timeout + request.wait
        self._attempt = 0
        self._maybe_applied = False
        self._free = True  #: one immediate resend for a pooled socket found dead
        self.body = request.body
        self.head = codec.head(request.method, codec.target(request.path), self.body)
        self.reply_timeout = timeout + request.wait

    def connect_timeout(self, now: float) -> float:
        """Seconds the next connect may take: within the call's whole budget."""
        return max(0.01, min(self._timeout, self._give_up - now))

    def decide(
        self, outcome: Response | Failure, now: float
    ) -> Response | QClientError | float:
        """What to do after an attempt.

        Returns:
            The reply, to return to the operation (any status but the retried ones);
            an error, to raise in it; or seconds to sleep before resending (0: at once).
        """
        request = self._request
        if isinstance(outcome, Response):
            if outcome.status not in RETRY_STATUSES:
                outcome.retried = self._maybe_applied
                return outcome
        elif not outcome.sent and is_certificate_error(outcome.error):
            return _caused(
                ProtocolError(
                    f"the TLS certificate of {self._url} failed verification"
                    f" ({outcome.error}); give the CA that signed it (ca=, QBROKER_CA)"
                ),
                outcome.error,
            )
        elif outcome.sent:
            if isinstance(outcome.error, TimeoutError):
                return _caused(
                    ProtocolError(
                        f"no reply from {self._url} within {self.reply_timeout:g} s"
                    ),
                    outcome.error,
                )
            self._maybe_applied = True
            if outcome.stale and self._free:
                self._free = False  # a keep-alive race: resend at once
                self._resend(now)
                return 0.0
        pause = backoff(self._attempt)
        if self._attempt >= self._retries or now + pause > self._give_up:
            if isinstance(outcome, Response):
                return self._codec.error(outcome)
            return _caused(
                ProtocolError(
                    f"{request.method.decode()} {request.path} to {self._url} failed "
                    f"after {self._attempt} retries: {outcome.error!r}"
                ),
                outcome.error,
            )
        self._attempt += 1
        self._resend(now + pause)
        return pause

    def _resend(self, at: float) -> None:
        """Build the resend, at `at`, of a long-poll: it waits only what is left."""
        rebuild = self._request.rebuild
        if rebuild is None:
            return
        left = max(0.0, self._request.wait - (at - self._start))
        again = rebuild(left)
        codec = self._codec
        self.body = again.body
        self.head = codec.head(again.method, codec.target(again.path), again.body)
        self.reply_timeout = self._timeout + left


def _caused(error: QClientError, cause: BaseException) -> QClientError:
    """`error` as `raise error from cause` would leave it."""
    error.__cause__ = cause
    error.__suppress_context__ = True
    return error
