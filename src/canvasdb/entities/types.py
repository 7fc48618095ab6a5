"""The entity type registry: what modules declare about their entity types at run time.

A type may carry a JSON Schema for ``data`` (checked on every write), which fields
are text for search (with a weight A-D), which hold references to other entities
(JSON paths such as ``$.depends_on[*]``: each becomes a relationship whose kind is
the path's last name, kept in step by the database), which relationship kinds from
its entities may never form a cycle, which fields feed the embedding, and a tag field
for facets. Search and the graph read these declarations.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import jsonschema
import jsonschema_rs
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from canvasdb.db import Connection, Database
from canvasdb.errors import InvalidInput, NotFound
from canvasdb.tenancy import Principal

TYPE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}(\.[a-z][a-z0-9_-]{0,62}){0,4}$")
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62}){0,7}$")
REFERENCE_PATH = re.compile(r"^\$(\.[A-Za-z_][A-Za-z0-9_]{0,62}(\[\*\])?){1,8}$")
KIND = TYPE_NAME  # relationship kinds are named like types: 'depends_on', 'board.edge'
WEIGHTS = ("A", "B", "C", "D")
_CACHE_SIZE = 1024
MAX_SCHEMA_DEPTH = 64  # nesting of objects and arrays in a JSON Schema


@dataclass(frozen=True)
class EntityType:
    name: str
    module: str = ""
    json_schema: dict[str, Any] | None = None
    text_fields: dict[str, str] = field(default_factory=dict)
    reference_fields: list[str] = field(default_factory=list)
    embed_fields: list[str] = field(default_factory=list)
    tag_field: str | None = None
    acyclic_kinds: list[str] = field(default_factory=list)  # relationship kinds that may not cycle
    updated_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["updated_at"] = self.updated_at.isoformat() if self.updated_at else None
        return out


def check_type_name(name: object, pointer: str = "/type") -> str:
    if not isinstance(name, str) or not TYPE_NAME.fullmatch(name):
        raise InvalidInput(
            "type must be lowercase dotted words such as 'board.node' or 'kanban.card'",
            pointer=pointer,
        )
    return name


def check_definition(spec: EntityType) -> EntityType:
    """Reject a declaration that later code could not use, naming the bad field."""
    check_type_name(spec.name, pointer="/name")
    if len(spec.module) > 100:
        raise InvalidInput("module is at most 100 characters", pointer="/module")
    if spec.json_schema is not None:
        _check_schema(spec.json_schema)
    for name, weight in spec.text_fields.items():
        if not FIELD_NAME.fullmatch(name):
            raise InvalidInput(f"bad text field name {name!r}", pointer=f"/text_fields/{name}")
        if weight not in WEIGHTS:
            raise InvalidInput("text field weight must be A, B, C or D",
                               pointer=f"/text_fields/{name}")
    for i, path in enumerate(spec.reference_fields):
        if not REFERENCE_PATH.fullmatch(path):
            raise InvalidInput("reference fields are JSON paths such as '$.parent' or "
                               "'$.depends_on[*]'", pointer=f"/reference_fields/{i}")
    for i, name in enumerate(spec.embed_fields):
        if not FIELD_NAME.fullmatch(name):
            raise InvalidInput(f"bad embed field name {name!r}", pointer=f"/embed_fields/{i}")
    if spec.tag_field is not None and not FIELD_NAME.fullmatch(spec.tag_field):
        raise InvalidInput("bad tag field name", pointer="/tag_field")
    for i, kind in enumerate(spec.acyclic_kinds):
        if not isinstance(kind, str) or not KIND.fullmatch(kind):
            raise InvalidInput("relationship kinds are lowercase dotted words such as 'depends_on'",
                               pointer=f"/acyclic_kinds/{i}")
    return spec


def _validator(schema: dict[str, Any]) -> Any:
    """The validator of ``data`` (jsonschema-rs): its regular expressions run in linear time,
    or within a backtracking limit for the patterns that need one, so no ``pattern`` can
    stall the server (with Python's ``re``, ``^(a+)+$`` against 28 characters blocked every
    request for 3 s, each more character doubling it), and a schema that refers to itself
    without end cannot exhaust the stack. A ``$ref`` resolves only inside the schema:
    nothing is ever fetched. Formats are annotations, as the 2020-12 draft says."""
    return jsonschema_rs.validator_for(schema, validate_formats=False, retriever=_never_fetch)


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest in ``value`` more than ``limit`` levels (walked without
    recursion, which is what such a value would exhaust)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _never_fetch(uri: str) -> Any:
    raise ValueError(f"{uri} is not fetched: a $ref points inside the schema")


def _check_schema(schema: dict[str, Any]) -> None:
    """A valid JSON Schema whose every ``$ref`` points inside itself and resolves.

    What python-jsonschema cannot check is refused first: a ``$schema`` that is not a string
    (it fails on it with a TypeError), and nesting deeper than MAX_SCHEMA_DEPTH (it recurses
    about eight frames a level: 120 levels ran out of stack)."""
    if not isinstance(schema.get("$schema", ""), str):
        raise InvalidInput("$schema is the URI of a JSON Schema dialect (a string)",
                           pointer="/json_schema/$schema")
    if nested_deeper_than(schema, MAX_SCHEMA_DEPTH):
        raise InvalidInput(f"the schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep",
                           pointer="/json_schema")
    try:
        validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise InvalidInput(f"not a valid JSON Schema: {exc.message}",
                           pointer="/json_schema" + (f"/{where}" if where else "")) from None
    resource = Resource.from_contents(schema, default_specification=DRAFT202012)  # honours $schema
    resolver = Registry().resolver_with_root(resource)
    stack: list[tuple[Any, str]] = [(schema, "/json_schema")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                if not ref.startswith("#"):
                    raise InvalidInput("a $ref must point inside the schema ('#/...'): nothing "
                                       "is fetched from elsewhere", pointer=f"{where}/$ref")
                try:
                    resolver.lookup(ref)
                except Unresolvable:
                    raise InvalidInput(f"$ref {ref!r} does not resolve", pointer=f"{where}/$ref") from None
            stack.extend((v, f"{where}/{_escape(str(k))}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{where}/{i}") for i, v in enumerate(node))
    try:  # what the data's validator must compile: its regular expressions, above all
        _validator(schema)
    except (jsonschema_rs.ValidationError, ValueError) as exc:
        raise InvalidInput(f"not a JSON Schema canvasdb can check: {str(exc).splitlines()[0]}",
                           pointer="/json_schema") from None


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _pointer(path: Any) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


class TypeRegistry:
    """Registered types per org, and their compiled validators (cached by version)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._validators: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    async def register(self, who: Principal, spec: EntityType) -> EntityType:
        """Create or replace a type's declaration. Existing entities are not re-validated, but
        they are indexed again for search when what search reads of the type changed."""
        who.require_org_admin()
        check_definition(spec)
        from psycopg.types.json import Jsonb

        async with self.db.transaction(who.org_id) as conn:
            # Alone on the type until the commit: its entities are indexed holding this lock
            # shared (migration 0025), so writes before this one are committed for the reindex
            # below, and writes after it read the new declaration.
            await conn.execute("SELECT pg_advisory_xact_lock(entity_type_lock_key(%s, %s))",
                               (who.org_id, spec.name))
            old = await (await conn.execute(
                "SELECT module, text_fields, embed_fields, tag_field FROM entity_types"
                " WHERE org_id = %s AND name = %s FOR UPDATE", (who.org_id, spec.name))).fetchone()
            row = await (await conn.execute(
                "INSERT INTO entity_types (org_id, name, module, json_schema, text_fields,"
                " reference_fields, embed_fields, tag_field, acyclic_kinds)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT (org_id, name) DO UPDATE SET module = EXCLUDED.module,"
                " json_schema = EXCLUDED.json_schema, text_fields = EXCLUDED.text_fields,"
                " reference_fields = EXCLUDED.reference_fields, embed_fields = EXCLUDED.embed_fields,"
                " tag_field = EXCLUDED.tag_field, acyclic_kinds = EXCLUDED.acyclic_kinds,"
                " updated_at = clock_timestamp() RETURNING *",
                (who.org_id, spec.name, spec.module,
                 Jsonb(spec.json_schema) if spec.json_schema is not None else None,
                 Jsonb(spec.text_fields), Jsonb(spec.reference_fields), Jsonb(spec.embed_fields),
                 spec.tag_field, Jsonb(spec.acyclic_kinds)),
            )).fetchone()
            assert row is not None
            if old != {k: row[k] for k in ("module", "text_fields", "embed_fields", "tag_field")}:
                # In id order, as writes and the indexer lock search rows.
                await conn.execute(
                    "SELECT count(*) FROM (SELECT search_index_entity(org_id, id, project_id, type, data,"
                    " deleted, updated_at) FROM entities WHERE org_id = %s AND type = %s ORDER BY id)"
                    " AS reindexed", (who.org_id, spec.name))
        return _from_row(row)

    async def list(self, who: Principal) -> list[EntityType]:
        async with self.db.transaction(who.org_id) as conn:
            cur = await conn.execute(
                "SELECT * FROM entity_types WHERE org_id = %s ORDER BY name", (who.org_id,)
            )
            return [_from_row(r) for r in await cur.fetchall()]

    async def get(self, who: Principal, name: str) -> EntityType:
        async with self.db.transaction(who.org_id) as conn:
            found = await self.lookup(conn, who, name)
        if found is None:
            raise NotFound(f"entity type {name!r} is not registered")
        return found

    async def lookup(self, conn: Connection, who: Principal, name: str) -> EntityType | None:
        cur = await conn.execute(
            "SELECT * FROM entity_types WHERE org_id = %s AND name = %s", (who.org_id, name)
        )
        row = await cur.fetchone()
        return None if row is None else _from_row(row)

    def check(self, who: Principal, spec: EntityType | None, data: Any) -> None:
        """Validate ``data`` against an already loaded type (None: unregistered, anything goes):
        InvalidInput naming the JSON pointer of the first bad field."""
        if spec is None or spec.json_schema is None:
            return
        key = (who.org_id, spec.name, spec.updated_at)
        validator = self._validators.get(key)
        if validator is None:
            try:
                validator = _validator(spec.json_schema)
            except (jsonschema_rs.ValidationError, ValueError) as exc:  # registered before this check
                raise InvalidInput(f"the schema of {spec.name} cannot be checked: {str(exc).splitlines()[0]}",
                                   pointer="/data") from None
            self._validators[key] = validator
            if len(self._validators) > _CACHE_SIZE:
                self._validators.popitem(last=False)
        error = next(validator.iter_errors(data), None)
        if error is not None:
            pointer = "/data" + _pointer(error.instance_path)
            raise InvalidInput(f"data does not match the schema of {spec.name}: {error.message}",
                               pointer=pointer)


def type_from_json(row: dict[str, Any]) -> EntityType:
    """A type from ``to_jsonb(entity_types)`` (timestamps arrive as text)."""
    return _from_row({**row, "updated_at": datetime.fromisoformat(row["updated_at"])})


def _from_row(row: dict[str, Any]) -> EntityType:
    return EntityType(
        name=row["name"], module=row["module"], json_schema=row["json_schema"],
        text_fields=row["text_fields"], reference_fields=row["reference_fields"],
        embed_fields=row["embed_fields"], tag_field=row["tag_field"],
        acyclic_kinds=row.get("acyclic_kinds") or [], updated_at=row["updated_at"],
    )  # fmt: skip
