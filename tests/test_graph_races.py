"""Races of the graph: two transactions at once, the first held open at the critical point (``races``)."""

from __future__ import annotations

from uuid import UUID

import pytest
from conftest import Tenant
from races import held, second

from canvasdb.errors import Conflict
from canvasdb.services import Services


async def node(svc: Services, t: Tenant, title: str, type: str = "task") -> UUID:
    return (await svc.entities.create(t.owner, t.project_id, type, {"title": title})).id


async def live(pg_url: str, t: Tenant, src: UUID, dst: UUID) -> bool:
    async with held(pg_url, t) as conn:
        cur = await conn.execute("SELECT bool_or(live) FROM relationships WHERE org_id = %s AND src = %s"
                                 " AND dst = %s", (t.org_id, src, dst))
        row = await cur.fetchone()
    assert row is not None and row[0] is not None, "no relationship"
    return bool(row[0])


async def test_if_match_updates_of_a_relationship_never_both_win(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
    rel = await svc.relationships.create(tenant.owner, a, b, "mentions", {"label": "v1"})
    async with held(pg_url, tenant) as first:  # an update of version 1, not yet committed
        await first.execute("UPDATE relationships SET data = '{\"label\": \"first\"}' WHERE org_id = %s"
                            " AND id = %s AND version = 1", (tenant.org_id, rel.id))
        with pytest.raises(Conflict) as info:
            await second(pg_url, first, svc.relationships.update(tenant.owner, rel.id, {"label": "second"},
                                                                 if_version=1))
    assert info.value.fields["current_version"] == 2
    assert (await svc.relationships.get(tenant.owner, rel.id)).data == {"label": "first"}
