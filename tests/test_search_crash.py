"""The indexer killed with SIGKILL in the middle of a batch: what it stored stays, the rest stays
queued, and the next drain indexes every entity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Tenant
from test_search import NOTE

from canvasdb.search.indexer import EMBED_BATCH
from canvasdb.services import Services

INDEXER = Path(__file__).with_name("crash_indexer.py")


async def test_sigkill_mid_batch_leaves_nothing_unindexed(pg_url: str, svc: Services, tenant: Tenant) -> None:
    await svc.types.register(tenant.owner, NOTE)
    for i in range(EMBED_BATCH + 10):
        await svc.entities.create(tenant.owner, tenant.project_id, "note", {"title": f"note {i}", "body": ""})
    proc = subprocess.Popen([sys.executable, str(INDEXER), pg_url, str(tenant.org_id)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "stalled\n"
        assert await svc.indexer.backlog(tenant.org_id) == {"terms": 0, "embeddings": 10}, "one batch stored"
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    await svc.indexer.drain(tenant.org_id)
    assert await svc.indexer.backlog(tenant.org_id) == {"terms": 0, "embeddings": 0}
    async with svc.db.transaction(tenant.org_id) as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM search_docs s JOIN search_vectors v ON v.org_id = s.org_id"
            " AND v.entity_id = s.entity_id AND v.embed_md5 = s.embed_md5 WHERE s.org_id = %s", (tenant.org_id,))
        assert (await cur.fetchone() or {})["n"] == EMBED_BATCH + 10
