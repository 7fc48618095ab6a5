"""Request-scoped dependencies: the services, the caller, and parsing of ids, ETags and as-of."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Annotated, Any, TypeVar
from uuid import UUID

from fastapi import Depends, Header, Path, Request
from pydantic import AfterValidator, BeforeValidator, Field
from starlette.types import Scope

from canvasdb.errors import BadRequest, CanvasdbError, Conflict, InvalidInput, Unauthorized
from canvasdb.services import Services
from canvasdb.tenancy import Principal

T = TypeVar("T")

# Dependencies are coroutines even when they do not await: FastAPI runs a plain function
# in its thread pool, and the two hops per request cost more than reading the entity.


async def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def bearer(authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> str:
    # (out of the OpenAPI document: its bearer scheme says it, and a generated client would
    # otherwise take the header as one more parameter of every call)
    if not authorization:
        raise Unauthorized("send an API token as 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


async def current_user(
    request: Request, svc: Annotated[Services, Depends(services)], token: Annotated[str, Depends(bearer)]
) -> UUID:
    return await user_of(request.scope, svc, token)


async def org_principal(
    request: Request,
    svc: Annotated[Services, Depends(services)],
    token: Annotated[str, Depends(bearer)],
    org: Annotated[str, Path(description="the org's slug or id", max_length=100)],
) -> Principal:
    return await member_of(request.scope, svc, token, org)


async def user_of(scope: Scope, svc: Services, token: str) -> UUID:
    """The user behind ``token``, looked up once per request (see ``_once``)."""
    return await _once(scope, (token, None), lambda: svc.tenancy.authenticate(token))


async def member_of(scope: Scope, svc: Services, token: str, org: str) -> Principal:
    """The caller behind ``token`` as a member of ``org``, looked up once per request."""
    return await _once(scope, (token, org), lambda: svc.tenancy.authorize(token, org))


_CHECKED = "canvasdb_callers"  # in a request's scope["state"]: {(token, org or None): outcome}


async def _once(scope: Scope, key: tuple[str, str | None], check: Callable[[], Awaitable[T]]) -> T:
    """``check()``'s outcome, refusal included, kept in the request's state: a large request's
    token is checked before its body is read (``limits.CredentialsFirst``), and the route's
    dependency then takes that outcome instead of looking the token up again."""
    checked: dict[tuple[str, str | None], Any] = scope.setdefault("state", {}).setdefault(_CHECKED, {})
    if key not in checked:
        try:
            checked[key] = await check()
        except CanvasdbError as exc:
            checked[key] = exc
            raise
    outcome = checked[key]
    if isinstance(outcome, CanvasdbError):
        raise outcome
    return outcome  # type: ignore[no-any-return]


Svc = Annotated[Services, Depends(services)]
User = Annotated[UUID, Depends(current_user)]
Who = Annotated[Principal, Depends(org_principal)]


def _not_nil(value: UUID | None) -> UUID | None:
    if value is not None and value.int == 0:  # pages start after it: never listed
        raise ValueError("id must not be the nil UUID")
    return value


# An id a client chooses for what it creates (entities, relationships).
ClientId = Annotated[UUID | None, AfterValidator(_not_nil),
                     Field(description="client-chosen id; generated if absent")]


_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _no_number(value: Any) -> Any:
    """Pydantic reads a number as a Unix time: ``"as_of": "5"``, meant as a version, was 1970."""
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError("an ISO 8601 time, such as 2026-11-27T10:00:00Z, not a number")
    return value


@contextlib.contextmanager
def query_parameters() -> Iterator[None]:
    """Refusals of a store, whose pointers name its arguments (``/type``), made to name the query
    parameters (``query:type``), as every other 422 of a query parameter does."""
    try:
        yield
    except InvalidInput as exc:
        pointer = exc.fields.get("pointer")
        if isinstance(pointer, str) and pointer.startswith("/"):
            exc.fields["pointer"] = "query:" + pointer[1:]
        raise


# A moment in a body or a query: ISO 8601 only.
IsoTime = Annotated[datetime, BeforeValidator(_no_number)]


def parse_id(value: str, what: str = "entity", *, pointer: str = "path:id") -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise InvalidInput(f"{what} id {value[:80]!r} is not a UUID", pointer=pointer) from None


def etags(value: str | None) -> set[str] | None:
    """The entity tags an If-Match or If-None-Match header lists (RFC 9110), without quotes or
    ``W/`` (``*`` stays); None without the header."""
    if value is None:
        return None
    return {tag.strip().removeprefix("W/").strip('"') for tag in value.split(",") if tag.strip()}


def parse_if_match(value: str | None) -> set[int] | None:
    """The versions an If-Match header names (``"3"``, ``W/"3"``, ``3``, or a list of them);
    ``*`` or none: any."""
    tags = etags(value)
    if tags is None or "*" in tags:
        return None
    if not tags or not all(tag.isascii() and tag.isdigit() and len(tag) <= 9 for tag in tags):
        raise BadRequest('If-Match must be an ETag from this API, such as "3"')  # not '²': int() refuses it
    return {int(tag) for tag in tags}


async def conditionally(write: Callable[[int | None], Awaitable[T]], if_match: str | None) -> T:
    """``write(if_version)`` under an If-Match header: with several versions, the write holds
    if the object is at any of them. The store checks one version, atomically; when that one
    is stale but the object is at another of the list, the write is tried at that one."""
    versions = parse_if_match(if_match)
    if versions is None:
        return await write(None)
    first = max(versions)
    try:
        return await write(first)
    except Conflict as exc:
        current = exc.fields.get("current_version")
        if current not in versions or current == first:
            raise
    return await write(current)
