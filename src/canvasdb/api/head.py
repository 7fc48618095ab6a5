"""HEAD wherever GET: RFC 9110 asks it of every general-purpose server, and a 405's ``Allow``
names HEAD beside GET, but FastAPI routes a GET handler for GET alone (HEAD /healthz was 405)."""

from __future__ import annotations

from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from canvasdb.api.route_match import matching_routes


class HeadAsGet:
    """Hands a HEAD that no route takes as such (attachments have their own) to the GET route.

    Only the app's copy of the scope says GET: the server's still says HEAD, so uvicorn sends
    the GET answer's headers, ``Content-Length`` included, and leaves its body unsent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD" and not any(
                match is Match.FULL for _, match, _ in matching_routes(scope)):
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
