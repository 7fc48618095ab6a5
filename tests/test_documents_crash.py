"""Durability by attack: an appender killed with SIGKILL loses no acknowledged update."""

from __future__ import annotations

import base64
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import Tenant
from pycrdt import Doc, Map

from canvasdb.documents import DocumentStore
from canvasdb.services import Services

WRITER = Path(__file__).with_name("crash_doc_writer.py")


async def test_sigkill_mid_append_keeps_every_acknowledged_update(
    pg_url: str, svc: Services, tenant: Tenant
) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "crash")
    acked: dict[int, bytes] = {}
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(WRITER), pg_url, str(tenant.org_id), "crash"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(random.uniform(1.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        for line in out.splitlines():
            seq, _, payload = line.partition(" ")
            if payload:
                acked[int(seq)] = base64.b64decode(payload)
    assert len(acked) > 100, "the writer did not get going"

    async with svc.db.transaction(tenant.org_id) as conn:
        cur = await conn.execute("SELECT seq, payload FROM doc_updates WHERE org_id = %s"
                                 " AND doc_id = 'crash' ORDER BY seq", (tenant.org_id,))
        stored = {r["seq"]: bytes(r["payload"]) for r in await cur.fetchall()}
    assert sorted(stored) == list(range(1, len(stored) + 1)), "sequence numbers are dense"
    for seq, payload in acked.items():
        assert stored.get(seq) == payload, f"acknowledged update {seq} lost or changed"
    replayed = Doc()
    for seq in sorted(stored):
        replayed.apply_update(stored[seq])
    loaded = Doc()
    loaded.apply_update(await DocumentStore(svc.db).state(tenant.owner, "crash"))
    assert loaded.get("nodes", type=Map).to_py() == replayed.get("nodes", type=Map).to_py()
