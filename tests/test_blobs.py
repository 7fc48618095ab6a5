"""The blob store contract, run against every backend: a local folder, and S3 on a real server.

The S3 backend talks HTTP to moto's S3 server (``ThreadedMotoServer``), started once per
session on a free localhost port: the real boto3 client, no patching. Each test gets a fresh
folder or a fresh key prefix, so it can see everything it stored and nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from canvasdb.blobs import BlobCorrupt, BlobNotFound, BlobStore, FilesystemBlobStore, open_blob_store
from canvasdb.blobs.s3 import S3BlobStore
from canvasdb.blobs.store import CHUNK_SIZE, StoredBlob
from canvasdb.errors import CanvasdbError, InsufficientStorage, InvalidInput, PayloadTooLarge, Unavailable
from canvasdb.settings import Settings

MiB = 1024 * 1024
S3_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
                  "region_name": "us-east-1"}
S3_BUCKET = "canvasdb-test"
# Low multipart settings, so the larger uploads below go up in several parts.
S3_MULTIPART = {"multipart_threshold": 6 * MiB, "multipart_chunksize": 5 * MiB}


# --- the S3 server -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server on a free localhost port, with the test bucket."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, **S3_CREDENTIALS)
    client.create_bucket(Bucket=S3_BUCKET)
    client.close()
    yield url
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Iterator[Any]:
    """A plain boto3 client, to look at and tamper with what the store wrote."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, **S3_CREDENTIALS)
    yield client
    client.close()


def new_s3_store(endpoint: str, **kwargs: Any) -> S3BlobStore:
    return S3BlobStore(S3_BUCKET, endpoint_url=endpoint, access_key_id="testing",
                       secret_access_key="testing", prefix=f"test-{uuid.uuid4().hex[:12]}/",
                       **{**S3_MULTIPART, **kwargs})


# --- one fixture, every backend ----------------------------------------------------------------

@dataclass
class Backend:
    """A store, and a way around it: what is visible in it, and how to damage a blob."""

    name: str
    store: BlobStore
    s3: Any = None

    def visible(self) -> list[str]:
        """Every object or file under the store's root, temporary files included."""
        if isinstance(self.store, FilesystemBlobStore):
            root = self.store.root
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        assert isinstance(self.store, S3BlobStore)
        listing = self.s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=self.store.prefix)
        uploads = self.s3.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=self.store.prefix)
        return sorted([o["Key"] for o in listing.get("Contents", [])]
                      + [f"upload:{u['Key']}" for u in uploads.get("Uploads", [])])

    def place(self, name: str, content: bytes) -> None:
        """Put a file or an object at ``name`` under the store's root, behind the store's back."""
        if isinstance(self.store, FilesystemBlobStore):
            path = self.store.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        else:
            assert isinstance(self.store, S3BlobStore)
            self.s3.put_object(Bucket=S3_BUCKET, Key=self.store.prefix + name, Body=content)

    def reopened(self, **kwargs: Any) -> BlobStore:
        """Another store over the same folder or prefix, with other options."""
        if isinstance(self.store, FilesystemBlobStore):
            return FilesystemBlobStore(self.store.root, **kwargs)
        assert isinstance(self.store, S3BlobStore)
        return S3BlobStore(S3_BUCKET, endpoint_url=self.store.endpoint_url, access_key_id="testing",
                           secret_access_key="testing", prefix=self.store.prefix, **kwargs)

    def overwrite(self, key: str, content: bytes) -> None:
        """Replace a blob's stored bytes behind the store's back."""
        if isinstance(self.store, FilesystemBlobStore):
            self.store.path(key).write_bytes(content)
        else:
            assert isinstance(self.store, S3BlobStore)
            self.s3.put_object(Bucket=S3_BUCKET, Key=self.store.object_name(key), Body=content)

    def flip_byte(self, key: str, at: int) -> None:
        if isinstance(self.store, FilesystemBlobStore):
            with open(self.store.path(key), "r+b") as fh:  # in place, as a disk would
                fh.seek(at)
                byte = fh.read(1)
                fh.seek(at)
                fh.write(bytes([byte[0] ^ 0x01]))
        else:
            assert isinstance(self.store, S3BlobStore)
            name = self.store.object_name(key)
            content = bytearray(self.s3.get_object(Bucket=S3_BUCKET, Key=name)["Body"].read())
            content[at] ^= 0x01
            self.s3.put_object(Bucket=S3_BUCKET, Key=name, Body=bytes(content))


@pytest.fixture(params=["filesystem", "s3"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "filesystem":
        result = Backend("filesystem", FilesystemBlobStore(tmp_path / "blobs"))
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        result = Backend("s3", new_s3_store(endpoint), request.getfixturevalue("s3_client"))
    yield result
    await result.store.close()


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


async def scanned(store: BlobStore) -> list[StoredBlob]:
    return sorted([blob async for blob in store.scan()], key=lambda blob: blob.key)


async def chunked(content: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(content), size):
        yield content[start:start + size]
        await asyncio.sleep(0)


async def failing_after(content: bytes, exc: Exception) -> AsyncIterator[bytes]:
    async for chunk in chunked(content):
        yield chunk
    raise exc


# --- round trips --------------------------------------------------------------------------------

async def test_bytes_round_trip(backend: Backend) -> None:
    content = b"hello, blobs\n"
    info = await backend.store.put(content)
    assert (info.key, info.size) == (sha(content), len(content))
    assert await backend.store.exists(info.key)
    assert await backend.store.get(info.key) == content


async def test_empty_content_round_trip(backend: Backend) -> None:
    info = await backend.store.put(b"")
    assert (info.key, info.size) == (sha(b""), 0)
    assert await backend.store.get(info.key) == b""
    async with await backend.store.open(info.key) as reader:
        assert reader.size == 0
        assert [chunk async for chunk in reader] == []


@pytest.mark.parametrize("size", [5 * MiB + 123, 13 * MiB], ids=["5MiB", "13MiB-multipart"])
async def test_stream_round_trip_in_chunks(backend: Backend, size: int) -> None:
    """A multi-megabyte stream goes in and comes back out in bounded chunks, never whole."""
    content = os.urandom(size)
    info = await backend.store.put(chunked(content))
    assert (info.key, info.size) == (sha(content), size)
    chunks = []
    async with await backend.store.open(info.key) as reader:
        assert reader.size == size
        async for chunk in reader:
            assert 0 < len(chunk) <= CHUNK_SIZE
            chunks.append(chunk)
    assert len(chunks) >= size // CHUNK_SIZE
    assert b"".join(chunks) == content


async def test_memoryview_and_bytearray_sources(backend: Backend) -> None:
    content = os.urandom(3 * MiB)
    a = await backend.store.put(bytearray(content))
    b = await backend.store.put(memoryview(content))
    assert a == b and a.key == sha(content)
    assert await backend.store.get(a.key) == content


async def test_put_of_the_same_content_is_idempotent(backend: Backend) -> None:
    content = os.urandom(2 * MiB + 7)
    first = await backend.store.put(content)
    stored = backend.visible()
    again = await backend.store.put(chunked(content, size=1000))
    concurrently = await asyncio.gather(*(backend.store.put(chunked(content)) for _ in range(4)))
    assert first == again and all(info == first for info in concurrently)
    assert backend.visible() == stored and len(stored) == 1
    assert await backend.store.get(first.key) == content


async def test_a_put_repairs_a_damaged_copy(backend: Backend) -> None:
    content = b"precious" * 1000
    info = await backend.store.put(content)
    backend.flip_byte(info.key, 10)
    with pytest.raises(BlobCorrupt):
        await backend.store.get(info.key)
    await backend.store.put(content)
    assert await backend.store.get(info.key) == content


# --- missing, malformed, deleted ---------------------------------------------------------------

async def test_missing_key(backend: Backend) -> None:
    key = sha(b"never stored " + uuid.uuid4().bytes)
    assert not await backend.store.exists(key)
    with pytest.raises(BlobNotFound) as raised:
        await backend.store.get(key)
    assert raised.value.status == 404
    with pytest.raises(BlobNotFound):
        await backend.store.open(key)


BAD_KEYS = ["", "../etc/passwd", "/etc/passwd", "ab/" + "0" * 61, "A" * 64, "0" * 63, "0" * 65,
            "g" * 64, "0" * 63 + "\n", "0" * 32 + "/" + "0" * 31, "..", "." * 64, "0" * 63 + "\x00"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=range(len(BAD_KEYS)))
async def test_malformed_keys_are_refused_before_any_io(backend: Backend, key: str) -> None:
    for call in (backend.store.get, backend.store.open, backend.store.exists, backend.store.delete):
        with pytest.raises(InvalidInput):
            await call(key)
    assert backend.visible() == []


async def test_delete_is_idempotent(backend: Backend) -> None:
    info = await backend.store.put(b"short-lived")
    await backend.store.delete(info.key)
    assert not await backend.store.exists(info.key)
    with pytest.raises(BlobNotFound):
        await backend.store.get(info.key)
    await backend.store.delete(info.key)  # already gone: no error
    await backend.store.delete(sha(b"never stored"))
    assert backend.visible() == []


async def test_delete_leaves_other_blobs(backend: Backend) -> None:
    keep = await backend.store.put(b"keep")
    drop = await backend.store.put(b"drop")
    await backend.store.delete(drop.key)
    assert await backend.store.get(keep.key) == b"keep"


# --- corruption: a clear error, never wrong bytes ----------------------------------------------

@pytest.mark.parametrize("size", [1000, 3 * MiB + 5], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("damage", ["flip first byte", "flip last byte", "truncate", "extend", "replace"])
async def test_corruption_is_detected_on_read(backend: Backend, size: int, damage: str) -> None:
    content = os.urandom(size)
    info = await backend.store.put(content)
    if damage == "flip first byte":
        backend.flip_byte(info.key, 0)
    elif damage == "flip last byte":
        backend.flip_byte(info.key, size - 1)
    elif damage == "truncate":
        backend.overwrite(info.key, content[:-1])
    elif damage == "extend":
        backend.overwrite(info.key, content + b"\x00")
    else:
        backend.overwrite(info.key, os.urandom(size))
    with pytest.raises(BlobCorrupt) as raised:
        await backend.store.get(info.key)
    assert raised.value.status == 500 and info.key in raised.value.detail
    assert raised.value.fields["hint"]
    # Streaming: whatever arrives before the error is never the whole content.
    received = bytearray()
    with pytest.raises(BlobCorrupt):
        async with await backend.store.open(info.key) as reader:
            async for chunk in reader:
                received += chunk
    assert len(received) < size and bytes(received) != content
    if size <= CHUNK_SIZE:
        assert received == b""  # small content is verified before its first byte is handed out


async def test_a_reader_of_a_file_damaged_while_stored_never_returns_it(backend: Backend) -> None:
    """The held-back last chunk: damage in the final bytes still stops the stream before them."""
    content = os.urandom(2 * CHUNK_SIZE + 10)
    info = await backend.store.put(content)
    backend.flip_byte(info.key, len(content) - 1)
    received = bytearray()
    with pytest.raises(BlobCorrupt):
        async with await backend.store.open(info.key) as reader:
            async for chunk in reader:
                received += chunk
    assert bytes(received) == content[:len(received)] and len(received) <= 2 * CHUNK_SIZE


# --- atomicity: a failed write leaves nothing visible ------------------------------------------

async def test_a_failing_source_leaves_nothing(backend: Backend) -> None:
    content = os.urandom(3 * MiB)
    with pytest.raises(RuntimeError, match="connection lost"):
        await backend.store.put(failing_after(content, RuntimeError("connection lost")))
    assert backend.visible() == []
    assert not await backend.store.exists(sha(content))


async def test_a_failing_source_leaves_an_existing_blob_intact(backend: Backend) -> None:
    content = os.urandom(MiB + 1)
    info = await backend.store.put(content)
    with pytest.raises(RuntimeError):
        await backend.store.put(failing_after(content[:MiB], RuntimeError("cut")))
    assert await backend.store.get(info.key) == content
    assert len(backend.visible()) == 1


async def test_content_over_the_limit_leaves_nothing(backend: Backend) -> None:
    content = os.urandom(2 * MiB + 1)
    for source in (content, chunked(content)):
        with pytest.raises(PayloadTooLarge) as raised:
            await backend.store.put(source, max_bytes=2 * MiB)
        assert raised.value.status == 413 and raised.value.fields["limit"] == 2 * MiB
    assert backend.visible() == []
    at_limit = await backend.store.put(chunked(content[:2 * MiB]), max_bytes=2 * MiB)
    assert at_limit.size == 2 * MiB


async def test_a_cancelled_upload_leaves_nothing(backend: Backend) -> None:
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield os.urandom(MiB)
        started.set()
        await asyncio.sleep(3600)
        yield b"never"

    task = asyncio.create_task(backend.store.put(slow()))
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.visible() == []


# --- listing -------------------------------------------------------------------------------------

async def test_scan_lists_every_blob_with_its_size_and_when_it_was_written(backend: Backend) -> None:
    assert await scanned(backend.store) == []
    before = datetime.now(UTC).replace(microsecond=0)  # S3 gives whole seconds
    contents = [os.urandom(100 + i) for i in range(5)] + [b""]
    for content in contents:
        await backend.store.put(content)
    after = datetime.now(UTC)
    listed = await scanned(backend.store)
    assert [(blob.key, blob.size) for blob in listed] == sorted((sha(c), len(c)) for c in contents)
    assert all(before <= blob.modified <= after for blob in listed), listed
    await backend.store.delete(sha(contents[0]))
    assert sha(contents[0]) not in [blob.key for blob in await scanned(backend.store)]


async def test_scan_skips_what_is_not_a_blob(backend: Backend) -> None:
    info = await backend.store.put(b"a blob")
    other = sha(b"elsewhere")
    for name in ("README", f"{info.key[:2]}/not-a-key", other, f"{info.key[:2]}/{other}",
                 f"{other[:2]}/{other.upper()}", f"tmp/{other}", "tmp/put-x.part", f"{other[:2]}/{other}/x"):
        backend.place(name, b"stray")
    assert [blob.key for blob in await scanned(backend.store)] == [info.key]


async def test_scan_goes_page_by_page(backend: Backend) -> None:
    keys = sorted(f"ab{sha(bytes([i]))[2:]}" for i in range(5)) + [sha(b"another folder")]
    for key in keys:
        backend.place(f"{key[:2]}/{key}", b"x")
    store = backend.reopened(list_page_size=2)
    try:
        assert [blob.key for blob in await scanned(store)] == sorted(keys)
    finally:
        await store.close()


# --- the filesystem backend ---------------------------------------------------------------------

async def test_filesystem_layout_and_permissions(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    info = await store.put(b"layout")
    path = tmp_path / "blobs" / info.key[:2] / info.key
    assert store.path(info.key) == path and path.read_bytes() == b"layout"
    assert path.stat().st_mode & 0o077 == 0  # private to the server's user
    for folder in (tmp_path / "blobs", path.parent, tmp_path / "blobs" / "tmp"):  # their names are hashes
        assert folder.stat().st_mode & 0o077 == 0, (folder, oct(folder.stat().st_mode))
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == sorted([info.key[:2], "tmp"])
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


async def test_filesystem_removes_stale_temporary_files(tmp_path: Path) -> None:
    tmp = tmp_path / "blobs" / "tmp"
    tmp.mkdir(parents=True)
    stale, fresh = tmp / "put-old.part", tmp / "put-new.part"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"another process is writing this")
    os.utime(stale, (1, 1))
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.sweep_every = 0  # (an hour)
    await store.put(b"x")
    assert not stale.exists() and fresh.exists()
    # one left later by a crashed peer, while this store runs on: a later write removes it
    stale.write_bytes(b"left by another process's crash")
    os.utime(stale, (1, 1))
    await store.put(b"y")
    assert not stale.exists() and fresh.exists()


async def test_filesystem_unwritable_folder_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    store = FilesystemBlobStore(blocker / "blobs")
    with pytest.raises(Unavailable) as raised:
        await store.put(b"x")
    assert raised.value.fields["hint"]


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The filesystem store's temporary files are made as usual, but write to ``/dev/full``
    (every write: ENOSPC from the kernel), as on a full disk, which no test can make portably."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    make = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = make(*args, **kwargs)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("size", [100, 3 * MiB])  # failing at the flush (buffered), at the write
async def test_filesystem_full_disk_is_insufficient_storage(tmp_path: Path, full_disk: None, size: int) -> None:
    """A full disk is 507 with a hint, not an OSError (a 500 and its traceback), and leaves nothing."""
    store = FilesystemBlobStore(tmp_path / "blobs")
    for source in (os.urandom(size), chunked(os.urandom(size))):
        with pytest.raises(InsufficientStorage) as raised:
            await store.put(source)
        assert raised.value.status == 507 and "No space left on device" in raised.value.detail
        assert raised.value.fields["hint"] == f"free space under {store.root}"
        assert [p.name for p in store.root.rglob("*")] == ["tmp"]


# --- the S3 backend -----------------------------------------------------------------------------

async def test_s3_layout(s3_endpoint: str, s3_client: Any) -> None:
    store = new_s3_store(s3_endpoint)
    try:
        info = await store.put(b"layout")
        name = f"{store.prefix}{info.key[:2]}/{info.key}"
        assert store.object_name(info.key) == name
        assert s3_client.get_object(Bucket=S3_BUCKET, Key=name)["Body"].read() == b"layout"
    finally:
        await store.close()


async def test_s3_missing_bucket_is_unavailable_with_a_hint(s3_endpoint: str) -> None:
    store = S3BlobStore("no-such-bucket", endpoint_url=s3_endpoint, access_key_id="testing",
                        secret_access_key="testing")
    try:
        for call in (lambda: store.put(b"x"), lambda: scanned(store)):
            with pytest.raises(Unavailable) as raised:
                await call()
            assert "no-such-bucket" in raised.value.fields["hint"]
    finally:
        await store.close()


async def test_s3_unreachable_endpoint_is_unavailable(s3_endpoint: str) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3BlobStore(S3_BUCKET, endpoint_url=f"http://127.0.0.1:{port}", access_key_id="testing",
                        secret_access_key="testing", max_attempts=1, connect_timeout=2)
    try:
        calls = [lambda: store.put(b"x"), lambda: store.exists(sha(b"x")), lambda: store.get(sha(b"x")),
                 lambda: scanned(store)]
        for call in calls:
            with pytest.raises(Unavailable) as raised:
                await call()
            assert raised.value.status == 503 and raised.value.fields["retry"] is True
    finally:
        await store.close()


# --- choosing a backend from the settings --------------------------------------------------------

def test_default_backend_is_a_folder_under_home(tmp_path: Path) -> None:
    store = open_blob_store(Settings(home=tmp_path))
    assert isinstance(store, FilesystemBlobStore) and store.root == tmp_path.resolve() / "blobs"
    store = open_blob_store(Settings(home=tmp_path, blobs_dir=tmp_path / "elsewhere"))
    assert isinstance(store, FilesystemBlobStore) and store.root == tmp_path.resolve() / "elsewhere"


async def test_s3_backend_from_environment(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> None:
    for name, value in {"BLOB_BACKEND": "s3", "S3_ENDPOINT_URL": s3_endpoint, "S3_BUCKET": S3_BUCKET,
                        "S3_ACCESS_KEY_ID": "testing", "S3_SECRET_ACCESS_KEY": "s3cr3t-value",
                        "MAX_ATTACHMENT_BYTES": "1234"}.items():
        monkeypatch.setenv(f"CANVASDB_{name}", value)
    settings = Settings()
    assert settings.max_attachment_bytes == 1234 and settings.s3_region == "us-east-1"
    assert "s3cr3t-value" not in repr(settings)  # the secret stays out of logs
    store = open_blob_store(settings)
    try:
        assert isinstance(store, S3BlobStore)
        info = await store.put(b"configured")
        assert await store.get(info.key) == b"configured"
    finally:
        await store.delete(sha(b"configured"))
        await store.close()


def test_s3_backend_without_a_bucket_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(CanvasdbError, match="CANVASDB_S3_BUCKET") as raised:
        open_blob_store(Settings(home=tmp_path, blob_backend="s3"))
    assert raised.value.fields["hint"]
