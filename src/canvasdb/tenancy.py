"""Orgs, users, memberships, projects, API tokens, and who may do what.

Roles: in an org, ``owner`` and ``admin`` read and write every project; a ``member``
reaches only the projects where it is an ``editor`` (read and write) or a
``viewer`` (read). Objects of an org the caller does not belong to do not exist
for it (404), never "forbidden".
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from canvasdb.db import Connection, Database
from canvasdb.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized

OrgRole = Literal["owner", "admin", "member"]
ORG_ROLES: tuple[str, ...] = ("owner", "admin", "member")
PROJECT_ROLES: tuple[str, ...] = ("editor", "viewer")
TOKEN_PREFIX = "cdb_"
NOT_A_MEMBER = "no member of this org has that email or id"
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
EMAIL = re.compile(r"^[^@\s\x00]{1,200}@[^@\s\x00]{1,119}$")


@dataclass(frozen=True)
class Principal:
    """Who acts, in which org. ``user_id`` None is the local operator (CLI), an owner."""

    org_id: UUID
    user_id: UUID | None
    org_role: OrgRole

    @property
    def is_org_admin(self) -> bool:
        return self.org_role in ("owner", "admin")

    def require_org_admin(self) -> None:
        if not self.is_org_admin:
            raise Forbidden("this needs the org's owner or admin role")


@dataclass(frozen=True)
class Org:
    id: UUID
    slug: str
    name: str


def check_slug(slug: str, what: str = "slug") -> str:
    """A slug that cannot be taken for an id: a reference that reads as a UUID is an id."""
    if not isinstance(slug, str) or not SLUG.fullmatch(slug):
        raise InvalidInput(
            f"{what} must be 1-63 lowercase letters, digits or '-', starting with a letter or digit",
            pointer=f"/{what}",
        )
    if _parse_uuid(slug) is not None:
        raise InvalidInput(f"{what} must not read as a UUID (that names an id)", pointer=f"/{what}")
    return slug


def _parse_uuid(ref: str) -> UUID | None:
    try:
        return UUID(ref)
    except (ValueError, TypeError, AttributeError):
        return None


def _by_ref(ref: str) -> tuple[str, tuple[Any, ...]]:
    """A condition matching a slug or id ``ref`` and its parameters: a ref that reads as a
    UUID is an id, any other a slug (slugs never read as one: ``check_slug``). Matching
    either, with the first row found, let an org whose slug was another's id stand in for
    it (migration 0020)."""
    as_id = _parse_uuid(ref)
    if as_id is None:
        return "slug = %s", (ref,)
    return "id = %s", (as_id,)


def role_in_project(org: str, project: str) -> str:
    """SQL for a member's role in a project (NULL: none), given SQL for the org and the
    project; its one parameter, last, is the user's id. Statements that resolve a project
    or a document, or create an entity, read the role in the same statement."""
    return (f"(SELECT m.role FROM project_members m WHERE m.org_id = {org}"
            f" AND m.project_id = {project} AND m.user_id = %s)")


def _check_token_shape(token: str | None) -> str:
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise Unauthorized("missing or malformed API token")
    return token


def hash_token(token: str) -> bytes:
    # Tokens carry 256 random bits, so a fast hash is enough: no dictionary to attack.
    return hashlib.sha256(token.encode()).digest()


class Tenancy:
    """The tenant registry: the Python API behind the CLI's and HTTP API's tenant commands."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # --- orgs ---------------------------------------------------------------------------------

    async def create_org(self, slug: str, name: str | None = None, *, owner: UUID | None = None) -> Org:
        check_slug(slug)
        name = name or slug
        async with self.db.transaction() as conn:
            taken = await conn.execute("SELECT 1 FROM orgs WHERE slug = %s", (slug,))
            if await taken.fetchone():
                raise Conflict(f"org {slug!r} already exists")
            row = await (await conn.execute(
                "INSERT INTO orgs (slug, name) VALUES (%s, %s) RETURNING id, slug, name", (slug, name)
            )).fetchone()
            assert row is not None
            org = Org(**row)
            if owner is not None:
                await _set_org_context(conn, org.id)
                await conn.execute(
                    "INSERT INTO org_members (org_id, user_id, role) VALUES (%s, %s, 'owner')",
                    (org.id, owner),
                )
        return org

    async def list_orgs(self) -> list[Org]:
        async with self.db.transaction() as conn:
            rows = await (await conn.execute("SELECT id, slug, name FROM orgs ORDER BY slug")).fetchall()
        return [Org(**r) for r in rows]

    async def resolve_org(self, ref: str) -> Org:
        """An org by slug or id."""
        where, params = _by_ref(ref)
        async with self.db.transaction() as conn:
            cur = await conn.execute(f"SELECT id, slug, name FROM orgs WHERE {where}", params)
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"org {ref!r} not found")
        return Org(**row)

    # --- users and tokens ---------------------------------------------------------------------

    async def ensure_user(self, email: str, name: str = "") -> UUID:
        """The user with this email, created if missing."""
        if not isinstance(email, str) or not EMAIL.fullmatch(email):
            raise InvalidInput("email must look like name@host", pointer="/email")
        async with self.db.transaction() as conn:
            row = await (await conn.execute(
                "INSERT INTO users (email, name) VALUES (%s, %s) ON CONFLICT (lower(email)) "
                "DO UPDATE SET name = users.name RETURNING id", (email, name),
            )).fetchone()
        assert row is not None
        return UUID(str(row["id"]))

    async def user_by_email(self, email: str) -> UUID:
        async with self.db.transaction() as conn:
            row = await (await conn.execute(
                "SELECT id FROM users WHERE lower(email) = lower(%s)", (email,)
            )).fetchone()
        if row is None:
            raise NotFound(f"user {email!r} not found")
        return UUID(str(row["id"]))

    async def set_org_role(self, org_id: UUID, user_id: UUID, role: str) -> None:
        if role not in ORG_ROLES:
            raise InvalidInput(f"org role must be one of {', '.join(ORG_ROLES)}", pointer="/role")
        async with self.db.transaction(org_id) as conn:
            await conn.execute(
                "INSERT INTO org_members (org_id, user_id, role) VALUES (%s, %s, %s) "
                "ON CONFLICT (org_id, user_id) DO UPDATE SET role = EXCLUDED.role",
                (org_id, user_id, role),
            )

    async def change_org_role(self, who: Principal, user_id: UUID, role: str) -> bool:
        """``set_org_role`` as an org member asks it: owners and admins manage members, only an
        owner makes an owner or changes an owner's role, and an org keeps at least one owner.
        True when the user was not a member before."""
        who.require_org_admin()
        if role not in ORG_ROLES:
            raise InvalidInput(f"org role must be one of {', '.join(ORG_ROLES)}", pointer="/role")
        async with self.db.transaction(who.org_id) as conn:
            owners = [r["user_id"] for r in await (await conn.execute(  # locked: two demotions take turns
                "SELECT user_id FROM org_members WHERE org_id = %s AND role = 'owner' FOR UPDATE",
                (who.org_id,))).fetchall()]
            if (role == "owner" or user_id in owners) and who.org_role != "owner":
                raise Forbidden("only an owner may make an owner or change an owner's role")
            if role != "owner" and owners == [user_id]:
                raise Conflict("an org keeps at least one owner: make another owner first")
            row = await (await conn.execute(  # xmax is 0 in a row the INSERT made, not in an updated one
                "INSERT INTO org_members (org_id, user_id, role) VALUES (%s, %s, %s) "
                "ON CONFLICT (org_id, user_id) DO UPDATE SET role = EXCLUDED.role"
                " RETURNING xmax = 0 AS added",
                (who.org_id, user_id, role),
            )).fetchone()
            return bool(row and row["added"])

    async def create_token(self, user_id: UUID, *, name: str = "") -> tuple[UUID, str]:
        """A new API token for the user: (token id, the token). The token is not stored."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        async with self.db.transaction() as conn:
            row = await (await conn.execute(
                "INSERT INTO api_tokens (user_id, token_hash, name) VALUES (%s, %s, %s) RETURNING id",
                (user_id, hash_token(token), name),
            )).fetchone()
        assert row is not None
        return UUID(str(row["id"])), token

    async def revoke_token(self, token_or_id: str) -> bool:
        """Revoke by the token itself or by its id; False if no live token matched."""
        token_id = _parse_uuid(token_or_id)
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE revoked_at IS NULL "
                "AND (token_hash = %s OR id = %s) RETURNING id",
                (hash_token(token_or_id), token_id),
            )
            return bool(await cur.fetchall())

    async def authenticate(self, token: str | None) -> UUID:
        """The user behind a live token, or Unauthorized."""
        token = _check_token_shape(token)
        async with self.db.transaction() as conn:
            row = await (await conn.execute(
                "SELECT user_id FROM api_tokens WHERE token_hash = %s AND revoked_at IS NULL",
                (hash_token(token),),
            )).fetchone()
        if row is None:
            raise Unauthorized("unknown or revoked API token")
        return UUID(str(row["user_id"]))

    async def authorize(self, token: str | None, org_ref: str) -> Principal:
        """``authenticate`` and ``principal`` in one round trip (``auth_principal``, migration
        0017): the caller behind a live token as a member of the org. Unauthorized for a
        missing, unknown or revoked token; NotFound when the org does not exist or the user
        is not a member."""
        row = await self.db.one("SELECT * FROM auth_principal(%s, %s, %s)",
                                (hash_token(_check_token_shape(token)), org_ref, _parse_uuid(org_ref)))
        if row is None:
            raise Unauthorized("unknown or revoked API token")
        if row["role"] is None:
            raise NotFound(f"org {org_ref!r} not found")
        return Principal(org_id=row["org_id"], user_id=row["user_id"], org_role=row["role"])

    async def principal(self, user_id: UUID, org_ref: str) -> Principal:
        """The user as a member of the org, or NotFound: a stranger learns nothing of the org."""
        where, params = _by_ref(org_ref)
        async with self.db.transaction() as conn:
            org = await (await conn.execute(f"SELECT id FROM orgs WHERE {where}", params)).fetchone()
            if org is None:
                raise NotFound(f"org {org_ref!r} not found")
            await _set_org_context(conn, org["id"])
            member = await (await conn.execute(
                "SELECT role FROM org_members WHERE org_id = %s AND user_id = %s",
                (org["id"], user_id),
            )).fetchone()
        if member is None:
            raise NotFound(f"org {org_ref!r} not found")
        return Principal(org_id=org["id"], user_id=user_id, org_role=member["role"])

    # --- projects -----------------------------------------------------------------------------

    async def create_project(self, who: Principal, slug: str, name: str | None = None) -> dict[str, Any]:
        who.require_org_admin()
        check_slug(slug)
        async with self.db.transaction(who.org_id) as conn:
            taken = await conn.execute(
                "SELECT 1 FROM projects WHERE org_id = %s AND slug = %s", (who.org_id, slug)
            )
            if await taken.fetchone():
                raise Conflict(f"project {slug!r} already exists")
            row = await (await conn.execute(
                "INSERT INTO projects (org_id, slug, name, created_by) VALUES (%s, %s, %s, %s) "
                "RETURNING id, slug, name, created_at",
                (who.org_id, slug, name or slug, who.user_id),
            )).fetchone()
        assert row is not None
        return row

    async def resolve_project(self, who: Principal, ref: str, *, write: bool = False) -> UUID:
        """A project id by slug or id, checking the caller may read (or write) it."""
        where, params = _by_ref(ref)
        rows = await self.db.read(  # the project and the caller's role, in one statement
            who.org_id, f"SELECT p.id, {role_in_project('p.org_id', 'p.id')} AS role"
            f" FROM projects p WHERE p.org_id = %s AND {where}", (who.user_id, who.org_id, *params))
        if not rows:
            raise NotFound(f"project {ref!r} not found")
        require_project_role(who, rows[0]["role"], write=write, what=f"project {ref!r}")
        return UUID(str(rows[0]["id"]))

    async def list_projects(self, who: Principal) -> list[dict[str, Any]]:
        async with self.db.transaction(who.org_id) as conn:
            if who.is_org_admin:
                cur = await conn.execute(
                    "SELECT id, slug, name, created_at FROM projects WHERE org_id = %s ORDER BY slug",
                    (who.org_id,),
                )
            else:
                cur = await conn.execute(
                    "SELECT p.id, p.slug, p.name, p.created_at FROM projects p JOIN project_members m"
                    " ON m.org_id = p.org_id AND m.project_id = p.id AND m.user_id = %s"
                    " WHERE p.org_id = %s ORDER BY p.slug",
                    (who.user_id, who.org_id),
                )
            return await cur.fetchall()

    async def set_project_role(
        self, who: Principal, project_id: UUID, user_id: UUID, role: str | None
    ) -> None:
        """Grant ``editor``/``viewer`` on a project (None removes). The user must be an org member."""
        who.require_org_admin()
        if role is not None and role not in PROJECT_ROLES:
            raise InvalidInput(f"project role must be one of {', '.join(PROJECT_ROLES)}",
                               pointer="/role")
        async with self.db.transaction(who.org_id) as conn:
            if role is None:
                await conn.execute(
                    "DELETE FROM project_members WHERE org_id = %s AND project_id = %s AND user_id = %s",
                    (who.org_id, project_id, user_id),
                )
                return
            member = await (await conn.execute(
                "SELECT 1 FROM org_members WHERE org_id = %s AND user_id = %s", (who.org_id, user_id)
            )).fetchone()
            if member is None:
                raise NotFound(NOT_A_MEMBER)
            await conn.execute(
                "INSERT INTO project_members (org_id, project_id, user_id, role) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (org_id, project_id, user_id) "
                "DO UPDATE SET role = EXCLUDED.role",
                (who.org_id, project_id, user_id, role),
            )


async def _set_org_context(conn: Connection, org_id: UUID) -> None:
    await conn.execute("SELECT set_config('canvasdb.org_id', %s, true)", (str(org_id),))


async def project_role(conn: Connection, who: Principal, project_id: UUID) -> str | None:
    """'admin', 'editor', 'viewer' or None: the caller's reach into one project."""
    if who.is_org_admin:
        return "admin"
    row = await (await conn.execute(f"SELECT {role_in_project('%s', '%s')} AS role",
                                    (who.org_id, project_id, who.user_id))).fetchone()
    return None if row is None or row["role"] is None else str(row["role"])


async def check_project_access(
    conn: Connection, who: Principal, project_id: UUID, *, write: bool, what: str = "project"
) -> None:
    """NotFound when the caller cannot read the project, Forbidden when it may only read."""
    role = None if who.is_org_admin else await project_role(conn, who, project_id)
    require_project_role(who, role, write=write, what=what)


def require_project_role(who: Principal, member_role: str | None, *, write: bool, what: str) -> None:
    """Judge access from the caller's project role (``member_role`` matters for members only)."""
    if who.is_org_admin:
        return
    if member_role is None:
        raise NotFound(f"{what} not found")
    if write and member_role == "viewer":
        raise Forbidden(f"a viewer may read this {what} but not change it")
