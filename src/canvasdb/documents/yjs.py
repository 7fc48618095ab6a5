"""What canvasdb reads of the Yjs v1 wire format without decoding a document.

Decoding a large board into a Yrs document takes about a second and holds the GIL,
so the serving path never does it: a document is served as the bytes it is stored
as (its snapshot and the updates after it). What that path needs to know of those
bytes is read here: state vectors, and which clock ranges an update carries, so a
process can keep a document's state vector current as updates pass through it.
Validation still applies an update to a real (empty) Yrs document.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from pycrdt import Doc, merge_updates
from pycrdt._pycrdt import Doc as _YrsDoc  # the Yrs document under Doc, without its locks (check_update)

from canvasdb.errors import InvalidInput

StateVector = dict[int, int]  # client id -> the next clock expected from that client
MAX_CLOCK = 2**32 - 1  # Yrs keeps clocks as 32-bit numbers

_GC, _SKIP = 0, 10
_DELETED, _JSON, _BINARY, _STRING, _EMBED, _FORMAT, _TYPE, _ANY, _DOC = range(1, 10)
_NAMED_TYPES = (3, 5)  # XmlElement and XmlHook carry a name after their type ref


class Reader:
    """lib0 decoding: varuints, length-prefixed bytes and strings, and skipping values."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        b = self.data[self.pos]  # IndexError at the end: the caller's "not parseable"
        self.pos += 1
        return b

    def uint(self) -> int:
        data, pos = self.data, self.pos  # inlined byte(): every update is read through here
        b = data[pos]
        n, shift = b & 0x7F, 7
        while b >= 0x80:
            pos += 1
            b = data[pos]
            n |= (b & 0x7F) << shift
            shift += 7
            if shift > 77:
                raise ValueError("varuint too long")
        self.pos = pos + 1
        return n

    def skip_varint(self) -> None:
        while self.byte() & 0x80:
            pass

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        self.pos += n

    def chunk(self) -> bytes:
        n = self.uint()
        start = self.pos
        self.skip(n)
        return self.data[start:self.pos]

    def string(self) -> str:
        n = self.uint()
        start = self.pos
        self.skip(n)
        return self.data[start:self.pos].decode("utf-8", "surrogatepass")

    def skip_string(self) -> None:
        self.skip(self.uint())

    def skip_any(self) -> None:
        tag = self.byte()
        if tag in (127, 126, 121, 120):  # undefined, null, false, true
            return
        if tag == 125:
            self.skip_varint()
        elif tag == 124:
            self.skip(4)
        elif tag in (123, 122):
            self.skip(8)
        elif tag in (119, 116):  # string, bytes
            self.skip_string()
        elif tag == 118:
            for _ in range(self.uint()):
                self.skip_string()
                self.skip_any()
        elif tag == 117:
            for _ in range(self.uint()):
                self.skip_any()
        else:
            raise ValueError(f"unknown value tag {tag}")


def _content_length(r: Reader, ref: int) -> int:
    """Skip an item's content; its length in clock ticks."""
    if ref == _DELETED:
        return r.uint()
    if ref == _JSON:
        n = r.uint()
        for _ in range(n):
            r.skip_string()
        return n
    if ref == _STRING:
        return len(r.string().encode("utf-16-le", "surrogatepass")) // 2
    if ref == _ANY:
        n = r.uint()
        for _ in range(n):
            r.skip_any()
        return n
    if ref in (_BINARY, _EMBED):
        r.skip_string()
    elif ref == _FORMAT:
        r.skip_string()
        r.skip_string()
    elif ref == _TYPE:
        if r.uint() in _NAMED_TYPES:
            r.skip_string()
    elif ref == _DOC:
        r.skip_string()
        r.skip_any()
    else:
        raise ValueError(f"unknown content {ref}")
    return 1


def clock_ranges(update: bytes) -> list[tuple[int, int, int]]:
    """The (client, first clock, end clock) ranges of the structs an update carries.

    Raises ValueError when the bytes are not a v1 update this reader understands.
    """
    try:
        return _read_structs(Reader(update))[0]
    except IndexError:
        raise ValueError("truncated update") from None


def highest_clock(update: bytes) -> int:
    """The highest clock an update names (as an end: an item's clock + 1): its structs' ends
    (skipped ranges included), the items they refer to, its deletions' ends. Raises
    ValueError when the bytes cannot be read."""
    r = Reader(update)
    try:
        _, highest = _read_structs(r)
        for _ in range(r.uint()):  # the delete set, after the structs
            r.uint()  # the client
            for _ in range(r.uint()):
                highest = max(highest, r.uint() + r.uint())
    except IndexError:
        raise ValueError("truncated update") from None
    return highest


def _read_structs(r: Reader) -> tuple[list[tuple[int, int, int]], int]:
    """Reads an update's structs: the clock ranges they carry, and the highest clock they name
    (ends and the items they refer to). Leaves ``r`` at the update's delete set."""
    ranges = []
    highest = 0
    for _ in range(r.uint()):
        count, client, clock = r.uint(), r.uint(), r.uint()
        start = clock
        for _ in range(count):
            info = r.byte()
            ref = info & 0x1F
            if ref in (_GC, _SKIP):
                length = r.uint()
                if ref == _SKIP:
                    if clock > start:
                        ranges.append((client, start, clock))
                    start = clock + length
                clock += length
                continue
            if info & 0x80:  # origin: an item's (client, clock)
                r.uint()
                highest = max(highest, r.uint() + 1)
            if info & 0x40:  # right origin
                r.uint()
                highest = max(highest, r.uint() + 1)
            if not info & 0xC0:  # parent: a root type's name or an item's id
                if r.uint() == 1:
                    r.skip_string()
                else:
                    r.uint()
                    highest = max(highest, r.uint() + 1)
                if info & 0x20:
                    r.skip_string()
            clock += _content_length(r, ref)
        if clock > start:
            ranges.append((client, start, clock))
        highest = max(highest, clock)
    return ranges, highest


def author(update: bytes) -> int | None:
    """The Yjs client id whose structs the update carries, when it carries one client's
    only (an edit as a client sends it); None for deletions alone, or a merge of several."""
    # by hand rather than with a Reader: it runs for every update the gateway commits
    if not update or update[0] != 1:  # one client (a varuint of one byte)
        return None
    i, end = 1, len(update)
    while i < end and update[i] & 0x80:  # how many structs: skipped
        i += 1
    client = shift = 0
    for byte in update[i + 1:i + 11]:
        client |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return client if client < 2**63 else None  # stored as a bigint
        shift += 7
    return None


def advance(clock: StateVector, update: bytes) -> bool:
    """Move ``clock`` past what ``update`` carries, as a Yjs document would once it applied it.

    A range that starts beyond what is known (its predecessors not seen yet) is left out,
    so the vector never claims more than is held; claiming less only makes a peer resend.
    Returns False when the update could not be read (the vector is then unchanged).
    """
    try:
        ranges = clock_ranges(update)
    except ValueError:
        return False
    if any(end > MAX_CLOCK for _, _, end in ranges):  # past what Yrs holds (it would truncate)
        return False
    for client, start, end in ranges:
        if start <= clock.get(client, 0) < end:
            clock[client] = end
    return True


def read_state_vector(data: bytes) -> StateVector:
    r = Reader(data)
    try:
        return {r.uint(): r.uint() for _ in range(r.uint())}
    except (IndexError, ValueError):
        raise InvalidInput("not a valid Yjs state vector", pointer="state_vector") from None


def write_uint(n: int) -> bytes:
    """lib0's varuint: 7 bits a byte, least significant first."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def write_state_vector(clock: StateVector) -> bytes:
    return write_uint(len(clock)) + b"".join(write_uint(c) + write_uint(n) for c, n in sorted(clock.items()))


def is_panic(exc: BaseException) -> bool:
    """Yrs reports some bad input by panicking; pycrdt raises that as a BaseException."""
    return type(exc).__name__ == "PanicException"


@contextmanager
def _panics_refused() -> Iterator[None]:
    """A Yrs panic turned into ValueError, like any other refusal of bad bytes."""
    try:
        yield
    except BaseException as exc:
        if is_panic(exc):
            raise ValueError(f"Yrs refused the update: {exc}") from None
        raise


def apply(doc: Doc, update: bytes) -> None:
    """``doc.apply_update``, a Yrs panic raised as ValueError."""
    with _panics_refused():
        doc.apply_update(update)


def check_update(payload: bytes) -> None:
    """Reject bytes that are not a Yjs v1 update, by applying them to an empty document
    (an update whose predecessors it lacks waits there as pending, which is fine).

    Decoding alone (``pycrdt.get_state``) is 18 times faster but lets through updates
    that decode and then make Yrs panic as they are applied (2 in 91,500 mutated
    updates): stored, such an update would break every later decoding of its document.
    The gateway checks every update, so the empty document is pycrdt's Yrs document
    itself: its Python ``Doc`` creates two locks each time, 3 of the 4.4 µs per check.

    Yrs reserves room for as many clients as the update declares before it reads them:
    7 bytes declaring 2^28 clients took 512 MB and a quarter of a second to refuse. A
    client takes at least 3 bytes, so a count past that is refused first, unread.

    Yrs keeps clocks in 32 bits and cuts larger ones short where JavaScript's Yjs keeps them
    (or refuses the update): such an update, stored, would make the server's document
    differ from its clients' (or break them). So the update is read once more here for the
    highest clock it names: 1-2 µs more for an edit as clients send them, about half again
    the Yrs check's time for a large update (50 ms for 1 MB of 60,000 map entries)."""
    if payload and payload[0] & 0x80:  # 128 clients or more
        try:
            declared = Reader(payload).uint()
        except (IndexError, ValueError):
            raise InvalidInput("not a valid Yjs update: truncated", pointer="/body") from None
        if declared > len(payload) // 3:
            raise InvalidInput(f"not a valid Yjs update: {declared} clients declared in {len(payload)} bytes",
                               pointer="/body")
    doc = _YrsDoc(None, True, None)
    txn = doc.create_transaction()
    try:
        with _panics_refused():
            doc.apply_update(txn, payload)
            txn.commit()
    except ValueError as exc:
        raise InvalidInput(f"not a valid Yjs update: {exc}", pointer="/body") from None
    finally:
        txn.drop()
    try:
        highest = highest_clock(payload)
    except ValueError as exc:
        raise InvalidInput(f"not a valid Yjs update: {exc}", pointer="/body") from None
    if highest > MAX_CLOCK:
        raise InvalidInput(f"not a valid Yjs update: a clock past {MAX_CLOCK}", pointer="/body")


CHECK_IN_THREAD_BYTES = 64 * 1024  # larger updates are checked off the event loop


async def check_update_off_loop(payload: bytes) -> None:
    """``check_update``, in a worker thread for a large update: a 1 MB one takes about 100 ms,
    which inline stalled every other connection of the process as long (in a thread, 30-50:
    Yrs holds the GIL while it applies, the clock scan lets go of it every few ms)."""
    if len(payload) > CHECK_IN_THREAD_BYTES:
        await asyncio.to_thread(check_update, payload)
    else:
        check_update(payload)


EMPTY_UPDATE = b"\x00\x00"  # no structs, no deletions
MERGE_CHUNK = 100  # pieces per merge_updates call in merge()


def merge(pieces: list[bytes]) -> bytes:
    """The pieces as one update. ``merge_updates`` grows faster than its argument count (one
    call over 100,000 updates: a minute), so it merges a hundred at a time, then those."""
    while len(pieces) > 1:
        pieces = [merge_updates(*pieces[i:i + MERGE_CHUNK]) for i in range(0, len(pieces), MERGE_CHUNK)]
    return pieces[0] if pieces else EMPTY_UPDATE
