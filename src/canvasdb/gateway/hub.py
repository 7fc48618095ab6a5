"""The gateway's rooms: who is connected to which document here, and fan-out to them.

Nothing here is a source of truth. An update from a client is validated and committed to
the op log first; the log's commit listener then broadcasts it to the other clients of
the document on this process, and the commit's NOTIFY tells other processes, which read
the update from the log (through their document store) and broadcast it to theirs. A
room only remembers which sequence numbers it has delivered, so that nothing is sent
twice or echoed to its sender. Awareness (cursors, names) is not stored: it is relayed
here and, through NOTIFY, to the other gateways.

The listening connection is named ``canvasdb-listen <origin>``: commits and awareness
are notified only while some other process listens (migration 0015), so a gateway alone
on its database is not woken by its own notices. It is also proven alive: a connection
that a NAT or firewall dropped without a word would otherwise stay open, hear nothing,
and look ready for hours.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from uuid import UUID

import psycopg
from psycopg.conninfo import conninfo_to_dict

from canvasdb import metrics
from canvasdb.db.pool import RECONNECT_EVERY
from canvasdb.documents import DocumentStore
from canvasdb.documents.log import NOTIFY_CHANNEL
from canvasdb.errors import one_line
from canvasdb.gateway import protocol

log = logging.getLogger("canvasdb.gateway")
_MAX_NOTIFY_AWARENESS = 6000  # bytes of awareness relayed through NOTIFY (its payload limit is 8000)
_SEND_QUEUE = 10_000  # messages waiting for one slow client before it is disconnected
_GOING_AWAY = b""  # queued last by drain(): the sender closes with 1001 once it gets there
# Bytes written to a client and not yet taken by it: past SLOW_CLIENT_BYTES and not going
# down for SLOW_CLIENT_STALL_S, the client is too slow; past _UNSENT_LIMIT of what it did
# not ask for, at once. It is closed with 1013 ("try again later"): the official client
# reconnects and resyncs (a 44xx code would make it stop for good). The answer to its own
# sync request does not count against the second limit: a large document may pass it.
SLOW_CLIENT_BYTES = 16 * 1024 * 1024
SLOW_CLIENT_STALL_S = 10
_UNSENT_LIMIT = 4 * SLOW_CLIENT_BYTES
CLOSE_GRACE_S = 5.0  # a close waits this long for room in the client's buffer; then it goes behind
# Awareness is held in memory and sent to every joiner: bounded per connection (the clients
# it introduced), per room (clients, and bytes of their states) and per state (protocol.py).
MAX_AWARENESS_CLIENTS_PER_CONNECTION = 64
MAX_AWARENESS_CLIENTS_PER_ROOM = 10_000
MAX_AWARENESS_BYTES_PER_ROOM = 4 * 1024 * 1024
LISTENER_NAME = "canvasdb-listen {origin}"  # application_name of the listening connection
# Once listening, rooms catch up at once and again after this long: a commit that checked
# for listeners before this one connected, and became visible only after the first
# catch-up read the log, sent no notice (migration 0015).
_CATCH_UP_AGAIN_S = 1.0
# The listening connection's libpq settings (what the conninfo sets wins): the kernel gives
# a silent peer up after 25 s of unanswered probes, or 20 s of unacknowledged data, not
# after the two hours of the default keepalive (both ignored on Unix sockets), and a
# connection attempt after 10 s.
_LISTENER_TCP = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5",
                 "keepalives_count": "3", "tcp_user_timeout": "20000", "connect_timeout": "10"}


def ws_frame(message: bytes) -> bytes:
    """A server's (unmasked) binary WebSocket frame: the same bytes for every peer."""
    n = len(message)
    if n < 126:
        return bytes((0x82, n)) + message
    if n < 65536:
        return bytes((0x82, 126)) + n.to_bytes(2, "big") + message
    return bytes((0x82, 127)) + n.to_bytes(8, "big") + message


def close_now(proto: Any, code: int, reason: str) -> None:
    """Close uvicorn's WebSocket ``proto`` without waiting for room in its buffer, which a
    client that does not read never makes: the close frame goes behind what waits. (The
    WebSocket layer drops a client that does not read up to it: api.ws_protocol.)"""
    proto.conn.fail(code, reason)  # as uvicorn's own keepalive timeout does
    proto.transport.write(b"".join(proto.conn.data_to_send()))
    proto.close_sent = True
    proto.transport.close()


@dataclass(eq=False)
class Peer:
    """One WebSocket connection's outbound side: messages are queued, a task sends them.

    With ``direct`` (uvicorn's protocol object for the socket), a message is written to the
    transport at once as a frame built once for all peers, whenever nothing is queued or
    being sent, so order holds: a broadcast then costs a write per peer, not a task switch
    and the ASGI and framing layers per peer and message."""

    send: Callable[[bytes], Any]  # the socket's send, awaited by the sender task
    close: Callable[[int, str], Any]
    direct: Any = None
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(_SEND_QUEUE))
    awareness_ids: set[int] = field(default_factory=set)  # the awareness clients it introduced
    awareness_heard: bool = False  # it sent awareness already (its first message is its own)
    awareness_answered: float = 0.0  # when a query for the room's awareness was last answered
    busy: bool = False  # the sender task is sending a message
    pending: list[bytes] = field(default_factory=list)  # frames for the next direct write
    pending_bytes: int = 0
    written: int = 0  # bytes written to the transport, ever
    asked_end: int = 0  # where (in those) the answer to its last sync request ends
    backlog_check: asyncio.TimerHandle | None = None  # the next one, while past SLOW_CLIENT_BYTES

    def _write(self) -> None:
        frames, self.pending, self.pending_bytes = self.pending, [], 0
        d = self.direct
        if frames and not (d.close_sent or d.disconnected or d.transport.is_closing()):
            data = b"".join(frames)
            self.written += len(data)
            d.transport.write(data)
            if self.backlog_check is None and self.unsent() > SLOW_CLIENT_BYTES:
                self.backlog_check = asyncio.get_running_loop().call_later(
                    1, self._check_backlog, float("inf"), 0)

    def _check_backlog(self, before: float, stalled: int) -> None:
        """Each second while more than SLOW_CLIENT_BYTES wait unread (the socket's whole buffer
        counts, what the WebSocket layer wrote too): a client that leaves no fewer for
        SLOW_CLIENT_STALL_S is cut off. The checks start when a write passes that mark and end
        when the client drains below it, so that a client that keeps up costs no wake-ups."""
        self.backlog_check = None
        d, now = self.direct, self.unsent()
        if d.close_sent or d.disconnected or now <= SLOW_CLIENT_BYTES:
            return
        stalled = stalled + 1 if now >= before else 0
        if stalled >= SLOW_CLIENT_STALL_S:
            self.cut_off()
            return
        self.backlog_check = asyncio.get_running_loop().call_later(1, self._check_backlog, now, stalled)

    def push(self, message: bytes, frame: bytes | None = None, *, asked: bool = False) -> None:
        """Send ``message`` (``frame``: the same, framed); ``asked``: the answer to the client's
        own sync request, which no backlog limit refuses (the next request waits for it)."""
        d = self.direct
        if d is not None and not self.busy and self.queue.empty():  # else in order, through the queue
            if d.close_sent or d.disconnected or d.transport.is_closing():
                return  # on its way out: the client resyncs when it reconnects
            if not asked and self._unasked_unsent() > _UNSENT_LIMIT:
                self.cut_off()
                return
            # Written when this turn of the event loop ends: what one commit sends a peer is
            # one write.
            if not self.pending:
                asyncio.get_running_loop().call_soon(self._write)
            frame = frame if frame is not None else ws_frame(message)
            self.pending.append(frame)
            self.pending_bytes += len(frame)
            if asked:
                self.asked_end = self.written + self.pending_bytes
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:  # too slow to keep up: it resyncs when it reconnects
            self.cut_off()

    def unsent(self) -> int:
        """Bytes written to this client and not yet taken by it (direct writes only; the
        queue has its own bound)."""
        d = self.direct
        return d.transport.get_write_buffer_size() + self.pending_bytes if d is not None else 0

    def _unasked_unsent(self) -> int:
        """``unsent()`` less what remains of the answer to its last sync request."""
        buffered = self.direct.transport.get_write_buffer_size()
        asked = max(0, self.asked_end - (self.written - buffered))
        return buffered + self.pending_bytes - asked

    def cut_off(self) -> None:
        """Close a client too slow to receive (1013: it reconnects and resyncs); the WebSocket
        layer drops it if the close does not get through."""
        d = self.direct
        if d is not None and (d.close_sent or d.disconnected):
            return
        metrics.GATEWAY_REJECTED.labels("slow_client").inc()
        if d is None:
            asyncio.get_running_loop().create_task(self.close(1013, "too slow to receive updates"))
            return
        self.pending, self.pending_bytes = [], 0
        close_now(d, 1013, "too slow to receive updates")

    def closing_stuck(self) -> bool:
        """Its close frame is written and the connection still open: a client that does not
        read keeps it so until the WebSocket layer drops it."""
        d = self.direct
        return d is not None and d.close_sent and not d.disconnected

    def going_away(self) -> None:
        """Close with 1001 ("going away") after what is already queued has been sent."""
        try:
            self.queue.put_nowait(_GOING_AWAY)
        except asyncio.QueueFull:
            asyncio.get_running_loop().create_task(self.close(1001, "server shutting down"))

    async def run_sender(self) -> None:
        while (message := await self.queue.get()) is not None:
            if message is _GOING_AWAY:
                await self.close(1001, "server shutting down")
                return
            self.busy = True
            try:
                await self.send(message)
            finally:
                self.busy = False


class Held(NamedTuple):
    """An awareness client's state that a room holds, with its size in bytes (UTF-8), counted
    against the room's budget."""

    clock: int
    state: str
    size: int


@dataclass(eq=False)
class Room:
    org_id: UUID
    doc_id: str
    peers: set[Peer] = field(default_factory=set)
    floor: int = 0  # every update up to here was delivered
    above: set[int] = field(default_factory=set)  # delivered updates past the floor
    awareness: dict[int, Held] = field(default_factory=dict)  # client id -> its state
    awareness_bytes: int = 0  # of the states held
    owners: dict[int, Peer] = field(default_factory=dict)  # awareness client -> its connection here
    gone: dict[int, int] = field(default_factory=dict)  # awareness client -> clock of its removal
    # awareness entries waiting for the room's next relay: for the peers here, and (those of
    # this gateway's clients) for the other gateways
    outgoing: dict[int, tuple[int, str]] = field(default_factory=dict)
    notify: dict[int, tuple[int, str]] = field(default_factory=dict)
    relay_due: asyncio.TimerHandle | None = None
    catching_up: asyncio.Lock = field(default_factory=asyncio.Lock)
    catch_up_due: asyncio.TimerHandle | None = None  # another try after one failed
    idle_since: float | None = None
    # Updates of clients here on their way to the log, by sender, until their commit is
    # broadcast: a catch-up that reads one from the log first skips its sender too.
    sending: dict[bytes, Peer] = field(default_factory=dict)

    def delivered(self, seq: int) -> bool:
        return seq <= self.floor or seq in self.above

    def mark(self, seq: int) -> None:
        if seq <= self.floor:
            return
        self.above.add(seq)
        while self.floor + 1 in self.above:
            self.floor += 1
            self.above.discard(self.floor)

    def broadcast(self, message: bytes, *, skip: Peer | None = None) -> None:
        sent = 0
        frame = ws_frame(message)
        for peer in self.peers:
            if peer is not skip:
                peer.push(message, frame)
                sent += 1
        metrics.GATEWAY_FANOUT.observe(sent)


class Hub:
    """All rooms of this process, the commit listener and the NOTIFY listener."""

    def __init__(self, documents: DocumentStore, conninfo: str, *, idle_seconds: float = 30,
                 awareness_delay: float = 0.05, liveness_seconds: float = 10) -> None:
        self.documents = documents
        self.conninfo = conninfo
        self.idle_seconds = idle_seconds
        self.awareness_delay = awareness_delay
        # The listening connection is asked SELECT 1 after this long without a notice, and
        # given up when it has not answered this long after.
        self.liveness_seconds = liveness_seconds
        self.origin = documents.log.origin
        self.rooms: dict[tuple[UUID, str], Room] = {}
        self.connections = 0  # open gateway connections here (connection.serve caps them)
        self.user_connections: Counter[UUID | None] = Counter()  # ... of each user, once authorized
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._catch_ups: set[asyncio.Task[None]] = set()  # kept: a task only the loop holds may vanish
        self._alive_at: float | None = None  # when the listening connection last proved alive
        self._notifier: psycopg.AsyncConnection[Any] | None = None
        self._catch_up_again: asyncio.TimerHandle | None = None
        self._outbox: list[str] = []  # awareness notices for other gateways, sent in batches
        self._outbox_ready = asyncio.Event()
        documents.log.committed = self._committed

    @property
    def listening(self) -> bool:
        """LISTENing on a connection that proved alive lately (a notice, or an answer to
        SELECT 1): one that has not is not trusted to hear other processes."""
        alive = self._alive_at
        return alive is not None and time.monotonic() - alive < 2 * self.liveness_seconds

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._sweep()),
                       asyncio.create_task(self._send_notices())]

    async def drain(self, timeout: float = 10.0) -> None:
        """Refuse new connections, tell every client "going away" (1001) after what is queued
        for it, and wait (up to ``timeout``) for the connections to end: each one commits the
        updates it had received before it ends, so nothing a client sent before the close is
        lost. A client reconnects (to another gateway) and resyncs the rest."""
        self.stopping = True
        for room in self.rooms.values():
            for peer in room.peers:
                peer.going_away()
        deadline = time.monotonic() + timeout
        while any(room.peers for room in self.rooms.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Close the connections still open with 1001; commits in flight finish first."""
        if self._catch_up_again is not None:
            self._catch_up_again.cancel()
        for room in self.rooms.values():  # no catch-up tried again from here on
            if room.catch_up_due is not None:
                room.catch_up_due.cancel()
        for task in [*self._tasks, *self._catch_ups]:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*self._catch_ups, return_exceptions=True)
        peers = [peer for room in self.rooms.values() for peer in room.peers]
        for peer in peers:
            with contextlib.suppress(Exception):
                await peer.close(1001, "server shutting down")
        if self._notifier is not None:
            await self._notifier.close()

    # --- rooms ----------------------------------------------------------------------------------

    def join(self, org_id: UUID, doc_id: str, peer: Peer, seq: int) -> Room:
        """Enter the document's room; ``seq`` is what the peer's initial sync included."""
        room = self.rooms.get((org_id, doc_id))
        if room is None:
            room = self.rooms[(org_id, doc_id)] = Room(org_id, doc_id, floor=seq)
        if not room.peers:
            metrics.GATEWAY_DOCS.inc()
        room.peers.add(peer)
        room.idle_since = None
        if seq > room.floor:  # updates from elsewhere this room has not broadcast yet
            self._catch_up_soon(room)
        return room

    def leave(self, room: Room, peer: Peer) -> None:
        if peer not in room.peers:
            return
        room.peers.discard(peer)
        if not room.peers:
            metrics.GATEWAY_DOCS.dec()
        for update in [u for u, sender in room.sending.items() if sender is peer]:  # commits that failed
            del room.sending[update]
        mine = [c for c in peer.awareness_ids if room.owners.get(c) is peer]
        for client in mine:
            del room.owners[client]
        gone = [(c, room.awareness[c].clock + 1, "null") for c in mine if c in room.awareness]
        if gone:  # tell the others this connection's clients are gone
            self._queue_awareness(room, gone, notify=self._notifier is not None)
        if not room.peers:
            room.idle_since = time.monotonic()

    async def _sweep(self) -> None:
        """Unload documents nobody here has had open for ``idle_seconds``."""
        while True:
            await asyncio.sleep(max(self.idle_seconds / 2, 0.5))
            now = time.monotonic()
            for key, room in list(self.rooms.items()):
                idle = room.idle_since
                if not room.peers and idle is not None and now - idle >= self.idle_seconds:
                    del self.rooms[key]
                    self.documents.unload(*key)

    # --- updates --------------------------------------------------------------------------------

    def _committed(self, org_id: UUID, doc_id: str, seq: int, payload: bytes, tag: object) -> None:
        """An update was committed by this process: send it to the room's other peers now."""
        room = self.rooms.get((org_id, doc_id))
        if room is None:
            return
        if room.sending:
            room.sending.pop(payload, None)
        if room.delivered(seq):
            return
        room.mark(seq)
        room.broadcast(protocol.sync_update(payload), skip=tag if isinstance(tag, Peer) else None)

    async def catch_up(self, room: Room) -> None:
        """Broadcast what other processes committed to this document and the room has not sent."""
        async with room.catching_up:
            updates = await self.documents.updates_since(room.org_id, room.doc_id, room.floor)
            if updates is None:  # a snapshot replaced updates we never sent: send its state
                sync = await self.documents.sync(room.org_id, room.doc_id)
                for update in sync.updates:
                    room.broadcast(protocol.sync_update(update))
                room.floor, room.above = sync.seq, set()
                return
            for seq, update in updates:
                if not room.delivered(seq):
                    room.mark(seq)
                    room.broadcast(protocol.sync_update(update), skip=room.sending.get(update))

    def _catch_up_soon(self, room: Room) -> None:
        """``catch_up`` in a task of its own. A failure (the database away, no connection
        free in time) is one line in the log, and the room tries again ``RECONNECT_EVERY``
        s later while it is open here: a quiet document sends no notice that would."""
        if room.catch_up_due is not None:
            room.catch_up_due.cancel()
            room.catch_up_due = None
        task = asyncio.get_running_loop().create_task(self.catch_up(room))
        self._catch_ups.add(task)
        task.add_done_callback(lambda done: self._caught_up(done, room))

    def _caught_up(self, task: asyncio.Task[None], room: Room) -> None:
        self._catch_ups.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.warning("could not catch %s up with the log: %s", room.doc_id, one_line(exc))
        if self.rooms.get((room.org_id, room.doc_id)) is room and room.catch_up_due is None:
            room.catch_up_due = asyncio.get_running_loop().call_later(
                RECONNECT_EVERY, self._catch_up_again_if_open, room)

    def _catch_up_again_if_open(self, room: Room) -> None:
        room.catch_up_due = None
        if self.rooms.get((room.org_id, room.doc_id)) is room:
            self._catch_up_soon(room)

    # --- awareness ------------------------------------------------------------------------------

    def relay_awareness(self, room: Room, update: bytes, sender: Peer | None) -> None:
        """To everyone here (the sender too: it keeps the client's connection watchdog fed,
        as the reference server does) and, through NOTIFY, to the other gateways.

        Each client's state belongs to one connection here, taken away when it goes: the
        clients a connection introduces (that the room did not hold: its own, or another
        tab's heard over a BroadcastChannel before that tab's socket opened), and the one
        client of its first message when that is newer than what the room holds (an
        official client's first message holds its own state only: that other tab's, or its
        own after a reconnection the room has not seen the end of). An official client
        also sends back every state it hears of, its first message included when it has
        no state of its own; those stay their owners'. Past the caps (clients per
        connection and per room), new clients are not taken in."""
        entries = protocol.awareness_entries(update)
        if sender is None:
            self._queue_awareness(room, entries, notify=self._notifier is not None)
            return
        first, sender.awareness_heard = not sender.awareness_heard, True
        kept, claims = [], []
        for client, clock, state in entries:
            held = room.awareness.get(client)
            if state != "null" and held is None:
                if (len(sender.awareness_ids) + len(claims) >= MAX_AWARENESS_CLIENTS_PER_CONNECTION
                        or len(room.awareness) + len(claims) >= MAX_AWARENESS_CLIENTS_PER_ROOM):
                    metrics.GATEWAY_REJECTED.labels("awareness_full").inc()
                    continue
                claims.append(client)
            elif state != "null" and first and len(entries) == 1 and clock > held.clock:
                claims.append(client)
            kept.append((client, clock, state))
        accepted = self._queue_awareness(room, kept, notify=self._notifier is not None)
        for client in claims:
            if client in accepted:
                room.owners[client] = sender
                sender.awareness_ids.add(client)

    def _queue_awareness(self, room: Room, entries: list[tuple[int, int, str]], *, notify: bool) -> set[int]:
        """Take in the entries newer than what the room holds, as y-protocols does (a state
        with a higher clock; a removal with at least the clock held), within the room's
        byte budget; the clients taken in.

        Awareness is relayed at most every ``awareness_delay`` seconds per room, as one
        message holding each client's latest state: the official client renews its state
        every 15 s, so a thousand clients that connected together renew together, and one
        frame per state and peer stalled the gateway for a third of a second. What a client
        sends back of states it heard is not newer, so it goes no further; nor does a state
        sent back after its client went (the clock of each removal is kept)."""
        accepted: set[int] = set()
        for client, clock, state in entries:
            held = room.awareness.get(client)
            held_bytes = held.size if held is not None else 0
            if state == "null":
                if held is None or clock < held.clock:
                    continue
                del room.awareness[client]
                room.owners.pop(client, None)
                room.gone[client] = clock
                if len(room.gone) > MAX_AWARENESS_CLIENTS_PER_ROOM:
                    del room.gone[next(iter(room.gone))]
                room.awareness_bytes -= held_bytes
            else:
                if clock <= (held.clock if held is not None else room.gone.get(client, -1)):
                    continue
                size = len(state.encode())
                if room.awareness_bytes - held_bytes + size > MAX_AWARENESS_BYTES_PER_ROOM:
                    metrics.GATEWAY_REJECTED.labels("awareness_full").inc()
                    continue
                room.awareness[client] = Held(clock, state, size)
                room.gone.pop(client, None)
                room.awareness_bytes += size - held_bytes
            accepted.add(client)
            for pending in (room.outgoing, room.notify) if notify else (room.outgoing,):
                if client not in pending or pending[client][0] <= clock:
                    pending[client] = (clock, state)
        if accepted and room.relay_due is None:
            room.relay_due = asyncio.get_running_loop().call_later(self.awareness_delay, self._relay, room)
        return accepted

    def _relay(self, room: Room) -> None:
        room.relay_due = None
        outgoing, room.outgoing = room.outgoing, {}
        notices, room.notify = room.notify, {}
        if outgoing:
            entries = [(client, clock, state) for client, (clock, state) in outgoing.items()]
            room.broadcast(protocol.awareness(protocol.awareness_update(entries)))
        entries = [(client, clock, state) for client, (clock, state) in notices.items()]
        for update in protocol.awareness_updates(entries, _MAX_NOTIFY_AWARENESS):  # NOTIFY is small
            encoded = base64.b64encode(update).decode()
            self._outbox.append(f"a {room.org_id} {encoded} {self.origin} {room.doc_id}")
            self._outbox_ready.set()

    def awareness_snapshot(self, room: Room, peer: Peer | None = None) -> bytes | None:
        """Every client's state, for a joiner or a query; a peer's queries are answered at most
        once per ``awareness_delay`` (each answer is the whole room's awareness)."""
        if peer is not None:
            now = time.monotonic()
            if now - peer.awareness_answered < self.awareness_delay:
                return None
            peer.awareness_answered = now
        if not room.awareness:
            return None
        return protocol.awareness(protocol.awareness_update(
            [(client, held.clock, held.state) for client, held in room.awareness.items()]))

    async def _send_notices(self) -> None:
        """Relay queued awareness to the other gateways: all that queued up in one statement,
        one statement at a time, so that it never holds more than one pooled connection (a
        task and a connection per notice starved the commits of a thousand clients)."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch, self._outbox = self._outbox, []
            try:
                async with self.documents.db.pool.connection() as conn:
                    await conn.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p"
                                       " WHERE doc_notify_wanted(%s)", (NOTIFY_CHANNEL, batch, self.origin))
            except Exception:  # awareness is ephemeral: a lost one is renewed by the client
                log.debug("could not relay awareness", exc_info=True)

    # --- other processes ------------------------------------------------------------------------

    async def _listen(self) -> None:
        """LISTEN for other processes' commits and awareness; reconnect with backoff (every
        ``RECONNECT_EVERY`` s at most, as the pool).

        A connection can die without a word (a NAT or firewall that drops the flow sends no
        RST), and one that nothing comes through looks the same as an idle one: after
        ``liveness_seconds`` without a notice it is asked SELECT 1, and given up if that is
        not answered within as long again. A new connection then re-reads every open
        document, as after any lost one."""
        delay = 0.5
        while True:
            try:
                self._notifier = await psycopg.AsyncConnection.connect(**self._listener_conninfo(),
                                                                       autocommit=True)
                async with self._notifier as conn:
                    await self._answered(conn, f"LISTEN {NOTIFY_CHANNEL}")
                    await self._end_earlier_listeners(conn)
                    self._alive_at, delay = time.monotonic(), 0.5
                    self._catch_up_all()  # what happened while not listening
                    self._catch_up_again = asyncio.get_running_loop().call_later(
                        _CATCH_UP_AGAIN_S, self._catch_up_all)
                    while True:
                        quiet = time.monotonic() - self._alive_at
                        if quiet >= self.liveness_seconds:
                            await self._answered(conn, "SELECT 1")
                            self._alive_at = time.monotonic()
                        else:
                            async for notice in conn.notifies(timeout=self.liveness_seconds - quiet):
                                self._alive_at = time.monotonic()
                                self._heard(notice.payload)
            except asyncio.CancelledError:
                self._alive_at = None
                raise
            except (psycopg.OperationalError, TimeoutError) as exc:  # the database away, or silent
                log.warning("lost the notification connection (%s); retrying in %.1f s",
                            one_line(exc), delay)
            except Exception:
                log.warning("lost the notification connection; retrying in %.1f s", delay, exc_info=True)
            self._alive_at = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_EVERY)

    def _listener_conninfo(self) -> dict[str, Any]:
        params: dict[str, Any] = {**_LISTENER_TCP, **conninfo_to_dict(self.conninfo)}
        params["application_name"] = LISTENER_NAME.format(origin=self.origin)
        return params

    async def _end_earlier_listeners(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """End this process's earlier listening connection if the server still holds it (one
        given up as silent stays open there until the server's TCP notices): PostgreSQL keeps
        every notification until each listener has read it, and that one reads nothing. A
        role that may not end it leaves it to the server's keepalives."""
        with contextlib.suppress(psycopg.Error):
            await self._answered(conn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                       " WHERE application_name = %s AND pid <> pg_backend_pid()",
                                 (LISTENER_NAME.format(origin=self.origin),))

    async def _answered(self, conn: psycopg.AsyncConnection[Any], statement: str,
                        params: tuple[Any, ...] | None = None) -> None:
        """Run ``statement`` on the listening connection; TimeoutError if no answer comes within
        ``liveness_seconds``. The statement is not cancelled then: psycopg would wait for the
        server to confirm the cancel, which a silent connection never does (for ever in older
        versions: psycopg#1371); its socket is shut down instead, so that it fails at once."""
        query = asyncio.ensure_future(conn.execute(statement, params))
        try:
            done, _ = await asyncio.wait({query}, timeout=self.liveness_seconds)
        finally:
            if not query.done():  # no answer yet, or the hub is stopping
                _shut_down(conn)
                await asyncio.wait({query})
        if not done:
            query.exception()  # the error of the shut-down socket: expected
            raise TimeoutError(f"no answer in {self.liveness_seconds:g} s")
        query.result()

    def _catch_up_all(self) -> None:
        for room in list(self.rooms.values()):
            self._catch_up_soon(room)

    def _heard(self, payload: str) -> None:
        try:
            kind, org, value, origin, doc_id = payload.split(" ", 4)
            key = (UUID(org), doc_id)
        except ValueError:
            return
        room = self.rooms.get(key)
        if room is None or origin == self.origin:
            return
        if kind == "u" and value.isdigit() and not room.delivered(int(value)):
            self._catch_up_soon(room)
        elif kind == "a":
            try:
                entries = protocol.awareness_entries(base64.b64decode(value))
            except (ValueError, protocol.ProtocolError):
                return
            self._queue_awareness(room, entries, notify=False)


def _shut_down(conn: psycopg.AsyncConnection[Any]) -> None:
    """Shut the connection's socket down under libpq: what waits on it fails at once."""
    with contextlib.suppress(OSError, psycopg.Error), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)
