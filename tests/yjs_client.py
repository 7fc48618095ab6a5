"""Drive the official JavaScript Yjs client (yjs + y-websocket, run by Node.js) from asyncio code.

Used by tests and benchmarks to check that a y-websocket server (canvasdb's gateway, or the reference
server as a peer) interoperates with the client real users run. Each ``JsClient`` is one Node process
running ``tests/js/client.mjs``: one ``Y.Doc`` plus one ``WebsocketProvider`` built as
``new WebsocketProvider(url, doc, ydoc, {params: {token}, WebSocketPolyfill: ws})``, so it connects to
``{url}/{doc}?token={token}``.

The npm packages are installed once per version of ``tests/js/package-lock.json`` by ``ensure_js()``.
``@y/websocket-server`` is pinned exactly to 0.1.1 in package.json: its 0.1.5 release depends on the
yjs 14 prereleases, which a caret range would pull in.

Example::

    server = await start_reference_server(port)  # node node_modules/@y/websocket-server/src/server.js
    try:
        async with await JsClient.start(f"ws://127.0.0.1:{port}/v1/orgs/o/docs", "d", "tok") as c:
            await c.wait_synced()
            await c.map_set("nodes", "n1", {"x": 1})
    finally:
        await stop_process(server)
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JS_SRC = Path(__file__).resolve().parent / "js"
LOCK_FILES = ("package.json", "package-lock.json")
CLIENT_FILE = "client.mjs"
REFERENCE_SERVER = Path("node_modules/@y/websocket-server/src/server.js")
NPM_TIMEOUT = 300.0
READ_LIMIT = 64 * 1024 * 1024  # a `state` reply carries the whole document as one line


class JsHarnessError(RuntimeError):
    """Node/npm missing, the install failed, or a Node process died or did not answer."""


class JsCommandError(JsHarnessError):
    """The JS client replied to a command with an error (bad arguments, a wait that timed out...)."""


def _default_cache() -> Path:
    env = os.environ.get("CANVASDB_JS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "canvasdb" / "js"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise JsHarnessError(
            f"`{tool}` not found on PATH: the Yjs interop harness needs Node.js >= 18 with npm "
            "(https://nodejs.org/)"
        )
    return path


def ensure_js(cache_dir: Path | None = None, *, package: Path = JS_SRC, files: Sequence[str] = (CLIENT_FILE,),
              build_native: bool = False) -> Path:
    """Install ``package``'s locked npm packages (once per lock file) and return the folder to run node in.

    The folder holds node_modules and copies of ``files`` (scripts of ``package``): ESM resolves
    imports relative to the importing file and ignores NODE_PATH, so scripts must live next to
    node_modules. Installs go to a temp dir renamed into place, so concurrent processes never see
    a half-installed tree. Install scripts run only with ``build_native`` (the benchmark's SQLite
    binding compiles from source, against this Node's own headers so nothing is fetched from
    nodejs.org); the tests' only one is the optional leveldown build they never use.
    """
    node = _require("node")
    npm = _require("npm")
    base = cache_dir if cache_dir is not None else _default_cache()
    digest = hashlib.sha256(b"".join((package / name).read_bytes() for name in LOCK_FILES)).hexdigest()
    target = base / f"deps-{digest[:16]}"
    if not (target / "node_modules").is_dir():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=base))
        tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unusable for other users
        env = dict(os.environ)
        argv = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        if build_native:
            prefix = Path(node).resolve().parent.parent
            if (prefix / "include" / "node" / "node.h").is_file():
                env["npm_config_nodedir"] = str(prefix)
        else:
            argv.append("--ignore-scripts")
        try:
            for name in LOCK_FILES:
                shutil.copy2(package / name, tmp / name)
            done = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=NPM_TIMEOUT)
            if done.returncode != 0:
                raise JsHarnessError(
                    f"`npm ci` in {tmp} failed with exit code {done.returncode}:\n{done.stdout}{done.stderr}"
                )
            try:
                tmp.rename(target)
            except OSError:
                if not (target / "node_modules").is_dir():
                    raise
                # another process finished the same install first; use theirs
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for name in files:
        _sync_file(package / name, target / name)
    return target


def _sync_file(src: Path, dst: Path) -> None:
    """Copy src over dst if they differ; atomic, so a racing reader sees the old or the new file."""
    data = src.read_bytes()
    if dst.is_file() and dst.read_bytes() == data:
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}-", dir=dst.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 5.0) -> int:
    """Terminate a child (SIGTERM, then SIGKILL after ``timeout``) and reap it; returns its exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return await proc.wait()


async def start_reference_server(
    port: int, *, host: str = "127.0.0.1", cache_dir: Path | None = None, timeout: float = 10.0
) -> asyncio.subprocess.Process:
    """Run the reference y-websocket server (@y/websocket-server) on host:port, in memory only.

    It is started as ``HOST=host PORT=port node node_modules/@y/websocket-server/src/server.js``
    and serves any path: the room is the URL path without its leading "/" and query string, and the
    token is ignored. Returns once the port accepts connections; stop it with ``stop_process()``.
    Its stderr (errors only) is inherited, so pytest shows it with a failing test.
    """
    js = await asyncio.to_thread(ensure_js, cache_dir)
    env = {**os.environ, "HOST": host, "PORT": str(port)}
    env.pop("YPERSISTENCE", None)
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(REFERENCE_SERVER),
        cwd=js,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if proc.returncode is not None:
            raise JsHarnessError(f"reference server exited with code {proc.returncode} before listening")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                await stop_process(proc)
                raise JsHarnessError(
                    f"reference server not listening on {host}:{port} after {timeout}s"
                ) from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return proc


@dataclass(frozen=True)
class DocState:
    """A client's view of its document (reply to ``state``), for the names the caller asked for."""

    client_id: int
    maps: dict[str, dict[str, Any]]
    arrays: dict[str, list[Any]]
    texts: dict[str, str]
    synced: bool
    update: bytes  # Y.encodeStateAsUpdate(doc)
    state_vector: bytes  # Y.encodeStateVector(doc)


Event = dict[str, Any]


class JsClient:
    """One official Yjs client in its own Node process; commands are JSON lines on its stdin.

    ``events`` collects everything the client reports unasked, in order: ``ready``, ``status``
    (connecting/connected/disconnected), ``synced``, ``close`` (code, reason; ``local`` when the
    provider closed the socket itself, code/reason then null), ``closed`` (the provider gave up
    reconnecting, by default after a 4400-4499 close) and ``error``.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[Event] = []
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=50)
        self.client_id: int | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []
        self._dead: JsHarnessError | None = None
        self._stderr_reader = asyncio.create_task(self._read_stderr())
        self._stdout_reader = asyncio.create_task(self._read_stdout())

    @classmethod
    async def start(
        cls,
        url: str,
        doc: str,
        token: str | None = None,
        *,
        connect: bool = True,
        cache_dir: Path | None = None,
        timeout: float = 10.0,
    ) -> JsClient:
        """Spawn a client for room ``{url}/{doc}`` and wait until its process is up (not until it syncs)."""
        js = await asyncio.to_thread(ensure_js, cache_dir)
        argv = ["node", CLIENT_FILE, "--url", url, "--doc", doc]
        if token is not None:
            argv += ["--token", token]
        if not connect:
            argv.append("--no-connect")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=js,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=READ_LIMIT,
        )
        client = cls(proc)
        try:
            ready = await client.wait_event(lambda e: e["event"] == "ready", timeout)
        except BaseException:
            await client.close()
            raise
        client.client_id = ready["client_id"]
        return client

    async def __aenter__(self) -> JsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing -------------------------------------------------------------------------------

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                self._dispatch(line)
        except Exception as e:  # e.g. a line over READ_LIMIT: nothing after it can be trusted
            self._fail_all(JsHarnessError(f"reading the JS client's output failed: {e!r}"))
            raise
        code = await self.proc.wait()
        await self._stderr_reader
        tail = "\n".join(self.stderr_tail)
        self._fail_all(JsHarnessError(f"JS client exited with code {code}; stderr tail:\n{tail}"))

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_tail.append(line.decode(errors="replace").rstrip())

    def _dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            self.stderr_tail.append(f"[stdout] {line.decode(errors='replace').rstrip()}")
            return
        if "event" in msg:
            self._on_event(msg)
        elif (fut := self._pending.pop(msg.get("id"), None)) is not None and not fut.done():
            if "error" in msg:
                fut.set_exception(JsCommandError(msg["error"]))
            else:
                fut.set_result(msg["result"])

    def _on_event(self, event: Event) -> None:
        self.events.append(event)
        for waiter in list(self._waiters):
            pred, fut = waiter
            if not fut.done() and pred(event):
                fut.set_result(event)
                self._waiters.remove(waiter)

    def _fail_all(self, err: JsHarnessError) -> None:
        self._dead = err
        for fut in [*self._pending.values(), *(f for _, f in self._waiters)]:
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self._waiters.clear()

    async def request(self, op: str, *, timeout: float = 10.0, **args: Any) -> Any:
        """Send one command and return its ``result``; raises JsCommandError on an error reply."""
        if self._dead is not None:
            raise self._dead
        assert self.proc.stdin is not None
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            self.proc.stdin.write(json.dumps({"id": req_id, "op": op, **args}).encode() + b"\n")
            await self.proc.stdin.drain()
            return await asyncio.wait_for(fut, timeout)
        except ConnectionError as e:
            raise self._dead or JsHarnessError(f"JS client stdin closed: {e}") from e
        except TimeoutError:
            raise JsHarnessError(f"JS client did not answer {op!r} within {timeout}s") from None
        finally:
            self._pending.pop(req_id, None)

    async def wait_event(
        self, pred: Callable[[Event], bool], timeout: float = 10.0, *, since: int = 0
    ) -> Event:
        """Return the first event from ``events[since:]`` matching ``pred``, waiting for one if needed.

        Pass ``since=len(c.events)`` before triggering something to ignore older matches.
        """
        for event in self.events[since:]:
            if pred(event):
                return event
        if self._dead is not None:
            raise self._dead
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        waiter = (pred, fut)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise JsHarnessError(
                f"no matching event within {timeout}s; events so far: {self.events}"
            ) from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def close(self, timeout: float = 5.0) -> None:
        """Ask the client to leave cleanly (awareness removal, socket close); kill it if it lingers."""
        if self.proc.returncode is None and self._dead is None:
            with contextlib.suppress(JsHarnessError):
                await self.request("close", timeout=timeout)
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await stop_process(self.proc, timeout)
        await asyncio.gather(self._stdout_reader, self._stderr_reader, return_exceptions=True)

    # -- commands -------------------------------------------------------------------------------

    async def map_set(self, map: str, key: str, value: Any) -> None:
        await self.request("map_set", map=map, key=key, value=value)

    async def map_set_map(self, map: str, key: str, fields: dict[str, Any]) -> None:
        """Set ``key`` to a nested Y.Map (not a plain JSON object) holding ``fields``."""
        await self.request("map_set_map", map=map, key=key, fields=fields)

    async def map_delete(self, map: str, key: str) -> None:
        await self.request("map_delete", map=map, key=key)

    async def array_push(self, array: str, values: Sequence[Any]) -> None:
        await self.request("array_push", array=array, values=list(values))

    async def text_insert(self, text: str, index: int, value: str) -> None:
        await self.request("text_insert", text=text, index=index, value=value)

    async def burst(self, n: int, map: str, timeout: float = 30.0) -> float:
        """Set keys ``b0``..``b{n-1}`` in ``n`` transactions; returns ms until all were handed to the provider."""
        result = await self.request("burst", n=n, map=map, timeout=timeout)
        return float(result["elapsed_ms"])

    async def awareness(self, state: Any) -> None:
        await self.request("awareness", state=state)

    async def peers(self) -> dict[int, Any]:
        """Awareness states of the other clients, by client id."""
        return {int(k): v for k, v in (await self.request("peers")).items()}

    async def state(
        self, maps: Sequence[str] = (), arrays: Sequence[str] = (), texts: Sequence[str] = ()
    ) -> DocState:
        r = await self.request("state", maps=list(maps), arrays=list(arrays), texts=list(texts))
        return DocState(
            client_id=r["client_id"],
            maps=r["maps"],
            arrays=r["arrays"],
            texts=r["texts"],
            synced=r["synced"],
            update=base64.b64decode(r["update"]),
            state_vector=base64.b64decode(r["state_vector"]),
        )

    async def wait_synced(self, timeout: float = 10.0) -> None:
        await self.request("wait_synced", timeout_ms=int(timeout * 1000), timeout=timeout + 5)

    async def wait_for(self, map: str, key: str, timeout: float = 10.0) -> None:
        """Wait until ``key`` exists in ``map`` (locally, i.e. it was written here or arrived)."""
        await self.request("wait_for", map=map, key=key, timeout_ms=int(timeout * 1000), timeout=timeout + 5)

    async def connect(self) -> None:
        await self.request("connect")

    async def disconnect(self) -> None:
        await self.request("disconnect")
