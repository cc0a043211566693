"""A request-body size limit as pure ASGI middleware: it runs before any framework reads the body."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

ASGIApp = Callable[..., Any]


class BodyLimit:
    """Answers `reject(max_bytes)` (an ASGI response) for a body over `max_bytes`, whether announced by
    Content-Length or streamed in chunks; otherwise reads the whole body first and replays it to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, reject: Callable[[int], ASGIApp]) -> None:
        self.app, self.max_bytes, self.reject = app, max_bytes, reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self.reject(self.max_bytes)(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self.reject(self.max_bytes)(scope, receive, send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay():  # the buffered body once; later receives pass through (disconnects)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
