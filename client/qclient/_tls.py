"""TLS for the clients: the `ssl.SSLContext` an `https://` client verifies with.

Certificates are always verified, against the system's CAs or, for a private CA, the
PEM file given as `ca=` (or env QBROKER_CA). `ssl` is imported only for an https URL,
so `import qclient` stays light.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

__all__ = ["client_context", "is_certificate_error"]


def client_context(ca: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """A verifying client context: the system CAs, or only `ca`'s when given (else
    env QBROKER_CA's). The host name is checked too.

    Raises:
        ValueError: the CA file cannot be read or holds no PEM certificate.
    """
    import ssl

    if ca is None:
        ca = os.environ.get("QBROKER_CA") or None
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ValueError(f"cannot use the CA file {ca}: {why}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def is_certificate_error(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a failed certificate check: resending
    cannot help, the client needs the right CA (or the broker the right certificate)."""
    import sys

    ssl = sys.modules.get("ssl")  # not loaded: no TLS was tried
    while ssl is not None and exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False
