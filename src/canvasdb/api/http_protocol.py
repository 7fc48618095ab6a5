"""uvicorn's HTTP/1.1 protocol with a deadline for each request's headers.

uvicorn waits for a request's headers for as long as the client takes to send them: its
keep-alive timeout runs only between requests, and not at all before the first one. A
client that opens connections and sends a header line now and then (slowloris) holds a
socket, a file descriptor and a parser each, for good, until the server can accept no
more. Here the headers of every request must be complete within a deadline, counted
from the connection or from the previous response; a request still incomplete then is
answered 408 and its connection closed (one that sent nothing is just closed)."""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TIMED_OUT_BODY = json.dumps({
    "type": "about:blank", "title": "Request Timeout", "status": 408,
    "detail": "the request headers took too long to arrive",
}, separators=(",", ":")).encode()  # fmt: skip
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
              b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMED_OUT_BODY), _TIMED_OUT_BODY))


class _HeaderDeadline(HttpToolsProtocol):
    header_timeout: float

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._started = False  # some bytes of a request have come (its answer is then a 408)
        self._waiting = True  # for the headers of a request
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._started = self._waiting = True

    def on_headers_complete(self) -> None:
        self._started = self._waiting = False
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # With pipelined requests queued, their headers are in: the last response arms it.
        if not self.pipeline and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self._waiting or self.transport.is_closing():
            return
        if self._started:
            self.transport.write(_TIMED_OUT)
        self.transport.close()


def with_header_deadline(seconds: float) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn's ``Config(http=...)``."""
    return type("HeaderDeadline", (_HeaderDeadline,), {"header_timeout": seconds})
