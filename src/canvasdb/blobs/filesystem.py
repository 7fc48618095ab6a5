"""Blobs as files in a local folder: ``<root>/<first 2 hex digits>/<sha256>``.

A write goes to a temporary file in ``<root>/tmp/`` (the same file system as the blobs,
so the final rename is atomic), is fsynced, then renamed into place with ``os.replace``
and the folder fsynced: a blob is either absent or complete, even across a crash. The key
is hashed while the content streams in, which is why the temporary file cannot already sit
in its final folder. Temporary files a crash left behind (of this process or another one
on the same folder) are removed once they are a day old, by a write at most every hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Generator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from canvasdb.blobs.store import (
    CHUNK_SIZE,
    BlobInfo,
    BlobNotFound,
    BlobReader,
    Block,
    Source,
    StoredBlob,
    check_key,
    consume,
    is_key,
    stream_pages,
)
from canvasdb.errors import InsufficientStorage, Unavailable

_TMP = "tmp"
_STALE_TMP_SECONDS = 24 * 3600
_SWEEP_EVERY_S = 3600.0  # how often a store's writes look for them
_FULL = (errno.ENOSPC, errno.EDQUOT)  # no room left: 507, not 503
_FOLDER = re.compile(r"[0-9a-f]{2}")  # a blob's folder: its key's first two hex digits


class FilesystemBlobStore:
    """A ``BlobStore`` in a local folder (created on first write)."""

    def __init__(self, root: Path | str, *, chunk_size: int = CHUNK_SIZE, list_page_size: int = 1000) -> None:
        self.root = Path(root).expanduser().resolve()
        self._chunk_size = chunk_size
        self._list_page_size = list_page_size  # blobs ``scan`` lists per worker-thread hop
        self._prepared = False
        self.sweep_every = _SWEEP_EVERY_S
        self._next_sweep = 0.0  # (monotonic) when a write next looks for stale temporary files

    def __repr__(self) -> str:
        return f"FilesystemBlobStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """Where the blob with this key lives (whether or not it exists)."""
        path = self.root / check_key(key)[:2] / key
        # Unreachable with a checked key; kept so that no later change can escape the root.
        if path.parent.parent != self.root:
            raise Unavailable(f"blob path {path} is outside {self.root}")
        return path

    async def put(self, source: Source, *, max_bytes: int | None = None) -> BlobInfo:
        tmp, fh = await asyncio.to_thread(self._new_tmp)

        def write(block: Block) -> None:
            try:
                fh.write(block)
            except OSError as exc:
                raise self._failed("write", tmp, exc) from exc

        try:
            info = await consume(source, write, max_bytes=max_bytes)
            await asyncio.to_thread(self._sync_file, fh)
            await asyncio.to_thread(self._install, tmp, self.path(info.key))
        except BaseException:
            with contextlib.suppress(OSError):  # after a failed write, the close fails too (its
                fh.close()  # flush of what is still buffered): not the error to report
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return info

    async def open(self, key: str) -> BlobReader:
        path = self.path(key)
        try:
            fh = await asyncio.to_thread(open, path, "rb", buffering=0)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} not found") from None
        except OSError as exc:
            raise self._failed("read", path, exc) from exc
        try:
            size = os.fstat(fh.fileno()).st_size
        except OSError as exc:
            fh.close()
            raise self._failed("read", path, exc) from exc

        def read(n: int) -> bytes:
            try:
                return fh.read(n) or b""
            except OSError as exc:
                raise self._failed("read", path, exc) from exc

        return BlobReader(key, size, read, fh.close, chunk_size=self._chunk_size, where=str(path))

    async def get(self, key: str) -> bytes:
        return await (await self.open(key)).read()

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path(key).is_file)

    async def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            raise self._failed("delete", path, exc) from exc

    def scan(self) -> AsyncIterator[StoredBlob]:
        return stream_pages(self._scanned())

    async def close(self) -> None:
        pass

    # --- in worker threads ----------------------------------------------------------------------

    def _new_tmp(self) -> tuple[Path, BinaryIO]:
        tmp_dir = self.root / _TMP
        try:
            if not self._prepared:
                # folders for this user alone: listed, the names are the contents' hashes,
                # which tell whether a known file is stored
                self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
                tmp_dir.mkdir(mode=0o700, exist_ok=True)
                self._prepared = True
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self.sweep_every
                self._remove_stale(tmp_dir)
            fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="put-", suffix=".part")
        except OSError as exc:
            raise self._failed("write", tmp_dir, exc) from exc
        return Path(name), os.fdopen(fd, "wb")

    def _remove_stale(self, tmp_dir: Path) -> None:
        # Another process may be writing to a recent one: only old files are left-overs.
        cutoff = time.time() - _STALE_TMP_SECONDS
        for entry in tmp_dir.glob("put-*.part"):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()

    def _scanned(self) -> Generator[list[StoredBlob], None, None]:
        """The blobs, a page at a time: the two-digit folders in order, each read as it goes."""
        try:
            folders = sorted(name for name in os.listdir(self.root) if _FOLDER.fullmatch(name))
        except FileNotFoundError:  # nothing was ever written
            return
        except OSError as exc:
            raise self._failed("list", self.root, exc) from exc
        for folder in folders:
            path = self.root / folder
            page: list[StoredBlob] = []
            try:
                with os.scandir(path) as entries:
                    for entry in entries:
                        if not (is_key(entry.name) and entry.name.startswith(folder)):
                            continue
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:  # deleted since the folder was read
                            continue
                        if stat.S_ISREG(info.st_mode):
                            page.append(StoredBlob(entry.name, info.st_size,
                                                   datetime.fromtimestamp(info.st_mtime, UTC)))
                        if len(page) >= self._list_page_size:
                            yield page
                            page = []
            except OSError as exc:
                raise self._failed("list", path, exc) from exc
            if page:
                yield page

    def _sync_file(self, fh: BinaryIO) -> None:
        """Flush, fsync and close the temporary file."""
        try:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        except OSError as exc:
            raise self._failed("write", self.root / _TMP, exc) from exc

    def _install(self, tmp: Path, final: Path) -> None:
        try:
            created = not final.parent.is_dir()
            final.parent.mkdir(mode=0o700, exist_ok=True)
            # Same content under the same name: replacing is harmless, and repairs a damaged copy.
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            if created:
                _fsync_dir(self.root)
        except OSError as exc:
            raise self._failed("write", final, exc) from exc

    def _failed(self, op: str, path: Path, exc: OSError) -> InsufficientStorage | Unavailable:
        """The OS error as the API's: a full disk or quota is 507, anything else 503."""
        detail = f"blob store: cannot {op} {path}: {exc.strerror or exc}"
        if exc.errno in _FULL:
            return InsufficientStorage(detail, hint=f"free space under {self.root}")
        return Unavailable(detail, hint=f"check that {self.root} exists, is writable and has free space",
                           retry=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
