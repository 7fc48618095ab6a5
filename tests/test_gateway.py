"""The real-time gateway against the official JavaScript Yjs client (yjs + y-websocket in Node.js),
with two gateway processes sharing documents through PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gc
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from uuid import uuid4

import httpx
import psycopg
import pytest
import uvicorn
import websockets
from conftest import Tenant, make_tenant
from pycrdt import Doc, Map
from relays import Balancer, PgProxy
from websockets.frames import Close, Frame, Opcode
from yjs_client import JsClient

from canvasdb.api import create_app, ws_protocol
from canvasdb.api.http_protocol import MAX_HEADER_BYTES, with_bounded_requests
from canvasdb.api.ws_protocol import MAX_FRAGMENTS, PING_BURST, with_bounds
from canvasdb.db import Database
from canvasdb.documents import DocumentStore, yjs
from canvasdb.gateway import protocol
from canvasdb.gateway.hub import Hub, Peer
from canvasdb.services import Services
from canvasdb.settings import Settings
from canvasdb.token_bucket import TokenBucket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def served(app, **config: object) -> AsyncIterator[uvicorn.Server]:
    """``app`` served by uvicorn in this event loop, on a port of its own (``server.config.port``)."""
    server = uvicorn.Server(uvicorn.Config(app, **{"port": free_port(), "lifespan": "off", "log_config": None,
                                                   **config}))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        yield server
    finally:
        server.should_exit = True
        await serving


class Gateway:
    """A ``canvasdb gateway`` process on its own port."""

    def __init__(self, pg_url: str, home: Path, port: int | None = None, **settings: str) -> None:
        self.port = port or free_port()
        env = {**os.environ, "CANVASDB_DATABASE_URL": pg_url, "CANVASDB_HOME": str(home),
               "CANVASDB_LOG_LEVEL": "warning", **settings}
        self.log = home / f"gateway-{self.port}.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "canvasdb", "gateway", "--port", str(self.port)],
                env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def url(self, org: str) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/orgs/{org}/docs"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def gateways(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Gateway]]:
    home = tmp_path_factory.mktemp("gateway-home")
    pair = [Gateway(pg_url, home), Gateway(pg_url, home)]
    yield pair
    for g in pair:
        g.stop()


@pytest.fixture
async def board(svc: Services) -> AsyncIterator[tuple[Tenant, str]]:
    t = await make_tenant(svc)
    await svc.documents.create(t.owner, t.project_id, "board-1", "board")
    yield t, "board-1"


async def eventually(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def stored_nodes(svc: Services, t: Tenant, doc_id: str) -> dict:
    doc = Doc()
    doc.apply_update(await DocumentStore(svc.db).state(t.owner, doc_id))
    return doc.get("nodes", type=Map).to_py() or {}


async def test_two_gateways_converge_late_joiner_and_awareness(
    gateways: list[Gateway], svc: Services, board: tuple[Tenant, str]
) -> None:
    t, doc = board
    ga, gb = gateways
    names = {"maps": ["nodes", "edges"], "arrays": ["items"]}
    async with (await JsClient.start(ga.url(t.slug), doc, t.token) as a,
                await JsClient.start(gb.url(t.slug), doc, t.token) as b):
        await a.wait_synced()
        await b.wait_synced()
        await a.map_set("nodes", "n1", {"type": "sticky", "x": 1, "text": "hello"})
        await b.map_set_map("nodes", "n2", {"type": "card", "x": 2})
        await b.map_set("edges", "e1", {"from": "n1", "to": "n2"})
        await a.array_push("items", [1, 2])
        await b.array_push("items", [3])

        async def converged():
            sa, sb = await a.state(**names), await b.state(**names)
            return len(sa.arrays["items"]) == 3 and (sa.maps, sa.arrays) == (sb.maps, sb.arrays)

        assert await eventually(converged)
        # What a peer received was stored before it was broadcast.
        assert set(await stored_nodes(svc, t, doc)) == {"n1", "n2"}

        await a.awareness({"user": "alice"})

        async def alice_seen_across():
            return (await b.peers()).get(a.client_id) == {"user": "alice"}

        assert await eventually(alice_seen_across)

        async with await JsClient.start(gb.url(t.slug), doc, t.token) as late:
            await late.wait_synced()
            s_late, s_a = await late.state(**names), await a.state(**names)
            assert (s_late.maps, s_late.arrays) == (s_a.maps, s_a.arrays)
            assert s_late.maps["edges"] == {"e1": {"from": "n1", "to": "n2"}}


async def test_refusals_close_with_final_codes(
    gateways: list[Gateway], svc: Services, board: tuple[Tenant, str]
) -> None:
    t, doc = board
    url = gateways[0].url(t.slug)
    for token, target, code in [("cdb_not-a-token", doc, 4401), (t.token, "no-such-doc", 4404)]:
        async with await JsClient.start(url, target, token) as c:
            closed = await c.wait_event(lambda e: e["event"] == "close" and e.get("code"), 10)
            assert closed["code"] == code
    other = await make_tenant(svc)  # a token of another org sees nothing of this one
    async with await JsClient.start(url, doc, other.token) as c:
        assert (await c.wait_event(lambda e: e["event"] == "close" and e.get("code"), 10))["code"] == 4404


async def viewer_token(svc: Services, t: Tenant) -> str:
    """A token of an org member who may only read the tenant's project."""
    viewer = await svc.tenancy.ensure_user(f"viewer-{t.slug}@example.com")
    await svc.tenancy.set_org_role(t.org_id, viewer, "member")
    await svc.tenancy.set_project_role(t.owner, t.project_id, viewer, "viewer")
    return (await svc.tenancy.create_token(viewer))[1]


async def test_a_viewer_reads_but_its_updates_are_refused(
    gateways: list[Gateway], svc: Services, board: tuple[Tenant, str]
) -> None:
    t, doc = board
    token = await viewer_token(svc, t)
    async with (await JsClient.start(gateways[0].url(t.slug), doc, t.token) as editor,
                await JsClient.start(gateways[1].url(t.slug), doc, token) as reader):
        await editor.wait_synced()
        await reader.wait_synced()
        await reader.map_set("nodes", "from-viewer", 1)
        await editor.map_set("nodes", "from-editor", 2)
        await reader.wait_for("nodes", "from-editor")
        await asyncio.sleep(0.5)
        assert "from-viewer" not in (await editor.state(maps=["nodes"])).maps["nodes"]
        assert set(await stored_nodes(svc, t, doc)) == {"from-editor"}


async def test_burst_then_disconnect_loses_nothing(
    gateways: list[Gateway], svc: Services, board: tuple[Tenant, str]
) -> None:
    """300 updates, then the sender leaves 50 ms later: all stored, all reach the other gateway's
    client, not echoed to the sender, and the gateway stays up."""
    t, doc = board
    async with await JsClient.start(gateways[1].url(t.slug), doc, t.token) as watcher:
        await watcher.wait_synced()
        sender = await JsClient.start(gateways[0].url(t.slug), doc, t.token)
        await sender.wait_synced()
        await sender.burst(300, "nodes")
        await asyncio.sleep(0.05)
        await sender.close()

        async def all_arrived():
            return len((await watcher.state(maps=["nodes"])).maps["nodes"]) == 300

        assert await eventually(all_arrived)
    assert len(await stored_nodes(svc, t, doc)) == 300
    assert (await svc.documents.get(t.owner, doc)).last_seq == 300
    logged = await svc.documents.changes(t.owner, doc, limit=1000)
    assert {c.client_id for c in logged} == {sender.client_id}, "each update names the Yjs client that sent it"
    assert httpx.get(f"http://127.0.0.1:{gateways[0].port}/readyz").status_code == 200


def counter(port: int, name: str) -> float:
    """A counter of the gateway's /metrics (its labels summed)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


async def test_a_fast_sender_is_slowed_down_not_cut_off(
    pg_url: str, svc: Services, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """150 updates at once against 100/s with a burst of 20: the excess waits for the rate
    (counted in /metrics), the connection stays open, and everything is stored."""
    t, doc = board
    gw = Gateway(pg_url, tmp_path, CANVASDB_GATEWAY_MAX_UPDATES_PER_S="100", CANVASDB_GATEWAY_UPDATE_BURST="20")
    try:
        async with await JsClient.start(gw.url(t.slug), doc, t.token) as sender:
            await sender.wait_synced()
            await sender.burst(150, "nodes")

            async def stored(n: int):
                return len(await stored_nodes(svc, t, doc)) == n

            assert await eventually(lambda: stored(150))
            await sender.map_set("nodes", "after", 1)  # still connected
            assert await eventually(lambda: stored(151))
        assert counter(gw.port, "canvasdb_gateway_throttled_total") > 0
        assert counter(gw.port, "canvasdb_gateway_rejected_total") == 0
        # counted once per message and per broadcast, without a lock (metrics.LoopCounter)
        assert counter(gw.port, 'canvasdb_gateway_messages_total{kind="sync"}') >= 151
        assert counter(gw.port, "canvasdb_gateway_broadcast_fanout_count") >= 151
        assert counter(gw.port, 'canvasdb_gateway_broadcast_fanout_bucket{le="0.0"}') >= 151  # no peer
    finally:
        gw.stop()


async def test_large_sync_requests_are_paid_for_at_the_update_rate(
    pg_url: str, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """A sync step 1 costs a token per KiB of its state vector (one of 40,000 clients, 157 KiB,
    takes a burst's worth): each is answered, and the next waits for the rate."""
    t, doc = board
    gw = Gateway(pg_url, tmp_path, CANVASDB_GATEWAY_MAX_UPDATES_PER_S="100", CANVASDB_GATEWAY_UPDATE_BURST="100")
    try:
        vector = yjs.write_state_vector({client: 1 for client in range(1, 40_001)})
        async with websockets.connect(f"{gw.url(t.slug)}/{doc}?token={t.token}", max_size=None) as ws:
            for _ in range(3):
                await ws.send(protocol.sync_step1(vector))
            answered = 0
            while answered < 3:
                answered += protocol.read(await asyncio.wait_for(ws.recv(), 10)).step == protocol.STEP2
        assert counter(gw.port, "canvasdb_gateway_throttled_total") >= 2
        assert counter(gw.port, "canvasdb_gateway_rejected_total") == 0
    finally:
        gw.stop()


async def test_a_sender_over_the_rate_for_too_long_is_closed(
    pg_url: str, svc: Services, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """Past the grace period over the rate: close 4429; what was accepted is stored, and the
    gateway serves on."""
    t, doc = board
    gw = Gateway(pg_url, tmp_path, CANVASDB_GATEWAY_MAX_UPDATES_PER_S="20", CANVASDB_GATEWAY_UPDATE_BURST="5",
                 CANVASDB_GATEWAY_RATE_GRACE_S="0.5")
    try:
        async with await JsClient.start(gw.url(t.slug), doc, t.token) as sender:
            await sender.wait_synced()
            await sender.burst(300, "nodes")
            closed = await sender.wait_event(lambda e: e["event"] == "close" and e.get("code"), 15)
            assert closed["code"] == 4429
        assert 5 <= len(await stored_nodes(svc, t, doc)) < 300
        assert counter(gw.port, 'canvasdb_gateway_rejected_total{reason="rate"}') == 1
        assert httpx.get(f"http://127.0.0.1:{gw.port}/readyz").status_code == 200
    finally:
        gw.stop()


async def test_malformed_frames_close_only_that_connection(
    gateways: list[Gateway], board: tuple[Tenant, str]
) -> None:
    t, doc = board
    url = f"{gateways[0].url(t.slug)}/{doc}?token={t.token}"
    async with await JsClient.start(gateways[0].url(t.slug), doc, t.token) as good:
        await good.wait_synced()
        deep = b"[" * 5000 + b"]" * 5000  # JSON past the parser's depth
        for bad in [b"\xff\xff\xff", protocol.sync_update(b"not an update"), b"\x00\x07\x01\x00",
                    protocol.awareness(b"\x01\x01\x01\x05{oops"),
                    # a lone surrogate in UTF-8 (not UTF-8): once held, it broke every later
                    # joiner's awareness snapshot (1011) and the room's relays
                    protocol.awareness(b"\x01\x07\x01\x06\"\xed\xa0\x80x\""),
                    protocol.awareness(b"\x01\x08\x01" + yjs.write_uint(len(deep)) + deep),
                    # what JSON.parse (the official client's) refuses, or a JavaScript number cannot hold
                    protocol.awareness(protocol.awareness_update([(9, 1, "NaN")])),
                    protocol.awareness(protocol.awareness_update([(2**60, 1, "{}")])),
                    protocol.awareness(protocol.awareness_update([(9, 2**53 - 1, "{}")])),
                    protocol.awareness(protocol.awareness_update([(9, 1, '"' + "x" * 70_000 + '"')]))]:
            async with websockets.connect(url) as ws:
                await ws.send(bad)
                with pytest.raises(websockets.ConnectionClosed) as info:
                    while True:
                        await asyncio.wait_for(ws.recv(), 5)
                assert info.value.rcvd is not None and info.value.rcvd.code == 4400
        async with websockets.connect(url) as ws:
            await ws.send("text frame")
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4400
        async with websockets.connect(url) as ws:  # a later joiner of this gateway's room syncs
            await synced(ws)
        await good.map_set("nodes", "still-fine", 1)
        async with await JsClient.start(gateways[1].url(t.slug), doc, t.token) as other:
            await other.wait_for("nodes", "still-fine")


async def closed_with(ws: websockets.ClientConnection) -> int | None:
    """The close code the server sent, reading (and dropping) whatever came before it."""
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    return info.value.rcvd.code if info.value.rcvd is not None else None


async def synced(ws: websockets.ClientConnection) -> None:
    """Answer the server's step 1 with ours, and wait for its step 2."""
    await ws.send(protocol.sync_step1(b"\x00"))
    while protocol.read(await asyncio.wait_for(ws.recv(), 5)).step != protocol.STEP2:
        pass


async def test_oversized_messages_close_4413_and_far_larger_ones_unread(
    pg_url: str, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """Over CANVASDB_MAX_UPDATE_BYTES: 4413 (the official client does not send it again); past
    twice that, the WebSocket layer refuses the message unread (1009). Both are counted."""
    t, doc = board
    gw = Gateway(pg_url, tmp_path, CANVASDB_MAX_UPDATE_BYTES="1024")
    try:
        url = f"{gw.url(t.slug)}/{doc}?token={t.token}"
        for size, code in [(1500, 4413), (2100, 4413), (10_000, 1009), (5_000_000, 1009)]:
            async with websockets.connect(url, max_size=None) as ws:
                try:
                    await ws.send(protocol.sync_update(b"\x00" * size))
                except websockets.ConnectionClosed as closed:  # while it was still sending
                    assert closed.rcvd is not None and closed.rcvd.code == code, size
                else:
                    assert await closed_with(ws) == code, size
        assert counter(gw.port, 'canvasdb_gateway_rejected_total{reason="too_large"}') == 4
        async with await JsClient.start(gw.url(t.slug), doc, t.token) as fine:  # and it serves on
            await fine.wait_synced()
    finally:
        gw.stop()


async def test_requests_whose_headers_dawdle_or_swell_are_cut_off_but_slow_bodies_and_websockets_are_not(
    pg_url: str, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """A slowloris client (a header line now and then) held its socket for good, and one
    header of 100 MB took as much memory: a request's headers must now arrive within
    CANVASDB_HTTP_HEADER_TIMEOUT_SECONDS of the connection or of the previous response, and
    within 64 KiB. What comes after the headers is not bound by either."""
    t, doc = board
    gw = Gateway(pg_url, tmp_path, CANVASDB_HTTP_HEADER_TIMEOUT_SECONDS="1")
    loop = asyncio.get_running_loop()

    async def opened() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", gw.port)

    try:
        def headers_of(size: int, *, ended: bool) -> bytes:
            """Send a request with a header of ``size`` bytes; the status line of the answer."""
            with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
                try:
                    for start in range(0, size, 10_000):
                        sock.sendall(b"a" * min(10_000, size - start))
                except ConnectionError:
                    return b"cut off"
                if ended:
                    sock.sendall(b"\r\n\r\n")
                return sock.makefile("rb").readline()

        assert (await asyncio.to_thread(headers_of, 60_000, ended=True)).startswith(b"HTTP/1.1 200")
        assert (await asyncio.to_thread(headers_of, MAX_HEADER_BYTES + 5_000, ended=True)).startswith(
            b"HTTP/1.1 431"), "complete in one read, or a few"
        assert (await asyncio.to_thread(headers_of, MAX_HEADER_BYTES + 40_000, ended=False)).startswith(
            b"HTTP/1.1 431 Request Header Fields Too Large")
        assert await asyncio.to_thread(headers_of, 100_000_000, ended=False) == b"cut off"
        silent, silent_w = await opened()
        dawdler, dawdler_w = await opened()
        dawdler_w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        kept, kept_w = await opened()  # a second request on a kept-alive connection, the same
        kept_w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(kept.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = next(int(line[15:]) for line in head.split(b"\r\n") if line.startswith(b"content-length: "))
        await asyncio.wait_for(kept.readexactly(length), 5)
        kept_w.write(b"GET /healthz HTTP/1.1\r\n")
        slow_body, slow_body_w = await opened()
        body = json.dumps({"slug": "slowly"}).encode()
        slow_body_w.write(b"POST /v1/orgs/%s/projects HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                          % (t.slug.encode(), t.token.encode(), len(body)))
        async with websockets.connect(f"{gw.url(t.slug)}/{doc}?token={t.token}") as ws:
            started = loop.time()
            for i in range(5):  # 2.5 s: the body arrives in pieces, long after the deadline
                await asyncio.sleep(0.5)
                slow_body_w.write(body[i * len(body) // 5:(i + 1) * len(body) // 5])
            assert await asyncio.wait_for(silent.read(), 1) == b""  # closed, no answer
            for reader in (dawdler, kept):
                answer = await asyncio.wait_for(reader.read(), 1)
                assert answer.startswith(b"HTTP/1.1 408 ") and answer.endswith(b'"status":408,'
                    b'"detail":"the request headers took too long to arrive"}'), answer
            assert (await asyncio.wait_for(slow_body.readline(), 5)).startswith(b"HTTP/1.1 201"), "slow body"
            assert loop.time() - started > 2
            await synced(ws)  # the WebSocket outlived the deadline
        for writer in (dawdler_w, kept_w, slow_body_w, silent_w):
            writer.close()
    finally:
        gw.stop()


async def test_stalled_bodies_unread_responses_and_trailers_are_cut_off(
    pg_url: str, svc: Services, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """Once the headers were in, nothing was bounded: a body paused for good, a response never
    read, and trailers after a chunked body (uvicorn added them to the request's headers: an
    unbounded list, and an Authorization header no proxy in front had seen) each held their
    connection and buffers. Now CANVASDB_HTTP_IDLE_TIMEOUT_SECONDS bounds a stall either way,
    and a trailer closes the connection."""
    t, _ = board
    gw = Gateway(pg_url, tmp_path, CANVASDB_HTTP_IDLE_TIMEOUT_SECONDS="1")
    content, small = os.urandom(30 * 1024 * 1024), os.urandom(200 * 1024)
    for name, blob in (("big.bin", content), ("small.bin", small)):
        r = httpx.put(f"http://127.0.0.1:{gw.port}/v1/orgs/{t.slug}/blobs/{name}", content=blob,
                      headers={"Authorization": f"Bearer {t.token}", "Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text

    def answer(sock: socket.socket) -> bytes:
        got = b""
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(1 << 20):
                got += chunk
        return got

    def exchange(request: bytes, *, then: bytes = b"", wait: float = 0.0, window: int = 0) -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
            if window:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
            started = time.monotonic()
            sock.sendall(request)
            time.sleep(wait)
            if then:
                sock.sendall(then)
            return answer(sock), time.monotonic() - started

    head = b"POST /v1/orgs/%s/projects HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % t.slug.encode()
    # a body that stops halfway: closed after the idle timeout, no answer, nothing done
    got, took = await asyncio.to_thread(exchange, head + b"Authorization: Bearer %s\r\nContent-Length: 100\r\n\r\n{"
                                        % t.token.encode())
    assert got == b"" and took < 10
    # answered (404) without its body, then a byte of the body, then nothing: closed the same way
    got, took = await asyncio.to_thread(exchange, b"GET /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n",
                                        then=b"x", wait=0.5)
    assert got.startswith(b"HTTP/1.1 404") and took < 10
    # the token in a trailer (a proxy in front saw none): the connection closes, nothing is done
    body = json.dumps({"slug": "from-a-trailer"}).encode()
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nAuthorization: Bearer %s\r\n\r\n" % (
        len(body), body, t.token.encode())
    got, _ = await asyncio.to_thread(exchange, chunked)
    assert got == b""
    assert "from-a-trailer" not in {p["slug"] for p in await svc.tenancy.list_projects(t.owner)}
    # a 30 MiB download left unread for 4 s is dropped: the rest never comes
    get = b"GET /v1/orgs/%s/blobs/big.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n" % (
        t.slug.encode(), t.token.encode())
    got, _ = await asyncio.to_thread(exchange, get, wait=4)
    assert got.startswith(b"HTTP/1.1 200") and len(got) < len(content)
    # read slowly (a 4 KiB window: its buffer drains for longer than the timeout), it goes on
    slow = get.replace(b"Host: x", b"Host: x\r\nConnection: close").replace(b"big.bin", b"small.bin")
    got, took = await asyncio.to_thread(exchange, slow, window=4096)
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(small), (len(got), took)
    gw.stop()


def upgrade(port: int, path: str, extra: bytes = b"", *, then: bytes = b"", more: int = 0) -> bytes:
    """Send a WebSocket upgrade with ``extra`` header lines (and ``then`` after the headers, and
    ``more`` bytes after that, a KiB at a time, as a client still sending a body); all the
    server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n%s"
                     % (path.encode(), extra, then))
        for _ in range(more // 1024):
            sock.sendall(b"x" * 1024)
            time.sleep(0.001)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


async def test_upgrades_the_websocket_parser_refuses_are_answered_and_closed(
    gateways: list[Gateway], board: tuple[Tenant, str]
) -> None:
    """uvicorn's HTTP parser takes upgrades that websockets' own refuses (more than 128
    headers, a line over 8 KiB, a body): the refusal was never written, and the connection
    stayed open for good (2 x 10,000 of them took every file descriptor). Each is answered
    now, and closed."""
    t, doc = board
    path = f"/v1/orgs/{t.slug}/docs/{doc}?token={t.token}"
    port = gateways[0].port
    for extra, then, path_, status in [
        (b"".join(b"X-H%d: v\r\n" % i for i in range(129)), b"", path, 431),
        (b"X-Big: %s\r\n" % (b"a" * 9000), b"", path, 431),
        (b"", b"", f"{path}&pad={'a' * 9000}", 414),
        (b"Content-Length: 1\r\n", b"x", path, 400),
    ]:
        answer = await asyncio.to_thread(upgrade, port, path_, extra, then=then)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    async with websockets.connect(f"ws://127.0.0.1:{port}{path}") as ws:  # and it serves on
        await synced(ws)


async def test_a_refused_upgrade_is_answered_to_a_client_still_sending(
    gateways: list[Gateway], board: tuple[Tenant, str]
) -> None:
    """The refusal was written and the connection closed at once: closed with bytes still
    coming, a socket is reset, and the client got the reset instead of the answer (or lost the
    answer to it). What the client sends is read and dropped for a while first, as after the
    HTTP layer's own refusals."""
    t, doc = board
    path = f"/v1/orgs/{t.slug}/docs/{doc}?token={t.token}"
    for extra, status in [(b"".join(b"X-H%d: v\r\n" % i for i in range(129)), 431),
                          (b"Content-Length: 300000\r\n", 400)]:
        answer = await asyncio.to_thread(upgrade, gateways[0].port, path, extra, more=300_000)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length:"))
        assert head.startswith(b"HTTP/1.1 %d " % status) and len(body) == length > 0, answer[:300]


async def test_a_websocket_handshake_not_completed_by_the_header_deadline_is_closed() -> None:
    """An application that never accepts (nor refuses) a WebSocket held its connection for
    good; it is closed at the header deadline (CANVASDB_HTTP_HEADER_TIMEOUT_SECONDS)."""
    left = asyncio.Event()

    async def never_accepts(scope: dict, receive, send) -> None:
        if scope["type"] == "websocket":
            while (await receive())["type"] != "websocket.disconnect":
                pass
            left.set()

    async with served(never_accepts, ws=with_bounds(0.5)) as server:
        assert await asyncio.wait_for(asyncio.to_thread(upgrade, server.config.port, "/"), 10) == b""  # no answer
        await asyncio.wait_for(left.wait(), 5)


async def test_the_idle_bound_is_the_clients_not_the_servers() -> None:
    """A body the application reads slowly, one the client holds back until ``100 Continue``,
    and requests that share a read are served whole: the body's idle clock runs only while
    the server reads and waits for the client, and bytes are counted per request."""

    async def app(scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        size, more = 0, True
        while more:
            await asyncio.sleep(2 if scope["path"] == "/slow" else 0)  # past the 1 s idle bound
            message = await receive()
            size, more = size + len(message.get("body", b"")), message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(
            str(size)))]})
        await send({"type": "http.response.body", "body": str(size).encode()})

    def post(path: str, size: int, extra: bytes = b"") -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n" % (path.encode(), size, extra)

    def exchange(*steps: bytes | float) -> bytes:
        with socket.create_connection(("127.0.0.1", server.config.port), timeout=10) as sock:
            for step in steps:
                if isinstance(step, float):
                    time.sleep(step)
                elif step == b"100":
                    assert sock.recv(100).startswith(b"HTTP/1.1 100")
                else:
                    sock.sendall(step)
            sock.shutdown(socket.SHUT_WR)
            return b"".join(iter(lambda: sock.recv(1 << 16), b""))

    async with served(app, http=with_bounded_requests(header_timeout=5, idle_timeout=1)) as server:
        body = b"x" * 300_000
        got = await asyncio.to_thread(exchange, post("/slow", len(body)) + body)
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"300000"), got[:200]
        got = await asyncio.to_thread(exchange, post("/slow", 10, b"Expect: 100-continue\r\n"), b"100", 0.5,
                                      b"y" * 10)  # a whole idle bound from the 100, not what was left
        assert got.endswith(b"10"), got[:200]
        second = post("/", len(body))
        got = await asyncio.to_thread(exchange, post("/", len(body)) + body[:-1000], 0.2,
                                      body[-1000:] + second + body[:150_000], 0.2, body[150_000:])
        assert got.count(b"HTTP/1.1 200") == 2 and got.endswith(b"300000"), got[:300]


class _FedTransport(asyncio.Transport):
    """Enough of a socket's transport for a protocol fed by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.written, self.closed = b"", False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 8000) if name in ("sockname", "peername") else default

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_a_read_ending_one_requests_headers_and_body_is_not_counted_as_the_next_ones_headers() -> None:
    """A read holding the end of one request's headers, its 200 KB body and the start of the
    next request counted all of it as the next request's headers: 431 for it."""
    async def app(scope: dict, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    config = Config(app, lifespan="off", log_config=None)
    config.load()
    protocol = with_bounded_requests(header_timeout=5, idle_timeout=5)(config=config, server_state=ServerState(),
                                                                       app_state={})
    transport = _FedTransport()
    protocol.connection_made(transport)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
    protocol.data_received(head[:10])
    protocol.data_received(head[10:] + b"x" * 200_000 + head[:20])  # one read: all but the first 10 bytes
    for _ in range(20):
        await asyncio.sleep(0)
    protocol.data_received(head[20:] + b"y" * 200_000)
    for _ in range(50):
        await asyncio.sleep(0.01)
    assert transport.written.count(b"HTTP/1.1 200") == 2 and not transport.closed, transport.written[:300]
    protocol.connection_lost(None)


async def test_tokens_in_the_header_and_revoked_tokens(
    gateways: list[Gateway], svc: Services, board: tuple[Tenant, str]
) -> None:
    t, doc = board
    url = f"{gateways[0].url(t.slug)}/{doc}"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {t.token}"}) as ws:
        await synced(ws)
    token_id, token = await svc.tenancy.create_token(t.owner.user_id)
    async with websockets.connect(f"{url}?token={token}") as ws:
        await synced(ws)
    await svc.tenancy.revoke_token(token)
    for connect in (websockets.connect(f"{url}?token={token}"), websockets.connect(url)):
        async with connect as ws:
            assert await closed_with(ws) == 4401


async def test_updates_are_not_echoed_and_a_viewer_is_told_why_its_are_refused(
    gateways: list[Gateway], svc: Services, board: tuple[Tenant, str]
) -> None:
    t, doc = board
    url = f"{gateways[0].url(t.slug)}/{doc}"
    async with (websockets.connect(f"{url}?token={t.token}") as sender,
                websockets.connect(f"{url}?token={t.token}") as peer,
                websockets.connect(f"{url}?token={await viewer_token(svc, t)}") as reader):
        for ws in (sender, peer, reader):
            await synced(ws)
        client = Doc()
        updates: list[bytes] = []
        client.observe(lambda event: updates.append(event.update))
        for i in range(20):
            client.get("nodes", type=Map)[f"k{i}"] = i
            await sender.send(protocol.sync_update(updates[-1]))
        received = [protocol.read(await asyncio.wait_for(peer.recv(), 5)).payload for _ in range(20)]
        assert received == updates  # the other client got each one, in order
        with pytest.raises(TimeoutError):  # and the sender none back
            while True:
                message = protocol.read(await asyncio.wait_for(sender.recv(), 1))
                assert message.kind != protocol.SYNC, message

        await reader.send(protocol.sync_update(updates[0]))
        seen = [protocol.read(await asyncio.wait_for(reader.recv(), 5)) for _ in range(21)]
        assert [m.payload for m in seen[:20]] == updates  # a viewer receives...
        assert seen[20].kind == protocol.AUTH and b"read-only" in seen[20].payload  # ...and is told
    assert len(await stored_nodes(svc, t, doc)) == 20


async def test_an_idle_document_is_unloaded_and_metrics_say_so(
    pg_url: str, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    t, doc = board
    gw = Gateway(pg_url, tmp_path, CANVASDB_GATEWAY_IDLE_SECONDS="1")
    try:
        async with await JsClient.start(gw.url(t.slug), doc, t.token) as client:
            await client.wait_synced()
            await client.map_set("nodes", "a", 1)
            assert counter(gw.port, "canvasdb_gateway_connections") == 1
            assert counter(gw.port, "canvasdb_gateway_open_documents") == 1
            assert counter(gw.port, "canvasdb_docs_loaded") == 1
            assert counter(gw.port, "canvasdb_doc_cache_bytes") > 0
            assert counter(gw.port, "canvasdb_doc_commit_seconds_count") >= 1
        assert await eventually(lambda: asyncio.sleep(0, counter(gw.port, "canvasdb_gateway_open_documents") == 0))

        async def unloaded() -> bool:
            return counter(gw.port, "canvasdb_docs_loaded") == 0 == counter(gw.port, "canvasdb_doc_cache_bytes")

        assert await eventually(unloaded, 10)
    finally:
        gw.stop()


async def test_access_taken_away_closes_an_open_connection(
    pg_url: str, svc: Services, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """A connection's token and access are checked again every CANVASDB_GATEWAY_REAUTH_SECONDS:
    revoked, it is closed (4401); a project role taken away, 4404; lowered to viewer, its
    updates are refused from then on."""
    t, doc = board
    gw = Gateway(pg_url, tmp_path, CANVASDB_GATEWAY_REAUTH_SECONDS="0.3")
    try:
        url = f"{gw.url(t.slug)}/{doc}"
        editor = await svc.tenancy.ensure_user(f"editor-{t.slug}@example.com")
        await svc.tenancy.set_org_role(t.org_id, editor, "member")
        await svc.tenancy.set_project_role(t.owner, t.project_id, editor, "editor")
        _, token = await svc.tenancy.create_token(editor)
        async with websockets.connect(f"{url}?token={token}") as ws:
            await synced(ws)
            await svc.tenancy.revoke_token(token)
            assert await closed_with(ws) == 4401
        _, token = await svc.tenancy.create_token(editor)
        async with websockets.connect(f"{url}?token={token}") as ws:
            await synced(ws)
            await svc.tenancy.set_project_role(t.owner, t.project_id, editor, None)
            assert await closed_with(ws) == 4404
        await svc.tenancy.set_project_role(t.owner, t.project_id, editor, "editor")
        async with websockets.connect(f"{url}?token={token}") as ws:
            await synced(ws)
            await svc.tenancy.set_project_role(t.owner, t.project_id, editor, "viewer")
            await asyncio.sleep(1)
            client = Doc()
            updates: list[bytes] = []
            client.observe(lambda event: updates.append(event.update))
            client.get("nodes", type=Map)["late"] = 1
            await ws.send(protocol.sync_update(updates[-1]))
            refusal = protocol.read(await asyncio.wait_for(ws.recv(), 5))
            assert refusal.kind == protocol.AUTH and b"read-only" in refusal.payload
        assert "late" not in await stored_nodes(svc, t, doc)
        assert counter(gw.port, 'canvasdb_gateway_rejected_total{reason="unauthorized"}') == 1
    finally:
        gw.stop()


def never_reading(port: int, path: str) -> socket.socket:
    """A WebSocket client that completes the handshake, then never reads (a small receive
    buffer, so the server's writes back up at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def send_megabytes(ws: websockets.ClientConnection, prefix: str, count: int) -> None:
    """``count`` updates of a megabyte each (nodes ``{prefix}-0`` ...), as one client makes them."""
    client = Doc()
    updates: list[bytes] = []
    client.observe(lambda event: updates.append(event.update))
    for i in range(count):
        client.get("nodes", type=Map)[f"{prefix}-{i}"] = "x" * 1_000_000
        await ws.send(protocol.sync_update(updates[-1]))


async def test_a_client_that_never_reads_is_cut_off(
    gateways: list[Gateway], board: tuple[Tenant, str]
) -> None:
    """Writers send 20 MB; a client of the document that reads nothing is closed (1013, it
    reconnects and resyncs; written behind what waits, then the connection dropped) instead of
    holding its 16 MB backlog for good, and the others are served on. Query-awareness frames
    pile answers up the same way, the whole room's states each; they are answered once per
    relay delay."""
    t, doc = board
    gw = gateways[0]
    path = f"/v1/orgs/{t.slug}/docs/{doc}?token={t.token}"
    slow = never_reading(gw.port, path)
    cut_before = counter(gw.port, 'canvasdb_gateway_rejected_total{reason="slow_client"}')
    try:
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}{path}", max_size=None) as writer:
            await synced(writer)
            await send_megabytes(writer, "big", 20)
            deadline = time.monotonic() + 30
            while counter(gw.port, 'canvasdb_gateway_rejected_total{reason="slow_client"}') == cut_before:
                assert time.monotonic() < deadline, "the client that never reads was not cut off"
                await asyncio.sleep(0.2)
            async with await JsClient.start(gw.url(t.slug), doc, t.token) as late:  # served on
                await late.wait_for("nodes", "big-19")
            # a client that asks for all 20 MB and reads nothing for 3 s (busy, or its network
            # stalled) is not cut off: what it asked for is not held against it, and a stall
            # must last 10 s
            small = socket.socket()
            small.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the backlog stays at the server
            small.connect(("127.0.0.1", gw.port))
            async with websockets.connect(f"ws://127.0.0.1:{gw.port}{path}", max_size=None, max_queue=1,
                                          sock=small) as pausing:
                await pausing.send(protocol.sync_step1(b"\x00"))
                await asyncio.sleep(3)
                while protocol.read(await asyncio.wait_for(pausing.recv(), 10)).step != protocol.STEP2:
                    pass
        assert counter(gw.port, 'canvasdb_gateway_rejected_total{reason="slow_client"}') == cut_before + 1
        slow.settimeout(30)  # the server ends the connection: the socket reaches its end (or a reset)
        with contextlib.suppress(ConnectionResetError):
            while slow.recv(1 << 20):
                pass

        async with websockets.connect(f"ws://127.0.0.1:{gw.port}{path}") as asker:
            await synced(asker)
            await asker.send(protocol.awareness(protocol.awareness_update([(99, 1, '{"name": "x"}')])))
            for _ in range(200):
                await asker.send(bytes([protocol.QUERY_AWARENESS]))
            answers = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    if protocol.read(await asyncio.wait_for(asker.recv(), 1)).kind == protocol.AWARENESS:
                        answers += 1
            assert 1 <= answers <= 5, answers  # its own relay and one or two answers, not 200
    finally:
        slow.close()


async def test_connections_that_keep_up_cost_no_wake_ups(
    settings: Settings, db: Database, svc: Services, board: tuple[Tenant, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each connection had a task that woke once a second to look at its backlog (20,000
    connections: 20,000 wake-ups a second); a client is looked at only while more than
    SLOW_CLIENT_BYTES wait for it now. Idle connections that keep up schedule nothing."""
    t, doc = board
    # an app of its own over the test database (its hub takes its document store's log over)
    app = create_app(settings, services=dataclasses.replace(svc, documents=DocumentStore(db)))
    async with served(app, ws=with_bounds(10), lifespan="on") as server:
        url = f"ws://127.0.0.1:{server.config.port}/v1/orgs/{t.slug}/docs/{doc}?token={t.token}"
        before = asyncio.all_tasks()
        async with contextlib.AsyncExitStack() as clients:
            for _ in range(3):
                await synced(await clients.enter_async_context(websockets.connect(url, ping_interval=None)))
            theirs = asyncio.all_tasks() - before  # the connections' tasks (uvicorn's, the gateway's)
            loop = asyncio.get_running_loop()
            call_at, scheduled_by = loop.call_at, set()

            def recorded(when: float, callback, *args: object, context=None) -> asyncio.TimerHandle:
                scheduled_by.add(asyncio.current_task())
                return call_at(when, callback, *args, context=context)

            with monkeypatch.context() as patch:
                patch.setattr(loop, "call_at", recorded)
                await asyncio.sleep(2.5)
        assert theirs and asyncio.current_task() in scheduled_by  # (what a timer looks like)
        assert not scheduled_by & theirs


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


async def test_a_ping_flood_is_closed(gateways: list[Gateway], board: tuple[Tenant, str]) -> None:
    """Pings were read and answered as fast as a client sent them (a core's worth, and the
    pongs piled up): past a burst of PING_BURST, more than PINGS_PER_S close with 1008."""
    t, doc = board
    async with websockets.connect(f"{gateways[0].url(t.slug)}/{doc}?token={t.token}") as ws:
        await synced(ws)
        for i in range(PING_BURST // 2):  # a burst is fine
            await ws.ping(b"%d" % i)
        await asyncio.sleep(0.2)
        await synced(ws)
        with contextlib.suppress(websockets.ConnectionClosed):
            for i in range(PING_BURST * 2):
                await ws.ping(b"%d" % i)
        # 1008; or, when pings still arrived after the close, a reset that lost the close frame
        assert await closed_with(ws) in (1008, None)


async def test_pings_from_a_client_that_never_reads_do_not_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ping was answered with a pong written whatever the write buffer held: a client
    that sent pings and read nothing grew the server by 480 MB in 12 s. While writes wait,
    pongs are not written; the latest ping is answered once they go again. (In process, with
    the ping rate bound out of the way.)"""
    monkeypatch.setattr(ws_protocol, "PINGS_PER_S", 1e12)
    monkeypatch.setattr(ws_protocol, "PING_BURST", 10**12)

    async def accepts(scope: dict, receive, send) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while (await receive())["type"] != "websocket.disconnect":
                pass

    async with served(accepts, ws=with_bounds(5)) as server:
        sock = await asyncio.to_thread(never_reading, server.config.port, "/")
        before = rss_mb(os.getpid())
        flood = Frame(Opcode.PING, b"p" * 125).serialize(mask=True) * 8000  # a megabyte of pings
        last = b"the last ping"
        sock.settimeout(60)
        for _ in range(64):
            await asyncio.to_thread(sock.sendall, flood)
        await asyncio.to_thread(sock.sendall, Frame(Opcode.PING, last).serialize(mask=True))
        await asyncio.sleep(1)
        assert rss_mb(os.getpid()) - before < 32  # the pongs of 64 MB of pings held: +80 MB

        def answered() -> bool:
            seen = b""
            while chunk := sock.recv(1 << 20):
                seen = seen[-64:] + chunk
                if b"\x8a%c%s" % (len(last), last) in seen:  # its pong
                    return True
            return False

        assert await asyncio.to_thread(answered)
        sock.close()


@pytest.mark.parametrize("frame", [Frame(Opcode.TEXT, b"\xff"), Frame(Opcode.CLOSE, Close(1000, "bye").serialize())],
                         ids=["the layer's own close", "the client's close"])
async def test_a_close_by_the_websocket_layer_drops_a_client_that_never_reads(frame: Frame) -> None:
    """The WebSocket layer's own closes (here 1007, a text frame that is not UTF-8) waited, as
    all of uvicorn's do, for the client to read up to the close frame: a client that reads
    nothing held its connection for good. It is dropped CLOSING_GRACE_S later; so is one
    that sends a close frame itself, then reads nothing of the answer to it."""
    async def sends_a_lot(scope: dict, receive, send) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "bytes": b"x" * 4_000_000})  # more than the sockets hold
            while (await receive())["type"] != "websocket.disconnect":
                pass

    async with served(sends_a_lot, ws=with_bounds(5)) as server:
        with await asyncio.to_thread(never_reading, server.config.port, "/") as sock:
            await asyncio.to_thread(sock.sendall, frame.serialize(mask=True))

            async def dropped() -> bool:
                return not server.server_state.connections

            assert await eventually(dropped, 15)  # CLOSING_GRACE_S is 5


async def test_a_message_of_too_many_frames_is_refused(
    gateways: list[Gateway], board: tuple[Tenant, str]
) -> None:
    """uvicorn kept every frame of a message, and websockets counts only their bytes: empty
    continuation frames without end grew the server's memory without bound and stalled it.
    A message may have MAX_FRAGMENTS frames; more, and it is refused as too large (1009)."""
    t, doc = board
    gw = gateways[0]
    too_large = counter(gw.port, 'canvasdb_gateway_rejected_total{reason="too_large"}')
    step1 = protocol.sync_step1(b"\x00")
    async with websockets.connect(f"{gw.url(t.slug)}/{doc}?token={t.token}") as ws:
        await ws.send([step1, *[b""] * (MAX_FRAGMENTS - 2)])  # and the last, empty, frame: the most
        while protocol.read(await asyncio.wait_for(ws.recv(), 5)).step != protocol.STEP2:
            pass
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send([step1, *[b""] * (MAX_FRAGMENTS - 1)])
        assert await closed_with(ws) == 1009
    assert counter(gw.port, 'canvasdb_gateway_rejected_total{reason="too_large"}') == too_large + 1


async def test_a_clients_protocol_error_is_no_traceback_in_the_log(
    gateways: list[Gateway], board: tuple[Tenant, str]
) -> None:
    """A text frame that is not UTF-8 made uvicorn log a traceback for each (8,715 connections
    with a bogus token in 5 s logged 8,637 of them, 5 MiB). It is closed with 1007 and
    nothing logged."""
    t, doc = board
    gw = gateways[0]
    start = gw.log.stat().st_size
    for _ in range(5):
        async with websockets.connect(f"{gw.url(t.slug)}/{doc}?token={t.token}") as ws:
            await ws.send(b"\xff\xfe", text=True)
            assert await closed_with(ws) == 1007
    with gw.log.open("rb") as log:
        log.seek(start)
        logged = log.read().decode()
    assert "Traceback" not in logged and "UTF-8" not in logged, logged[:2000]


async def test_awareness_is_bounded_and_belongs_to_who_introduced_it(
    gateways: list[Gateway], board: tuple[Tenant, str]
) -> None:
    """Each client's state belongs to one connection, and goes when it goes: the clients of
    its first awareness message (an official client's own) and those it introduces, at most
    64. An official client sends back the states it hears of others: those stay theirs. A
    tab may introduce another tab's state (heard over a BroadcastChannel) before that tab's
    socket opens: the state is that tab's once its socket says so."""
    t, doc = board
    url = f"{gateways[0].url(t.slug)}/{doc}?token={t.token}"
    states: dict[int, str] = {}

    def aware(*entries: tuple[int, int, str]) -> bytes:
        return protocol.awareness(protocol.awareness_update(list(entries)))

    async with websockets.connect(url) as watcher, websockets.connect(url) as alice:
        async def heard(want: dict[int, str]) -> None:
            while any(states.get(c) != v for c, v in want.items()):
                message = protocol.read(await asyncio.wait_for(watcher.recv(), 5))
                if message.kind == protocol.AWARENESS:
                    states.update((c, v) for c, _, v in protocol.awareness_entries(message.payload))

        for ws in (watcher, alice):
            await synced(ws)
        await alice.send(aware((1, 1, '{"name": "alice"}')))
        async with websockets.connect(url) as bob:
            await synced(bob)
            await bob.send(aware((2, 1, '{"name": "bob"}')))  # its own first, as the official client
            await bob.send(aware((1, 1, '{"name": "alice"}'), *[(1000 + i, 1, '{"fake": 1}') for i in range(100)]))
            await heard({1: '{"name": "alice"}', 2: '{"name": "bob"}'})
            await asyncio.sleep(0.3)
            with contextlib.suppress(TimeoutError):
                await heard({0: "never"})
            assert len([c for c in states if c >= 1000]) == 63, "64 clients per connection, bob's included"
        await heard({2: "null"})  # bob left: his states go, alice's stays
        assert states[1] == '{"name": "alice"}' and states[1000] == "null"

        async with websockets.connect(url) as tab1:
            await synced(tab1)
            await tab1.send(aware((3, 1, '{"tab": 1}')))
            await tab1.send(aware((4, 1, '{"tab": 2}')))  # the other tab's, before its socket opened
            async with websockets.connect(url) as tab2:
                await synced(tab2)
                await tab2.send(aware((4, 2, '{"tab": 2}')))
                await heard({3: '{"tab": 1}', 4: '{"tab": 2}'})
                await tab1.close()
                await heard({3: "null"})
                await asyncio.sleep(0.3)
                with contextlib.suppress(TimeoutError):
                    await heard({0: "never"})
                assert states[4] == '{"tab": 2}', "the first tab took the second's state with it"
            await heard({4: "null"})
    assert counter(gateways[0].port, 'canvasdb_gateway_rejected_total{reason="awareness_full"}') >= 37


class _Transport:
    """What a Peer writes to, counting what waits unread."""

    def __init__(self) -> None:
        self.buffer, self.closing, self.aborted = 0, False, False

    def write(self, data: bytes) -> None:
        self.buffer += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = True


class _Socket:
    """uvicorn's WebSocket protocol object, as far as a Peer writes through it."""

    def __init__(self) -> None:
        self.transport, self.close_sent, self.disconnected, self.closed_with = _Transport(), False, False, None
        self.conn = self

    def fail(self, code: int, reason: str) -> None:
        self.closed_with = code

    def data_to_send(self) -> list[bytes]:
        return [b"close"]


async def test_the_answer_to_a_clients_own_sync_is_not_held_against_it() -> None:
    """A 70 MB document's first sync passes the 64 MB a client may leave unread; what others
    write to it meanwhile is not refused for it, only what it does not read beyond that."""
    socket_ = _Socket()
    peer = Peer(send=None, close=None, direct=socket_)  # type: ignore[arg-type]
    peer.push(b"s" * 70_000_000, asked=True)
    await asyncio.sleep(0)
    peer.push(b"an edit")
    await asyncio.sleep(0)
    assert socket_.closed_with is None, "cut off for the document it asked for"
    socket_.transport.buffer -= 69_000_000  # it read most of it
    peer.push(b"e" * 68_000_000)  # then others' edits it does not read (64 MiB is 67.1 MB)
    await asyncio.sleep(0)
    peer.push(b"one more")
    assert socket_.closed_with == 1013 and socket_.transport.closing


async def test_awareness_newer_than_held_only_and_owned_by_who_said_it_first(db: Database) -> None:
    """A client with no state of its own sends back the room's states as its first message:
    it owns none of them. A state sent back after its client went stays gone. A state the
    room's byte budget refused is nobody's."""
    hub = Hub(DocumentStore(db), "postgresql://unused", awareness_delay=0.01)
    a, b, v, w1, w2 = (Peer(send=None, close=None, direct=_Socket()) for _ in range(5))  # type: ignore[arg-type]
    room = hub.join(uuid4(), "room", a, 0)
    for peer in (b, v, w1, w2):
        hub.join(room.org_id, "room", peer, 0)
    hub.relay_awareness(room, protocol.awareness_update([(1, 1, '{"a": 1}')]), a)
    hub.relay_awareness(room, protocol.awareness_update([(2, 1, '{"b": 1}')]), b)
    hub.relay_awareness(room, protocol.awareness_update([(1, 1, '{"a": 1}'), (2, 1, '{"b": 1}')]), v)
    assert room.owners == {1: a, 2: b}
    hub.leave(room, a)
    hub.leave(room, v)
    assert set(room.awareness) == {2}, "a's state went with a; b's stayed when v left"
    hub.relay_awareness(room, protocol.awareness_update([(1, 1, '{"a": 1}')]), b)  # sent back late
    assert set(room.awareness) == {2} and room.owners == {2: b}
    hub.relay_awareness(room, protocol.awareness_update([(2, 2, '{"b": "\u00e9"}')]), b)  # replaced
    big = '"' + "\u00e9" * 30_000 + '"'  # 60,002 bytes: the budget counts bytes, not characters
    for peer, base in ((w1, 100), (w2, 200)):
        hub.relay_awareness(room, protocol.awareness_update([(base + i, 1, big) for i in range(60)]), peer)
    assert len(room.awareness) < 121 and set(room.owners) == set(room.awareness)
    assert room.awareness_bytes == sum(len(held.state.encode()) for held in room.awareness.values())
    assert room.awareness_bytes <= 4 * 1024 * 1024


async def test_a_closing_client_that_never_reads_is_dropped(
    pg_url: str, svc: Services, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """A close the gateway asks for (here: its token revoked) waits for room in the socket's
    buffer, which a client that reads nothing never makes: the close frame is then written
    behind what waits, and the connection dropped 5 s later, with a backlog under the
    slow-client limit too."""
    t, doc = board
    gw = Gateway(pg_url, tmp_path, CANVASDB_GATEWAY_REAUTH_SECONDS="1")
    token_id, token = await svc.tenancy.create_token(t.owner.user_id)
    slow = never_reading(gw.port, f"/v1/orgs/{t.slug}/docs/{doc}?token={token}")
    try:
        async with websockets.connect(f"{gw.url(t.slug)}/{doc}?token={t.token}", max_size=None) as writer:
            await synced(writer)
            await send_megabytes(writer, "mid", 4)  # the socket's buffers full, the slow-client limit far
            await svc.tenancy.revoke_token(token)
            deadline = time.monotonic() + 40
            while counter(gw.port, "canvasdb_gateway_connections") > 1:
                assert time.monotonic() < deadline, "the closing connection was kept"
                await asyncio.sleep(0.5)
        assert counter(gw.port, 'canvasdb_gateway_rejected_total{reason="slow_client"}') == 0
    finally:
        slow.close()
        gw.stop()


async def test_connections_over_a_cap_are_told_to_try_again_later(
    pg_url: str, svc: Services, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """One token held 4,000 connections, and two clients 20,000 (every file descriptor; other
    users' connections were reset). Past CANVASDB_GATEWAY_MAX_CONNECTIONS_PER_USER of one
    user, or CANVASDB_GATEWAY_MAX_CONNECTIONS in all: 1013, counted, logged once per 30 s."""
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert Settings().gateway_max_connections == soft_limit * 3 // 4
    t, doc = board
    other = await make_tenant(svc)
    await svc.documents.create(other.owner, other.project_id, doc, "board")
    gw = Gateway(pg_url, tmp_path, CANVASDB_GATEWAY_MAX_CONNECTIONS_PER_USER="2",
                 CANVASDB_GATEWAY_MAX_CONNECTIONS="3")
    try:
        async with contextlib.AsyncExitStack() as stack:
            async def connected(tenant: Tenant) -> websockets.ClientConnection:
                return await stack.enter_async_context(
                    websockets.connect(f"{gw.url(tenant.slug)}/{doc}?token={tenant.token}"))

            mine = [await connected(t), await connected(t)]
            for ws in mine:
                await synced(ws)
            assert await closed_with(await connected(t)) == 1013  # a third of one user's
            await synced(await connected(other))  # another user's: three in all
            for tenant in (other, t, other):
                assert await closed_with(await connected(tenant)) == 1013
            await mine[0].close()

            async def fewer() -> bool:
                return counter(gw.port, "canvasdb_gateway_connections") == 2

            assert await eventually(fewer)
            await synced(await connected(t))  # a place again
        assert counter(gw.port, 'canvasdb_gateway_rejected_total{reason="connections_per_user"}') == 1
        assert counter(gw.port, 'canvasdb_gateway_rejected_total{reason="connections"}') == 3
    finally:
        gw.stop()
    lines = gw.log.read_text().splitlines()
    assert sum("too many connections of user" in line for line in lines) == 1
    assert sum("too many connections in this process" in line for line in lines) == 1


async def test_awareness_is_relayed_as_each_clients_latest_state(
    gateways: list[Gateway], board: tuple[Tenant, str]
) -> None:
    t, doc = board
    url = f"{gateways[0].url(t.slug)}/{doc}?token={t.token}"
    async with websockets.connect(url) as watcher, websockets.connect(url) as cursors:
        for ws in (watcher, cursors):  # each has joined the room once the server asks to sync
            while protocol.read(await asyncio.wait_for(ws.recv(), 5)).step != protocol.STEP1:
                pass
        for clock in range(1, 31):  # two clients' cursors moving, faster than the relay delay
            states = [(client, clock, json.dumps({"x": clock, "client": client})) for client in (71, 72)]
            await cursors.send(protocol.awareness(protocol.awareness_update(states)))
        seen: dict[int, int] = {}
        messages = 0
        while seen != {71: 30, 72: 30}:
            message = protocol.read(await asyncio.wait_for(watcher.recv(), 5))
            if message.kind == protocol.AWARENESS:
                messages += 1
                for client, clock, state in protocol.awareness_entries(message.payload):
                    assert json.loads(state) == {"x": clock, "client": client}
                    assert clock > seen.get(client, 0), "an older state after a newer one"
                    seen[client] = clock
        assert messages < 30, "each state was relayed on its own"
        # a later move still goes out (after at most the relay delay)
        await cursors.send(protocol.awareness(protocol.awareness_update([(71, 31, "{}")])))
        while True:
            message = protocol.read(await asyncio.wait_for(watcher.recv(), 5))
            if message.kind == protocol.AWARENESS:
                assert protocol.awareness_entries(message.payload) == [(71, 31, "{}")]
                break


async def test_http_updates_reach_websocket_clients(
    gateways: list[Gateway], board: tuple[Tenant, str]
) -> None:
    t, doc = board
    async with await JsClient.start(gateways[0].url(t.slug), doc, t.token) as c:
        await c.wait_synced()
        writer = Doc()
        updates: list[bytes] = []
        writer.observe(lambda e: updates.append(e.update))
        writer.get("nodes", type=Map)["via-http"] = {"type": "note"}
        r = httpx.post(f"http://127.0.0.1:{gateways[1].port}/v1/orgs/{t.slug}/docs/{doc}/updates",
                       content=updates[0], headers={"Authorization": f"Bearer {t.token}"})
        assert r.status_code == 201
        await c.wait_for("nodes", "via-http")


@contextlib.asynccontextmanager
async def behind_balancer(pg_url: str, home: Path, t: Tenant,
                          doc: str) -> AsyncIterator[tuple[Gateway, JsClient, JsClient]]:
    """Gateways A and B; client ``a`` reaches A through a load balancer (B next), ``b`` is on B."""
    ga, gb = Gateway(pg_url, home), Gateway(pg_url, home)
    try:
        async with (Balancer([ga.port, gb.port]) as lb,
                    await JsClient.start(lb.url(t.slug), doc, t.token) as a,
                    await JsClient.start(gb.url(t.slug), doc, t.token) as b):
            await a.wait_synced()
            await b.wait_synced()
            yield ga, a, b
    finally:
        ga.stop()
        gb.stop()


async def test_killed_gateway_loses_nothing_acknowledged(
    pg_url: str, tmp_path: Path, svc: Services, board: tuple[Tenant, str]
) -> None:
    """Clients type on gateways A and B; A is killed with SIGKILL; its client reconnects through
    the load balancer to B, resyncs, and everyone (and the store) converges."""
    t, doc = board
    async with behind_balancer(pg_url, tmp_path, t, doc) as (ga, a, b):
        for i in range(40):
            await a.map_set("nodes", f"a{i}", i)
            await b.map_set("nodes", f"b{i}", i)
            if i == 20:
                ga.stop(signal.SIGKILL)
            await asyncio.sleep(0.01)

        async def converged():
            sa, sb = await a.state(maps=["nodes"]), await b.state(maps=["nodes"])
            return len(sa.maps["nodes"]) == 80 and sa.maps == sb.maps

        assert await eventually(converged, 30)
        final = (await a.state(maps=["nodes"])).maps["nodes"]

        async def stored():
            return await stored_nodes(svc, t, doc) == final

        assert await eventually(stored)


async def test_sigterm_commits_what_arrived_then_says_going_away(
    pg_url: str, tmp_path: Path, svc: Services, board: tuple[Tenant, str]
) -> None:
    """SIGTERM during a burst: the gateway stops accepting, commits what its clients sent,
    closes them with 1001 and exits 0; the client resyncs the rest through another gateway."""
    t, doc = board
    async with behind_balancer(pg_url, tmp_path, t, doc) as (ga, a, b):
        await a.burst(200, "nodes")
        ga.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(ga.proc.wait, 20) == 0
        closed = await a.wait_event(lambda e: e.get("event") == "close" and not e.get("local"))
        assert closed["code"] == 1001

        async def arrived():
            return len((await b.state(maps=["nodes"])).maps["nodes"]) == 200

        assert await eventually(arrived, 30)
        assert len(await stored_nodes(svc, t, doc)) == 200


def test_awareness_updates_split_to_fit_a_notify_payload() -> None:
    entries = [(client, 1, json.dumps({"name": "x" * (client * 7)})) for client in range(1, 40)]
    entries.append((99, 1, json.dumps({"huge": "y" * 500})))  # larger than a message may be
    updates = protocol.awareness_updates(entries, 300)
    assert len(updates) > 1 and all(len(u) <= 300 for u in updates)
    relayed = [e for u in updates for e in protocol.awareness_entries(u)]
    assert relayed == [e for e in entries if e[0] != 99]


def edits() -> tuple[Map, list[bytes]]:
    """A pycrdt map standing in for a Yjs client's, and the updates its edits make."""
    doc, updates = Doc(), []
    doc.observe(lambda event: updates.append(event.update))
    return doc.get("nodes", type=Map), updates


async def test_a_silently_dead_listener_is_noticed_and_replaced(
    pg_url: str, db: Database, svc: Services, board: tuple[Tenant, str]
) -> None:
    """The listening connection stays open but nothing comes through it any more (a NAT or
    firewall dropped the flow: no RST, no FIN). The hub stops saying it listens (/readyz),
    connects again, and its clients get what other processes committed meanwhile and after."""
    t, doc = board
    nodes, updates = edits()
    async with PgProxy(pg_url) as proxy:
        store = DocumentStore(db)  # as another gateway process: only its listener goes through the proxy
        hub = Hub(store, proxy.url, liveness_seconds=0.5)
        await hub.start()
        peer = Peer(send=None, close=None)  # type: ignore[arg-type]
        received: list[bytes] = []

        async def got(update: bytes) -> bool:
            while not peer.queue.empty():
                received.append(peer.queue.get_nowait())  # type: ignore[arg-type]
            return protocol.sync_update(update) in received

        try:
            hub.join(t.org_id, doc, peer, (await store.sync(t.org_id, doc)).seq)
            assert await eventually(lambda: asyncio.sleep(0, hub.listening))
            assert proxy.silence() == 1
            nodes["while-deaf"] = 1
            await svc.documents.append(t.owner, doc, updates[-1])  # its notice is lost
            assert await eventually(lambda: asyncio.sleep(0, not hub.listening)), "still says it listens"
            assert await eventually(lambda: asyncio.sleep(0, hub.listening))
            assert proxy.listeners == 2  # over a new connection
            name = f"canvasdb-listen {store.log.origin}"
            with psycopg.connect(pg_url) as admin:  # the silent one ended on the server too
                open_there = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                           (name,)).fetchone()
            assert open_there == (1,)
            assert await eventually(lambda: got(updates[0]))  # read again from the log
            nodes["after"] = 2
            await svc.documents.append(t.owner, doc, updates[-1])
            assert await eventually(lambda: got(updates[1]))
        finally:
            await hub.stop()
            await store.close()


async def test_connecting_while_the_database_is_away_is_try_again_later(
    pg_url: str, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """No database: the connection is closed with 1013 ("try again later", so the client
    reconnects), counted, and logged in one line, not as an internal error with a traceback."""
    t, doc = board
    async with PgProxy(pg_url) as proxy:
        gw = await asyncio.to_thread(Gateway, proxy.url, tmp_path)
        try:
            proxy.cut()
            async with websockets.connect(f"{gw.url(t.slug)}/{doc}?token={t.token}") as ws:
                with pytest.raises(websockets.ConnectionClosed) as info:
                    while True:
                        await asyncio.wait_for(ws.recv(), 30)
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1013, "try again later")
            assert counter(gw.port, 'canvasdb_gateway_rejected_total{reason="unavailable"}') == 1
        finally:
            await asyncio.to_thread(gw.stop)
    lines = gw.log.read_text().splitlines()
    assert f"gateway connection to {doc} failed" not in lines
    refused = [i for i, line in enumerate(lines) if f"closed a connection to {doc} with 1013" in line]
    assert len(refused) == 1
    assert not any(line.startswith("Traceback") for line in lines[refused[0] + 1:refused[0] + 2])


async def test_an_outage_is_a_few_lines_in_the_log_however_many_clients(
    pg_url: str, board: tuple[Tenant, str], tmp_path: Path
) -> None:
    """While the database is away, every open connection fails its access re-check, and every
    client that connects is refused (1013): each kind is one line per 30 s, not one per client
    (3,000 lines in a 36 s outage with 3,000 clients). The connections stay open throughout."""
    t, doc = board
    async with PgProxy(pg_url) as proxy:
        gw = await asyncio.to_thread(Gateway, proxy.url, tmp_path, CANVASDB_GATEWAY_REAUTH_SECONDS="0.5")
        try:
            url = f"{gw.url(t.slug)}/{doc}?token={t.token}"
            clients = [await websockets.connect(url) for _ in range(10)]
            for ws in clients:
                await synced(ws)


            async def refused() -> int | None:
                async with websockets.connect(url) as ws:
                    with pytest.raises(websockets.ConnectionClosed) as info:
                        await asyncio.wait_for(ws.recv(), 30)
                return info.value.rcvd.code if info.value.rcvd is not None else None

            proxy.cut()
            # past the pool's wait for a connection: each re-check has failed at least once
            *codes, _ = await asyncio.gather(*(refused() for _ in range(3)), asyncio.sleep(11))
            assert codes == [1013] * 3
            proxy.restore()
            for ws in clients:
                await ws.send(protocol.sync_step1(b"\x00"))  # still open, and served again
                await asyncio.wait_for(synced(ws), 15)
                await ws.close()
        finally:
            await asyncio.to_thread(gw.stop)
    lines = gw.log.read_text().splitlines()
    assert len([line for line in lines if "could not check access to" in line]) == 1, lines
    assert len([line for line in lines if "with 1013, try again later" in line]) == 1, lines


async def test_a_room_whose_catch_up_failed_tries_again(
    pg_url: str, svc: Services, board: tuple[Tenant, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A catch-up that fails (here: the database away) is tried again while the room is
    open: a quiet document sends no further notice, and its peers would miss the update."""
    t, doc = board
    ydoc = Doc()
    ydoc.get("nodes", type=Map)["n1"] = "from another gateway"
    await svc.documents.append(t.owner, doc, ydoc.get_update())  # seq 1, never sent by this room
    async with PgProxy(pg_url) as proxy, Database(proxy.url, min_size=1, max_size=1, timeout=0.5) as away:
        store = DocumentStore(away)
        hub = Hub(store, "")
        waiting = Peer(send=None, close=None)  # type: ignore[arg-type]
        try:
            hub.join(t.org_id, doc, waiting, 0)
            proxy.cut()
            with caplog.at_level(logging.WARNING, "canvasdb.gateway"):
                # the notice of seq 1 arrives while the database is away
                hub._heard(f"u {t.org_id} 1 another-gateway {doc}")

                async def failed() -> bool:
                    return any("could not catch" in r.getMessage() for r in caplog.records)

                assert await eventually(failed)
            proxy.restore()

            async def received() -> int:
                return waiting.queue.qsize()

            assert await eventually(received, timeout=10) == 1, "the room never tried again"
        finally:
            await hub.stop()
            await store.close()


async def test_a_catch_up_that_fails_is_one_line_in_the_log(
    pg_url: str, board: tuple[Tenant, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A room catching up with the log while the database is away: the task's failure is
    logged in one line, never left for asyncio's "Task exception was never retrieved"."""
    t, doc = board
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    unhandled: list[str] = []

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if "catch_up" in repr(context.get("future")):
            unhandled.append(context["message"])
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        async with PgProxy(pg_url) as proxy, Database(proxy.url, min_size=1, max_size=1, timeout=1) as away:
            store = DocumentStore(away)
            hub = Hub(store, "")
            try:
                hub.join(t.org_id, doc, Peer(send=None, close=None), 0)  # type: ignore[arg-type]
                proxy.cut()
                with caplog.at_level(logging.WARNING, "canvasdb.gateway"):
                    # a peer whose sync included an update the room has not sent: it catches up
                    hub.join(t.org_id, doc, Peer(send=None, close=None), 1)  # type: ignore[arg-type]

                    async def logged() -> list[logging.LogRecord]:
                        return [r for r in caplog.records if "could not catch" in r.getMessage()]

                    records = await eventually(logged)
            finally:
                await hub.stop()
                await store.close()
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert [r.getMessage().startswith(f"could not catch {doc} up with the log: ") for r in records] == [True]
    assert records[0].exc_info is None
    assert unhandled == []


async def test_a_token_bucket_refuses_more_at_once_than_it_holds() -> None:
    """Waiting for more tokens than the bucket ever holds would never end."""
    bucket = TokenBucket(rate=10, burst=5)
    with pytest.raises(ValueError):
        async with asyncio.timeout(1):  # (not forever, should it wait)
            await bucket.take(6)
    await bucket.take(5)
    assert not bucket.try_take(1)
