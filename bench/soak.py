"""Soak test: `canvasdb up` under a sustained mixed load, watched for what accumulates.

The other scripts measure one capability at a time, for seconds. A server that runs for weeks fails
differently: memory, file descriptors, threads or database connections that grow a little with
every request, queues that fall behind, errors logged and forgotten, a stop that hangs. This script
starts its own `canvasdb up` (a free port, a fresh temporary CANVASDB_HOME with its embedded
PostgreSQL), drives every kind of traffic at once for --minutes (entities with references and
history, as-of reads, graph queries, searches, attachments, document updates over HTTP, WebSocket
clients editing boards and leaving abruptly, hostile frames and requests, token churn), samples
the server once a minute, then checks that it settles back once idle and stops cleanly on SIGTERM.

Usage: .venv/bin/python bench/soak.py [--minutes 10] [--rate 1.0] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pycrdt
import websockets
from harness import ERR, free_port, interrupts_held, machine_facts, phase, print_footer, print_targets
from rich.console import Console
from rich.table import Table

from canvasdb.gateway import protocol as yp

# The load: loops per kind and their mean operations per second each (scaled by --rate).
WRITERS, READERS, WS_CLIENTS = 2, 2, 6
RATES = {"writer": 3.5, "reader": 3.0, "graph": 1.0, "search": 1.0, "attachments": 0.5, "http_docs": 0.5,
         "hostile_http": 0.3}
CHURN_EVERY_S = 45.0
SEED_ENTITIES, BOARDS = 150, 8
LOAD_MIX = [
    f"{WRITERS} writers at {{writer}}/s each: 12 % create (60 % with a parent reference), 48 % patch "
    "(30 % of them set depends_on), 10 % GET + PUT If-Match, 10 % delete, 10 % undelete, 5 % restore "
    "version 1, 5 % relationship",
    f"{READERS} readers at {{reader}}/s each: get, as-of version, as-of time, history (+ next page), "
    "diff, list (+ as of a time), batch get of 20",
    "graph at {graph}/s: neighbors, dependents, reachable, path, subgraph, cycle check, relationships "
    "(20 % as of a past time)",
    "search at {search}/s: text / semantic / hybrid, facets, filters, negation, 15 % typos, next pages",
    "attachments at {attachments}/s: put 100 B-2 MB (30 % the same content), get (+ 304), head, delete",
    "document updates over HTTP at {http_docs}/s: append, state, changes",
    "{ws} WebSocket clients, one session after another: sync, 3-40 edits with awareness, then 8 % "
    "a hostile frame, 2 % a text frame; 30 % leave by TCP reset, 15 % by FIN without a close frame",
    "token churn every {churn:.0f} s: create, use over HTTP and a WebSocket, revoke (the WebSocket "
    "must close 4401), every 4th time a new org",
    "hostile HTTP at {hostile_http}/s: bad JSON, bad UUID, bad token, bad blob key, bad search mode",
]

# The baseline is the server at rest after a warm-up at the same load (its pools and caches
# grown to what the load needs); the idle sample, the server at rest after the load: each taken
# SETTLE_S after its load ended.
WARMUP_S, SETTLE_S = 60.0, 60.0

# Checks.
RSS_SLOPE_MB_PER_10_MIN = 5.0
IDLE_MARGIN = {"fds": 5, "pg_conns": 2, "threads": 2}
DRAIN_WITHIN_S = 60.0
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")
WARNING_LINE = re.compile(r"\bWARNING\b")

WORDS = ["roadmap", "quarterly", "planning", "meeting", "budget", "launch", "design", "review", "sprint",
         "retro", "customer", "feedback", "invoice", "marketing", "hiring", "onboarding", "security", "audit",
         "migration", "database", "latency", "dashboard", "kanban", "sticky", "whiteboard", "brainstorm",
         "architecture", "incident", "postmortem", "release"]
HOSTILE_FRAMES = [
    b"", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", bytes([0, 2, 5, 1, 2]),  # truncated, bad varint
    bytes([0, 2]) + bytes([10]) + b"notanupdate", bytes([0, 9, 0]), bytes([7]),
    bytes([1]) + bytes([20]) + bytes([1, 5, 1]) + b"{NaN}" + b"x" * 12,
]
OK = (200, 201, 204)
BINARY = {"Content-Type": "application/octet-stream"}


def words(n: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(n))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # PostgreSQL running as another user (started by root)
        return True
    return True


# --- the server ------------------------------------------------------------------------------


class Server:
    """`canvasdb up` on a free port with a home of its own; stopped (PostgreSQL too) on every way out."""

    def __init__(self, workdir: Path) -> None:
        self.home, self.port = workdir / "home", free_port()
        self.log_path = workdir / "server.log"
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "CANVASDB_HOME": str(self.home), "CANVASDB_LOG_LEVEL": "warning"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.pg_pid: int | None = None
        self.db_url = self.token = ""

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "canvasdb", "up", "--port", str(self.port)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"canvasdb up exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"canvasdb up not ready after 180 s; see {self.log_path}")
            time.sleep(0.5)
        self.token = (self.home / "admin-token").read_text().strip()
        status = json.loads(self.cli("db", "status", "--json"))
        self.db_url, self.pg_pid = status["url"], status["pid"]

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def cli(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run([sys.executable, "-m", "canvasdb", *args], env=self.env, input=stdin, text=True,
                              capture_output=True, check=True, timeout=60).stdout

    def stop(self) -> dict[str, Any]:
        """SIGTERM, as a service manager stops it: how long it took, its exit code, PostgreSQL gone."""
        assert self.proc is not None
        log_size = self.log_path.stat().st_size
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.perf_counter() - started
        with open(self.log_path, errors="replace") as fh:
            fh.seek(log_size)
            tail = fh.read()
        pg_gone = self.pg_pid is None or gone_within(self.pg_pid, 10)
        return {"exit_code": code, "seconds": round(seconds, 1), "postgres_stopped": pg_gone,
                "error_lines": [ln[:300] for ln in tail.splitlines() if ERROR_LINE.search(ln)]}

    def ensure_stopped(self) -> None:
        """Whatever happened: no server and no PostgreSQL of ours left running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pg_pid is not None and pid_alive(self.pg_pid):
            with contextlib.suppress(subprocess.SubprocessError):
                self.cli("db", "stop")


def gone_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` has exited within ``seconds`` (PostgreSQL's own stop takes a moment)."""
    deadline = time.monotonic() + seconds
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# --- the load ------------------------------------------------------------------------------------


@dataclass
class Load:
    """The mixed load's state: its org, what it made, and every response's status by operation."""

    http: httpx.AsyncClient
    server: Server
    rate: float
    end: float
    slug: str = ""
    ids: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    times: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    docs: list[str] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"/v1/orgs/{self.slug}{path}"

    def ws_url(self, doc: str, token: str) -> str:
        return f"ws://127.0.0.1:{self.server.port}/v1/orgs/{self.slug}/docs/{doc}?token={token}"

    def running(self) -> bool:
        return time.monotonic() < self.end

    async def pause(self, kind: str) -> None:
        await asyncio.sleep(random.expovariate(RATES[kind] * self.rate))

    def note(self, op: str, status: int | str, ok: tuple[int | str, ...] = OK) -> None:
        self.statuses[f"{op} {status}"] += 1
        if status not in ok and len(self.unexpected) < 300:
            self.unexpected.append(f"{datetime.now(UTC):%H:%M:%S} {op} {status}")

    async def req(self, op: str, method: str, path: str, ok: tuple[int, ...] = OK,
                  **kw: Any) -> httpx.Response | None:
        try:
            r = await self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            self.note(op, type(e).__name__, ok)
            return None
        self.note(op, r.status_code, ok)
        return r


async def setup(load: Load) -> None:
    """An org of its own with two projects, a card type with references, seed cards and boards."""
    load.slug = f"soak{int(time.time())}"
    await load.req("org", "POST", "/v1/orgs", json={"slug": load.slug, "name": "Soak"})
    for p in ("alpha", "beta"):
        await load.req("project", "POST", load.url("/projects"), json={"slug": p, "name": p})
    await load.req("type", "POST", load.url("/entity-types"), json={
        "name": "soak.card", "module": "soak",
        "json_schema": {"type": "object", "required": ["title"],
                        "properties": {"title": {"type": "string"},
                                       "status": {"enum": ["todo", "doing", "done"]}}},
        "text_fields": {"title": "A", "body": "B"}, "embed_fields": ["title", "body"], "tag_field": "tags",
        "reference_fields": ["$.depends_on[*]", "$.parent"], "acyclic_kinds": ["depends_on"]})
    for i in range(SEED_ENTITIES):
        await create(load, title="roadmap quarterly " + words(3) if i == 0 else None)
    load.times.append(datetime.now(UTC).isoformat())
    for i in range(BOARDS):
        doc = f"board-{i}"
        await load.req("doc", "POST", load.url(f"/projects/{random.choice(('alpha', 'beta'))}/docs"),
                       json={"id": doc})
        load.docs.append(doc)


async def create(load: Load, title: str | None = None) -> None:
    data: dict[str, Any] = {"title": title or words(4), "body": words(20), "tags": random.sample(WORDS, 2),
                            "status": random.choice(["todo", "doing", "done"])}
    if load.ids and random.random() < 0.6:
        data["parent"] = random.choice(load.ids)
    r = await load.req("create", "POST", load.url(f"/projects/{random.choice(('alpha', 'beta'))}/entities"),
                       json={"type": "soak.card", "data": data})
    if r is not None and r.status_code == 201:
        load.ids.append(r.json()["id"])


async def writer(load: Load) -> None:
    while load.running():
        await load.pause("writer")
        roll, eid = random.random(), random.choice(load.ids)
        if roll < 0.12:
            await create(load)
        elif roll < 0.60:
            patch: dict[str, Any] = {"status": random.choice(["todo", "doing", "done"]), "body": words(15)}
            if random.random() < 0.3:
                patch["depends_on"] = random.sample(load.ids, random.randint(0, 3))
            await load.req("patch", "PATCH", load.url(f"/entities/{eid}"), json={"data": patch},
                           ok=(200, 410, 422))
        elif roll < 0.70:
            r = await load.req("get-for-put", "GET", load.url(f"/entities/{eid}"), ok=(200, 410))
            if r is not None and r.status_code == 200:
                data = r.json()["data"] | {"title": words(4)}
                await load.req("put-if-match", "PUT", load.url(f"/entities/{eid}"), json={"data": data},
                               headers={"If-Match": r.headers["etag"]}, ok=(200, 409, 410, 422))
        elif roll < 0.80:
            r = await load.req("delete", "DELETE", load.url(f"/entities/{eid}"), ok=(200, 410))
            if r is not None and r.status_code == 200:
                load.deleted.append(eid)
        elif roll < 0.90 and load.deleted:
            eid = load.deleted.pop(random.randrange(len(load.deleted)))
            await load.req("undelete", "POST", load.url(f"/entities/{eid}/undelete"), ok=(200, 409, 422))
        elif roll < 0.95:
            await load.req("restore", "POST", load.url(f"/entities/{eid}/restore?version=1"),
                           ok=(200, 404, 410, 422))
        else:
            a, b = random.sample(load.ids, 2)
            await load.req("relationship", "POST", load.url("/relationships"),
                           json={"src": a, "dst": b, "kind": random.choice(["mentions", "depends_on"])},
                           ok=(201, 410, 422))
        if random.random() < 0.02:
            load.times.append(datetime.now(UTC).isoformat())


async def reader(load: Load) -> None:
    while load.running():
        await load.pause("reader")
        roll, eid = random.random(), random.choice(load.ids)
        if roll < 0.3:
            await load.req("get", "GET", load.url(f"/entities/{eid}"), ok=(200, 410))
        elif roll < 0.45:
            await load.req("asof-version", "GET", load.url(f"/entities/{eid}"),
                           params={"as_of": random.randint(1, 5)}, ok=(200, 404, 410))
        elif roll < 0.6:
            await load.req("asof-time", "GET", load.url(f"/entities/{eid}"),
                           params={"as_of": random.choice(load.times)}, ok=(200, 404, 410))
        elif roll < 0.75:
            r = await load.req("history", "GET", load.url(f"/entities/{eid}/history"), params={"limit": 5})
            if r is not None and r.status_code == 200 and r.json().get("next"):
                await load.req("history-page2", "GET", load.url(f"/entities/{eid}/history"),
                               params={"limit": 5, "before": r.json()["next"]})
        elif roll < 0.82:
            await load.req("diff", "GET", load.url(f"/entities/{eid}/diff"), params={"from": 1, "to": 2},
                           ok=(200, 404, 422))
        elif roll < 0.9:
            await load.req("list", "GET", load.url("/projects/alpha/entities"),
                           params={"limit": 50, "after": random.choice(load.ids)}, ok=(200, 422))
        elif roll < 0.95:
            await load.req("list-asof", "GET", load.url("/projects/beta/entities"),
                           params={"limit": 50, "as_of": random.choice(load.times)})
        else:
            await load.req("batch", "GET", load.url("/entities"),
                           params={"ids": ",".join(random.sample(load.ids, 20))})


async def graph(load: Load) -> None:
    gone = (200, 404, 410)
    while load.running():
        await load.pause("graph")
        (a, b), roll = random.sample(load.ids, 2), random.random()
        as_of = {"as_of": random.choice(load.times)} if random.random() < 0.2 else {}
        if roll < 0.25:
            await load.req("neighbors", "GET", load.url(f"/entities/{a}/neighbors"),
                           params={"depth": 2, "direction": "both", **as_of}, ok=gone)
        elif roll < 0.4:
            await load.req("dependents", "GET", load.url(f"/entities/{a}/dependents"),
                           params={"depth": 3, **as_of}, ok=gone)
        elif roll < 0.55:
            await load.req("reachable", "GET", load.url(f"/entities/{a}/reachable"),
                           params={"depth": 4, "direction": "out"}, ok=gone)
        elif roll < 0.7:
            await load.req("path", "GET", load.url("/graph/path"),
                           params={"from": a, "to": b, "max_depth": 6, "direction": "both"}, ok=gone)
        elif roll < 0.85:
            await load.req("subgraph", "POST", load.url("/graph/subgraph"),
                           json={"roots": [a, b], "depth": 2, "direction": "both", "limit": 200}, ok=gone)
        elif roll < 0.93:
            await load.req("cycle", "GET", load.url("/graph/cycle"),
                           params={"src": a, "dst": b, "kind": "depends_on"}, ok=gone)
        else:
            await load.req("rels", "GET", load.url("/relationships"), params={"entity": a, "limit": 50})


async def search(load: Load) -> None:
    while load.running():
        await load.pause("search")
        q = words(random.randint(1, 3))
        if random.random() < 0.15:  # a typo: two letters swapped
            i = random.randrange(1, len(q) - 1)
            q = q[:i] + q[i + 1] + q[i] + q[i + 2:]
        params: dict[str, Any] = {"q": q, "mode": random.choice(["text", "semantic", "hybrid", "hybrid"]),
                                  "limit": 20}
        roll = random.random()
        if roll < 0.3:
            params["facets"] = "type,tag"
        elif roll < 0.45:
            params |= {"project": "alpha", "data.status": "done"}
        elif roll < 0.5:
            params["q"] = "-" + random.choice(WORDS)
        r = await load.req(f"search-{params['mode']}", "GET", load.url("/search"), params=params)
        if r is not None and r.status_code == 200 and r.json().get("next_cursor") and random.random() < 0.3:
            await load.req("search-page2", "GET", load.url("/search"),
                           params={**params, "cursor": r.json()["next_cursor"]})
        if random.random() < 0.05:
            await load.req("search-status", "GET", load.url("/search/status"))


async def attachments(load: Load) -> None:
    shared = os.urandom(50_000)
    while load.running():
        await load.pause("attachments")
        roll = random.random()
        if roll < 0.4 or not load.blobs:
            key = f"files/{uuid.uuid4().hex[:8]}/{random.choice(['a.png', 'b.pdf', 'c.bin'])}"
            size = random.choice([100, 10_000, 300_000, 2_000_000])
            body = shared if random.random() < 0.3 else os.urandom(size)
            r = await load.req("blob-put", "PUT", load.url(f"/blobs/{key}"), content=body, headers=BINARY)
            if r is not None and r.status_code in (200, 201):
                load.blobs.append(key)
        elif roll < 0.75:
            key = random.choice(load.blobs)
            r = await load.req("blob-get", "GET", load.url(f"/blobs/{key}"), ok=(200, 404))
            if r is not None and r.status_code == 200 and random.random() < 0.3:
                await load.req("blob-304", "GET", load.url(f"/blobs/{key}"),
                               headers={"If-None-Match": r.headers["etag"]}, ok=(304,))
        elif roll < 0.85:
            key = random.choice(load.blobs)
            await load.req("blob-head", "HEAD", load.url(f"/blobs/{key}"), ok=(200, 404))
        else:
            key = load.blobs.pop(random.randrange(len(load.blobs)))
            await load.req("blob-delete", "DELETE", load.url(f"/blobs/{key}"), ok=(204, 404))


async def http_docs(load: Load) -> None:
    ydoc = pycrdt.Doc()
    nodes = ydoc.get("nodes", type=pycrdt.Map)
    while load.running():
        await load.pause("http_docs")
        doc = random.choice(load.docs)
        if random.random() < 0.5:
            before = ydoc.get_state()
            nodes[f"h{random.randint(0, 20)}"] = {"type": "sticky", "x": 1, "y": 2, "w": 3, "h": 4,
                                                  "text": words(2)}
            await load.req("doc-update", "POST", load.url(f"/docs/{doc}/updates"),
                           content=ydoc.get_update(before), headers=BINARY)
        elif random.random() < 0.5:
            await load.req("doc-state", "GET", load.url(f"/docs/{doc}/state"))
        else:
            await load.req("doc-changes", "GET", load.url(f"/docs/{doc}/changes"), params={"limit": 50})


async def hostile_http(load: Load) -> None:
    while load.running():
        await load.pause("hostile_http")
        choice = random.randrange(5)
        if choice == 0:
            await load.req("bad-json", "POST", load.url("/projects/alpha/entities"), content=b"{nope",
                           headers={"Content-Type": "application/json"}, ok=(400,))
        elif choice == 1:
            await load.req("bad-uuid", "GET", load.url("/entities/not-a-uuid"), ok=(422,))
        elif choice == 2:
            await load.req("bad-token", "GET", load.url(f"/entities/{load.ids[0]}"),
                           headers={"Authorization": "Bearer cdb_nope"}, ok=(401,))
        elif choice == 3:
            await load.req("bad-key", "PUT", load.url("/blobs/../x"), content=b"x", ok=(404, 422))
        else:
            await load.req("bad-search", "GET", load.url("/search"), params={"q": "x", "mode": "nope"},
                           ok=(422,))


def reset(ws: Any) -> None:
    """Close the TCP connection with a reset (SO_LINGER 0), as a crashed client or a dropped NAT."""
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


async def ws_session(load: Load, name: str) -> None:
    """One client's visit to a board: sync, edits with awareness, maybe a hostile frame, then leave
    by a close frame, a bare FIN or a reset."""
    mode = random.random()
    try:
        async with websockets.connect(load.ws_url(random.choice(load.docs), load.server.token),
                                      max_size=None, open_timeout=15, close_timeout=5) as ws:
            ydoc = pycrdt.Doc()
            nodes = ydoc.get("nodes", type=pycrdt.Map)

            async def receive() -> None:
                async for frame in ws:
                    if isinstance(frame, bytes) and frame and frame[0] == yp.SYNC:
                        m = yp.read(frame)
                        if m.step in (yp.STEP2, yp.UPDATE):
                            ydoc.apply_update(m.payload)
                        elif m.step == yp.STEP1:
                            await ws.send(yp.sync_step2(ydoc.get_update(m.payload)))

            receiving = asyncio.create_task(receive())
            await ws.send(yp.sync_step1(ydoc.get_state()))
            await asyncio.sleep(0.5)
            for clock in range(1, random.randint(3, 40) + 1):
                if not load.running():
                    break
                before, key = ydoc.get_state(), f"n{random.randint(0, 60)}"
                if random.random() < 0.2 and key in nodes:
                    del nodes[key]
                else:
                    nodes[key] = {"type": "sticky", "x": random.randint(0, 999), "y": random.randint(0, 999),
                                  "w": 200, "h": 120, "text": words(3)}
                await ws.send(yp.sync_update(ydoc.get_update(before)))
                cursor = json.dumps({"user": name, "cursor": [random.random(), random.random()]})
                await ws.send(yp.awareness(yp.awareness_update([(ydoc.client_id, clock, cursor)])))
                if random.random() < 0.1:
                    await ws.send(bytes([yp.QUERY_AWARENESS]))
                await asyncio.sleep(random.uniform(0.1, 1.0))
            if mode < 0.08:
                await ws.send(random.choice(HOSTILE_FRAMES))
                await asyncio.sleep(0.5)
                load.note("ws-hostile", ws.close_code or "open", ok=(4400, 1002, 1007, 1008, "open"))
            elif mode < 0.1:
                await ws.send("a text frame")
                await asyncio.sleep(0.5)
                load.note("ws-text", ws.close_code or "open", ok=(4400, 1003, 1007, "open"))
            if mode > 0.7:
                reset(ws)
                load.note("ws-rst", "done", ok=("done",))
            elif mode > 0.55:
                ws.transport.close()  # FIN without a close frame
                load.note("ws-fin", "done", ok=("done",))
            else:
                await ws.close()
                load.note("ws-close", ws.close_code or "none", ok=(1000, 4400))
            receiving.cancel()
    except websockets.ConnectionClosed as e:
        load.note("ws-closed", e.rcvd.code if e.rcvd else "none", ok=(4400, 1000, 1001, 1007))
    except (OSError, TimeoutError, websockets.InvalidStatus) as e:
        load.note("ws-error", type(e).__name__, ok=())


async def ws_client(load: Load, i: int) -> None:
    while load.running():
        await ws_session(load, f"user{i}")
        await asyncio.sleep(random.uniform(0.5, 4) / load.rate)


async def token_churn(load: Load) -> None:
    """Tokens created, used and revoked, one of them held by an open WebSocket; now and then an org."""
    n = 0
    while load.running():
        await asyncio.sleep(min(CHURN_EVERY_S / load.rate, max(0.0, load.end - time.monotonic())))
        if not load.running():
            return
        n += 1
        try:
            made = json.loads(await asyncio.to_thread(
                load.server.cli, "token", "create", "--org", load.slug, "--user", f"churn{n % 5}@soak.local",
                "--role", "admin", "--json"))
        except subprocess.CalledProcessError as e:
            load.note("token-create", "fail", ok=())
            load.unexpected.append(e.stderr[-300:])
            continue
        load.note("token-create", 201)
        token, entity = made["token"], load.url(f"/entities/{load.ids[0]}")
        auth = {"Authorization": f"Bearer {token}"}
        await load.req("churn-get", "GET", entity, headers=auth)
        try:
            ws = await websockets.connect(load.ws_url(load.docs[0], token))
        except (OSError, TimeoutError, websockets.InvalidHandshake) as e:
            load.note("churn-ws", type(e).__name__, ok=())
            ws = None
        await asyncio.to_thread(load.server.cli, "token", "revoke", "-", stdin=token)
        load.note("token-revoke", 200)
        await load.req("revoked-get", "GET", entity, headers=auth, ok=(401,))
        if ws is not None:
            await revoked_socket_closes(load, ws)
        if n % 4 == 0:
            await load.req("org-create", "POST", "/v1/orgs",
                           json={"slug": f"churn{int(time.time())}", "name": "c"}, ok=(201,))


async def revoked_socket_closes(load: Load, ws: Any) -> None:
    try:
        async with asyncio.timeout(45):
            async for _ in ws:
                pass
    except TimeoutError:
        load.note("revoked-ws", "still-open", ok=())
        await ws.close()
        return
    except websockets.ConnectionClosed:
        pass
    load.note("revoked-ws", ws.close_code or "none", ok=(4401,))


async def guarded(load: Load, loop: Awaitable[None]) -> None:
    """Run one load loop; a bug in it is recorded (and fails the run), not fatal to the others."""
    try:
        await loop
    except Exception as e:  # noqa: BLE001
        load.unexpected.append(f"load loop failed: {type(e).__name__}: {e}"[:300])


def load_loops(load: Load) -> list[Awaitable[None]]:
    loops = [writer(load) for _ in range(WRITERS)] + [reader(load) for _ in range(READERS)]
    loops += [graph(load), search(load), attachments(load), http_docs(load), token_churn(load),
              hostile_http(load)]
    loops += [ws_client(load, i) for i in range(ws_clients(load.rate))]
    return [guarded(load, loop) for loop in loops]


def ws_clients(rate: float) -> int:
    return max(1, round(WS_CLIENTS * rate))


# --- sampling ------------------------------------------------------------------------------------


class Sampler:
    """Reads the server's process, database, /metrics and log, and times a few probe requests.

    It runs in a thread of its own with blocking clients, so that the load's event loop delays
    neither its probes nor its reads."""

    def __init__(self, server: Server, load: Load) -> None:
        self.server, self.load = server, load
        self.log_pos = 0
        self.http = httpx.Client(base_url=server.base, timeout=30,
                                 headers={"Authorization": f"Bearer {server.token}"})

    def sample(self, phase_name: str, minute: float) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": phase_name, "minute": round(float(minute), 1),
                               "at": datetime.now(UTC).strftime("%H:%M:%S")}
        for part in (self.process, self.database, self.metrics, self.probe):
            try:
                out |= part()
            except (OSError, httpx.HTTPError, psycopg.Error) as e:
                out.setdefault("sample_errors", []).append(f"{part.__name__}: {e!r}"[:200])
        out |= self.new_log_lines()
        return out

    def process(self) -> dict[str, Any]:
        assert self.server.proc is not None
        pid = self.server.proc.pid
        with open(f"/proc/{pid}/status") as fh:
            status = fh.read()
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read().rsplit(")", 1)[1].split()
        return {"rss_mb": int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024,  # type: ignore[union-attr]
                "threads": int(re.search(r"Threads:\s+(\d+)", status).group(1)),  # type: ignore[union-attr]
                "fds": len(os.listdir(f"/proc/{pid}/fd")),
                "cpu_s": round((int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"), 1)}

    def database(self) -> dict[str, Any]:
        return queue_state(self.server.db_url) | {"pg_conns": pg_connections(self.server.db_url)}

    def metrics(self) -> dict[str, Any]:
        text = self.http.get("/metrics").text
        wanted = {"canvasdb_gateway_connections": "ws_conns", "canvasdb_docs_loaded": "docs_loaded"}
        found = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                found[wanted[name]] = int(float(value))
        return found

    def probe(self) -> dict[str, Any]:
        org = f"/v1/orgs/{self.load.slug}"

        def median_ms(path: str, params: dict[str, Any], n: int) -> float:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                self.http.get(path, params=params).raise_for_status()
                times.append((time.perf_counter() - t0) * 1000)
            return round(statistics.median(times), 1)

        return {"get_ms": median_ms(f"{org}/entities/{self.load.ids[0]}", {}, 5),
                "search_text_ms": median_ms(f"{org}/search", {"q": "roadmap quarterly", "mode": "text"}, 3),
                "search_hybrid_ms": median_ms(f"{org}/search", {"q": "planning meeting"}, 3)}

    def new_log_lines(self) -> dict[str, Any]:
        with open(self.server.log_path, errors="replace") as fh:
            fh.seek(self.log_pos)
            text = fh.read()
            self.log_pos = fh.tell()
        lines = text.splitlines()
        return {"error_lines": [ln[:300] for ln in lines if ERROR_LINE.search(ln)],
                "warning_lines": [ln[:300] for ln in lines if WARNING_LINE.search(ln)]}


def pg_connections(url: str) -> int:
    """Connections to canvasdb's database other than this one (the server's pools, listener, worker)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid()").fetchone()
    return int(row[0]) if row else 0


def queue_state(url: str) -> dict[str, int]:
    """Entities waiting for the search indexer, and procrastinate jobs waiting, running or failed."""
    with psycopg.connect(url, autocommit=True) as conn:
        search_queue = conn.execute("SELECT count(*) FROM search_queue").fetchone()
        jobs = dict(conn.execute("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1"))
    return {"search_queue": int(search_queue[0]) if search_queue else 0,
            "jobs_pending": jobs.get("todo", 0) + jobs.get("doing", 0), "jobs_failed": jobs.get("failed", 0)}


async def wait_drained(url: str) -> float | None:
    """Seconds until the search queue is empty and no job waits or runs (None: not within the bound).

    The per-minute sweeps are jobs too: a moment between them with nothing pending is what counts."""
    started = time.monotonic()
    while time.monotonic() - started <= DRAIN_WITHIN_S:
        state = await asyncio.to_thread(queue_state, url)
        if state["search_queue"] == 0 and state["jobs_pending"] == 0:
            return round(time.monotonic() - started, 1)
        await asyncio.sleep(1)
    return None


# --- the run -------------------------------------------------------------------------------------


async def soak(server: Server, minutes: float, rate: float) -> dict[str, Any]:
    """Set up; warm up and settle for the baseline; load for ``minutes``, sampling each minute; settle."""
    headers = {"Authorization": f"Bearer {server.token}"}
    limits = httpx.Limits(max_connections=20, max_keepalive_connections=10)
    async with httpx.AsyncClient(base_url=server.base, headers=headers, timeout=60, limits=limits) as http:
        load = Load(http, server, rate, end=float("inf"))
        with phase("set up the org, its cards and boards"):
            await setup(load)
        sampler = Sampler(server, load)
        with phase(f"warm up ({WARMUP_S:.0f} s of the same load), then settle"):
            load.end = time.monotonic() + WARMUP_S
            await asyncio.gather(*load_loops(load))
            _, baseline = await settled(sampler, "baseline", since=None)
        start = time.monotonic()
        load.end = start + minutes * 60
        loops = asyncio.gather(*load_loops(load))
        samples = [baseline]
        with phase(f"mixed load for {minutes:g} min, sampled every minute", total=minutes) as advance:
            for minute in range(1, int(minutes) + 1):
                await asyncio.sleep(max(0.0, start + minute * 60 - time.monotonic()))
                samples.append(await asyncio.to_thread(sampler.sample, "load", minute))
                advance()
            await loops
        with phase("settle after the load"):
            drain_s, idle = await settled(sampler, "idle", since=start)
        samples.append(idle)
        sampler.http.close()
    return {"samples": samples, "drain_seconds": drain_s, "org": load.slug,
            "operations": sum(load.statuses.values()), "responses": dict(sorted(load.statuses.items())),
            "unexpected": load.unexpected}


async def settled(sampler: Sampler, phase_name: str,
                  since: float | None) -> tuple[float | None, dict[str, Any]]:
    """Once a load has ended: the seconds its queues took to drain, and a sample SETTLE_S after its end
    (its minute counted from ``since``, the main load's start; 0 for the baseline)."""
    ended = time.monotonic()
    drain_s = await wait_drained(sampler.server.db_url)
    await asyncio.sleep(max(0.0, ended + SETTLE_S - time.monotonic()))
    minute = 0.0 if since is None else (time.monotonic() - since) / 60
    return drain_s, await asyncio.to_thread(sampler.sample, phase_name, minute)


def rss_slope_mb_per_10_min(samples: list[dict[str, Any]]) -> float:
    """Least-squares slope of RSS over the second half of the load (caches should be warm by then)."""
    loaded = [s for s in samples if s["phase"] == "load" and "rss_mb" in s]
    half = [s for s in loaded if s["minute"] >= loaded[-1]["minute"] / 2] if loaded else []
    if len(half) < 2:
        return 0.0
    return statistics.linear_regression([s["minute"] for s in half], [s["rss_mb"] for s in half]).slope * 10


def checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    samples = report["samples"]
    base, idle = samples[0], samples[-1]
    out = [{"name": "RSS growth over the second half of the load", "value": report["rss_slope"],
            "unit": "MB per 10 min", "target": f"< {RSS_SLOPE_MB_PER_10_MIN:g}",
            "pass": report["rss_slope"] < RSS_SLOPE_MB_PER_10_MIN}]
    for key, label in (("fds", "open fds"), ("pg_conns", "PostgreSQL connections"), ("threads", "threads")):
        limit = base.get(key, 0) + IDLE_MARGIN[key]
        out.append({"name": f"{label} once idle, against the baseline", "value": idle.get(key, -1),
                    "unit": "", "target": f"<= {base.get(key)} + {IDLE_MARGIN[key]}",
                    "pass": 0 <= idle.get(key, -1) <= limit})
    drained = report["drain_seconds"]
    out.append({"name": "search queue and job queue drained after the load",
                "value": float("inf") if drained is None else drained, "unit": "s",
                "target": f"<= {DRAIN_WITHIN_S:g}", "pass": drained is not None})
    failed = idle.get("jobs_failed", -1)
    out.append({"name": "failed jobs", "value": failed, "unit": "", "target": "0", "pass": failed == 0})
    errors = sum(len(s.get("error_lines", [])) for s in samples) + len(report["shutdown"]["error_lines"])
    out.append({"name": "error / traceback lines in the server log", "value": errors, "unit": "lines",
                "target": "0", "pass": errors == 0})
    out.append({"name": "responses other than expected (and load loop failures)",
                "value": len(report["unexpected"]), "unit": "", "target": "0",
                "pass": not report["unexpected"]})
    stop = report["shutdown"]
    code = stop["exit_code"]
    out.append({"name": "clean stop on SIGTERM: exit code (PostgreSQL stopped, no traceback)",
                "value": -1 if code is None else code, "unit": "", "target": "0",
                "pass": code == 0 and stop["postgres_stopped"] and not stop["error_lines"]})
    sample_errors = sum(len(s.get("sample_errors", [])) for s in samples)
    out.append({"name": "samples taken without error", "value": sample_errors, "unit": "errors",
                "target": "0", "pass": sample_errors == 0})
    return out


def load_mix(rate: float) -> list[str]:
    scaled = {k: f"{v * rate:g}" for k, v in RATES.items()}
    return [line.format(**scaled, ws=ws_clients(rate), churn=CHURN_EVERY_S / rate) for line in LOAD_MIX]


def run(minutes: float, rate: float, workdir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    server = Server(workdir)
    try:
        with phase("start canvasdb up (embedded PostgreSQL, fresh home)"), interrupts_held():
            server.start()
        report: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
                                  "minutes": minutes, "rate": rate, "load_mix": load_mix(rate),
                                  "seed": {"entities": SEED_ENTITIES, "boards": BOARDS},
                                  "warmup_s": WARMUP_S, "settle_s": SETTLE_S,
                                  "machine": machine_facts(server.db_url)}
        report |= asyncio.run(soak(server, minutes, rate))
        with phase("stop canvasdb up with SIGTERM"):
            report["shutdown"] = server.stop()
    finally:
        server.ensure_stopped()
    report["rss_slope"] = round(rss_slope_mb_per_10_min(report["samples"]), 2)
    report["targets"] = checks(report)
    report["load_avg_at_end"] = os.getloadavg()
    report["total_seconds"] = time.perf_counter() - started
    report["notes"] = [
        f"RSS bound: at a steady load a server should plateau once its pools and caches are warm (the "
        f"first half); {RSS_SLOPE_MB_PER_10_MIN:g} MB per 10 min is what a leak of about 0.5 KB per request "
        "(about 1,000 a minute at rate 1) or 20 KB per WebSocket session (about 25 a minute) would show, "
        "5 GB in a week. Fitted over a few samples with 1-2 MB of jitter between them, the slope of a run "
        "shorter than 20 minutes is uncertain to about that bound: soak longer for a verdict.",
        "Server, load, sampler and PostgreSQL share the machine: probe latencies include the load's CPU.",
    ]
    return report


def print_report(report: dict[str, Any], console: Console) -> None:
    m = report["machine"]
    console.print(f"[bold]canvasdb soak[/] at {report['started']}, canvasdb {m['canvasdb_revision']}: "
                  f"{report['minutes']:g} min of mixed load at rate x{report['rate']:g} after "
                  f"{report['warmup_s']:.0f} s of warm-up, {report['operations']:,} operations in all; "
                  f"baseline and idle samples {report['settle_s']:.0f} s after each load ended. "
                  f"Data: a fresh org with {report['seed']['entities']} "
                  f"seed cards and {report['seed']['boards']} boards, growing with the load. Machine: "
                  f"{m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB; "
                  f"PostgreSQL {m['postgresql']}.",
                  highlight=False)
    for line in report["load_mix"]:
        console.print(f"  - {line}", highlight=False)
    table = Table(title="Samples (all of them in --json)", title_justify="left")
    columns = (("phase", "when"), ("minute", "min"), ("rss_mb", "RSS MB"), ("threads", "threads"),
               ("fds", "fds"), ("pg_conns", "PG conns"), ("search_queue", "search queue"),
               ("jobs_pending", "jobs"), ("ws_conns", "WS conns"), ("docs_loaded", "docs loaded"),
               ("get_ms", "get ms"), ("search_text_ms", "text ms"), ("search_hybrid_ms", "hybrid ms"),
               ("error_lines", "errors"))
    for _, title in columns:
        table.add_column(title, justify="left" if title == "when" else "right")
    for s in shown_samples(report["samples"]):
        table.add_row(*(cell(s.get(key)) for key, _ in columns))
    console.print(table)
    stop = report["shutdown"]
    console.print(f"Stop: exit code {stop['exit_code']} after {stop['seconds']} s; PostgreSQL "
                  f"{'stopped' if stop['postgres_stopped'] else 'STILL RUNNING'}.", highlight=False)
    print_targets(console, report)
    print_footer(console, report)
    for line in report["unexpected"][:10]:
        console.print(f"unexpected: {line}", highlight=False, style="red")
    for s in report["samples"]:
        for line in s.get("error_lines", [])[:5] + s.get("sample_errors", []):
            console.print(f"{s['at']} {line}", highlight=False, style="red")


def shown_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Baseline, first, middle and last sample of the load, and the idle one."""
    loaded = [s for s in samples if s["phase"] == "load"]
    picked = [loaded[0], loaded[len(loaded) // 2], loaded[-1]] if loaded else []
    unique = [s for i, s in enumerate(picked) if s not in picked[:i]]
    return [samples[0], *unique, samples[-1]]


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return str(len(value))
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: the same way out, through the server's stop."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="length of the load (default 10)")
    parser.add_argument("--rate", type=float, default=1.0, help="scale every load loop's rate (default 1)")
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout (table on stderr)")
    args = parser.parse_args()
    if args.minutes < 1 or args.rate <= 0:
        parser.error("--minutes must be at least 1 and --rate above 0")
    signal.signal(signal.SIGTERM, interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="canvasdb-bench-soak-"))
    try:
        report = run(args.minutes, args.rate, workdir)
    except KeyboardInterrupt:
        ERR.print("[yellow]interrupted[/]; server stopped")
        return 130
    except RuntimeError as exc:
        ERR.print(f"[red]{exc}[/]")
        return 1
    finally:
        shutil.rmtree(workdir / "home", ignore_errors=True)
    if args.json:
        print_report(report, ERR)
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report, Console(width=None if sys.stdout.isatty() else 160))
    kept = "" if all(t["pass"] for t in report["targets"]) else f" (server log kept in {workdir})"
    if not kept:
        shutil.rmtree(workdir, ignore_errors=True)
    ERR.print(f"done{kept}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
