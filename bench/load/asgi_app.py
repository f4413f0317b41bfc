"""The peers' application: read the whole body, answer ``202`` with an empty body.

``app`` is plain ASGI (for uvicorn and hypercorn); ``fastapi_app`` is the same
route in FastAPI.  Neither is imported by the gateway.
"""
from __future__ import annotations

from typing import Any

__all__ = ["app", "fastapi_app"]

_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"0")]


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    received = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 202, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": b""})


try:  # only the peers' venv has FastAPI; module level so its annotations resolve
    from fastapi import FastAPI, Request, Response
except ImportError:
    FastAPI = None


def _fastapi() -> Any:
    if FastAPI is None:
        return None
    api = FastAPI()

    @api.post("/v1/logs")
    async def logs(request: Request) -> Response:
        await request.body()
        return Response(status_code=202, media_type="application/json")

    return api


fastapi_app = _fastapi()
