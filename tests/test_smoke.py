from conftest import Tenant

from canvasdb.services import Services


async def test_create_and_get(svc: Services, tenant: Tenant) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"t": 1})
    got = await svc.entities.get(tenant.owner, e.id)
    assert got.data == {"t": 1} and got.version == 1
