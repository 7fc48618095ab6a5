"""Request-scoped dependencies: the services, the caller, and parsing of ids, ETags and as-of."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import Depends, Header, Path, Request

from canvasdb.errors import BadRequest, InvalidInput, Unauthorized
from canvasdb.services import Services
from canvasdb.tenancy import Principal

# Dependencies are coroutines even when they do not await: FastAPI runs a plain function
# in its thread pool, and the two hops per request cost more than reading the entity.


async def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def bearer(authorization: Annotated[str | None, Header()] = None) -> str:
    if not authorization:
        raise Unauthorized("send an API token as 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


async def current_user(
    svc: Annotated[Services, Depends(services)], token: Annotated[str, Depends(bearer)]
) -> UUID:
    return await svc.tenancy.authenticate(token)


async def org_principal(
    svc: Annotated[Services, Depends(services)],
    token: Annotated[str, Depends(bearer)],
    org: Annotated[str, Path(description="the org's slug or id", max_length=100)],
) -> Principal:
    return await svc.tenancy.authorize(token, org)


Svc = Annotated[Services, Depends(services)]
User = Annotated[UUID, Depends(current_user)]
Who = Annotated[Principal, Depends(org_principal)]


def parse_id(value: str, what: str = "entity", *, pointer: str = "path:id") -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise InvalidInput(f"{what} id {value[:80]!r} is not a UUID", pointer=pointer) from None


def parse_if_match(value: str | None) -> int | None:
    """The version in an If-Match header (``"3"``, ``W/"3"`` or ``3``); ``*`` or none: any."""
    if value is None or value.strip() == "*":
        return None
    raw = value.strip().removeprefix("W/").strip('"')
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:  # not '²': int() refuses it
        raise BadRequest('If-Match must be an ETag from this API, such as "3"')
    return int(raw)
