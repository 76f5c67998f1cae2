"""The broker's TLS settings: one server `ssl.SSLContext` from `--tls-cert`/`--tls-key`.

The connections themselves are server.py's: a TLS connection is the same keep-alive
loop over a non-blocking `ssl.SSLSocket` on the connection's socket, so OpenSSL does
the record work in C and h11 stays sans-IO (trio's SSLStream, a Python loop around a
memory BIO, cost more per request; see bench/RESULTS.md).
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSConfigError(ValueError):
    """A certificate or key the broker cannot use; the message is one line."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context serving `cert` (a PEM chain, the leaf first) with `key`.

    TLS 1.2 at least; the ALPN protocol offered is http/1.1, the only one spoken.

    Raises:
        TLSConfigError: a file is missing, unreadable, not PEM, or the key does not
            match the certificate.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    for what, path in (("certificate", cert), ("key", key)):
        try:
            path.open("rb").close()
        except OSError as exc:
            raise TLSConfigError(
                f"cannot read the TLS {what} {path}: {exc.strerror}"
            ) from None
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"cannot use the TLS certificate {cert} with the key {key}"
            f" ({exc.reason or exc}); both must be PEM, the key the certificate's"
        ) from None
    return ctx
