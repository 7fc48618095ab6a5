"""A pure ASGI guard that refuses request bodies over a size, before anything buffers them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """Refuses bodies over ``max_bytes`` with 413; ``path_limits`` gives other limits to the paths
    that match a regular expression (the first that matches), such as streamed uploads."""

    def __init__(self, app: ASGIApp, *, max_bytes: int,
                 path_limits: Iterable[tuple[str, int]] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = [(re.compile(pattern), limit) for pattern, limit in path_limits]

    def limit_for(self, path: str) -> int:
        for pattern, limit in self.path_limits:
            if pattern.match(path):
                return limit
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.limit_for(scope.get("path", ""))
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            await self._refuse(send, max_bytes)
            return
        seen = 0
        overflow = False

        async def counted_receive() -> Message:
            # A streamed body that grows too large is cut off here, as a disconnect: a body
            # that merely ended could be a complete document (then padding) and be acted on.
            # Whatever the app answers is replaced by a 413 in guarded_send.
            nonlocal seen, overflow
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    overflow = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not overflow:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._refuse(send, max_bytes)

        await self.app(scope, counted_receive, guarded_send)

    async def _refuse(self, send: Send, max_bytes: int) -> None:
        body = json.dumps({
            "type": "about:blank", "title": "Payload too large", "status": 413,
            "detail": f"the request body is over {max_bytes} bytes", "limit": max_bytes,
        }, separators=(",", ":")).encode()  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
