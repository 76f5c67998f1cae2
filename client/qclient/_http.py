"""Sans-IO HTTP for the client: request bytes and reply decoding.

Theory of operation (h11's examples, httpx's `_transports`): this module never touches a
socket or an event loop.

1. `Codec` turns a msgspec struct into a body and knows the fixed headers (Host,
   Content-Type, Accept, Authorization) and the URL prefix; one per client.
2. `HTTPConnection` wraps one `h11.Connection` per socket. `request()` gives the
   bytes to write; the driver feeds whatever it reads to `receive()` and calls
   `next_response()` until it returns a `Response`. `reusable` then says if the
   socket may go back to the pool (keep-alive) or must be closed.
3. `Codec.decode()` turns a 2xx `Response` into its reply struct with a module-level
   reused msgspec Decoder, and any other status into the matching `BrokerError`.

What to send is decided by the operations (`_ops`), when to resend by `_retry`.
"""

from __future__ import annotations

import re
import select
from typing import Any, Final, Generic, Literal, TypeVar
from urllib.parse import quote, urlsplit

import h11
import msgspec

from qclient._errors import BrokerError, ProtocolError, broker_error
from qclient.wire import (
    NAME_PATTERN,
    BatchReply,
    CancelReply,
    EnqueueManyReply,
    EnqueueReply,
    ErrorBody,
    ExtendReply,
    Health,
    JobRecord,
    LeaseReply,
    QueueList,
    QueueStats,
    ResultsReply,
    WorkerList,
)

T = TypeVar("T")

Encoding = Literal["json", "msgpack"]

DEFAULT_URL: Final = (
    "http://127.0.0.1:7733"  #: used when neither url nor QBROKER_URL is set
)
DEFAULT_PORT: Final = 7733  #: port for a URL that names none
DEFAULT_TIMEOUT: Final = (
    30.0  #: seconds for connect, and for a reply beyond a long-poll wait
)
DEFAULT_RETRIES: Final = 10  #: resends after connection trouble (~10 s in all)
MAX_IDLE_CONNECTIONS: Final = 64  #: keep-alive sockets a client keeps open while idle
RECV_SIZE: Final = 65536  #: bytes asked of one recv()
RESULT_POLL_CHUNK: Final = 60.0  #: seconds of one long-poll for a job's result
SEND_MANY_CHUNK: Final = 1000  #: jobs per send_many() request; <= MAX_RESULTS
MAX_HEADS: Final = 1024  #: request heads a client keeps built before it starts over

_NAME_RE = re.compile(NAME_PATTERN)


def path_name(name: str) -> str:
    """A queue name or job id ready for a URL path segment.

    Valid names (protocol.md section 2) need no escaping; anything else is
    percent-encoded so that the broker, not a mangled path, rejects it.
    """
    if _NAME_RE.match(name) is not None:
        return name
    return quote(name, safe="")


def readable_now(fd: int) -> bool:
    """True if an idle keep-alive socket has something to read: EOF or stray bytes.

    Either way the socket can't carry a new request (the broker closed it, or sent
    an unsolicited 408), so the pool drops it instead of failing a request on it.
    """
    try:
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class Response:
    """One complete HTTP reply. `retried` is set by the retry policy: True if an
    earlier attempt of the same call failed in a way that may have reached the broker."""

    __slots__ = ("body", "msgpack", "retried", "status")

    def __init__(self, status: int, body: bytes, msgpack: bool) -> None:
        self.status = status
        self.body = body
        self.msgpack = msgpack
        self.retried = False


class ConnectionLost(Exception):
    """The broker closed the connection before a whole reply arrived (internal)."""


#: What a failed exchange on a connection raises, besides TimeoutError.
TRANSPORT_ERRORS: Final = (OSError, ConnectionLost, h11.ProtocolError)


class HTTPConnection:
    """The sans-IO state of one keep-alive connection: one `h11.Connection`.

    Not thread-safe: a connection serves one request at a time, which the pools
    guarantee by handing each socket to one caller.
    """

    __slots__ = (
        "_body",
        "_h11",
        "_host",
        "_msgpack",
        "_status",
        "got_bytes",
        "reusable",
    )

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.CLIENT)
        self._status = 0
        self._msgpack = False
        self._body: list[bytes] = []
        self.got_bytes = False  #: any byte of the current reply arrived
        self.reusable = False  #: after a reply: keep-alive may go on

    def request(self, head: h11.Request, body: bytes) -> bytes:
        """The bytes of one request (`Codec.head` made `head` for `body`)."""
        h = self._h11
        self.got_bytes = False
        self.reusable = False
        data = h.send(head)
        assert data is not None
        if body:
            more = h.send(h11.Data(data=body))
            assert more is not None
            data += more
        end = h.send(h11.EndOfMessage())
        assert end is not None
        return data + end

    def receive(self, data: bytes) -> None:
        """Feed bytes read from the socket; b"" means the peer closed it."""
        if data:
            self.got_bytes = True
        self._h11.receive_data(data)

    def next_response(self) -> Response | None:
        """The complete reply, or None if more bytes must be read first.

        Raises:
            ConnectionLost: the peer closed the connection mid-reply.
            h11.RemoteProtocolError: the reply is not valid HTTP/1.1.
        """
        h = self._h11
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Data):
                self._body.append(event.data)
            elif isinstance(event, h11.Response):
                self._status = event.status_code
                self._msgpack = _is_msgpack(event.headers)
            elif isinstance(event, h11.EndOfMessage):
                body = b"".join(self._body)
                self._body.clear()
                if h.our_state is h11.DONE and h.their_state is h11.DONE:
                    h.start_next_cycle()
                    self.reusable = True
                return Response(self._status, body, self._msgpack)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise ConnectionLost("connection closed before the reply ended")
            # InformationalResponse (1xx): skip it, the real reply follows.


def _is_msgpack(headers: Any) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return bool(value.startswith(b"application/msgpack"))
    return False


class Decoders(Generic[T]):
    """The reused msgpack and JSON decoders of one reply type (msgspec perf tips)."""

    __slots__ = ("json", "msgpack")

    def __init__(self, type_: Any) -> None:
        self.msgpack: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type_)
        self.json: msgspec.json.Decoder[T] = msgspec.json.Decoder(type_)


ENQUEUE_REPLY: Final[Decoders[EnqueueReply]] = Decoders(EnqueueReply)
ENQUEUE_MANY_REPLY: Final[Decoders[EnqueueManyReply]] = Decoders(EnqueueManyReply)
JOB_RECORD: Final[Decoders[JobRecord]] = Decoders(JobRecord)
CANCEL_REPLY: Final[Decoders[CancelReply]] = Decoders(CancelReply)
LEASE_REPLY: Final[Decoders[LeaseReply]] = Decoders(LeaseReply)
EXTEND_REPLY: Final[Decoders[ExtendReply]] = Decoders(ExtendReply)
BATCH_REPLY: Final[Decoders[BatchReply]] = Decoders(BatchReply)
QUEUE_LIST: Final[Decoders[QueueList]] = Decoders(QueueList)
QUEUE_STATS: Final[Decoders[QueueStats]] = Decoders(QueueStats)
HEALTH: Final[Decoders[Health]] = Decoders(Health)
WORKER_LIST: Final[Decoders[WorkerList]] = Decoders(WorkerList)
RESULTS_REPLY: Final[Decoders[ResultsReply]] = Decoders(ResultsReply)
#: `POST /v1/jobs/{id}/fail` replies {"state": ...}; qclient.wire has no struct for it.
STATE_REPLY: Final[Decoders[dict[str, Any]]] = Decoders(dict[str, Any])
_ERROR_BODY: Final[Decoders[ErrorBody]] = Decoders(ErrorBody)

_MSGPACK_ENCODER = msgspec.msgpack.Encoder()
_JSON_ENCODER = msgspec.json.Encoder()
_CONTENT_TYPES = {"msgpack": b"application/msgpack", "json": b"application/json"}


class Codec:
    """Everything about a client's requests that is fixed at construction.

    Args:
        url: the broker's base URL, `http[s]://host[:port][/prefix]`.
        token: sent as `Authorization: Bearer <token>` when not None/empty.
        encoding: "msgpack" (default, faster) or "json" for request and reply bodies.

    Raises:
        ValueError: the URL is not `http://` or `https://`, or the encoding is
            unknown.
    """

    __slots__ = (
        "_encode",
        "_get_headers",
        "_heads",
        "_json",
        "_post_headers",
        "host",
        "port",
        "prefix",
        "tls",
    )

    def __init__(self, url: str, token: str | None, encoding: Encoding) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"qclient speaks http[s]://host:port, not {url!r}")
        if encoding not in _CONTENT_TYPES:
            raise ValueError(f"encoding must be 'msgpack' or 'json', not {encoding!r}")
        self.host: str = parts.hostname
        self.tls: bool = parts.scheme == "https"  #: verify the broker's certificate
        self.port: int = parts.port or DEFAULT_PORT
        self.prefix: str = parts.path.rstrip("/")
        host_header = parts.netloc.rpartition("@")[2].encode("ascii")
        mime = _CONTENT_TYPES[encoding]
        base = [(b"Host", host_header), (b"Accept", mime)]
        if token:
            base.append((b"Authorization", b"Bearer " + token.encode("latin-1")))
        self._get_headers = base
        self._post_headers = [*base, (b"Content-Type", mime)]
        self._json = encoding == "json"
        self._encode = _JSON_ENCODER.encode if self._json else _MSGPACK_ENCODER.encode
        #: (method, target, body length) -> its h11 request event. Events are
        #: immutable, and h11 checks the headers of each one it is handed a list for
        #: (a fifth of what a small request costs it), not of one it made itself.
        self._heads: dict[tuple[bytes, bytes, int], h11.Request] = {}

    def encode(self, obj: Any) -> bytes:
        """The request body for a wire struct (or any msgspec-encodable value)."""
        return self._encode(obj)

    def roundtrip(self, value: Any) -> Any:
        """`value` as it comes back from the broker once sent in this encoding."""
        decode = msgspec.json.decode if self._json else msgspec.msgpack.decode
        return decode(self._encode(value))

    def head(self, method: bytes, target: bytes, body: bytes) -> h11.Request:
        """The request head for a body (GET carries none, POST always a length).
        Thread-safe: a race only builds the same event twice."""
        key = (method, target, len(body))
        event = self._heads.get(key)
        if event is None:
            if method == b"GET":
                headers = self._get_headers
            else:
                length = (b"Content-Length", b"%d" % len(body))
                headers = [*self._post_headers, length]
            event = h11.Request(method=method, target=target, headers=headers)
            if len(self._heads) >= MAX_HEADS:
                self._heads.clear()
            self._heads[key] = event
        return event

    def target(self, path: str) -> bytes:
        """The request target for a path below the base URL, e.g. "/v1/queues"."""
        return (self.prefix + path).encode("ascii")

    def decode(self, response: Response, decoders: Decoders[T]) -> T:
        """The reply struct of a 2xx response.

        Raises:
            BrokerError: (a subclass by reason) for any non-2xx status.
            ProtocolError: a 2xx body that does not decode as the expected type.
        """
        if not 200 <= response.status < 300:
            raise self.error(response)
        decoder = decoders.msgpack if response.msgpack else decoders.json
        try:
            return decoder.decode(response.body)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"undecodable {response.status} reply: {exc}") from exc

    def error(self, response: Response) -> BrokerError:
        """The `BrokerError` for an error reply (any body, ErrorBody or not)."""
        decoder = _ERROR_BODY.msgpack if response.msgpack else _ERROR_BODY.json
        try:
            body = decoder.decode(response.body)
        except msgspec.DecodeError:
            text = response.body[:200].decode("utf-8", "replace")
            return broker_error(response.status, f"http_{response.status}", text)
        return broker_error(response.status, body.error, body.message, body.field)


def format_wait(wait: float) -> str:
    """A long-poll `wait` as a query value: milliseconds are enough, and no exponent."""
    return f"{max(0.0, wait):.3f}"
