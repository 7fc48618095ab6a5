"""Property: for random sequences of writes, every as-of read returns exactly what was written."""

from __future__ import annotations

from typing import Any

from conftest import Tenant, make_tenant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canvasdb.errors import Gone
from canvasdb.services import Services

_keys = st.sampled_from(["a", "b", "c", "title", "tags", "x/y", "~n", ""])
# NUL and lone surrogates are refused by design (PostgreSQL's jsonb cannot hold them).
_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text \
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)
_objects = st.dictionaries(_keys, _json, max_size=5)
_merge = st.dictionaries(_keys, _json, max_size=4)

_steps = st.lists(
    st.one_of(
        st.tuples(st.just("replace"), _objects),
        st.tuples(st.just("patch"), _merge),
        st.tuples(st.just("delete"), st.none()),
        st.tuples(st.just("undelete"), st.none()),
        st.tuples(st.just("restore"), st.integers(1, 30)),
    ),
    min_size=1,
    max_size=25,
)

_tenant: Tenant | None = None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(initial=_objects, steps=_steps)
async def test_every_version_reads_back_exactly(svc: Services, initial: dict[str, Any],
                                                steps: list[tuple[str, Any]]) -> None:
    global _tenant
    if _tenant is None:
        _tenant = await make_tenant(svc)
    who = _tenant.owner
    store = svc.entities
    e = await store.create(who, _tenant.project_id, "prop", initial)
    written = {1: (e.data, False, e.updated_at)}
    current = e
    for op, arg in steps:
        if op == "replace":
            if current.deleted:
                continue
            current = await store.replace(who, e.id, arg)
        elif op == "patch":
            if current.deleted:
                continue
            current = await store.patch(who, e.id, arg)
        elif op == "delete":
            current = await store.delete(who, e.id)
        elif op == "undelete":
            current = await store.undelete(who, e.id)
        else:
            current = await store.restore(who, e.id, min(arg, current.version))
        written[current.version] = (current.data, current.deleted, current.updated_at)
    assert sorted(written) == list(range(1, current.version + 1)), "versions are dense"
    for version, (data, deleted, at) in written.items():
        by_version = await store.get(who, e.id, as_of=version)
        by_time = await store.get(who, e.id, as_of=at)
        assert (by_version.data, by_version.deleted) == (data, deleted)
        assert (by_time.version, by_time.data, by_time.deleted) == (version, data, deleted)
    if current.deleted:
        try:
            await store.get(who, e.id)
            raise AssertionError("a deleted entity must not read as live")
        except Gone:
            pass
    else:
        assert (await store.get(who, e.id)).data == current.data
