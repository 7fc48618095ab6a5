"""What the benchmark scripts share: progress and timing, machine facts, and the run around them.

Each script (entities.py, docs.py) keeps its own measurements, targets, notes and report; this
module holds the plumbing that must behave the same in all of them, so that a fix to interrupt
handling or cleanup (say) lands once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from canvasdb.db import EmbeddedPostgres
from canvasdb.services import Services
from canvasdb.tenancy import Principal

ERR = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


@contextmanager
def phase(title: str, total: float | None = None) -> Iterator[Callable[..., None]]:
    """A transient progress bar; yields ``advance(n=1, completed=None)``. Logs the phase's time."""
    start = time.perf_counter()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=ERR, transient=True, refresh_per_second=4,
                  disable=not ERR.is_terminal) as progress:
        task = progress.add_task(title, total=total)

        def advance(n: float = 1, completed: float | None = None) -> None:
            if completed is None:
                progress.advance(task, n)
            else:
                progress.update(task, completed=completed)

        yield advance
    ERR.print(f"[green]done[/] {title} [dim]({time.perf_counter() - start:.1f} s)[/]", highlight=False)


def summary(latencies: list[float], elapsed: float | None = None, cpu: float | None = None) -> dict[str, Any]:
    """Count, p50/p99/mean/max in ms (nearest rank), the rate when ``elapsed`` is given, and this
    process's CPU time per operation (ms) when ``cpu`` (seconds, all threads) is given."""
    s = sorted(latencies)

    def rank(q: float) -> float:
        return s[max(0, math.ceil(q * len(s)) - 1)] * 1000

    out = {"n": len(s), "p50_ms": rank(0.50), "p99_ms": rank(0.99),
           "mean_ms": sum(s) / len(s) * 1000, "max_ms": s[-1] * 1000}
    if elapsed is not None:
        out |= {"seconds": elapsed, "per_s": len(s) / elapsed}
    if cpu is not None:
        out["client_cpu_ms_per_op"] = cpu / len(s) * 1000
    return out


async def run_writers(title: str, seconds: float, writers: int,
                      work: Callable[[int], Awaitable[Any]]) -> tuple[float, float]:
    """Run ``work(w)`` for each writer under a progress bar of ``seconds``; (wall, CPU) seconds.

    The writers stop themselves at their deadline; the bar just follows the clock meanwhile."""
    with phase(title, seconds) as advance:
        start, cpu = time.perf_counter(), time.process_time()
        jobs = asyncio.gather(*(work(w) for w in range(writers)))
        jobs.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" on Ctrl-C
        while not jobs.done():
            await asyncio.wait([jobs], timeout=0.25)
            advance(completed=min(seconds, time.perf_counter() - start))
        await jobs
        return time.perf_counter() - start, time.process_time() - cpu


def stats(ms: list[float], answers: list[int]) -> dict[str, Any]:
    """Median, p95 and max of latencies in ms, and of the answers' sizes."""
    s = sorted(ms)
    return {"n": len(s), "median_ms": statistics.median(s), "p95_ms": s[max(0, round(0.95 * len(s)) - 1)],
            "max_ms": s[-1], "answers_median": statistics.median(answers) if answers else 0,
            "answers_max": max(answers) if answers else 0}


async def timed(cases: list[Any], fn: Callable[[Any], Awaitable[int]], title: str) -> dict[str, Any]:
    """Time ``fn`` over ``cases`` after warming caches and plans on the first tenth."""
    for case in cases[: max(3, len(cases) // 10)]:  # warm the cache and the plans
        await fn(case)
    ms, answers = [], []
    with phase(title, len(cases)) as advance:
        for case in cases:
            t0 = time.perf_counter()
            answers.append(await fn(case))
            ms.append((time.perf_counter() - t0) * 1000)
            advance()
    return stats(ms, answers)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server a benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source_revision() -> str:
    """The canvasdb commit measured (src/ is what runs), with +dirty if src/ has local changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "src"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine_facts(url: str, more_settings: tuple[str, ...] = (),
                  versions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """CPU, RAM, load, software versions and key PostgreSQL settings, so a result can be judged later.

    ``more_settings`` are further ``SHOW`` names; ``versions`` further libraries (listed after psycopg)."""
    cpu_model = ""
    with suppress(OSError, StopIteration), open("/proc/cpuinfo") as fh:
        cpu_model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    with psycopg.connect(url) as conn:
        settings = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in  # type: ignore[index]
                    ("server_version", "shared_buffers", "synchronous_commit", "fsync", "wal_level",
                     *more_settings)}
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model,
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_avg_at_start": os.getloadavg(), "platform": platform.platform(),
            "python": platform.python_version(), "psycopg": psycopg.__version__, **(versions or {}),
            "postgresql": settings.pop("server_version"), "pg_settings": settings,
            "canvasdb_revision": source_revision()}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def interrupts_held(*, then_raise: bool = True) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then act on them (or drop them): a server
    interrupted half-way through its start could otherwise keep running after its folder is gone."""
    got: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if got and then_raise:
            raise KeyboardInterrupt


def cleanup(server: EmbeddedPostgres | None, workdir: Path) -> None:
    """Stop our server and remove the temporary folder (kept, and named, if the server won't stop)."""
    with interrupts_held(then_raise=False):
        if server is not None:
            try:
                server.stop()
            except Exception as exc:
                ERR.print(f"[red]could not stop the embedded PostgreSQL[/] ({exc}); kept {workdir}")
                return
        shutil.rmtree(workdir, ignore_errors=True)


def run(doc: str, scales: Mapping[str, Any], benchmark: Callable[[str, Any, Path, float], dict[str, Any]],
        print_report: Callable[[dict[str, Any], Console], None], *, prepare: Callable[[str], object],
        prefix: str) -> int:
    """A benchmark script's command line: --scale/--json/--database-url, a temporary folder (named
    ``prefix``...) with an embedded PostgreSQL unless a URL is given, ``prepare(url)`` for the schema,
    then ``benchmark`` and its report; the folder and server go on every way out, Ctrl-C and SIGTERM
    included (exit status 130)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--scale", choices=list(scales), default="default")
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout (table on stderr)")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of a temporary embedded one")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    server: EmbeddedPostgres | None = None
    try:
        url = args.database_url
        if url is None:
            server = EmbeddedPostgres(workdir / "pgdata")
            with phase("start embedded PostgreSQL"), interrupts_held():
                url = server.start()
        with phase("migrate"):
            prepare(url)
        report = benchmark(url, scales[args.scale], workdir, started)
    except KeyboardInterrupt:
        ERR.print("[yellow]interrupted[/]; cleaning up")
        return 130
    finally:
        cleanup(server, workdir)
    if args.json:
        print_report(report, ERR)
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report, Console(width=None if sys.stdout.isatty() else 160))
    return 0


def print_targets(console: Console, report: dict[str, Any]) -> None:
    """One PASS/FAIL line per target, for reports whose table has no target column."""
    for t in report["targets"]:
        mark = "[green]PASS[/]" if t["pass"] else "[red]FAIL[/]"
        value = f"{t['value']:,.2f}" if isinstance(t["value"], float) else f"{t['value']:,}"
        console.print(f"{mark} {t['name']}: {value} {t['unit']} (target {t['target']})", highlight=False)


def print_footer(console: Console, report: dict[str, Any]) -> None:
    """The last lines of a report: how many targets pass, the run time, the notes."""
    passed = sum(t["pass"] for t in report["targets"])
    console.print(f"Targets: {passed}/{len(report['targets'])} pass. Total run time "
                  f"{report['total_seconds']:.0f} s (load avg at end "
                  f"{', '.join(f'{x:.2f}' for x in report['load_avg_at_end'])}).", highlight=False)
    for note in report["notes"]:
        console.print(f"Note: {note}", highlight=False, style="dim")


@dataclass(frozen=True)
class Tenant:
    """An org with its owner and one project, made fresh for a run."""

    org_id: UUID
    slug: str
    owner: UUID
    project_id: UUID

    @property
    def who(self) -> Principal:
        return Principal(org_id=self.org_id, user_id=self.owner, org_role="owner")


async def make_tenant(svc: Services, slug: str) -> Tenant:
    owner = await svc.tenancy.ensure_user(f"owner@{slug}.bench.example", "Bench owner")
    org = await svc.tenancy.create_org(slug, owner=owner)
    project = await svc.tenancy.create_project(
        Principal(org_id=org.id, user_id=owner, org_role="owner"), "main")
    return Tenant(org.id, slug, owner, project["id"])
