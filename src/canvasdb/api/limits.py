"""Pure ASGI guards that act before a request's body is read: one refuses bodies over a size,
before anything buffers them; the other checks the caller's token before a large body is read."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from canvasdb.api.deps import bearer, member_of, user_of
from canvasdb.api.problems import problem_response
from canvasdb.api.route_match import matching_routes
from canvasdb.errors import CanvasdbError, NotFound


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


class CredentialsFirst:
    """Checks the API token of a ``/v1`` request whose body is over ``min_bytes`` (or chunked)
    before the body is read. FastAPI reads and parses a body before it resolves a route's
    dependencies, the token among them: a client with no token at all could make the server
    read and parse 4 MiB of JSON (170 ms of CPU) for each 401. Smaller bodies cost less than
    the extra round trip this takes.

    The check is the one the route's dependency makes (as a member of the org its path names,
    if it names one), and its outcome is left in the request's state for that dependency: the
    token is looked up once. An org's 404 is left for the route to answer, where it always
    did (after the body's own errors, such as JSON that does not parse)."""

    def __init__(self, app: ASGIApp, *, min_bytes: int = 64 * 1024) -> None:
        self.app = app
        self.min_bytes = min_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope["headers"])
            declared = headers.get(b"content-length")
            large = (b"chunked" in headers.get(b"transfer-encoding", b"").lower() if declared is None
                     else not declared.isdigit() or int(declared) > self.min_bytes)
            if large:
                try:
                    token = await bearer(headers.get(b"authorization", b"").decode("latin-1"))
                    svc, org = scope["app"].state.services, _org_of_route(scope)
                    await (user_of(scope, svc, token) if org is None else member_of(scope, svc, token, org))
                except NotFound:
                    pass
                except CanvasdbError as exc:
                    await problem_response(exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _org_of_route(scope: Scope) -> str | None:
    """The org named in the path of the route that will answer ``scope``, if any."""
    for _, match, child in matching_routes(scope):
        if match is Match.FULL:
            return child.get("path_params", {}).get("org")  # type: ignore[no-any-return]
    return None
