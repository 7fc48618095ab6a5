"""The y-websocket wire protocol (y-protocols' sync and awareness messages), as bytes.

Every WebSocket frame is one message: a varuint type, then its body. Sync (0) carries a
sub-type and a length-prefixed payload: step 1 (a state vector), step 2 (an update
answering step 1) or update. Awareness (1) carries a length-prefixed awareness update:
a list of (client id, clock, JSON state), where the state ``null`` means "gone".
Auth (2) with sub-type 0 is "permission denied" and a reason; query awareness (3) has
no body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from canvasdb.documents.yjs import Reader
from canvasdb.documents.yjs import write_uint as _uint

SYNC, AWARENESS, AUTH, QUERY_AWARENESS = 0, 1, 2, 3
MAX_SAFE_INTEGER = 2**53 - 1
MAX_AWARENESS_STATE = 64 * 1024  # bytes of one client's awareness state (a cursor, a name)
STEP1, STEP2, UPDATE = 0, 1, 2
_PERMISSION_DENIED = 0


class ProtocolError(ValueError):
    """A frame that is not a y-websocket message."""


@dataclass(frozen=True)
class Message:
    kind: int  # SYNC, AWARENESS, AUTH or QUERY_AWARENESS
    step: int | None  # for SYNC: STEP1, STEP2 or UPDATE
    payload: bytes


def _chunk(data: bytes) -> bytes:
    return _uint(len(data)) + data


def read(frame: bytes) -> Message:
    r = Reader(frame)
    try:
        kind = r.uint()
        if kind == SYNC:
            step = r.uint()
            if step not in (STEP1, STEP2, UPDATE):
                raise ProtocolError(f"unknown sync message {step}")
            return Message(kind, step, r.chunk())
        if kind == AWARENESS:
            return Message(kind, None, r.chunk())
        if kind == QUERY_AWARENESS:
            return Message(kind, None, b"")
        if kind == AUTH:
            return Message(kind, None, frame[r.pos:])
    except (IndexError, ValueError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
    raise ProtocolError(f"unknown message type {kind}")


def sync_step1(state_vector: bytes) -> bytes:
    return bytes([SYNC, STEP1]) + _chunk(state_vector)


def sync_step2(update: bytes) -> bytes:
    return bytes([SYNC, STEP2]) + _chunk(update)


def sync_update(update: bytes) -> bytes:
    return bytes([SYNC, UPDATE]) + _chunk(update)


def awareness(update: bytes) -> bytes:
    return bytes([AWARENESS]) + _chunk(update)


def permission_denied(reason: str) -> bytes:
    return bytes([AUTH, _PERMISSION_DENIED]) + _chunk(reason.encode())


def awareness_entries(update: bytes) -> list[tuple[int, int, str]]:
    """The (client id, clock, JSON state) entries of an awareness update."""
    r = Reader(update)
    try:
        raw = [(r.uint(), r.uint(), r.chunk()) for _ in range(r.uint())]
    except (IndexError, ValueError) as exc:
        raise ProtocolError(f"malformed awareness update: {exc}") from None
    if any(len(state) > MAX_AWARENESS_STATE for _, _, state in raw):
        raise ProtocolError(f"an awareness state is at most {MAX_AWARENESS_STATE} bytes")
    try:  # strict UTF-8 (lib0 writes no other): a lone surrogate read here could not be sent on
        entries = [(client, clock, state.decode()) for client, clock, state in raw]
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"malformed awareness update: {exc}") from None
    for client, clock, state in entries:
        # what a JavaScript number holds (and the clock one more, for when its client goes)
        if client > MAX_SAFE_INTEGER or clock >= MAX_SAFE_INTEGER:
            raise ProtocolError("an awareness client id or clock is past 2^53 - 1")
        try:
            json.loads(state, parse_constant=_not_json)
        except (ValueError, RecursionError):  # nested past the parser's depth: not a state either
            raise ProtocolError("an awareness state is not JSON") from None
    return entries


def _not_json(constant: str) -> None:
    """NaN and Infinity, which Python's parser takes and JSON.parse (the client's) does not."""
    raise ValueError(f"{constant} is not JSON")


def awareness_update(entries: list[tuple[int, int, str]]) -> bytes:
    out = bytearray(_uint(len(entries)))
    for client, clock, state in entries:
        out += _uint(client) + _uint(clock) + _chunk(state.encode())
    return bytes(out)


def awareness_updates(entries: list[tuple[int, int, str]], max_bytes: int) -> list[bytes]:
    """``entries`` as awareness updates of at most ``max_bytes`` each; an entry that alone
    would be larger is left out."""
    updates: list[bytes] = []
    chunk: list[bytes] = []
    size = 5  # the largest count prefix
    for client, clock, state in entries:
        entry = _uint(client) + _uint(clock) + _chunk(state.encode())
        if len(entry) + 5 > max_bytes:
            continue
        if size + len(entry) > max_bytes:
            updates.append(_uint(len(chunk)) + b"".join(chunk))
            chunk, size = [], 5
        chunk.append(entry)
        size += len(entry)
    if chunk:
        updates.append(_uint(len(chunk)) + b"".join(chunk))
    return updates

