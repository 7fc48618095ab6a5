"""uvicorn's HTTP/1.1 protocol with bounds on what a client may make the server wait for or hold.

uvicorn waits for a request's headers, its body and the reading of its response for as
long as the client takes: its keep-alive timeout runs only between requests, and not at
all before the first one. A client that opens connections and sends a header line now
and then (slowloris), a body byte now and then, or never reads what it asked for, holds
a socket, a file descriptor and buffers each, for good, until the server can accept no
more. And its parser (httptools) takes headers of any size (one header line of 100 MB
grew the server by 116 MB), and trailers after a chunked body, which uvicorn adds to
the request's headers: unbounded, and a way to slip in an ``Authorization`` header that
a proxy in front never saw. Here, as nginx does by default:

- the headers of every request must be complete within a deadline, counted from the
  connection or from the previous response (else 408; a connection that sent nothing is
  just closed), and within ``MAX_HEADER_BYTES`` (else 431);
- a body must not pause for longer than an idle timeout (nginx's client_body_timeout),
  nor carry more than ``MAX_HEADER_BYTES`` of framing beyond its own size; a trailer
  closes the connection;
- a response the client leaves unread for as long is dropped (nginx's send_timeout).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from canvasdb.api.lingering import Lingering
from canvasdb.api.problems import problem

MAX_HEADER_BYTES = 64 * 1024  # the request line and headers (nginx allows 4 x 8 KiB)


def _problem(status: int, title: str, detail: str) -> bytes:
    """A whole HTTP response carrying ``problems.problem``'s document, to write to the socket."""
    body = bytes(problem(status, title, detail).body)
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, title.encode(), len(body), body))


_TIMED_OUT = _problem(408, "Request Timeout", "the request headers took too long to arrive")
_TOO_LARGE = _problem(431, "Request Header Fields Too Large",
                      f"the request line and headers are over {MAX_HEADER_BYTES} bytes")


class _BoundedRequests(HttpToolsProtocol):
    header_timeout: float
    idle_timeout: float

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._started = False  # some bytes of a request have come (its answer is then a 408)
        self._waiting = True  # for the headers of a request
        self._in_body = False  # between a request's headers and its end
        self._header_bytes = 0
        self._requests = self._headed = 0  # requests begun on this connection, and whose headers are in
        self._body_bytes = self._framing_bytes = 0
        self._body_moved = 0.0  # when the body last made progress (loop time)
        self._server_paused = False  # the server did not read at the body clock's last look
        self._lingering: Lingering | None = None  # since the request was refused
        self._deadline: asyncio.TimerHandle | None = None
        self._send_stall: asyncio.TimerHandle | None = None
        self._arm(self.header_timeout, self._headers_late)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._lingering.received(data)
            return
        # A read that found the server waiting for a request's headers, completed none and
        # left it waiting held only those headers; one that found it in a body and left it in
        # the same one held only that body. Any other read may hold parts of two requests, so
        # it is not counted (a read is at most 256 KiB: that bounds the slack).
        waiting, in_body, request = self._waiting, self._in_body, self._requests
        body_before, headed = self._body_bytes, self._headed
        super().data_received(data)
        if self.transport.is_closing():
            return
        if waiting and self._waiting and self._headed == headed:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse_headers(_TOO_LARGE)
        elif in_body and self._in_body and self._requests == request:
            self._framing_bytes += len(data) - (self._body_bytes - body_before)
            if self._framing_bytes > MAX_HEADER_BYTES + self._body_bytes:  # chunk sizes, extensions
                self._drop()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._started = self._waiting = True
        self._requests += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._waiting:  # a trailer, after a chunked body: none is taken
            self._drop()
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._started = self._waiting = False
        self._headed += 1
        self._header_bytes = 0
        self._disarm()
        # Counted as they arrived, the headers could pass the bound by a read's worth.
        if len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > MAX_HEADER_BYTES:
            self._refuse_headers(_TOO_LARGE)
            return
        super().on_headers_complete()
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self._in_body, self._body_bytes, self._framing_bytes, self._server_paused = True, 0, 0, False
            self._body_moved = self.loop.time()
            self._arm(self.idle_timeout, self._body_late)

    def on_body(self, body: bytes) -> None:
        if self._lingering is None:
            self._body_bytes += len(body)
            self._body_moved = self.loop.time()
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._lingering is None:
            self._in_body = False
            self._disarm()
            super().on_message_complete()
            answered = self.cycle is not None and self.cycle.response_complete
            if answered and not self.pipeline and not self.parser.should_upgrade():  # before its body ended
                self._arm(self.header_timeout, self._headers_late)

    def handle_websocket_upgrade(self) -> None:
        if self._lingering is None:  # (refused for its headers' size)
            super().handle_websocket_upgrade()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # With pipelined requests queued, their headers are in: the last response arms it.
        # A body still coming keeps its own deadline.
        if not self.pipeline and not self._in_body and not self.transport.is_closing():
            self._arm(self.header_timeout, self._headers_late)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_stall is None:
            self._watch_sending(None)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_stall is not None:
            self._send_stall.cancel()
            self._send_stall = None

    def _watch_sending(self, unsent: int | None) -> None:
        """While writes wait, drop the connection once nothing was taken for a whole idle timeout."""
        now = self.transport.get_write_buffer_size()
        if unsent is not None and now >= unsent:
            self._send_stall = None
            self.transport.abort()
            return
        self._send_stall = self.loop.call_later(self.idle_timeout, self._watch_sending, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._send_stall is not None:
            self._send_stall.cancel()
        super().connection_lost(exc)

    def _arm(self, delay: float, expired: object) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, expired)  # type: ignore[arg-type]

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if not self._waiting or self.transport.is_closing():
            return
        if self._started:
            self._refuse_headers(_TIMED_OUT)
        else:
            self.transport.close()

    def _body_late(self) -> None:
        self._deadline = None
        if not self._in_body or self.transport.is_closing():
            return
        # While the server does not read (the client may not send), and once after it starts
        # again, the clock starts over: the client gets a whole timeout from then.
        paused = self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue)
        if paused or self._server_paused:
            self._body_moved = self.loop.time()
        self._server_paused = paused
        idle = self.loop.time() - self._body_moved
        if idle < self.idle_timeout:
            self._arm(self.idle_timeout - idle, self._body_late)
        else:
            self._drop()

    def _drop(self) -> None:
        """Close the connection; the request's application sees its client gone (any answer it
        still sends goes nowhere, and nothing is logged for it)."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _refuse_headers(self, response: bytes) -> None:
        """Answer and close, lingering (see ``Lingering``). Behind a response still being
        written (pipelined requests), no answer fits: just close."""
        self._disarm()
        busy = self.cycle is not None and not self.cycle.response_complete
        self._lingering = Lingering(self.transport, None if busy else response)


def with_bounded_requests(*, header_timeout: float, idle_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn's ``Config(http=...)``."""
    return type("BoundedRequests", (_BoundedRequests,),
                {"header_timeout": header_timeout, "idle_timeout": idle_timeout})
