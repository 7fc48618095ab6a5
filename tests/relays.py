"""TCP relays for the tests that fail connections as a network or an outage does: in front of
gateways (``Balancer``) or of the test database (``PgProxy``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Self

from psycopg.conninfo import conninfo_to_dict, make_conninfo


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
               silent: Callable[[], bool] = lambda: False) -> None:
    """Copy ``src`` to ``dst`` until either end closes; while ``silent()``, drop what comes, and
    leave ``dst`` open at the end (a dropped flow delivers no FIN either)."""
    try:
        while data := await src.read(65536):
            if not silent():
                dst.write(data)
                await dst.drain()
    except OSError:
        pass
    finally:
        if not silent():
            dst.close()


class _Relay:
    """Accepts on 127.0.0.1 and pipes each connection both ways to what ``_upstream`` opens."""

    def __init__(self) -> None:
        self.port = 0
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    def _start(self, *tasks: asyncio.Task[None]) -> None:
        for task in tasks:
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class Balancer(_Relay):
    """A TCP load balancer in front of gateways: each new connection goes to the first backend
    that accepts it, so when one gateway dies its clients reconnect to the next."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__()
        self.ports = ports

    def url(self, org: str) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/orgs/{org}/docs"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self.ports:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            writer.close()
            return
        self._start(asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer)))


class PgProxy(_Relay):
    """A TCP proxy to the test database. ``silence()``: the listening connections open now
    (application_name ``canvasdb-listen ...``) stop forwarding anything, both ways, and stay
    open, as when a NAT or firewall drops a flow (no RST, no FIN); new connections forward as
    before. ``cut()``: every connection closes and new ones are closed at once (the database
    away), until ``restore()``."""

    def __init__(self, pg_url: str) -> None:
        super().__init__()
        self._params = {k: v for k, v in conninfo_to_dict(pg_url).items() if k not in ("host", "hostaddr", "port")}
        self._target = conninfo_to_dict(pg_url)
        self._relays: list[dict] = []  # per connection: {"listener", "silent", "writers"}
        self._refusing = False
        self.url = ""

    async def __aenter__(self) -> PgProxy:
        await super().__aenter__()
        self.url = make_conninfo("", **self._params, host="127.0.0.1", port=str(self.port),
                                 sslmode="disable", gssencmode="disable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        await super().__aexit__(*exc)

    def silence(self) -> int:
        """Silence the listening connections open now; how many."""
        quiet = [r for r in self._relays if r["listener"] and not r["silent"]]
        for relay in quiet:
            relay["silent"] = True
        return len(quiet)

    @property
    def listeners(self) -> int:
        """Listening connections made through the proxy so far."""
        return sum(r["listener"] for r in self._relays)

    def cut(self) -> None:
        self._refusing = True
        for relay in self._relays:
            for writer in relay["writers"]:
                writer.close()

    def restore(self) -> None:
        self._refusing = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.close()
            return
        host, port = self._target.get("host") or "localhost", self._target.get("port") or "5432"
        if host.startswith("/"):
            up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        else:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        relay = {"listener": False, "silent": False, "writers": [writer, up_writer]}
        self._relays.append(relay)
        try:  # the startup packet names the application
            size = await reader.readexactly(4)
            startup = await reader.readexactly(int.from_bytes(size, "big") - 4)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            up_writer.close()
            return
        relay["listener"] = b"canvasdb-listen" in startup
        up_writer.write(size + startup)

        def silent() -> bool:
            return bool(relay["silent"])

        self._start(asyncio.create_task(pipe(reader, up_writer, silent)),
                    asyncio.create_task(pipe(up_reader, writer, silent)))
