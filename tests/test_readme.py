"""The README's reference tables against the code: a setting or a route added, renamed or
dropped without its row (or a default changed without it) fails here, not in a user's hands."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from canvasdb.settings import Settings

README = (Path(__file__).parents[1] / "README.md").read_text()
_METHOD = r"(?:GET|HEAD|POST|PUT|PATCH|DELETE)"


def _table_rows(first_cell: str) -> list[list[str]]:
    return [line.split(" | ") for line in README.splitlines() if line.startswith(f"| {first_cell}")]


def test_every_setting_has_a_row_with_its_default() -> None:
    documented: dict[str, str] = {}
    for names_cell, default_cell, *_ in _table_rows("`CANVASDB_"):
        names = re.findall(r"`CANVASDB_(\w+)`", names_cell)
        defaults = default_cell.split(" / ")  # "`2` / `20`", or one for all ("unset")
        defaults = defaults if len(defaults) == len(names) else [default_cell] * len(names)
        documented |= {name.lower(): default for name, default in zip(names, defaults, strict=True)}
    assert set(documented) == set(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        if field.default is None or field.default_factory is not None:  # "unset", or a rule in words
            continue
        shown = re.findall(r"`([^`]+)`", documented[name])
        assert shown, (name, documented[name])
        kind = Path if isinstance(field.default, Path) else type(field.default)
        assert kind(shown[0]) == field.default, (name, shown[0], field.default)


def _documented_routes() -> set[tuple[str, str]]:
    """Every ``METHOD /path`` of the README's route tables; ``.../rest`` continues the row's
    first path (``GET .../history`` of a relationship) or replaces its end from the same name
    on (``GET .../entity-types/{name}``)."""
    routes = set()
    for row in _table_rows("`"):
        base = None
        for methods, path in re.findall(rf"`({_METHOD}(?:\\\|{_METHOD})*) ((?:/|\.\.\./)[^`?]*)", " | ".join(row)):
            if path.startswith("..."):
                assert base is not None, row
                rest = path.removeprefix("...")
                first = rest.split("/")[1]
                path = (base[:base.index(f"/{first}")] if f"/{first}" in base else base) + rest
            base = base or path
            routes |= {(method, path) for method in methods.split("\\|")}
    return routes


async def test_every_route_has_a_row(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    served = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert _documented_routes() == served
