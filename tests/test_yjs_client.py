"""The JS Yjs client harness itself, checked against the reference y-websocket server (not canvasdb).

If these fail, interop failures against canvasdb's gateway mean nothing, so they pin down that the
harness really syncs, converges and reports what the official client does.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import pycrdt
import pytest
from yjs_client import JsClient, JsCommandError, start_reference_server, stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
async def server_url() -> AsyncIterator[str]:
    port = free_port()
    proc = await start_reference_server(port)
    yield f"ws://127.0.0.1:{port}/v1/orgs/acme/docs"
    await stop_process(proc)


def room() -> str:
    return f"doc-{uuid.uuid4().hex[:12]}"


async def eventually(check, timeout: float = 10.0):
    """Poll an async check until it returns a truthy value; sync over the network is asynchronous."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.05)


async def test_two_clients_converge_on_maps_arrays_and_text(server_url: str) -> None:
    doc = room()
    async with (
        await JsClient.start(server_url, doc, "tok-a") as a,
        await JsClient.start(server_url, doc, "tok-b") as b,
    ):
        await a.wait_synced()
        await b.wait_synced()
        await a.map_set("nodes", "n1", {"x": 1, "tags": ["a", "b"]})
        await a.map_set_map("nodes", "n2", {"x": 2, "label": "two"})
        await b.map_set("edges", "e1", {"from": "n1", "to": "n2"})
        await a.map_set("nodes", "gone", 0)
        await a.map_delete("nodes", "gone")
        await a.array_push("items", [1, "two", {"three": 3}])
        await b.array_push("items", [4])
        await a.text_insert("t", 0, "hello")
        await b.text_insert("t", 0, ">> ")

        names = {"maps": ["nodes", "edges"], "arrays": ["items"], "texts": ["t"]}

        async def same():
            sa, sb = await a.state(**names), await b.state(**names)
            complete = len(sa.arrays["items"]) == 4
            return complete and (sa.maps, sa.arrays, sa.texts) == (sb.maps, sb.arrays, sb.texts)

        assert await eventually(same)
        s = await b.state(**names)
        assert s.synced
        assert s.maps["nodes"] == {"n1": {"x": 1, "tags": ["a", "b"]}, "n2": {"x": 2, "label": "two"}}
        assert s.maps["edges"] == {"e1": {"from": "n1", "to": "n2"}}
        # a's and b's writes are concurrent, so their relative order is Yjs's (client id based) choice.
        assert s.arrays["items"] in ([1, "two", {"three": 3}, 4], [4, 1, "two", {"three": 3}])
        assert s.texts["t"] in (">> hello", "hello>> ")

        # The nested Y.Map really is a shared type, as a Python Yjs implementation decodes it.
        py = pycrdt.Doc()
        py.apply_update(s.update)
        n2 = py.get("nodes", type=pycrdt.Map)["n2"]
        assert isinstance(n2, pycrdt.Map)
        assert n2.to_py() == {"x": 2, "label": "two"}


async def test_late_joiner_gets_full_state(server_url: str) -> None:
    doc = room()
    async with await JsClient.start(server_url, doc, "tok") as a:
        await a.wait_synced()
        for i in range(20):
            await a.map_set("nodes", f"n{i}", {"i": i})
        await a.text_insert("t", 0, "written before c joined")
        async with await JsClient.start(server_url, doc, "tok") as c:
            await c.wait_synced()
            sa = await a.state(maps=["nodes"], texts=["t"])
            sc = await c.state(maps=["nodes"], texts=["t"])
    assert sc.maps == sa.maps and len(sc.maps["nodes"]) == 20
    assert sc.texts == {"t": "written before c joined"}
    assert sc.state_vector == sa.state_vector


async def test_awareness_is_seen_by_the_other_client_and_cleared_on_close(server_url: str) -> None:
    doc = room()
    async with await JsClient.start(server_url, doc, "tok-b") as b:
        a = await JsClient.start(server_url, doc, "tok-a")
        async with a:
            await a.wait_synced()
            await a.awareness({"user": "alice", "cursor": [1, 2]})

            async def a_seen():
                return (await b.peers()).get(a.client_id) == {"user": "alice", "cursor": [1, 2]}

            assert await eventually(a_seen)
            assert b.client_id not in await b.peers()

        async def a_gone():
            return a.client_id not in await b.peers()

        assert await eventually(a_gone)


async def test_burst_of_300_reaches_the_other_client(server_url: str) -> None:
    doc = room()
    async with (
        await JsClient.start(server_url, doc, "tok") as a,
        await JsClient.start(server_url, doc, "tok") as b,
    ):
        await a.wait_synced()
        await b.wait_synced()
        await a.burst(300, "burst")
        await b.wait_for("burst", "b299")
        s = await b.state(maps=["burst"])
    assert s.maps["burst"] == {f"b{i}": i for i in range(300)}


async def test_disconnect_connect_and_close_events(server_url: str) -> None:
    doc = room()
    async with (
        await JsClient.start(server_url, doc, "tok", connect=False) as a,
        await JsClient.start(server_url, doc, "tok") as b,
    ):
        await a.map_set("m", "offline", 1)
        await a.connect()
        await a.wait_synced()
        await b.wait_for("m", "offline")

        mark = len(a.events)
        await a.disconnect()
        close = await a.wait_event(lambda e: e["event"] == "close", since=mark)
        assert close == {"event": "close", "code": None, "reason": None, "local": True}
        await a.wait_event(lambda e: e == {"event": "status", "status": "disconnected"}, since=mark)

        await a.map_set("m", "while-away", 2)
        await a.connect()
        await b.wait_for("m", "while-away")


async def test_server_side_close_is_reported_with_its_code() -> None:
    port = free_port()
    proc = await start_reference_server(port)
    try:
        async with await JsClient.start(f"ws://127.0.0.1:{port}/v1/orgs/o/docs", room(), "tok") as a:
            await a.wait_synced()
            await stop_process(proc)
            close = await a.wait_event(lambda e: e["event"] == "close")
            assert close["local"] is False and close["code"] in (1005, 1006)
    finally:
        await stop_process(proc)


async def test_bad_command_is_an_error_reply_not_a_crash(server_url: str) -> None:
    async with await JsClient.start(server_url, room(), "tok", connect=False) as a:
        with pytest.raises(JsCommandError, match="unknown op"):
            await a.request("no_such_op")
        with pytest.raises(JsCommandError, match="timed out"):
            await a.wait_for("m", "never", timeout=0.1)
        await a.map_set("m", "k", 1)
        assert (await a.state(maps=["m"])).maps == {"m": {"k": 1}}
