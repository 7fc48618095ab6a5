"""Blobs as objects in a bucket of any S3-compatible service (MinIO, AWS S3, ...).

Object names are ``<prefix><first 2 hex digits>/<sha256>``. The key is the hash of the
content, so a streamed upload is first spooled (in memory up to ``spool_bytes``, then in
a temporary file) while it is hashed, then sent under its final name: by one PUT, or as a
multipart upload above ``multipart_threshold``. S3 makes an object visible only when its
PUT or its multipart upload completes, and boto3 aborts a multipart upload that fails, so a
failed write leaves nothing visible. boto3 blocks: every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import IO, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError

from canvasdb.blobs.store import (
    CHUNK_SIZE,
    BlobCorrupt,
    BlobInfo,
    BlobNotFound,
    BlobReader,
    Source,
    StoredBlob,
    check_key,
    consume,
    is_key,
    stream_pages,
)
from canvasdb.errors import CanvasdbError, Unavailable

_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3BlobStore:
    """A ``BlobStore`` in an S3 bucket, which must exist."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        prefix: str = "",
        chunk_size: int = CHUNK_SIZE,
        spool_bytes: int = 8 * 1024 * 1024,
        spool_dir: Path | None = None,
        multipart_threshold: int = 64 * 1024 * 1024,
        multipart_chunksize: int = 16 * 1024 * 1024,
        list_page_size: int = 1000,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self._chunk_size = chunk_size
        self._spool_bytes = spool_bytes
        self._spool_dir = spool_dir
        self._list_page_size = list_page_size  # objects per ListObjectsV2 request (1,000 at most)
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                        multipart_chunksize=multipart_chunksize)
        # Credentials left unset fall back to boto3's own chain (AWS_* variables, profiles, roles).
        session = boto3.session.Session(aws_access_key_id=access_key_id,
                                        aws_secret_access_key=secret_access_key, region_name=region)
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=Config(
            signature_version="s3v4",
            # MinIO and most S3-compatible servers want path-style URLs (no bucket in the host name).
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
        ))  # fmt: skip

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix}{where})"

    def object_name(self, key: str) -> str:
        return f"{self.prefix}{check_key(key)[:2]}/{key}"

    async def put(self, source: Source, *, max_bytes: int | None = None) -> BlobInfo:
        # Closed without a thread hop on the way out, so that it happens even during cancellation.
        with tempfile.SpooledTemporaryFile(max_size=self._spool_bytes, dir=self._spool_dir) as spool:
            info = await consume(source, spool.write, max_bytes=max_bytes)
            await asyncio.to_thread(self._upload, spool, self.object_name(info.key))
        return info

    def _upload(self, spool: IO[bytes], name: str) -> None:
        spool.seek(0)
        try:
            self._client.upload_fileobj(spool, self.bucket, name, Config=self._transfer,
                                        ExtraArgs={"ContentType": "application/octet-stream"})
        except (BotoCoreError, ClientError) as exc:
            raise self._error("upload", name, exc) from exc

    async def open(self, key: str) -> BlobReader:
        name = self.object_name(key)
        try:
            response = await asyncio.to_thread(self._client.get_object, Bucket=self.bucket, Key=name)
        except (BotoCoreError, ClientError) as exc:
            if _is_missing(exc):
                raise BlobNotFound(f"blob {key} not found") from None
            raise self._error("read", name, exc) from exc
        body = response["Body"]

        def read(n: int) -> bytes:
            try:
                return body.read(n) or b""
            except (BotoCoreError, ClientError) as exc:
                raise self._error("read", name, exc) from exc

        return BlobReader(key, int(response["ContentLength"]), read, body.close,
                          chunk_size=self._chunk_size, where=f"s3://{self.bucket}/{name}")

    async def get(self, key: str) -> bytes:
        return await (await self.open(key)).read()

    async def exists(self, key: str) -> bool:
        name = self.object_name(key)
        try:
            await asyncio.to_thread(self._client.head_object, Bucket=self.bucket, Key=name)
        except (BotoCoreError, ClientError) as exc:
            if _is_missing(exc):
                return False
            raise self._error("check", name, exc) from exc
        return True

    async def delete(self, key: str) -> None:
        name = self.object_name(key)
        try:
            # S3 answers 204 whether or not the object existed: idempotent as it is.
            await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=name)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("delete", name, exc) from exc

    def scan(self) -> AsyncIterator[StoredBlob]:
        return stream_pages(self._scanned())

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    def _scanned(self) -> Generator[list[StoredBlob], None, None]:
        """The blobs under the prefix, a ListObjectsV2 page at a time."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": self._list_page_size})
        try:
            for page in pages:
                yield [StoredBlob(key, int(item["Size"]), item["LastModified"])
                       for item in page.get("Contents", [])
                       if (key := self._key_of(item["Key"])) is not None]
        except (BotoCoreError, ClientError) as exc:
            raise self._error("list", self.prefix, exc) from exc

    def _key_of(self, name: str) -> str | None:
        """The key an object name stands for (``object_name``'s inverse); None for other objects."""
        key = name.rpartition("/")[2]
        return key if is_key(key) and name == f"{self.prefix}{key[:2]}/{key}" else None

    def _error(self, op: str, name: str, exc: BotoCoreError | ClientError) -> CanvasdbError:
        where = f"s3://{self.bucket}/{name}"
        if isinstance(exc, FlexibleChecksumError):
            return BlobCorrupt(f"blob {where} failed the service's own checksum: {exc}",
                               hint="restore the object from a backup, or store the content again")
        code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
        hints = {
            "NoSuchBucket": f"create the bucket {self.bucket!r}, or set CANVASDB_S3_BUCKET",
            "AccessDenied": "check CANVASDB_S3_ACCESS_KEY_ID / CANVASDB_S3_SECRET_ACCESS_KEY and the "
                            "bucket's policy",
            "InvalidAccessKeyId": "check CANVASDB_S3_ACCESS_KEY_ID",
            "SignatureDoesNotMatch": "check CANVASDB_S3_SECRET_ACCESS_KEY and CANVASDB_S3_REGION",
        }
        reachable = f"check that {self.endpoint_url or 'S3'} is reachable (CANVASDB_S3_ENDPOINT_URL)"
        hint = hints.get(code, reachable)
        return Unavailable(f"blob store: cannot {op} {where}: {exc}", hint=hint, retry=code not in hints)


def _is_missing(exc: BotoCoreError | ClientError) -> bool:
    if not isinstance(exc, ClientError):
        return False
    error = exc.response.get("Error", {})
    return str(error.get("Code", "")) in _MISSING
