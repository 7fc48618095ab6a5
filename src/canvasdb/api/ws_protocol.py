"""uvicorn's WebSocket protocol (websockets-sansio) with bounds on what one client makes it hold.

- The handshake. uvicorn's HTTP parser hands an upgrade over to websockets, whose own parser
  refuses some that it accepted (more than 128 headers, a line over 8 KiB, a request body);
  uvicorn then waited for a request that never came, with no answer and no timer: 2 x 10,000
  such connections took the server's 20,000 file descriptors. The refusal is now written and
  the connection closed, lingering first as after the HTTP layer's own refusals (what the
  client still sends is read and dropped for a while: see api.lingering), and any handshake
  not complete within the header deadline is closed.
- A message's fragments. uvicorn keeps each one, and websockets counts payload bytes only,
  so endless empty continuation frames grew memory without bound under ``ws_max_size`` and
  stalled the event loop (another client's /healthz took up to 7.8 s). A message of more
  than ``MAX_FRAGMENTS`` frames is refused with 1009 ("message too big"): it is the layer's
  own refusal of a message too large, counted by the gateway as such; a browser sends a
  message in one frame.
- Pongs. Each ping was answered at once, whatever the write buffer held: a client that sends
  pings and reads nothing grew the server by 480 MB in 12 s. While the transport's writes
  are paused, pongs are not written; only the latest ping is answered once they resume,
  as RFC 6455 (5.5.3) allows.
- Ping floods: past ``PINGS_PER_S`` (after a burst of ``PING_BURST``) the connection is
  closed with 1008 (policy violation): each ping costs a parse and a pong.
- A text message that is not UTF-8 is closed with 1007, as before, but without the
  traceback uvicorn logged for each: it is the client's error, not the server's.
- Closes. Once the close frame is written (whoever closes: uvicorn, these bounds, the
  gateway, or the client, whose close is answered with one), uvicorn waits for the client
  to read up to it, which a client that reads nothing never does: the connection stayed
  open for good. It is dropped ``CLOSING_GRACE_S`` later.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame

from canvasdb.api.lingering import Lingering
from canvasdb.token_bucket import TokenBucket

MAX_FRAGMENTS = 1000  # frames of one message
PINGS_PER_S, PING_BURST = 10.0, 100  # a client's pings: sustained rate, and burst (then 1008)
_PONG = b"\x8a"  # the first byte of a server's pong frame (FIN, opcode 0xA)
CLOSING_GRACE_S = 5.0  # a client gets this long to read up to the close frame; then it is dropped


class _Bounded(WebSocketsSansIOProtocol):
    handshake_timeout: float
    _dropping: asyncio.TimerHandle | None = None  # the drop of a connection whose close frame is written
    _lingering: Lingering | None = None  # since the handshake was refused

    @property
    def close_sent(self) -> bool:
        return self._close_sent

    @close_sent.setter
    def close_sent(self, sent: bool) -> None:
        """Set by every close (uvicorn's, and any code's that writes a close frame itself): the
        drop is armed here, once for all of them."""
        self._close_sent = sent
        if sent:
            self._drop_later()

    def handle_close(self, event: Frame) -> None:
        super().handle_close(event)
        if self.transport.is_closing():  # the client's close, answered (close_sent stays unset)
            self._drop_later()

    def _drop_later(self) -> None:
        if self._dropping is None and not self.disconnected:
            self._dropping = self.loop.call_later(CLOSING_GRACE_S, self.transport.abort)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._pong: bytes | None = None  # the answer to the latest ping, held while writes are paused
        # each ping costs a parse and a pong; a browser sends none, a library a few a minute
        self._pings = TokenBucket(PINGS_PER_S, PING_BURST)
        self._deadline = self.loop.call_later(self.handshake_timeout, self._expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        if self._dropping is not None:
            self._dropping.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._lingering.received(data)
            return
        super().data_received(data)
        refused = self.conn.handshake_exc
        if refused is not None and not self.handshake_initiated and not self.transport.is_closing():
            # websockets answers a 414 or a 431 (uvicorn never wrote it); the rest, nothing
            answer = b"".join(self.conn.data_to_send()) or self.conn.reject(
                400, f"Failed to open a WebSocket connection: {refused.__cause__ or refused}.\n").serialize()
            self._lingering = Lingering(self.transport, answer)

    def _expired(self) -> None:
        if not self.handshake_complete:
            self.transport.close()

    def handle_cont(self, event: Frame) -> None:
        if len(self.frames) < MAX_FRAGMENTS:
            super().handle_cont(event)
        elif not self.transport.is_closing():
            self.frames = []
            self.conn.fail(1009, f"a message is at most {MAX_FRAGMENTS} frames")
            self.handle_parser_exception()

    def handle_ping(self) -> None:
        if not self._pings.try_take():
            if not self.transport.is_closing():
                self.conn.fail(1008, f"more than {PINGS_PER_S:g} pings a second")
                self.handle_parser_exception()
            return
        if self.writable.is_set():
            super().handle_ping()
            return
        output = self.conn.data_to_send()  # pongs, and maybe a close frame
        pongs = [frame for frame in output if frame.startswith(_PONG)]
        self._pong = pongs[-1] if pongs else self._pong
        self.transport.write(b"".join(frame for frame in output if not frame.startswith(_PONG)))

    def resume_writing(self) -> None:
        super().resume_writing()
        pong, self._pong = self._pong, None
        if pong is not None and not (self.close_sent or self.transport.is_closing()):
            self.transport.write(pong)

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError as exc:
                self.frames = []
                self.conn.fail(1007, f"invalid UTF-8 at byte {exc.start}")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()


def with_bounds(handshake_timeout: float) -> type[WebSocketsSansIOProtocol]:
    """The protocol class to give uvicorn's ``Config(ws=...)``."""
    return type("BoundedWebSocket", (_Bounded,), {"handshake_timeout": handshake_timeout})
