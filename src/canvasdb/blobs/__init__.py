"""Object storage: content-addressed blobs (a local folder or S3), and org attachments over them."""

from __future__ import annotations

from canvasdb.blobs.attachments import Attachment, Attachments
from canvasdb.blobs.filesystem import FilesystemBlobStore
from canvasdb.blobs.store import BlobCorrupt, BlobInfo, BlobNotFound, BlobReader, BlobStore
from canvasdb.errors import CanvasdbError
from canvasdb.settings import Settings

__all__ = [
    "Attachment", "Attachments", "BlobCorrupt", "BlobInfo", "BlobNotFound", "BlobReader", "BlobStore",
    "FilesystemBlobStore", "open_blob_store",
]  # fmt: skip


def open_blob_store(settings: Settings) -> BlobStore:
    """The store ``CANVASDB_BLOB_BACKEND`` names. Does no I/O: folders are made on first write,
    and an unreachable S3 service or a missing bucket shows on first use (503, with a hint)."""
    if settings.blob_backend == "filesystem":
        return FilesystemBlobStore(settings.blobs_path)
    if not settings.s3_bucket:
        raise CanvasdbError("CANVASDB_BLOB_BACKEND is 's3' but CANVASDB_S3_BUCKET is not set",
                            hint="set CANVASDB_S3_BUCKET (and CANVASDB_S3_ENDPOINT_URL for MinIO)")
    from canvasdb.blobs.s3 import S3BlobStore  # boto3 loads only when it is used

    secret = settings.s3_secret_access_key
    return S3BlobStore(settings.s3_bucket, endpoint_url=settings.s3_endpoint_url,
                       access_key_id=settings.s3_access_key_id,
                       secret_access_key=secret.get_secret_value() if secret else None,
                       region=settings.s3_region)
