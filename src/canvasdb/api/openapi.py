"""The OpenAPI document as clients see the API: bearer tokens, and errors as problem documents.

FastAPI describes what its own machinery does: no security scheme (the token is read by a
plain dependency, for canvasdb's own 401 messages) and a 422 "HTTPValidationError" shape
that the problem handler never sends. A generated client would then neither send the token
nor parse one error. This rewrites those parts of the generated document, once.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from canvasdb.api.problems import MEDIA_TYPE

PUBLIC = ("/healthz", "/readyz", "/metrics")  # the only paths that take no token
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
_READ_BY_POST = ("/v1/orgs/{org}/graph/subgraph",)  # a read whose question is a body
_DELETABLE = ("entities", "relationships")  # soft-deleted: reading one answers 410

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details; more members where useful (`pointer`, "
                   "`current_version`, `limit`, `errors`).",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "example": "about:blank"},
        "title": {"type": "string", "example": "Invalid input"},
        "status": {"type": "integer", "example": 422},
        "detail": {"type": "string", "example": "data does not match the schema of kanban.card: "
                                                "\"nope\" is not one of \"todo\" or \"done\""},
        "pointer": {"type": "string", "description": "JSON pointer of the bad field (`query:NAME`, "
                                                    "`path:NAME` or `header:NAME` outside the body)"},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "pointer": {"type": "string"}, "detail": {"type": "string"}}}},
    },
    "additionalProperties": True,
}
# Every status the API may answer a caller's mistake (or a busy database) with.
ERRORS = {
    "400": "Malformed JSON or header",
    "401": "Missing, unknown or revoked token",
    "403": "The caller's role does not allow this: a viewer's write, or what only owners and admins do",
    "404": "Not found, or in an org the caller does not belong to",
    "409": "Stale If-Match, or an id that is taken",
    "410": "Deleted: undelete or restore it first",
    "413": "Body or data too large",
    "415": "A body sent as another media type than JSON",
    "422": "Invalid input",
    "503": "Database unavailable or statement timeout (retry)",
    "507": "No room left to store: a full disk or quota under the blobs or the database",
}


def install(app: FastAPI) -> None:
    """Serve the rewritten document at /openapi.json (and to /docs)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = rewrite(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def rewrite(doc: dict[str, Any]) -> dict[str, Any]:
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Problem"] = PROBLEM_SCHEMA
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "An API token (`cdb_...`) from `canvasdb token create`"}}
    problem = {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    components["responses"] = {status: {"description": text, "content": problem}
                               for status, text in ERRORS.items()}
    doc["security"] = [{"bearer": []}]
    for path, item in doc.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            if path in PUBLIC:
                operation["security"] = []
                operation.get("responses", {}).pop("422", None)
                if path != "/metrics":  # the probes: the database away, or not ready
                    operation["responses"]["503"] = {"$ref": "#/components/responses/503"}
                continue
            responses = operation.setdefault("responses", {})
            for status in ERRORS:
                if status in ("413", "415") and "requestBody" not in operation:
                    continue
                if status in ("409", "507") and (method == "get" or path in _READ_BY_POST):
                    # reads neither conflict nor store
                    continue
                if status == "410" and not any(f"/{what}/{{id}}" in path for what in _DELETABLE):
                    continue
                responses[status] = {"$ref": f"#/components/responses/{status}"}
    return doc
