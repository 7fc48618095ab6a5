"""HTTP routes for attachments: ``PUT/GET/DELETE /v1/orgs/{org}/blobs/{key}``, bodies streamed.

Uploads go from the request straight into the blob store (hashed on the way, never held
whole in memory); downloads stream back out of it, verified while they stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from canvasdb.api.deps import Svc, Who, etags
from canvasdb.blobs import BlobCorrupt
from canvasdb.blobs.attachments import Attachment
from canvasdb.errors import BadRequest, CanvasdbError, PayloadTooLarge

log = logging.getLogger("canvasdb.api")
router = APIRouter(prefix="/v1/orgs/{org}", tags=["attachments"])
# Requests on these paths may carry bodies up to CANVASDB_MAX_ATTACHMENT_BYTES (see create_app).
UPLOAD_PATHS = r"^/v1/orgs/[^/]+/blobs/"
BINARY = {"schema": {"type": "string", "format": "binary"}}


async def _body(request: Request) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length", "")
    received = 0
    try:
        async for chunk in request.stream():
            if chunk:
                received += len(chunk)
                yield chunk
    except ClientDisconnect:
        # Also how BodySizeLimit cuts a body that grew too large: it then answers 413 itself.
        raise BadRequest("the client stopped before the body was complete; nothing was stored") from None
    # The server frames bodies by their Content-Length; should one ever hand over another
    # count, the content is not what the client sent: refuse it rather than store it as whole.
    if declared.isdigit() and int(declared) != received:
        raise BadRequest(f"the body held {received} bytes, not the {int(declared)} its Content-Length "
                         "declared; nothing was stored")


async def _key_as_sent(request: Request, key: Annotated[str, Path(
    description="the attachment's name in the org: 1-512 of A-Z a-z 0-9 . _ - and /, in segments "
                "separated by single '/' (no '.' or '..' segment)", examples=["images/logo.png"],
)]) -> str:  # fmt: skip
    # Starlette's route pattern ends in '$', which also matches before a final line break, and
    # the parameter then silently drops it: put it back, so that the key check refuses it.
    return key + "\n" if request.scope.get("path", "").endswith("\n") else key


Key = Annotated[str, Depends(_key_as_sent)]


def _etag(sha256: str) -> str:
    return f'"{sha256}"'


def _not_modified(attachment: Attachment, if_none_match: str | None) -> Response | None:
    """304 when If-None-Match names the attachment's content (or ``*``), else None."""
    if {"*", attachment.sha256} & (etags(if_none_match) or set()):
        return Response(status_code=304, headers={"ETag": _etag(attachment.sha256)})
    return None


def _content_headers(attachment: Attachment) -> dict[str, str]:
    """What GET and HEAD tell of the content. Ranges are not served (a Range header gets the
    whole content, 200).

    The content is the uploader's, served from the API's origin: a browser must never run it
    nor show it as a page of this origin, whatever its declared type (a navigation downloads
    it, under the key's last segment, whose characters need no quoting; <img> is unaffected).
    """
    filename = attachment.key.rpartition("/")[2]
    return {"Content-Type": attachment.content_type, "Content-Length": str(attachment.size),
            "ETag": _etag(attachment.sha256), "Accept-Ranges": "none",
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}


@router.put("/blobs/{key:path}", status_code=201,
            openapi_extra={"requestBody": {"required": True, "content": {"*/*": BINARY}}},
            responses={200: {"description": "replaced"}, 201: {"description": "created"}})
async def put_attachment(
    org: str, key: Key, request: Request, svc: Svc, who: Who,
    content_type: Annotated[str | None, Header(alias="Content-Type")] = None,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> JSONResponse:  # fmt: skip
    """Store the body under ``key`` (replacing it); its ``Content-Type`` is kept. Owners and admins.
    ``If-Match`` (replace only that content) and ``If-None-Match: *`` (create only): 409 if not."""
    declared = request.headers.get("content-length", "")
    limit = svc.attachments.max_bytes
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the content is over the limit of {limit} bytes", limit=limit)
    attachment, created = await svc.attachments.put(
        who, key, _body(request), content_type=content_type, if_match=etags(if_match),
        if_none_match=etags(if_none_match))
    return JSONResponse(attachment.to_json(), status_code=201 if created else 200,
                        headers={"ETag": _etag(attachment.sha256)})


@router.get("/blobs/{key:path}", response_class=StreamingResponse,
            responses={200: {"content": {"*/*": BINARY}, "description": "the content"},
                       304: {"description": "If-None-Match matched"}})
async def get_attachment(
    org: str, key: Key, svc: Svc, who: Who,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:  # fmt: skip
    """The content, streamed, with its Content-Type, Content-Length and ETag (its SHA-256).

    Verified as it streams: content of up to 1 MiB is checked before the first byte is sent
    (damage answers 500); for larger content the last chunk is withheld unless the whole
    matches, so a client never receives a complete, wrong body (the connection is cut).
    """
    attachment = await svc.attachments.get(who, key)
    if (not_modified := _not_modified(attachment, if_none_match)) is not None:
        return not_modified
    attachment, reader = await svc.attachments.open(who, attachment)
    chunks = aiter(reader)
    try:
        first = await anext(chunks, b"")
    except BlobCorrupt as exc:
        await reader.aclose()
        # The details (where the store keeps it) go to the log, not to the client.
        log.error("GET attachment %r in org %s: %s", key, who.org_id, exc.detail)
        raise BlobCorrupt(f"the stored content of attachment {key!r} is damaged",
                          sha256=attachment.sha256, hint=exc.fields.get("hint")) from None
    except BaseException:
        await reader.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
        except CanvasdbError as exc:
            log.error("GET attachment %r in org %s cut short: %s", key, who.org_id, exc.detail)
            raise
        finally:
            await reader.aclose()

    return StreamingResponse(body(), headers=_content_headers(attachment))


@router.head("/blobs/{key:path}", response_class=Response,
             responses={200: {"description": "the content's headers, no body"},
                        304: {"description": "If-None-Match matched"}})
async def head_attachment(
    org: str, key: Key, svc: Svc, who: Who,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:  # fmt: skip
    """GET's headers without the content, from the attachment's row: the content is neither
    read nor verified (a GET is what finds damage)."""
    attachment = await svc.attachments.get(who, key)
    return _not_modified(attachment, if_none_match) or Response(headers=_content_headers(attachment))


@router.delete("/blobs/{key:path}", status_code=204, response_class=Response)
async def delete_attachment(
    org: str, key: Key, svc: Svc, who: Who,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
) -> Response:  # fmt: skip
    """Remove ``key``; its content goes when no other key, in any org, holds the same bytes.
    With ``If-Match``, only if the key still holds that content (409 if not)."""
    await svc.attachments.delete(who, key, if_match=etags(if_match))
    return Response(status_code=204)
