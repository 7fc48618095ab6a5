"""A lingering close after a refusal (nginx's): closed with bytes still coming, a socket is
reset, and a client that is still sending gets the reset, and may lose the answer before it
reads it. So the answer is written and the sending side shut, then what the client still
sends is read and dropped for ``LINGER_S`` or ``LINGER_BYTES``, whichever ends first."""

from __future__ import annotations

import asyncio

LINGER_S, LINGER_BYTES = 2.0, 1024 * 1024  # what is read (and dropped) after a refusal


class Lingering:
    """Started by a refusal: ``answer`` is written; the protocol hands it what it reads since.
    No answer (none fits, as behind a response still being written): just closed."""

    def __init__(self, transport: asyncio.Transport, answer: bytes | None) -> None:
        self.transport, self.read = transport, 0
        if answer is None:
            transport.close()
            return
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def received(self, data: bytes) -> None:
        """Drop ``data``; close once the client sent more than ``LINGER_BYTES``."""
        self.read += len(data)
        if self.read > LINGER_BYTES:
            self.transport.close()
