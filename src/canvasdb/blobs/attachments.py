"""Attachments: an org's named keys (``images/logo.png``) mapped to content in the blob store.

A row in ``attachments`` names the content by its SHA-256; the content itself is shared by
every key, in any org, that holds the same bytes, and is removed when the last row pointing
at it goes. Who may do what: every member of the org reads its attachments; owners and
admins write and delete them.

A committed row always points at content that exists, and content goes when the last row
pointing at it does (``canvasdb.blobs.gc``): a write whose content was collected between
its upload and its row answers 409 (retry: storing is idempotent).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from canvasdb.blobs import gc
from canvasdb.blobs.store import BlobCorrupt, BlobNotFound, BlobReader, BlobStore, Source
from canvasdb.db import Connection, Database
from canvasdb.errors import Conflict, InvalidInput, NotFound
from canvasdb.tenancy import Principal

MAX_KEY_LENGTH = 512
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_KEY = re.compile(r"[A-Za-z0-9._/-]{1,512}")
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_CONTENT_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ -~]*)?")
_COLUMNS = "org_id, key, sha256, size, content_type, created_at, created_by"


@dataclass(frozen=True)
class Attachment:
    org_id: UUID
    key: str
    sha256: str
    size: int
    content_type: str
    created_at: datetime
    created_by: UUID | None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "size": self.size,
                "content_type": self.content_type}


def check_key(key: str) -> str:
    """The key itself, or InvalidInput (pointer ``path:key``): no way to name anything else."""
    if (not isinstance(key, str) or not _KEY.fullmatch(key)
            or any(part in ("", ".", "..") for part in key.split("/"))):
        raise InvalidInput(
            f"an attachment key is 1-{MAX_KEY_LENGTH} characters of A-Z a-z 0-9 . _ - and /, "
            "with no leading, trailing or double '/' and no '.' or '..' segment; "
            f"got {key[:80]!r}" + ("..." if len(key) > 80 else ""),
            pointer="path:key",
        )
    return key


def check_content_type(value: str | None) -> str:
    """A media type such as ``image/png`` or ``text/plain; charset=utf-8``; unset means bytes."""
    if value is None or not value.strip():
        return DEFAULT_CONTENT_TYPE
    value = value.strip()
    if len(value) > 255 or not _CONTENT_TYPE.fullmatch(value):
        raise InvalidInput("Content-Type must be a media type such as 'image/png' (at most 255 "
                           "printable ASCII characters)", pointer="header:content-type")
    return value


class Attachments:
    """The attachments of every org, over one blob store."""

    def __init__(self, db: Database, blobs: BlobStore, *, max_bytes: int = 100 * 1024 * 1024) -> None:
        self.db = db
        self.blobs = blobs
        self.max_bytes = max_bytes

    async def put(self, who: Principal, key: str, source: Source, *, content_type: str | None = None,
                  if_match: set[str] | None = None,
                  if_none_match: set[str] | None = None) -> tuple[Attachment, bool]:
        """Store ``source`` under ``key`` (replacing what was there); True when the key is new.

        Checks the key, the caller's role and the content type before reading ``source``.
        Over ``max_bytes``: PayloadTooLarge, and nothing changes. ``if_match`` / ``if_none_match``
        are the SHA-256 values (or ``*``) of HTTP's preconditions, checked under the row's lock:
        Conflict, and nothing changes, when they do not hold.
        """
        check_key(key)
        who.require_org_admin()
        media_type = check_content_type(content_type)
        info = await self.blobs.put(source, max_bytes=self.max_bytes)
        try:
            attachment, previous = await self._record(who, key, info.key, info.size, media_type,
                                                      if_match=if_match, if_none_match=if_none_match)
        except Exception:
            await self._collect(info.key)  # this content may now be referenced by nothing
            raise
        if previous is not None and previous != info.key:
            await self._collect(previous)
        return attachment, previous is None

    async def _record(self, who: Principal, key: str, sha256: str, size: int, content_type: str, *,
                      if_match: set[str] | None, if_none_match: set[str] | None,
                      ) -> tuple[Attachment, str | None]:
        """Insert or update the row under the content's shared lock; the sha256 it replaced."""
        async with self.db.transaction(who.org_id) as conn:
            await gc.hold(conn, sha256)
            if not await self.blobs.exists(sha256):
                raise Conflict("the content was removed by a concurrent delete while it was being "
                               "stored; send it again", retry=True)
            values = (sha256, size, content_type, who.user_id, who.org_id, key)
            for _ in range(3):
                old = await (await conn.execute(
                    "SELECT sha256 FROM attachments WHERE org_id = %s AND key = %s FOR UPDATE",
                    (who.org_id, key),
                )).fetchone()
                current = None if old is None else str(old["sha256"])
                _check_preconditions(key, current, if_match, if_none_match)
                if old is not None:
                    row = await (await conn.execute(
                        "UPDATE attachments SET sha256 = %s, size = %s, content_type = %s,"
                        " created_by = %s, created_at = now() WHERE org_id = %s AND key = %s"
                        f" RETURNING {_COLUMNS}", values,
                    )).fetchone()
                    assert row is not None
                    return Attachment(**row), str(old["sha256"])
                row = await (await conn.execute(
                    "INSERT INTO attachments (sha256, size, content_type, created_by, org_id, key)"
                    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (org_id, key) DO NOTHING"
                    f" RETURNING {_COLUMNS}", values,
                )).fetchone()
                if row is not None:
                    return Attachment(**row), None
                # A concurrent writer created the key between our SELECT and INSERT: lock it now.
        raise Conflict(f"attachment {key!r} is being written concurrently; try again", retry=True)

    async def get(self, who: Principal, key: str) -> Attachment:
        """The attachment's metadata; NotFound when the org has no such key."""
        check_key(key)
        async with self.db.transaction(who.org_id) as conn:
            found = await _select(conn, who.org_id, key)
        if found is None:
            raise NotFound(f"attachment {key!r} not found")
        return found

    async def open(self, who: Principal, attachment: Attachment) -> tuple[Attachment, BlobReader]:
        """A reader of the attachment's content (close it), and the attachment as it is now.

        The key may have been replaced or deleted since ``attachment`` was read: then the
        current version is opened, or NotFound raised. Content missing under a row that still
        points at it is damage: BlobCorrupt.
        """
        current = attachment
        missing: str | None = None
        for _ in range(3):
            try:
                reader = await self.blobs.open(current.sha256)
            except BlobNotFound:
                # Deleted (and collected) since it was read, or deleted and written again?
                async with self.db.transaction(who.org_id) as conn:
                    now = await _select(conn, who.org_id, current.key)
                if now is None:
                    raise NotFound(f"attachment {current.key!r} not found") from None
                if now.sha256 == current.sha256 == missing:
                    raise BlobCorrupt(
                        f"the content of attachment {current.key!r} (sha256 {current.sha256}) is "
                        "missing from the blob store", sha256=current.sha256,
                        hint="restore the blob store from a backup, or upload the attachment again",
                    ) from None
                missing, current = current.sha256, now
                continue
            if reader.size != current.size:
                await reader.aclose()
                raise BlobCorrupt(f"the content of attachment {current.key!r} holds {reader.size} "
                                  f"bytes, not {current.size}", sha256=current.sha256)
            return current, reader
        raise Conflict(f"attachment {attachment.key!r} is being replaced; try again", retry=True)

    async def delete(self, who: Principal, key: str, *, if_match: set[str] | None = None) -> None:
        """Remove the key; its content goes too if nothing else points at it. NotFound if absent;
        Conflict if ``if_match`` (SHA-256 values, or ``*``) does not hold."""
        check_key(key)
        who.require_org_admin()
        async with self.db.transaction(who.org_id) as conn:
            row = await (await conn.execute(
                "DELETE FROM attachments WHERE org_id = %(org)s AND key = %(key)s AND (%(tags)s::text[]"
                " IS NULL OR sha256 = ANY(%(tags)s) OR '*' = ANY(%(tags)s)) RETURNING sha256",
                {"org": who.org_id, "key": key, "tags": None if if_match is None else sorted(if_match)},
            )).fetchone()
            if row is None:  # absent, or If-Match did not hold: which?
                found = await _select(conn, who.org_id, key)
                if found is None:
                    raise NotFound(f"attachment {key!r} not found")
                _check_preconditions(key, found.sha256, if_match, None)
        await self._collect(str(row["sha256"]))

    async def _collect(self, sha256: str) -> None:
        await gc.collect(self.db, self.blobs, sha256)


def _check_preconditions(key: str, current: str | None, if_match: set[str] | None,
                         if_none_match: set[str] | None) -> None:
    """HTTP's If-Match / If-None-Match against the key's current SHA-256 (None: no such key)."""
    if if_match is not None and (current is None or not ({"*", current} & if_match)):
        raise Conflict(f"attachment {key!r} is not at the version If-Match names", current_etag=current)
    if if_none_match is not None and current is not None and {"*", current} & if_none_match:
        raise Conflict(f"attachment {key!r} exists, and If-None-Match said it must not",
                       current_etag=current)


async def _select(conn: Connection, org_id: UUID, key: str) -> Attachment | None:
    row = await (await conn.execute(
        f"SELECT {_COLUMNS} FROM attachments WHERE org_id = %s AND key = %s", (org_id, key)
    )).fetchone()
    return None if row is None else Attachment(**row)
