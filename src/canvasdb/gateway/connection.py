"""One client's WebSocket: authenticate, sync, then relay its updates and awareness.

Close codes (4400-4499 make the official y-websocket client stop reconnecting):
4400 malformed message or invalid update, 4401 missing/unknown/revoked token, 4404 no such
document (or no access to it), 4413 message too large (past twice the limit, the WebSocket
layer's own 1009, unread: ``frame_limit``), 4429 update rate exceeded for longer
than the grace period (below it, the sender is only slowed down), 1001 server shutting
down, 1013 ("try again later") the database unavailable, the client too slow to
receive (see hub.SLOW_CLIENT_BYTES), or too many connections open here (of its user, or in
all): the client reconnects with backoff and resyncs. A viewer's updates are
refused with the protocol's "permission denied" message (auth type 2) and the connection
stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from canvasdb import metrics
from canvasdb.documents import yjs
from canvasdb.errors import InvalidInput, NotFound, PayloadTooLarge, Unauthorized, Unavailable
from canvasdb.gateway import protocol
from canvasdb.gateway.hub import CLOSE_GRACE_S, SLOW_CLIENT_BYTES, Hub, Peer, close_now
from canvasdb.services import Services
from canvasdb.settings import Settings
from canvasdb.tenancy import Principal
from canvasdb.token_bucket import TokenBucket

log = logging.getLogger("canvasdb.gateway")
_MAX_IN_FLIGHT = 1000  # updates of one connection waiting for their commit
_FRAMING = 64  # bytes a y-websocket message may add around its update


def frame_limit(settings: Settings) -> int:
    """The largest message the WebSocket layer reads; past it, it refuses the message itself
    with 1009 ("message too big") before reading it. Twice the gateway's own limit (an update
    of ``max_update_bytes`` and its framing), so that a message merely over that limit is
    refused by the gateway with 4413, which tells the official client not to send it again,
    and only a far larger one, which would otherwise fill memory, is cut off unread."""
    return 2 * (settings.max_update_bytes + _FRAMING)
RAW_SEND = "canvasdb.raw_send"  # scope key: the server's own ASGI send, before any middleware
_KINDS = {protocol.SYNC: "sync", protocol.AWARENESS: "awareness"}  # counted by these names


class KeepRawSend:
    """ASGI middleware that records the server's ``send`` for WebSocket scopes, so the gateway
    can reach the socket under it (Starlette wraps ``send`` further in)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            scope[RAW_SEND] = send
        await self.app(scope, receive, send)


def _direct(ws: WebSocket) -> Any:
    """uvicorn's websockets-sansio protocol object under ``ws`` (its ``send`` is a bound method
    of it), for direct frame writes; None under any other server, which then takes the
    ordinary path."""
    proto = getattr(ws.scope.get(RAW_SEND), "__self__", None)
    needed = ("transport", "close_sent", "disconnected", "conn")
    if proto is None or not all(hasattr(proto, a) for a in needed):
        return None
    return proto if hasattr(proto.conn, "fail") and hasattr(proto.conn, "data_to_send") else None


class _Closing(Exception):
    def __init__(self, code: int, reason: str, metric: str) -> None:
        super().__init__(reason)
        self.code, self.reason, self.metric = code, reason, metric


class _Throttle:
    """A sender's updates: ``rate`` a second sustained, ``burst`` at once (a token bucket).

    A sender over the rate is slowed down, not cut off: each update waits for its token, and
    meanwhile its socket is not read, so TCP holds the sender back. Closing instead would
    strand the edits of a client that merely drew fast (4429 is final for y-websocket, which
    then stops reconnecting). One that stays over the rate for ``grace`` seconds is refused.
    """

    def __init__(self, rate: float, burst: int, grace: float) -> None:
        self.bucket, self.grace = TokenBucket(rate, burst), grace
        self.over_since: float | None = None  # when the sender last found the bucket empty

    async def take(self, n: int = 1) -> bool:
        """Wait for ``n`` tokens (at most a burst's); False if the sender has been over the
        rate for too long."""
        n = min(n, self.bucket.burst)
        if self.bucket.try_take(n):
            self.over_since = None
            return True
        now = time.monotonic()
        if self.over_since is None:
            self.over_since = now
        elif now - self.over_since > self.grace:
            return False
        metrics.GATEWAY_THROTTLED.inc()
        await self.bucket.take(n)
        return True


def _token(ws: WebSocket) -> str | None:
    token = ws.query_params.get("token")
    if token:
        return token
    scheme, _, value = ws.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _too_many(metric: str, message: str, *args: object) -> _Closing:
    """The refusal of a connection over a cap (1013: the official client tries again later,
    with backoff), logged once per 30 s with a count (runtime.quiet_outage_logs)."""
    log.warning(message, *args)
    return _Closing(1013, "too many connections; try again later", metric)


async def serve(ws: WebSocket, org: str, doc_id: str, svc: Services, hub: Hub, settings: Settings) -> None:
    """Each connection is counted the moment it is accepted (in all) and authorized (for its
    user), with no wait between the count and its check: connections that arrive together
    cannot all slip under a cap. Without caps one token held 4,000 connections, and two
    clients 20,000, every file descriptor of the process."""
    await ws.accept()
    metrics.GATEWAY_CONNECTIONS.inc()
    hub.connections += 1
    user = None  # whose cap the connection counts against, once authorized
    try:
        if hub.connections > settings.gateway_max_connections:
            raise _too_many("connections", "too many connections in this process: refused one with 1013 "
                            "(CANVASDB_GATEWAY_MAX_CONNECTIONS=%d)", settings.gateway_max_connections)
        token = _token(ws)
        who, writer = await _authorized(svc, token, org, doc_id)
        if hub.user_connections[who.user_id] >= settings.gateway_max_connections_per_user:
            raise _too_many("connections_per_user", "too many connections of user %s: refused one with 1013 "
                            "(CANVASDB_GATEWAY_MAX_CONNECTIONS_PER_USER=%d)", who.user_id,
                            settings.gateway_max_connections_per_user)
        user = who.user_id
        hub.user_connections[user] += 1
        await _serve(ws, org, doc_id, svc, hub, settings, token, who, writer)
    except _Closing as stop:
        metrics.GATEWAY_REJECTED.labels(stop.metric).inc()
        await _close(ws, stop.code, stop.reason)
    except WebSocketDisconnect:
        pass
    except Unavailable as exc:  # not a fault of the gateway: one line, not a traceback per client
        metrics.GATEWAY_REJECTED.labels("unavailable").inc()
        log.warning("closed a connection to %s with 1013, try again later: %s", doc_id, exc.detail)
        await _close(ws, 1013, "try again later")
    except Exception:
        log.exception("gateway connection to %s failed", doc_id)
        await _close(ws, 1011, "internal error")
    finally:
        hub.connections -= 1
        if user is not None:
            hub.user_connections[user] -= 1
            if not hub.user_connections[user]:
                del hub.user_connections[user]
        metrics.GATEWAY_CONNECTIONS.dec()


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    """A graceful close, within CLOSE_GRACE_S: it waits for room in the socket's buffer, which a
    client that does not read never makes; then the close frame goes behind what waits (and
    the WebSocket layer drops a client that does not read up to it: api.ws_protocol)."""
    if ws.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            try:
                await asyncio.wait_for(ws.close(code, reason[:120]), CLOSE_GRACE_S)
            except TimeoutError:
                proto = _direct(ws)
                if proto is not None and not (proto.close_sent or proto.disconnected):
                    close_now(proto, code, reason[:120])


async def _authorized(svc: Services, token: str | None, org: str, doc_id: str) -> tuple[Any, bool]:
    """(who, may write), or the _Closing that refuses the connection."""
    try:
        who = await svc.tenancy.authorize(token, org)
        return who, await svc.documents.check_access(who, doc_id)
    except Unauthorized as exc:
        raise _Closing(4401, exc.detail, "unauthorized") from None
    except (NotFound, InvalidInput) as exc:
        raise _Closing(4404, exc.detail, "not_found") from None


async def _serve(ws: WebSocket, org: str, doc_id: str, svc: Services, hub: Hub, settings: Settings,
                 token: str | None, who: Principal, writer: bool) -> None:
    max_message = settings.max_update_bytes + _FRAMING

    sync = await svc.documents.sync(who.org_id, doc_id)
    peer = Peer(send=ws.send_bytes, close=lambda code, reason: _close(ws, code, reason), direct=_direct(ws))
    sender = asyncio.create_task(peer.run_sender())
    room = hub.join(who.org_id, doc_id, peer, sync.seq)

    async def recheck() -> None:
        """Access is checked again every ``gateway_reauth_seconds``: a revoked token, a
        membership or project role taken away closes the connection (4401, 4404), a role
        lowered to viewer makes it read-only; until then it would have gone on for good."""
        nonlocal writer
        while True:
            await asyncio.sleep(settings.gateway_reauth_seconds)
            try:
                _, writer = await _authorized(svc, token, org, doc_id)
            except _Closing as stop:
                metrics.GATEWAY_REJECTED.labels(stop.metric).inc()
                await peer.close(stop.code, stop.reason)
                return
            except Unavailable as exc:  # the database is away: the connection goes on, checked next time
                log.warning("could not check access to %s again: %s", doc_id, exc.detail)
            except Exception:
                log.warning("could not check access to %s again", doc_id, exc_info=True)

    checker = asyncio.create_task(recheck())
    in_flight: set[asyncio.Future[object]] = set()
    below_limit = asyncio.Event()  # fewer than _MAX_IN_FLIGHT updates wait for their commit
    below_limit.set()
    throttle = _Throttle(settings.gateway_max_updates_per_s, settings.gateway_update_burst,
                         settings.gateway_rate_grace_s)

    def settled(commit: asyncio.Future[object]) -> None:
        in_flight.discard(commit)
        below_limit.set()
        if not commit.cancelled() and commit.exception() is not None:
            log.warning("an update to %s was not stored: %s", doc_id, commit.exception())
            peer.push(protocol.permission_denied("update not stored; reconnect to resync"))
            asyncio.get_running_loop().create_task(peer.close(1011, "update not stored"))

    async def receive_update(update: bytes) -> None:
        if not writer:
            metrics.GATEWAY_REJECTED.labels("read_only").inc()
            peer.push(protocol.permission_denied("read-only access: updates are not accepted"))
            return
        if not await throttle.take():
            raise _Closing(4429, "too many updates for too long; slow down", "rate")
        try:
            await yjs.check_update_off_loop(update)
        except InvalidInput as exc:
            raise _Closing(4400, exc.detail, "invalid_update") from None
        while len(in_flight) >= _MAX_IN_FLIGHT:  # the socket is not read meanwhile: TCP holds the sender
            below_limit.clear()
            await below_limit.wait()
        try:  # queued in order for the next group commit; the broadcast follows the commit
            commit: asyncio.Future[Any] = svc.documents.submit_checked(who.org_id, doc_id, update,
                                                                       user_id=who.user_id, tag=peer)
        except PayloadTooLarge as exc:
            raise _Closing(4413, exc.detail, "too_large") from None
        room.sending[update] = peer
        in_flight.add(commit)
        commit.add_done_callback(settled)

    try:
        peer.push(protocol.sync_step1(sync.state_vector))
        if (aware := hub.awareness_snapshot(room)) is not None:
            peer.push(aware)
        while True:
            frame = await ws.receive()
            if frame["type"] == "websocket.disconnect":
                if frame.get("code") == 1009:  # refused unread by the WebSocket layer (frame_limit)
                    metrics.GATEWAY_REJECTED.labels("too_large").inc()
                break
            data = frame.get("bytes")
            if data is None:
                raise _Closing(4400, "y-websocket messages are binary frames", "malformed")
            if len(data) > max_message:
                raise _Closing(4413, f"a message is at most {max_message} bytes", "too_large")
            try:
                message = protocol.read(data)
            except protocol.ProtocolError as exc:
                raise _Closing(4400, str(exc), "malformed") from None
            metrics.GATEWAY_MESSAGES.inc(_KINDS.get(message.kind, "other"))
            if message.kind == protocol.SYNC and message.step == protocol.STEP1:
                # a token per KiB of state vector: reading one of 140,000 clients took 0.14 s
                if not await throttle.take(1 + len(message.payload) // 1024):
                    raise _Closing(4429, "too many sync requests for too long; slow down", "rate")
                while peer.unsent() > SLOW_CLIENT_BYTES and not peer.closing_stuck():
                    await asyncio.sleep(0.1)  # the last answer first (not reading meanwhile: TCP waits)
                await _answer_step1(svc, who.org_id, doc_id, message.payload, peer)
            elif message.kind == protocol.SYNC:  # step 2 (what we lacked) or an update
                if message.payload != yjs.EMPTY_UPDATE:
                    await receive_update(message.payload)
            elif message.kind == protocol.AWARENESS:
                try:
                    hub.relay_awareness(room, message.payload, peer)
                except protocol.ProtocolError as exc:
                    raise _Closing(4400, str(exc), "malformed") from None
            elif message.kind == protocol.QUERY_AWARENESS and (aware := hub.awareness_snapshot(room, peer)):
                peer.push(aware)
    finally:
        checker.cancel()
        if in_flight:  # the client left; what it sent is still committed and broadcast
            await asyncio.gather(*in_flight, return_exceptions=True)
        hub.leave(room, peer)
        if peer.queue.full():
            sender.cancel()
        else:
            peer.queue.put_nowait(None)  # send what is queued, then stop
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(sender, 5)


async def _answer_step1(svc: Services, org_id: object, doc_id: str, state_vector: bytes, peer: Peer) -> None:
    """Send what the client lacks: the stored pieces as updates, the last one as step 2 (the
    client counts itself synced on step 2)."""
    try:
        sync = await svc.documents.sync(org_id, doc_id, state_vector)  # type: ignore[arg-type]
    except InvalidInput as exc:
        raise _Closing(4400, exc.detail, "malformed") from None
    except PayloadTooLarge as exc:
        raise _Closing(4413, exc.detail, "too_large") from None
    pieces = sync.updates or [yjs.EMPTY_UPDATE]
    for piece in pieces[:-1]:
        peer.push(protocol.sync_update(piece), asked=True)
    peer.push(protocol.sync_step2(pieces[-1]), asked=True)
