"""Errors as RFC 9457 problem documents (``application/problem+json``); never a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from canvasdb.api.route_match import matching_routes
from canvasdb.errors import CanvasdbError

log = logging.getLogger("canvasdb.api")
MEDIA_TYPE = "application/problem+json"


def problem(status: int, title: str, detail: str, *, headers: dict[str, str] | None = None,
            **fields: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **fields}
    headers = dict(headers or {})
    if status == 401:  # RFC 6750: a 401 names the scheme the client must use
        headers["WWW-Authenticate"] = 'Bearer realm="canvasdb"'
    elif status == 503 and fields.get("retry") is not False:  # RFC 9110: when to try again
        headers["Retry-After"] = str(fields.get("retry_after", 1))
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _pointer(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        kind = parts.pop(0)
        if kind != "body":
            return f"{kind}:" + ".".join(parts)
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


async def _canvasdb_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CanvasdbError)
    if exc.status >= 500:
        # The hint of a server-side failure is for the operator (the database's or the
        # object store's own message, with hosts and ports): logged, not sent to the client.
        hint = exc.fields.get("hint")
        log.error("%s %s failed: %s%s", request.method, request.url.path, exc.detail,
                  f" ({hint})" if hint else "", extra={"detail": exc.detail})
    return problem_response(exc)


def problem_response(exc: CanvasdbError) -> JSONResponse:
    fields = {k: v for k, v in exc.fields.items() if k != "hint"} if exc.status >= 500 else exc.fields
    return problem(exc.status, exc.title, exc.detail, **fields)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"pointer": _pointer(tuple(e.get("loc", ()))), "detail": e.get("msg", "invalid")}
        for e in exc.errors()
    ]
    unparsed = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
    if unparsed is not None:
        return problem(400, "Bad request", _json_error(unparsed, exc.body))
    first = errors[0] if errors else {"pointer": "", "detail": "invalid"}
    if first["pointer"] == "":  # the body as a whole: missing, or not an object
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and media != "application/json" and not media.endswith("+json"):
            # FastAPI reads JSON only when the request says it is JSON
            return problem(415, "Unsupported media type",
                           f"send the body as JSON with 'Content-Type: application/json', not {media[:80]!r}")
        return problem(422, "Invalid input", "the body must be a JSON object", pointer="", errors=errors)
    return problem(422, "Invalid input", f"{first['pointer']}: {first['detail']}",
                   pointer=first["pointer"], errors=errors)


def _json_error(error: dict[str, Any], text: Any) -> str:
    """What the JSON parser met, and where as a line and column: FastAPI gives the character's
    offset as the error's location, which read as a JSON pointer (``/36``) into the body."""
    reason = str(error.get("ctx", {}).get("error", "")).strip()
    detail = "the body is not valid JSON" + (f": {reason[:1].lower()}{reason[1:]}" if reason else "")
    offset = error["loc"][-1]
    if isinstance(text, str) and isinstance(offset, int):
        line, column = text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)
        detail += f" at line {line}, column {column}"
    return detail


# What FastAPI's JSON read raised, when not a JSONDecodeError (it answers them all alike)
_UNREADABLE_JSON = {UnicodeDecodeError: "it is not UTF-8 text", RecursionError: "it is nested too deeply"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    titles = {400: "Bad request", 404: "Not found", 405: "Method not allowed", 413: "Payload too large"}
    unreadable = _UNREADABLE_JSON.get(type(exc.__cause__))  # FastAPI's "error parsing the body"
    if exc.status_code == 400 and unreadable:
        return problem(400, "Bad request", f"the body is not valid JSON: {unreadable}")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # RFC 9110: the methods the resource allows (Starlette names one route's)
        headers["Allow"] = ", ".join(_allowed(request))
    return problem(exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail), headers=headers)


def _allowed(request: Request) -> list[str]:
    """The methods of every route whose path matches the request's (FastAPI makes each method
    of a path a route of its own)."""
    allowed = {method for route, _, _ in matching_routes(request.scope) for method in route.methods or ()}
    return sorted(allowed | ({"HEAD"} if "GET" in allowed else set()))


async def _client_gone(request: Request, exc: Exception) -> JSONResponse:
    # Also how BodySizeLimit cuts off a body that grew too large (it then answers 413 itself).
    # Nobody reads this answer otherwise, and a client that leaves is no server error to log.
    return problem(400, "Bad request", "the client stopped before the body was complete; nothing was done")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return problem(500, "Internal error", "an unexpected error occurred; it has been logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(CanvasdbError, _canvasdb_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
