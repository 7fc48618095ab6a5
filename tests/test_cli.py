"""The ``canvasdb`` command, run as a user runs it: a subprocess with the server's settings."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import typer
import websockets.exceptions
import websockets.sync.client
from psycopg.conninfo import make_conninfo

from canvasdb.cli import app
from canvasdb.db import EmbeddedPostgres

CLI = [sys.executable, "-m", "canvasdb"]


def run(env: dict[str, str], *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, input=input, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def env(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("cli-home")
    return {**os.environ, "CANVASDB_DATABASE_URL": pg_url, "CANVASDB_HOME": str(home)}


def test_every_command_has_help() -> None:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")

    def walk(cmd: Any, path: str) -> list[str]:
        missing = [] if (cmd.help or "").strip() else [path]
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                missing += walk(sub, f"{path} {name}")
        return missing

    assert walk(group, "canvasdb") == []
    names = {" ".join(p) for p in [("db", "start"), ("db", "stop"), ("db", "status"), ("db", "url"),
                                   ("db", "migrate"), ("org", "create"), ("org", "list"), ("user", "create"),
                                   ("token", "create"), ("token", "revoke"), ("entity", "get"),
                                   ("entity", "put"), ("entity", "history"), ("type", "register"),
                                   ("type", "list"), ("blobs", "sweep"), ("embedder", "list"),
                                   ("embedder", "use"), ("up",)]}
    for name in names:
        cmd: Any = group
        for part in name.split():
            cmd = cmd.commands[part]
        assert cmd.help


def _help_pages() -> dict[str, str]:
    """Every group's and command's ``--help``, rendered wide enough that nothing wraps."""
    from typer.testing import CliRunner

    pages: dict[str, str] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        pages[" ".join(["canvasdb", *path])] = shown.output
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return pages


def test_help_breaks_no_sentence_in_two() -> None:
    """A command's summary is one line in its group's list, and each paragraph of its page
    one line on a wide terminal: rich keeps the line breaks of a docstring wrapped in the
    source, which cut `canvasdb --help`'s rows in two mid-sentence."""
    for page, shown in _help_pages().items():
        lines = shown.splitlines()
        if "─ Commands ─" in shown:
            start = next(i for i, line in enumerate(lines) if "─ Commands ─" in line) + 1
            rows = [line.removeprefix("│ ") for line in lines[start:] if line.startswith("│")]
            continued = [row.strip() for row in rows if row.startswith(" ")]
            assert not continued, (page, continued)
        start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
        end = next(i for i, line in enumerate(lines) if line.startswith("╭"))
        about = [line.strip() for line in lines[start:end]]
        broken = [(a, b) for a, b in zip(about, about[1:], strict=False) if a and b]
        assert not broken, (page, broken)


def test_version_as_a_command_and_as_an_option() -> None:
    """``canvasdb --version``, what most commands answer, was "No such option" (exit 2)."""
    from typer.testing import CliRunner

    from canvasdb import __version__

    for args in (["version"], ["--version"]):
        said = CliRunner().invoke(app, args)
        assert (said.exit_code, said.output) == (0, f"{__version__}\n"), (args, said.output)


def test_org_token_entity_round_trip(env: dict[str, str]) -> None:
    slug = f"cli-{os.getpid()}-{time.time_ns() % 10**6}"
    run(env, "org", "create", slug, "--name", "CLI org")
    listed = json.loads(run(env, "org", "list", "--json").stdout)
    assert slug in [o["slug"] for o in listed]
    token = run(env, "token", "create", "--org", slug, "--user", f"ops@{slug}.io", "--role", "admin").stdout
    assert token.startswith("cdb_") and token.count("\n") == 1, "only the token, for scripts"
    run(env, "token", "create", "--org", slug, "--user", f"dev@{slug}.io")  # a new user: a member
    run(env, "user", "create", f"pm@{slug}.io", "--org", slug, "--role", "admin")
    for refused in (["token", "create", "--org", slug, "--user", f"typo@{slug}.io", "--role", "bogus"],
                    ["user", "create", f"typo@{slug}.io", "--org", slug, "--role", "bogus"],
                    ["user", "create", f"typo@{slug}.io", "--org", "no-such-org"]):
        bad = run(env, *refused, check=False)
        assert bad.returncode == 1 and bad.stderr.startswith("Error:"), bad.stderr
    with psycopg.connect(env["CANVASDB_DATABASE_URL"]) as conn:
        roles = dict(conn.execute("SELECT u.email, m.role FROM users u JOIN org_members m ON m.user_id = u.id"
                                  " JOIN orgs o ON o.id = m.org_id WHERE o.slug = %s", (slug,)).fetchall())
        typo = conn.execute("SELECT count(*) FROM users WHERE email = %s", (f"typo@{slug}.io",)).fetchone()
    assert roles == {f"ops@{slug}.io": "admin", f"dev@{slug}.io": "member", f"pm@{slug}.io": "admin"}
    assert typo == (0,), "a refused command writes nothing"
    run(env, "project", "create", "--org", slug, "main")
    created = json.loads(run(env, "entity", "put", "--org", slug, "--project", "main", "--type", "note",
                             '{"title": "hello"}').stdout)
    eid = created["id"]
    run(env, "entity", "put", "--org", slug, "--id", eid, "-", input='{"title": "hello again"}')
    got = json.loads(run(env, "entity", "get", "--org", slug, eid).stdout)
    assert got["data"] == {"title": "hello again"} and got["version"] == 2
    old = json.loads(run(env, "entity", "get", "--org", slug, eid, "--as-of", "1").stdout)
    assert old["data"] == {"title": "hello"}
    hist = json.loads(run(env, "entity", "history", "--org", slug, eid, "--json").stdout)
    assert [v["version"] for v in hist] == [2, 1]
    assert "update" in run(env, "entity", "history", "--org", slug, eid).stdout
    first = run(env, "entity", "history", "--org", slug, eid, "--limit", "1")
    assert "older versions: --before 2" in first.stderr, first.stderr
    first = run(env, "entity", "history", "--org", slug, eid, "--limit", "1", "--json")  # stdout: JSON alone
    assert [v["version"] for v in json.loads(first.stdout)] == [2]
    assert "older versions: --before 2" in first.stderr, "a script learns there is a next page"
    older = json.loads(run(env, "entity", "history", "--org", slug, eid, "--before", "2", "--json").stdout)
    assert [v["version"] for v in older] == [1]

    # The token works against the API, then stops working once revoked.
    from canvasdb.services import Services  # noqa: F401  (import check: CLI and API share settings)

    assert run(env, "token", "revoke", "-", input=token).stdout.strip() == "revoked"  # not in argv
    again = run(env, "token", "revoke", token.strip(), check=False)
    assert again.returncode == 1 and "Error:" in again.stderr

    # --json names the token's id, which revokes it too (the token itself need not be kept)
    made = json.loads(run(env, "token", "create", "--org", slug, "--user", f"dev@{slug}.io", "--json").stdout)
    assert made["token"].startswith("cdb_") and made["user"] == f"dev@{slug}.io"
    assert (made["org"], made["role"]) == (slug, "member")
    with psycopg.connect(env["CANVASDB_DATABASE_URL"]) as conn:
        owner = conn.execute("SELECT user_id::text FROM api_tokens WHERE id = %s", (made["id"],)).fetchone()
    assert owner == (made["user_id"],)
    assert run(env, "token", "revoke", made["id"]).stdout.strip() == "revoked"


def test_entity_put_if_version_never_creates(env: dict[str, str]) -> None:
    """``--if-version`` says "replace only if at this version": an id that names no entity is
    refused, not created at version 1 (as PUT with If-Match answers 404), and so is no id at all
    (an entity was created, the option ignored)."""
    slug = f"cli-ifv-{os.getpid()}-{time.time_ns() % 10**6}"
    run(env, "org", "create", slug)
    run(env, "project", "create", "--org", slug, "main")
    new_id = "6f1c2a4e-0000-4000-8000-000000000001"
    refused = run(env, "entity", "put", "--org", slug, "--project", "main", "--type", "note", "--id", new_id,
                  "--if-version", "3", '{"title": "x"}', check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("Error:") and "not found" in refused.stderr
    missing = run(env, "entity", "get", "--org", slug, new_id, check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr, "nothing was created"
    no_id = run(env, "entity", "put", "--org", slug, "--project", "main", "--type", "note",
                "--if-version", "1", '{"title": "x"}', check=False)  # a replace of nothing named
    assert no_id.returncode == 1 and no_id.stderr.startswith("Error:") and "--id" in no_id.stderr, no_id.stderr
    made = json.loads(run(env, "entity", "put", "--org", slug, "--project", "main", "--type", "note",
                          "--id", new_id, '{"title": "x"}').stdout)  # without it, the id is created
    assert made["id"] == new_id and made["version"] == 1


def test_entity_put_does_not_pretend_to_change_type_or_project(env: dict[str, str]) -> None:
    """A replacement writes data only: a ``--type`` or ``--project`` other than the entity's is
    refused, not dropped without a word; the same ones are accepted."""
    slug = f"cli-place-{os.getpid()}-{time.time_ns() % 10**6}"
    run(env, "org", "create", slug)
    run(env, "project", "create", "--org", slug, "main")
    run(env, "project", "create", "--org", slug, "other")
    made = json.loads(run(env, "entity", "put", "--org", slug, "--project", "main", "--type", "note",
                          '{"title": "x"}').stdout)
    for option, value, said in (("--type", "task", "--type"), ("--project", "other", "--project")):
        refused = run(env, "entity", "put", "--org", slug, "--id", made["id"], option, value, '{"title": "y"}',
                      check=False)
        assert refused.returncode == 1 and refused.stderr.startswith("Error:") and said in refused.stderr
    assert json.loads(run(env, "entity", "get", "--org", slug, made["id"]).stdout)["version"] == 1
    same = json.loads(run(env, "entity", "put", "--org", slug, "--id", made["id"], "--project", "main",
                          "--type", "note", '{"title": "y"}').stdout)
    assert (same["version"], same["data"]) == (2, {"title": "y"})


def test_errors_are_one_clear_line(env: dict[str, str]) -> None:
    bad = run(env, "entity", "get", "--org", "no-such-org", "not-a-uuid", check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("Error:") and "Traceback" not in bad.stderr
    bad = run(env, "entity", "put", "--org", "no-such-org", "{not json", check=False)
    assert bad.returncode == 1 and "not valid JSON" in bad.stderr
    bad = run(env, "org", "create", "Not A Slug", check=False)
    assert bad.returncode == 1 and "slug" in bad.stderr and "Traceback" not in bad.stderr
    long_name = "x" * 150  # piped, a long message stays one line (rich wrapped it at 80 columns)
    bad = run(env, "entity", "get", "--org", long_name, "00000000-0000-0000-0000-000000000000", check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and long_name in bad.stderr, bad.stderr


def test_bytes_that_are_not_utf8_are_one_clear_line(env: dict[str, str]) -> None:
    """A byte that is not UTF-8, in an argument or on stdin, reaches Python as a lone surrogate,
    which the database driver cannot encode: an error line, not a traceback, from every command."""
    bad = "\udcff"  # what Python makes of b"\xff" in argv (os.fsdecode)
    nil = "00000000-0000-0000-0000-000000000000"
    for args in (["entity", "get", "--org", bad, nil], ["org", "create", "ok-name", "--name", bad],
                 ["user", "create", f"a{bad}@b.io"], ["token", "revoke", bad],
                 ["token", "create", "--org", bad, "--user", "a@b.io"], ["search", "--org", bad, "x"],
                 ["search", "--org", bad, "x", "--project", bad]):
        said = run(env, *args, check=False)
        assert said.returncode == 1 and said.stderr.startswith("Error:"), (args, said.stderr)
        assert "Traceback" not in said.stderr and said.stderr.count("\n") == 1, (args, said.stderr)
    # stdin as under a UTF-8 locale outside Python's UTF-8 mode (en_US.UTF-8, say), where
    # reading such a byte fails, and as under the C locale, where it becomes a lone surrogate
    for io_encoding in ("utf-8:strict", "utf-8:surrogateescape"):
        for args in (["token", "revoke", "-"], ["type", "register", "--org", "no-such-org", "-"],
                     ["entity", "put", "--org", "no-such-org", "--id", nil, "-"]):
            piped = subprocess.run([*CLI, *args], env={**env, "PYTHONIOENCODING": io_encoding},
                                   capture_output=True, input=b"\xff\n", timeout=120)
            assert piped.returncode == 1 and piped.stderr.startswith(b"Error:"), (args, io_encoding, piped.stderr)
            assert b"Traceback" not in piped.stderr, (args, io_encoding, piped.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("canvasdb up did not become ready")


def test_up_with_embedded_database(tmp_path: Path) -> None:
    """`canvasdb up` on an empty home: embedded PostgreSQL, demo org, token; clean stop on SIGTERM."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    port = _free_port()
    env |= {"CANVASDB_HOME": str(tmp_path / "home"), "CANVASDB_PORT": str(port)}
    tokens = []
    for _ in range(2):
        proc = subprocess.Popen([*CLI, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_ready(proc, port)
            token = (tmp_path / "home" / "admin-token").read_text().strip()
            r = httpx.post(f"http://127.0.0.1:{port}/v1/orgs/demo/projects/demo/entities",
                           headers={"Authorization": f"Bearer {token}"},
                           json={"type": "note", "data": {"hello": "world"}})
            assert r.status_code == 201, r.text
            # the y-websocket client's way: the token in the query string, which servers log
            with contextlib.suppress(websockets.exceptions.WebSocketException), \
                    websockets.sync.client.connect(
                        f"ws://127.0.0.1:{port}/v1/orgs/demo/docs/none?token={token}") as ws:
                ws.recv(timeout=10)
            httpx.get(f"http://127.0.0.1:{port}/healthz?token={token}&x=1")
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert "embedded PostgreSQL stopped" in output
        announced, logs = output.split("\n", 3)[1], output.split("\n", 3)[3]
        assert token in announced and "token=[hidden]&x=1" in logs and "docs/none?token=[hidden]" in logs
        assert token not in logs, "an API token was written to the log"
        tokens.append(token)
        status = run(env, "db", "status", check=False)
        assert status.returncode == 3 and "running: false" in status.stdout
    assert tokens[0] == tokens[1], "the second run prints the saved token again"
    assert oct((tmp_path / "home" / "admin-token").stat().st_mode & 0o777) == "0o600"


def test_up_finishes_a_first_run_that_was_killed(tmp_path: Path) -> None:
    """`canvasdb up` killed in its first run after making the demo org (before its project and
    token): the next run finishes the job. It found the org, took the run as done, and left
    an org with no project and no token to reach it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    port = _free_port()
    env |= {"CANVASDB_HOME": str(tmp_path / "home"), "CANVASDB_PORT": str(port)}
    try:
        run(env, "org", "create", "demo", "--name", "Demo")  # what the killed run had committed
        run(env, "user", "create", "admin@demo.local", "--org", "demo", "--role", "owner")
        proc = subprocess.Popen([*CLI, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            _wait_ready(proc, port)
            token = (tmp_path / "home" / "admin-token").read_text().strip()
            r = httpx.post(f"http://127.0.0.1:{port}/v1/orgs/demo/projects/demo/entities",
                           headers={"Authorization": f"Bearer {token}"}, json={"type": "note", "data": {}})
            assert r.status_code == 201, r.text
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=60)
    finally:  # the CLI started the database and `up` found it running: it stays until stopped
        run(env, "db", "stop", check=False)
    assert token in output.split("\n", 3)[1], "the new token is announced"
    assert not list((tmp_path / "home").glob("*.tmp")), "the token file is written whole, nothing left beside"


def _kill_the_server_and_wait_until(works_again: Callable[[], bool], pg: EmbeddedPostgres,
                                    proc: subprocess.Popen) -> None:
    """Kill the embedded server (its postmaster), wait until ``proc`` has started another, then
    until ``works_again``."""
    killed = pg.status().pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while not (pg.status().running and pg.status().pid != killed):
        assert time.monotonic() < deadline, "the embedded PostgreSQL was not started again"
        assert proc.poll() is None
        time.sleep(0.5)
    while not works_again():
        assert time.monotonic() < deadline, "requests did not work again"
        time.sleep(0.5)


def test_up_starts_its_embedded_database_again_when_it_exits(tmp_path: Path) -> None:
    """A full disk makes PostgreSQL PANIC and exit (here: the postmaster killed): `canvasdb up`
    says so in its log, with the end of PostgreSQL's, and starts it again; requests work again
    (it answered 503 until someone ran `canvasdb db start`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    port = _free_port()
    env |= {"CANVASDB_HOME": str(tmp_path / "home"), "CANVASDB_PORT": str(port)}
    pg = EmbeddedPostgres(tmp_path / "home" / "pgdata")
    proc = subprocess.Popen([*CLI, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(proc, port)
        token = (tmp_path / "home" / "admin-token").read_text().strip()

        def create() -> int:
            return httpx.post(f"http://127.0.0.1:{port}/v1/orgs/demo/projects/demo/entities",
                              headers={"Authorization": f"Bearer {token}"},
                              json={"type": "note", "data": {}}, timeout=30).status_code

        assert create() == 201
        _kill_the_server_and_wait_until(lambda: create() == 201, pg, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    [exited] = [line for line in output.splitlines() if "has exited" in line]
    assert exited.startswith("the embedded PostgreSQL has exited; starting it again. The end of its log ")
    assert "the embedded PostgreSQL runs again" in output and "Traceback" not in output
    assert "embedded PostgreSQL stopped" in output and not pg.status().running


def test_gateway_starts_its_embedded_database_again_when_it_exits(tmp_path: Path) -> None:
    """As `up` does: a gateway alone on the embedded server answered 503 for good once the
    server had exited (a full disk; here the postmaster killed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    port = _free_port()
    env |= {"CANVASDB_HOME": str(tmp_path / "home"), "CANVASDB_PORT": str(port)}
    pg = EmbeddedPostgres(tmp_path / "home" / "pgdata")
    proc = subprocess.Popen([*CLI, "gateway"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_ready(proc, port)
        _kill_the_server_and_wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code == 200, pg, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "the embedded PostgreSQL runs again" in output and "Traceback" not in output
    assert "embedded PostgreSQL stopped" in output and not pg.status().running


def test_up_and_gateway_on_a_busy_port_fail_in_one_line(tmp_path: Path) -> None:
    """A port in use (or an address not of this machine) is a one-line error before anything
    starts: no "serving" announced, no traceback, no embedded PostgreSQL left running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    env["CANVASDB_HOME"] = str(tmp_path / "home")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        for args in (["up", "--port", port], ["gateway", "--port", port]):
            done = run(env, *args, check=False)
            assert done.returncode == 1, done.stderr
            assert done.stderr.splitlines() == [
                f"Error: cannot listen on 127.0.0.1:{port}: address already in use",
                "Try: choose another port with --port or CANVASDB_PORT"]
            assert "serving" not in done.stdout
    done = run(env, "up", "--host", "no-such-host.invalid", check=False)
    assert done.returncode == 1 and "--host or CANVASDB_HOST" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home" / "pgdata").exists(), "nothing was started for a server that cannot listen"


def test_bad_settings_are_named_in_one_line(tmp_path: Path) -> None:
    """Each bad CANVASDB_* value is named with what it should be; nothing starts (a log level
    uvicorn does not know, or a pool smaller than its minimum, failed only once serving); so is
    a CANVASDB_HOME that cannot hold the embedded database (it was a traceback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    env["CANVASDB_HOME"] = str(tmp_path / "home")
    cases = {
        ("CANVASDB_PORT", "abc"): "CANVASDB_PORT='abc': input should be a valid integer",
        ("CANVASDB_LOG_LEVEL", "loud"): "CANVASDB_LOG_LEVEL='loud': input should be 'critical', 'error', "
                                        "'warning', 'info', 'debug' or 'trace'",
        ("CANVASDB_POOL_MIN_SIZE", "30"): "CANVASDB_POOL_MIN_SIZE (30) is more than CANVASDB_POOL_MAX_SIZE (20)",
    }
    for (name, value), expected in cases.items():
        done = run({**env, name: value}, "up", check=False)
        assert done.returncode == 1, done.stderr
        first, hint = done.stderr.splitlines()
        assert first.startswith("Error: invalid setting ") and expected in first, first
        assert hint.startswith("Try: ") and "Traceback" not in done.stderr
    assert not (tmp_path / "home" / "pgdata").exists()
    both = run({**env, "CANVASDB_PORT": "0", "CANVASDB_LOG_LEVEL": "x"}, "db", "status", check=False)
    assert "CANVASDB_PORT='0'" in both.stderr and "CANVASDB_LOG_LEVEL='x'" in both.stderr
    upper = run({**env, "CANVASDB_LOG_LEVEL": "WARNING"}, "db", "status", check=False)
    assert upper.returncode == 3, upper.stderr  # any case is a level; the server is not running
    for command in ("up", "gateway"):  # settings that only fail together: before anything starts
        for name, value, expected in (("CANVASDB_BLOB_BACKEND", "s3", "CANVASDB_S3_BUCKET is not set"),
                                      ("CANVASDB_EMBEDDER", "openai", "needs the API's base url")):
            done = run({**env, name: value}, command, "--port", str(_free_port()), check=False)
            assert done.returncode == 1 and expected in done.stderr.splitlines()[0], done.stderr
            assert "serving" not in done.stdout and "Traceback" not in done.stderr
    assert not (tmp_path / "home" / "pgdata").exists()
    (tmp_path / "a-file").write_text("not a folder")
    for args in (["up", "--port", str(_free_port())], ["db", "start"]):  # (a port in use is said first)
        done = run({**env, "CANVASDB_HOME": str(tmp_path / "a-file")}, *args, check=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.splitlines() == [
            f"Error: cannot keep the embedded database in {tmp_path / 'a-file'}: it is not a folder",
            "Try: set CANVASDB_HOME to a folder this user can write"]


def test_blobs_sweep_removes_old_orphans(env: dict[str, str], tmp_path: Path) -> None:
    """Content no row points at, written longer ago than the grace period, goes; the rest stays."""
    env = {**env, "CANVASDB_BLOBS_DIR": str(tmp_path / "blobs")}
    paths = {}
    for content in (b"an old orphan", b"a young orphan"):
        key = hashlib.sha256(content).hexdigest()
        paths[content] = tmp_path / "blobs" / key[:2] / key
        paths[content].parent.mkdir(parents=True, exist_ok=True)
        paths[content].write_bytes(content)
    os.utime(paths[b"an old orphan"], (time.time() - 25 * 3600,) * 2)
    done = run(env, "blobs", "sweep")
    assert done.stdout == "blobs listed: 2, past the grace period: 1, orphans removed: 1 (13 bytes)\n"
    assert done.stderr == "", "no progress bar when not on a terminal"
    assert not paths[b"an old orphan"].exists() and paths[b"a young orphan"].exists()
    assert json.loads(run({**env, "CANVASDB_BLOB_ORPHAN_GRACE_S": "0"}, "blobs", "sweep", "--json").stdout) == {
        "listed": 1, "old": 1, "removed": 1, "removed_bytes": 14}
    assert not paths[b"a young orphan"].exists()
    refused = run(env, "blobs", "sweep", "--grace", "-1", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr


def test_db_start_status_url_stop(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    env["CANVASDB_HOME"] = str(tmp_path / "home")
    try:
        assert "running:" in run(env, "db", "start").stdout
        status = json.loads(run(env, "db", "status", "--json").stdout)
        assert status["running"] is True and status["pid"] > 0
        url = run(env, "db", "url").stdout.strip()
        assert url == status["url"] and url.startswith("postgresql://")
        assert run(env, "db", "migrate").stdout.strip() == "up to date"
    finally:
        assert run(env, "db", "stop").stdout.strip() == "stopped"
    assert run(env, "db", "stop").stdout.strip() == "not running"


def test_db_status_of_a_database_named_by_url(env: dict[str, str], pg_url: str) -> None:
    """It connects to say whether the database runs, and never prints the URL's password."""
    with_password = make_conninfo(pg_url, password="not-to-be-shown")  # (the server trusts local users)
    up = run({**env, "CANVASDB_DATABASE_URL": with_password}, "db", "status", "--json")
    status = json.loads(up.stdout)
    assert status["running"] is True and status["embedded"] is False
    assert "not-to-be-shown" not in up.stdout and "password=***" in status["url"]
    away = make_conninfo(pg_url, port=str(_free_port()))
    down = run({**env, "CANVASDB_DATABASE_URL": away}, "db", "status", check=False)
    assert down.returncode == 3 and "running: false" in down.stdout and "embedded: false" in down.stdout \
        and "error: " in down.stdout, down.stdout
    assert "Traceback" not in down.stderr
    for unreadable in ("postgresql://me:not-to-be-shown@127.0.0.1/db?no_such_option=1",  # libpq refuses both
                       "host=127.0.0.1 password=not-to-be-shown no_such_option=1"):
        said = run({**env, "CANVASDB_DATABASE_URL": unreadable}, "db", "status", check=False)
        assert said.returncode == 1 and "not-to-be-shown" not in said.stdout + said.stderr, said.stdout
        assert said.stderr.startswith("Error: invalid setting CANVASDB_DATABASE_URL (value not shown)")


async def test_search_command(env: dict[str, str], svc: Any, tenant: Any) -> None:
    from canvasdb.entities import EntityType

    await svc.types.register(tenant.owner, EntityType(name="note", text_fields={"title": "A"}))
    note = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"title": "[bold] quarterly plan"})
    await svc.indexer.drain(tenant.org_id)  # the words, for typo corrections
    found = json.loads(run(env, "search", "--org", tenant.slug, "quartrly", "--mode", "text", "--json").stdout)
    assert [h["id"] for h in found["hits"]] == [str(note.id)]
    assert found["corrections"] == {"quartrly": ["quarterly"]}
    table = run({**env, "COLUMNS": "200"}, "search", "--org", tenant.slug, "plan", "--mode", "text",
                "--facets", "type").stdout
    assert "[bold] quarterly plan" in table and "1 shown of 1 matches" in table and "note (1)" in table
    nothing = run(env, "search", "--org", tenant.slug, "zzyzx", "--mode", "text", "--facets", "type").stdout
    assert "0 shown of 0 matches" in nothing and "type: none" in nothing, nothing
    bad = run(env, "search", "--org", tenant.slug, "x", "--where", "status=done", check=False)
    assert bad.returncode == 1 and "data.FIELD=VALUE" in bad.stderr
    long = run(env, "search", "--org", tenant.slug, "plan " * 2001, check=False)  # as over HTTP
    assert long.returncode == 1 and "at most 10,000 characters" in long.stderr, long.stderr


def test_embedder_use_switches_back_to_a_retired_model(env: dict[str, str], pg_url: str) -> None:
    """A retired model comes back only on the operator's word: ``embedder use`` makes it building (its
    processes build it, then it takes over) and stops any other build; an unknown name is one line."""
    name = f"cli_models_{os.getpid()}_{time.time_ns() % 10**6}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    own = {**env, "CANVASDB_DATABASE_URL": make_conninfo(pg_url, dbname=name)}
    try:
        run(own, "db", "migrate")
        with psycopg.connect(own["CANVASDB_DATABASE_URL"], autocommit=True) as conn:
            conn.execute("INSERT INTO search_models (model, kind, url, dimension, state) VALUES"
                         " ('new-model', 'ollama', 'http://127.0.0.1:1', 8, 'active'),"
                         " ('old-model', 'local', NULL, 384, 'retired'),"
                         " ('mistaken-model', 'ollama', 'http://127.0.0.1:1', 4, 'building')")
        said = run(own, "embedder", "use", "old-model").stdout
        assert "embedding model old-model is building" in said, said
        assert "the build of embedding model mistaken-model stopped" in said, said
        listed = json.loads(run(own, "embedder", "list", "--json").stdout)
        assert [(m["model"], m["state"]) for m in listed] == [
            ("new-model", "active"), ("old-model", "building"), ("mistaken-model", "retired")]
        assert "old-model" in run({**own, "COLUMNS": "200"}, "embedder", "list").stdout
        assert "is active" in run(own, "embedder", "use", "new-model").stdout
        unknown = run(own, "embedder", "use", "no-such-model", check=False)
        assert unknown.returncode == 1 and unknown.stderr.startswith(
            "Error: no embedding model no-such-model is registered"), unknown.stderr
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_search_from_the_cli_alone(env: dict[str, str]) -> None:
    """The README's walk: an org, a type that declares what search reads, a card, a search; no
    HTTP call and no token needed."""
    slug = f"cli-search-{os.getpid()}-{time.time_ns() % 10**6}"
    run(env, "org", "create", slug)
    run(env, "project", "create", "--org", slug, "roadmap")
    declared = json.loads(run(env, "type", "register", "--org", slug,
                              '{"name": "kanban.card", "text_fields": {"title": "A"}}').stdout)
    assert declared["name"] == "kanban.card" and declared["text_fields"] == {"title": "A"}
    card = json.loads(run(env, "entity", "put", "--org", slug, "--project", "roadmap", "--type", "kanban.card",
                          '{"title": "Ship the board"}').stdout)
    found = json.loads(run(env, "search", "--org", slug, "ship -draft", "--mode", "text", "--json").stdout)
    assert [h["id"] for h in found["hits"]] == [card["id"]]
    listed = json.loads(run(env, "type", "list", "--org", slug, "--json").stdout)
    assert [t["name"] for t in listed] == ["kanban.card"]
    assert "kanban.card" in run({**env, "COLUMNS": "200"}, "type", "list", "--org", slug).stdout
    for spec, says in (('{"name": "x", "colour": 1}', "colour"), ("{not json", "not valid"),
                       ('{"name": "x", "text_fields": {"title": "Z"}}', "weight")):
        bad = run(env, "type", "register", "--org", slug, spec, check=False)
        assert bad.returncode == 1 and bad.stderr.startswith("Error:") and says in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    assert [t["name"] for t in json.loads(run(env, "type", "list", "--org", slug, "--json").stdout)] == [
        "kanban.card"], "a refused declaration writes nothing"


def test_settings_that_fail_only_in_use_are_refused_at_start(tmp_path: Path) -> None:
    """A connection string libpq cannot read was a traceback at the first connection (and its
    message quotes the string, password and all); infinite or overflowing periods failed in
    the daily sweep or retention job, a statement timeout over PostgreSQL's range in every
    connection the pool tried (the server never answered)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    env["CANVASDB_HOME"] = str(tmp_path / "home")
    unreadable = "postgresql://me:not-to-be-shown@[::1:5432/db"
    for args in (["db", "migrate"], ["org", "list"], ["up", "--port", str(_free_port())]):
        done = run({**env, "CANVASDB_DATABASE_URL": unreadable}, *args, check=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        first, hint = done.stderr.splitlines()
        assert first.startswith("Error: invalid setting CANVASDB_DATABASE_URL (value not shown): not a "
                                "connection string PostgreSQL reads"), first
        assert "not-to-be-shown" not in done.stderr and hint.startswith("Try: ")
    cases = {("CANVASDB_BLOB_ORPHAN_GRACE_S", "inf"): "input should be a finite number",
             ("CANVASDB_UPDATE_RETENTION_HOURS", "1e300"): "input should be less than or equal to 876000",
             ("CANVASDB_STATEMENT_TIMEOUT_MS", str(2**31)): "input should be less than or equal to 2147483647"}
    for (name, value), expected in cases.items():
        done = run({**env, name: value}, "db", "status", check=False)
        assert done.returncode == 1 and f"{name}='{value}': {expected}" in done.stderr, done.stderr
    refused = run(env, "blobs", "sweep", "--grace", "inf", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert not (tmp_path / "home").exists(), "nothing was made"


def test_an_empty_variable_is_unset_and_an_unknown_one_is_named(tmp_path: Path) -> None:
    """CANVASDB_BLOBS_DIR= kept blobs in the current folder, CANVASDB_PORT= was an error while
    unset was not; a misspelt name was ignored without a word."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    env |= {"CANVASDB_HOME": str(tmp_path / "home"), "CANVASDB_BLOBS_DIR": "", "CANVASDB_PORT": ""}
    done = subprocess.run([*CLI, "db", "status"], env={**env, "CANVASDB_PROT": "9000", "CANVASDB_NOISE": "1"},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 3, done.stderr  # not running: the settings were fine
    assert done.stderr.splitlines() == [
        "Warning: CANVASDB_NOISE is not a canvasdb setting; it is ignored",
        "Warning: CANVASDB_PROT is not a canvasdb setting (did you mean CANVASDB_PORT?); it is ignored"]
    from canvasdb.settings import Settings

    with pytest.MonkeyPatch.context() as patch:
        for name in ("CANVASDB_HOME", "CANVASDB_BLOBS_DIR"):
            patch.setenv(name, env[name])
        assert Settings().blobs_path == tmp_path / "home" / "blobs"


def test_a_port_out_of_range_is_refused_not_replaced(tmp_path: Path) -> None:
    """`--port 0` served on CANVASDB_PORT (8080) without a word."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    env |= {"CANVASDB_HOME": str(tmp_path / "home")}
    for port in ("65536", "0"):  # (too large was a traceback)
        for command in ("up", "gateway"):
            done = run(env, command, "--port", port, check=False)
            assert done.returncode == 2 and "--port" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home").exists()


def test_a_privileged_port_says_so() -> None:
    """A port below 1024 for a user who may not bind it was told to "choose an address of this
    machine". Run as nobody when the tests run as root (root may bind any port)."""
    from canvasdb.cli import _listen
    from canvasdb.errors import Unavailable

    "127.0.0.1".encode("idna")  # (the codec getaddrinfo needs, loaded while its files can be read)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        os.close(read)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            _listen("127.0.0.1", 1).close()
            said = "listening"
        except Unavailable as exc:
            said = f"{exc.detail}\n{exc.fields['hint']}"
        os.write(write, said.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = pipe.read()
    os.waitpid(child, 0)
    assert said.splitlines() == ["cannot listen on 127.0.0.1:1: permission denied",
                                 "ports below 1024 need root (or CAP_NET_BIND_SERVICE): choose another "
                                 "with --port or CANVASDB_PORT"]


def test_two_starts_at_once_on_a_new_home(tmp_path: Path) -> None:
    """Two `db start` (or `up`) at once on a new home both ran initdb: the second failed to put
    its copy in place ("directory not empty") and left it behind, as a start killed during
    initdb left its own; both are gone now, and both starts use the one server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    env["CANVASDB_HOME"] = str(tmp_path / "home")
    (tmp_path / "home" / ".pgdata-killed" / "base").mkdir(parents=True)  # an initdb cut short
    starts = [subprocess.Popen([*CLI, "db", "start"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    try:
        said = [start.communicate(timeout=120) for start in starts]
        assert [start.returncode for start in starts] == [0, 0], said
        assert said[0][0] == said[1][0] and said[0][0].startswith("running: "), said
        assert not list((tmp_path / "home").glob(".pgdata-*")), "nothing left beside the data folder"
    finally:
        run(env, "db", "stop", check=False)


@pytest.mark.parametrize("command", ["up", "gateway", "worker"])
def test_stopped_during_start_up_leaves_nothing_running(tmp_path: Path, command: str) -> None:
    """SIGTERM once the command has started the embedded server, before it serves (migrations,
    bootstrap): Python's default ended it at once, and the server ran on with no one to stop
    it. The next start works."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    env |= {"CANVASDB_HOME": str(tmp_path / "home"), "CANVASDB_PORT": str(_free_port())}
    pg = EmbeddedPostgres(tmp_path / "home" / "pgdata")
    proc = subprocess.Popen([*CLI, command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        while not (tmp_path / "home" / "pgdata" / "postmaster.pid").exists():
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert "Traceback" not in output, output
        assert not pg.status().running, f"the server `{command}` started is stopped with it"
        assert "running: " in run(env, "db", "start").stdout
    finally:
        run(env, "db", "stop", check=False)


@pytest.mark.parametrize("command", ["gateway", "worker"])
def test_gateway_and_worker_stop_the_embedded_server_they_started(tmp_path: Path, command: str) -> None:
    """`gateway` and `worker` start the embedded server on a home where none runs, and never
    stopped it: after a SIGTERM it ran on. As `up`, each stops the one it started and leaves
    one it found running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANVASDB_")}
    port = _free_port()
    env |= {"CANVASDB_HOME": str(tmp_path / "home"), "CANVASDB_PORT": str(port)}
    pg = EmbeddedPostgres(tmp_path / "home" / "pgdata")
    try:
        for found_running in (False, True):
            if found_running:
                run(env, "db", "start")
            proc = subprocess.Popen([*CLI, command], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            try:
                if command == "gateway":
                    _wait_ready(proc, port)
                else:
                    assert proc.stdout is not None
                    assert any(line.startswith("canvasdb worker running") for line in proc.stdout)
            finally:
                proc.send_signal(signal.SIGTERM)
                output, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0 and "Traceback" not in output, output
            assert pg.status().running is found_running, output
            assert ("embedded PostgreSQL stopped" in output) is not found_running, output
    finally:
        run(env, "db", "stop", check=False)
