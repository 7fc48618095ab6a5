"""Durability by attack: a writer killed with SIGKILL mid-write loses nothing it was told was written."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

from conftest import Tenant

from canvasdb.entities import history
from canvasdb.services import Services

WRITER = Path(__file__).with_name("crash_writer.py")


async def test_sigkill_mid_write_keeps_every_acknowledged_write(
    pg_url: str, svc: Services, tenant: Tenant
) -> None:
    acked: dict[UUID, int] = {}
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), pg_url, str(tenant.org_id), str(tenant.project_id)],
            stdout=subprocess.PIPE, text=True,
        )
        time.sleep(random.uniform(1.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        lines = [line.split() for line in out.splitlines() if line.count(" ") == 1]
        assert len(lines) > 20, "the writer did not get going"
        for eid, version in lines:
            acked[UUID(eid)] = max(acked.get(UUID(eid), 0), int(version))

    who = tenant.owner
    for eid, version in acked.items():
        current = await svc.entities.get(who, eid)
        assert current.version >= version, "an acknowledged version was lost"
        rows = (await svc.entities.history(who, eid, limit=1000)).items
        assert [v.version for v in rows] == list(range(current.version, 0, -1)), "no gaps, no half-writes"
        async with svc.db.transaction(tenant.org_id) as conn:
            cur = await conn.execute(
                "SELECT version, op, at, actor, deleted, patch, keyframe FROM entity_versions"
                " WHERE org_id = %s AND entity_id = %s ORDER BY version", (tenant.org_id, eid))
            full = await cur.fetchall()
        assert history.rebuild(full) == current.data, "replaying every patch gives the current data"
