"""uvicorn's HTTP/1.1 protocol with bounds on each request's headers: a deadline and a size.

uvicorn waits for a request's headers for as long as the client takes to send them: its
keep-alive timeout runs only between requests, and not at all before the first one. A
client that opens connections and sends a header line now and then (slowloris) holds a
socket, a file descriptor and a parser each, for good, until the server can accept no
more. And its parser (httptools) takes headers of any size: one header line of 100 MB
grew the server by 116 MB. Here the headers of every request must be complete within a
deadline, counted from the connection or from the previous response (else 408; a
connection that sent nothing is just closed), and within ``MAX_HEADER_BYTES`` (else 431).
Either way the connection is closed."""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 64 * 1024  # the request line and headers (nginx allows 4 x 8 KiB)
LINGER_S, LINGER_BYTES = 2.0, 1024 * 1024  # what is read (and dropped) after a refusal


def _problem(status: int, title: str, detail: str) -> bytes:
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail},
                      separators=(",", ":")).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, title.encode(), len(body), body))


_TIMED_OUT = _problem(408, "Request Timeout", "the request headers took too long to arrive")
_TOO_LARGE = _problem(431, "Request Header Fields Too Large",
                      f"the request line and headers are over {MAX_HEADER_BYTES} bytes")


class _BoundedHeaders(HttpToolsProtocol):
    header_timeout: float

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._started = False  # some bytes of a request have come (its answer is then a 408)
        self._waiting = True  # for the headers of a request
        self._header_bytes = 0
        self._lingering: int | None = None  # bytes read since the request was refused
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.close()
            return
        # A read that found the server waiting for headers and left it waiting held only
        # headers; the one that starts a request after a response may end the previous
        # body, so it is not counted (a read is at most 256 KiB: that bounds the slack).
        counted = self._waiting
        super().data_received(data)
        if counted and self._waiting and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                if self.cycle is None or self.cycle.response_complete:
                    self._refuse(_TOO_LARGE)
                else:  # behind a response still being written (pipelined): no answer fits
                    self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._started = self._waiting = True

    def on_headers_complete(self) -> None:
        self._started = self._waiting = False
        self._header_bytes = 0
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
            self._refuse(_TIMED_OUT)
        else:
            self.transport.close()

    def _refuse(self, response: bytes) -> None:
        """Answer and close, reading (and dropping) what the client still sends for a while
        first: closed with unread bytes, a socket is reset, and a reset client may lose the
        answer before it reads it (nginx's "lingering close")."""
        self._disarm()
        self.transport.write(response)
        self._lingering = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def with_bounded_headers(timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn's ``Config(http=...)``."""
    return type("BoundedHeaders", (_BoundedHeaders,), {"header_timeout": timeout})
