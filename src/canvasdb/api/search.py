"""HTTP routes for search: ``GET /v1/orgs/{org}/search`` and the indexing status."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from canvasdb.api.deps import IsoTime, Svc, Who, query_parameters
from canvasdb.errors import InvalidInput
from canvasdb.search.engine import FACETS, MAX_LIMIT, MAX_QUERY_CHARS, Filters, Mode, check_text

router = APIRouter(prefix="/v1/orgs/{org}", tags=["search"])
MAX_VALUES = 100  # of a list parameter (project, type, module), repeated or comma-separated
List = Annotated[list[str] | None, Query(max_length=MAX_VALUES, description="repeat, or comma-separated")]
_KNOWN = {"q", "mode", "typo", "project", "type", "module", "updated_after", "updated_before", "facets",
          "limit", "cursor"}


def _split(values: list[str] | None, name: str) -> tuple[str, ...]:
    """The values of a repeated or comma-separated parameter, each once, at most MAX_VALUES."""
    out = tuple(dict.fromkeys(v.strip() for value in values or () for v in value.split(",") if v.strip()))
    if len(out) > MAX_VALUES:
        raise InvalidInput(f"at most {MAX_VALUES} values of {name}", pointer=f"query:{name}")
    for value in out:
        check_text(value, f"query:{name}")
    return out


@router.get("/search")
async def search(
    svc: Svc, who: Who, request: Request,
    q: Annotated[str, Query(max_length=MAX_QUERY_CHARS,
                            description="websearch syntax: \"phrase\", OR, -word")] = "",
    mode: Mode = "hybrid",
    typo: bool = True,
    project: List = None,
    type: List = None,
    module: List = None,
    updated_after: IsoTime | None = None,
    updated_before: IsoTime | None = None,
    facets: Annotated[str | None, Query(max_length=100, description=f"of {', '.join(FACETS)}")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> dict[str, Any]:  # fmt: skip
    """Search the org's entities the caller may read. ``data.FIELD=VALUE`` filters on a field of
    ``data`` (dotted for nested fields); see the README for ranking and the response."""
    data = []
    for key, value in request.query_params.multi_items():
        if key.startswith("data."):
            data.append((key[5:], value))
        elif key not in _KNOWN:
            raise InvalidInput(f"unknown parameter {key!r}; filters on data are written data.FIELD=VALUE",
                               pointer=f"query:{key}")
    projects = tuple([await svc.tenancy.resolve_project(who, ref) for ref in _split(project, "project")])
    filters = Filters(projects=projects, types=_split(type, "type"), modules=_split(module, "module"),
                      updated_after=updated_after, updated_before=updated_before, data=tuple(data))
    with query_parameters():
        results = await svc.search.search(who, q, mode=mode, typo=typo, filters=filters,
                                          facets=_split([facets] if facets else None, "facets"), limit=limit,
                                          cursor=cursor)
    return results.to_json()


@router.get("/search/status")
async def search_status(svc: Svc, who: Who) -> dict[str, Any]:
    """Indexing backlog of the org (entities waiting for their words and vectors) and the models:
    for the org's owners and admins (403 otherwise), as the backlog is the whole org's."""
    who.require_org_admin()
    active = await svc.models.active()
    return {"backlog": await svc.indexer.backlog(who.org_id),
            "active_model": active.model if active else None,
            "configured_model": svc.models.configured.model}
