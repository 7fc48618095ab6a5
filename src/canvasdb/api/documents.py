"""HTTP routes for live documents: metadata, binary state and updates, the change list."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from canvasdb.api.deps import Svc, Who
from canvasdb.entities import parse_as_of_time
from canvasdb.errors import InvalidInput

router = APIRouter(prefix="/v1/orgs/{org}", tags=["documents"])
YJS_UPDATE = "application/octet-stream"


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=200, examples=["board-42"])
    kind: str = Field(default="board", max_length=32, examples=["board", "text"])
    entity_id: UUID | None = Field(default=None, description="the entity this document belongs to")


@router.post("/projects/{project}/docs", status_code=201)
async def create_document(org: str, project: str, body: DocumentIn, svc: Svc, who: Who) -> dict[str, Any]:
    """Create a live document (a Yjs doc) in a project."""
    project_id = await svc.tenancy.resolve_project(who, project, write=True)
    doc = await svc.documents.create(who, project_id, body.id, body.kind, entity_id=body.entity_id)
    return doc.to_json()


@router.get("/docs/{doc}")
async def get_document(org: str, doc: str, svc: Svc, who: Who) -> dict[str, Any]:
    """The document's metadata: its last sequence number, projection lag and ``exact_since``."""
    return (await svc.documents.get(who, doc)).to_json()


@router.get("/docs/{doc}/state", response_class=Response,
            responses={200: {"content": {YJS_UPDATE: {}}, "description": "a Yjs v1 update",
                             "headers": {"Canvasdb-Exact": {
                                 "description": "with as_of: false when retention has deleted updates of"
                                                " that moment (the answer is the snapshot before it)",
                                 "schema": {"type": "string", "enum": ["true", "false"]}}}}})
async def document_state(
    org: str, doc: str, svc: Svc, who: Who,
    as_of: Annotated[str | None, Query(max_length=64, description="ISO 8601 time")] = None,
    # (the HTTP server refuses a request line past 64 KiB before canvasdb reads it)
    state_vector: Annotated[str | None, Query(max_length=60_000,
                                              description="base64 (standard or URL-safe) Yjs state vector:"
                                                          " only what a peer with it lacks")] = None,
) -> Response:  # fmt: skip
    """The document as one binary Yjs update (apply it to an empty Y.Doc to get the document)."""
    moment = parse_as_of_time(as_of)
    vector = None
    if state_vector:
        try:
            vector = base64.b64decode(_standard_base64(state_vector), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("state_vector must be base64", pointer="query:state_vector") from None
    if moment is not None:  # with whether it is exact (retention may have taken the updates of then)
        past = await svc.documents.state_as_of(who, doc, moment)
        return Response(past.update, media_type=YJS_UPDATE,
                        headers={"Canvasdb-Exact": "true" if past.exact else "false"})
    return Response(await svc.documents.state(who, doc, state_vector=vector), media_type=YJS_UPDATE)


def _standard_base64(text: str) -> str:
    """Base64 as clients send it in a URL: the URL-safe alphabet, padding left out, or a "+"
    sent raw (which a query string reads as a space) are all taken."""
    text = text.replace(" ", "+").replace("-", "+").replace("_", "/")
    return text + "=" * (-len(text) % 4)


UPDATE_PATHS = r"^/v1/orgs/[^/]+/docs/[^/]+/updates$"  # bodies up to CANVASDB_MAX_UPDATE_BYTES


@router.post("/docs/{doc}/updates", status_code=201,
             openapi_extra={"requestBody": {"required": True,
                                            "content": {YJS_UPDATE: {"schema": {"type": "string",
                                                                                "format": "binary"}}}}})
async def append_update(org: str, doc: str, request: Request, svc: Svc, who: Who) -> dict[str, Any]:
    """Append one binary Yjs v1 update; answers once it is durable, with its sequence number."""
    payload = await request.body()
    if not payload:
        raise InvalidInput("the body must be a Yjs update", pointer="/body")
    done = await svc.documents.append(who, doc, payload)
    return {"seq": done.seq, "at": done.at.isoformat()}


@router.get("/docs/{doc}/changes")
async def document_changes(
    org: str, doc: str, svc: Svc, who: Who,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:  # fmt: skip
    """The document's change times, oldest first: one entry per stored update."""
    items, more = await svc.documents.changes_page(who, doc, after=after, limit=limit)
    return {"items": [c.to_json() for c in items], "next": str(items[-1].seq) if more else None}
