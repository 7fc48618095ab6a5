"""The blob store contract: content-addressed bytes, written atomically, verified on read.

A blob's key is the SHA-256 of its content, in lowercase hex. Every backend (a local
folder, an S3-compatible service) keeps the same promises, written on ``BlobStore``
below, and one contract test suite runs against each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from canvasdb.errors import CanvasdbError, InvalidInput, NotFound, PayloadTooLarge

CHUNK_SIZE = 1024 * 1024  # read and write granularity: one worker-thread hop per MiB
_KEY = re.compile(r"[0-9a-f]{64}")
_RESTORE = "restore the object from a backup, or store the same content again"

T = TypeVar("T")
Block = bytes | bytearray | memoryview
Source = Block | AsyncIterable[bytes]
"""What ``put`` stores: bytes in memory, or an async stream of byte chunks."""


class BlobNotFound(NotFound):
    """No blob has this key."""

    title = "Blob not found"


class BlobCorrupt(CanvasdbError):
    """The stored bytes do not match their key (or their recorded size). Retrying will not help."""

    status = 500
    title = "Corrupt blob"


@dataclass(frozen=True)
class BlobInfo:
    """What ``put`` stored: the key (SHA-256 of the content, lowercase hex) and the size in bytes."""

    key: str
    size: int


@dataclass(frozen=True)
class StoredBlob:
    """A blob as ``scan`` lists it: its key, its size, and when it was last written (aware)."""

    key: str
    size: int
    modified: datetime


def is_key(name: str) -> bool:
    """Whether ``name`` is a blob key: 64 lowercase hex digits."""
    return isinstance(name, str) and _KEY.fullmatch(name) is not None


def check_key(key: str) -> str:
    """The key itself, or InvalidInput: 64 lowercase hex digits, so never a path of any kind."""
    if not is_key(key):
        raise InvalidInput(f"blob key {str(key)[:80]!r} is not a SHA-256 in lowercase hex")
    return key


class BlobStore(Protocol):
    """Content-addressed storage of immutable byte strings.

    Keys are the SHA-256 of the content (64 lowercase hex digits); anything else is refused
    with InvalidInput before any I/O, so a key can never name a path or an object outside the
    store. Backend faults (S3 unreachable or refusing, a folder that cannot be written) raise
    ``Unavailable`` with a ``hint``; they may be retried. A full disk raises
    ``InsufficientStorage`` (507), with a hint: retrying helps only once space is freed.
    """

    async def put(self, source: Source, *, max_bytes: int | None = None) -> BlobInfo:
        """Store the content of ``source``; return its key and size.

        Idempotent: the same content always gets the same key, and storing it again is
        harmless (a backend may rewrite it, which also repairs a damaged copy).
        Atomic: the content becomes visible under its key only once it is complete and
        durable. A source that raises, a cancelled call, or content over ``max_bytes``
        (PayloadTooLarge, with ``limit``) leaves nothing visible, and nothing behind but
        what a later ``put`` cleans up.
        """
        ...

    async def open(self, key: str) -> BlobReader:
        """The content, as a ``BlobReader`` (chunks, verified while they are read).

        BlobNotFound when no blob has this key. The reader must be closed (``async with``).
        """
        ...

    async def get(self, key: str) -> bytes:
        """The whole content in memory, verified: BlobNotFound when missing, BlobCorrupt
        when the stored bytes do not hash to the key. For small blobs; stream large ones."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether a blob has this key. Does not read or verify the content."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the blob. Idempotent: no error when it is already gone.

        Content is shared by everything that stored the same bytes: callers decide when no
        one needs it any more (see ``canvasdb.blobs.attachments``).
        """
        ...

    def scan(self) -> AsyncIterator[StoredBlob]:
        """Every blob in the store, in no particular order, with when it was last written (a
        ``put`` of content already stored counts as a write).

        Streamed a page (a folder's entries, an S3 listing page) at a time: memory stays
        bounded however many blobs there are. A blob stored or deleted during the scan may
        or may not be listed. Anything in the store that is not a blob is skipped.
        """
        ...

    async def close(self) -> None:
        """Release connections and threads. The store is unusable afterwards."""
        ...


class BlobReader:
    """The content of one blob, chunk by chunk: ``async with reader: async for chunk in reader``.

    ``size`` is the stored size, known before the first chunk. Chunks are hashed as they are
    read, and the last one is held back until the whole content has matched its key and its
    size: a reader of a damaged blob gets BlobCorrupt instead of the last chunk, so it never
    receives a complete, wrong content. A blob of up to ``chunk_size`` bytes is thus entirely
    verified before its first chunk is handed out.
    """

    def __init__(self, key: str, size: int, read: Callable[[int], bytes], close: Callable[[], None],
                 *, chunk_size: int = CHUNK_SIZE, where: str = "") -> None:
        self.key = key
        self.size = size
        self._read = read
        self._close = close
        self._chunk_size = chunk_size
        self._where = where or key
        self._iterating = False
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._iterating:
            raise RuntimeError("a BlobReader can be read only once")
        self._iterating = True
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        seen = 0
        held: bytes | None = None

        def step() -> bytes:
            # Read and hash in the worker thread: hashlib releases the GIL on large buffers.
            chunk = self._read(self._chunk_size)
            digest.update(chunk)
            return chunk

        while chunk := await asyncio.to_thread(step):
            seen += len(chunk)
            if seen > self.size:
                raise BlobCorrupt(f"blob {self._where} holds more than its {self.size} bytes",
                                  key=self.key, hint=_RESTORE)
            if held is not None:
                yield held
            held = chunk
        if seen != self.size:
            raise BlobCorrupt(f"blob {self._where} ended after {seen} of its {self.size} bytes",
                              key=self.key, hint=_RESTORE)
        if digest.hexdigest() != self.key:
            raise BlobCorrupt(
                f"blob {self._where} is damaged: its {seen} bytes hash to {digest.hexdigest()}, "
                "not to its key", key=self.key, hint=_RESTORE,
            )
        if held is not None:
            yield held

    async def read(self) -> bytes:
        """All of the content, verified; closes the reader."""
        async with self:
            return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()  # quick (a file or a pooled connection), and must run even when cancelled

    async def __aenter__(self) -> BlobReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def stream_pages(pages: Generator[list[T], None, None]) -> AsyncIterator[T]:
    """The items of a blocking generator of pages, each page made in a worker thread (one at
    a time); the generator is closed with the stream, so it lets go of what it holds."""
    with contextlib.closing(pages):
        while (page := await asyncio.to_thread(next, pages, None)) is not None:
            for item in page:
                yield item


async def consume(source: Source, write: Callable[[Block], object], *,
                  max_bytes: int | None = None) -> BlobInfo:
    """Feed ``source`` to ``write`` while hashing it; return its key and size.

    ``write`` runs in a worker thread, on blocks of about ``CHUNK_SIZE`` bytes (never
    concurrently with itself). Over ``max_bytes``, PayloadTooLarge is raised as soon as the
    total passes the limit, before anything more is written.
    """
    digest = hashlib.sha256()

    def step(block: Block) -> None:
        digest.update(block)
        write(block)

    def too_large() -> PayloadTooLarge:
        return PayloadTooLarge(f"the content is over the limit of {max_bytes} bytes", limit=max_bytes)

    if isinstance(source, Block):
        size = memoryview(source).nbytes
        if max_bytes is not None and size > max_bytes:
            raise too_large()
        for start in range(0, size, 8 * CHUNK_SIZE):
            await asyncio.to_thread(step, memoryview(source)[start:start + 8 * CHUNK_SIZE])
        return BlobInfo(digest.hexdigest(), size)
    size = 0
    buffer = bytearray()
    async for chunk in source:
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise too_large()
        buffer += chunk
        if len(buffer) >= CHUNK_SIZE:
            block, buffer = buffer, bytearray()
            await asyncio.to_thread(step, block)
    if buffer:
        await asyncio.to_thread(step, buffer)
    return BlobInfo(digest.hexdigest(), size)
