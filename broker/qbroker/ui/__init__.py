"""The dashboard at /ui (filled in next)."""

from __future__ import annotations

from typing import Any

from qbroker.protocol import Request, Response


async def respond(broker: Any, req: Request) -> Response:
    return Response(404, b"{}")
