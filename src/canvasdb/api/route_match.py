"""Which of the app's routes match a request, for the code that must know before (or instead of)
the router: the token check ahead of a large body, and the ``Allow`` header of a 405."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi.routing import RouteContext, iter_route_contexts
from starlette.routing import Match
from starlette.types import Scope


def matching_routes(scope: Scope) -> Iterator[tuple[RouteContext, Match, Scope]]:
    """The app's routes whose path matches ``scope``, in the router's order, each with how it
    matches (FULL when the method matches too) and what it adds to the scope (its path params)."""
    for route in iter_route_contexts(scope["app"].routes):
        match, child = route.matches(scope)
        if match is not Match.NONE:
            yield route, match, child
