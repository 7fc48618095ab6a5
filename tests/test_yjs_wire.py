"""The Yjs wire format as canvasdb reads it, and documents served as stored bytes (never decoded)."""

from __future__ import annotations

import random

import pytest
from conftest import Tenant, loop_turns_during
from pycrdt import Array, Doc, Map, Text, merge_updates

from canvasdb.documents import DocumentStore, yjs
from canvasdb.errors import InvalidInput
from canvasdb.services import Services

VALUES = [1, 2.5, -7, 2**40, "x", "é", None, True, False, {"q": [1, "é", None]}, b"\x00\x01", [1, [2]]]


class Peer:
    """A pycrdt document that records every update it emits."""

    def __init__(self) -> None:
        self.doc = Doc()
        self.out: list[bytes] = []
        self.doc.observe(lambda e: self.out.append(e.update))

    def edit(self, rng: random.Random) -> None:
        m, a, t = (self.doc.get("m", type=Map), self.doc.get("a", type=Array), self.doc.get("t", type=Text))
        with self.doc.transaction():
            for _ in range(rng.randint(1, 3)):
                c = rng.random()
                if c < 0.25:
                    m[rng.choice("abcde")] = rng.choice(VALUES)
                elif c < 0.35:
                    m[rng.choice("xyz")] = Map({"k": rng.choice(VALUES), "t": Text("hi")})
                elif c < 0.45 and len(m):
                    del m[rng.choice(list(m.keys()))]
                elif c < 0.65:
                    a.insert(rng.randint(0, len(a)), rng.choice(VALUES))
                elif c < 0.7 and len(a):
                    del a[rng.randrange(len(a))]
                else:  # (an index inside a surrogate pair would be the test's bug: BMP text only)
                    t.insert(rng.randint(0, len(t)), rng.choice(["ab", "é", "€uro"]))


@pytest.mark.parametrize("seed", range(40))
def test_state_vector_follows_updates_like_a_document(seed: int) -> None:
    """Three peers edit (every kind of content, in transactions of one to three changes);
    the vector kept from their updates' headers alone is what the peers made, and what the
    headers of all their updates merged say."""
    rng = random.Random(seed)
    peers = [Peer() for _ in range(3)]
    clock, seen = {}, []
    for _ in range(40):
        peer = rng.choice(peers)
        peer.edit(rng)
        for update in peer.out:
            seen.append(update)
            assert yjs.advance(clock, update)
        peer.out.clear()
    made = {p.doc.client_id: p.doc.get_state() for p in peers}
    made = {c: yjs.read_state_vector(v)[c] for c, v in made.items() if v != b"\x00"}
    assert clock == made
    assert {c: end for c, start, end in yjs.clock_ranges(merge_updates(*seen)) if start == 0} == clock


def test_an_update_past_a_gap_is_not_claimed() -> None:
    peer = Peer()
    for i in range(3):
        peer.doc.get("m", type=Map)[f"k{i}"] = i
    first, _, third = peer.out
    clock: yjs.StateVector = {}
    assert yjs.advance(clock, first) and yjs.advance(clock, third)
    assert clock == {peer.doc.client_id: 1}, "the third's predecessor is missing"


def test_clocks_past_what_yrs_holds_are_not_claimed() -> None:
    """A GC struct of length 2^62 (accepted by Yrs, which keeps 32 bits of it): a state vector
    that took it at its word would say more than any document holds."""
    huge = bytes([1, 1, 5, 0, 0]) + yjs.write_uint(2**62) + bytes([0])
    clock: yjs.StateVector = {}
    assert yjs.clock_ranges(huge) == [(5, 0, 2**62)]
    assert not yjs.advance(clock, huge) and clock == {}


@pytest.mark.parametrize("where", ["struct", "skip", "origin", "right origin", "parent", "deletion"])
def test_updates_naming_clocks_past_32_bits_are_refused(where: str) -> None:
    """Yrs keeps 32 bits of a clock where JavaScript's Yjs keeps it whole (or throws): stored,
    such an update would make the server's document and its clients' differ. Each place a
    clock is named, one past the last Yrs holds is refused; the last one is not."""
    w = yjs.write_uint

    def update(last: int) -> bytes:  # names clock ``last`` (as an end, an item's clock + 1)
        if where == "struct":  # GC from last - 1, length 1
            return w(1) + w(1) + w(5) + w(last - 1) + bytes([0]) + w(1) + w(0)
        if where == "skip":
            return w(1) + w(2) + w(5) + w(0) + bytes([0]) + w(1) + bytes([10]) + w(last - 1) + w(0)
        if where in ("origin", "right origin"):
            flag = 0x80 if where == "origin" else 0x40
            return w(1) + w(1) + w(5) + w(0) + bytes([flag | 1]) + w(7) + w(last - 1) + w(1) + w(0)
        if where == "parent":  # Deleted content of length 1 under the item (7, last - 1)
            return w(1) + w(1) + w(5) + w(0) + bytes([1]) + w(0) + w(7) + w(last - 1) + w(1) + w(0)
        return w(0) + w(1) + w(5) + w(1) + w(last - 1) + w(1)  # deletes last - 1

    yjs.check_update(update(yjs.MAX_CLOCK))
    assert yjs.highest_clock(update(yjs.MAX_CLOCK)) == yjs.MAX_CLOCK
    for past in (yjs.MAX_CLOCK + 1, 2**53, 2**62):
        with pytest.raises(InvalidInput, match="a clock past 4294967295"):
            yjs.check_update(update(past))


async def test_a_large_update_is_checked_off_the_event_loop_with_the_same_verdicts() -> None:
    """A 1 MB update took 100 ms to check, every other connection of the process waiting."""
    doc = Doc()
    doc["m"] = m = Map()
    with doc.transaction():
        for i in range(20_000):
            m[f"k{i}"] = i
    large = doc.get_update()
    assert len(large) > yjs.CHECK_IN_THREAD_BYTES
    _, turns = await loop_turns_during(yjs.check_update_off_loop(large))
    assert turns > 0, "the loop ran while it was checked"
    assert large[-1] == 0, "no deletions"  # then one: of client 1, clocks MAX_CLOCK and past
    past = large[:-1] + bytes([1, 1, 1]) + yjs.write_uint(yjs.MAX_CLOCK) + yjs.write_uint(2)
    for bad, why in ((large[:-5000], "not a valid Yjs update"), (past, "a clock past")):
        with pytest.raises(InvalidInput, match=why):
            await yjs.check_update_off_loop(bad)


def test_the_author_of_an_update_is_its_one_client() -> None:
    a, b = Peer(), Peer()
    a.doc.get("m", type=Map)["k"] = 1
    b.doc.get("m", type=Map)["j"] = 2
    (edit,), (other,) = a.out, b.out
    assert yjs.author(edit) == a.doc.client_id and yjs.author(other) == b.doc.client_id
    b.doc.apply_update(edit)
    b.out.clear()
    del b.doc.get("m", type=Map)["k"]  # a deletion of a's struct: no struct of b's own
    (deletion,) = b.out
    assert yjs.clock_ranges(deletion) == [] and yjs.author(deletion) is None
    assert yjs.author(merge_updates(edit, other)) is None, "two clients: no single author"
    for bad in (b"", b"\x01", b"\x01\x01", b"\x01\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f"):
        assert yjs.author(bad) is None


def test_state_vector_round_trip_and_bad_bytes() -> None:
    vector = {1: 5, 2**53 - 1: 300, 77: 0}
    assert yjs.read_state_vector(yjs.write_state_vector(vector)) == vector
    assert yjs.write_state_vector({}) == b"\x00"
    for bad in [b"", b"\x02\x01", b"\xff\xff\xff"]:
        with pytest.raises(InvalidInput):
            yjs.read_state_vector(bad)
    assert not yjs.advance({}, b"\x05\x01")  # truncated: unreadable, vector untouched
    for bad in [b"\x01\x00", b"garbage", b"\xff" * 10, DECODES_THEN_PANICS]:
        with pytest.raises(InvalidInput):
            yjs.check_update(bad)
    yjs.check_update(yjs.EMPTY_UPDATE)


# A mutated map update that decodes as a Yjs v1 update but makes Yrs panic once applied
# (found by fuzzing): a check that only decodes would store it, and every later decoding of
# its document would fail.
DECODES_THEN_PANICS = (b"\x01\x02\x91\x8b\xe4\xd2\x96\xbf\xbf\x08\xdd\xae\xba\xb7;'\x01\x01m\x03n40"
                       b"\x01(\x00\x91\x8b\xe4\xd2\x96\xbf\xbf\x08;\x01z\x01|?\x80\x00\x00\x00")


def test_the_panicking_update_decodes() -> None:
    """The sample above is the case the check exists for: decoding alone accepts it."""
    from pycrdt import get_state

    get_state(DECODES_THEN_PANICS)
    with pytest.raises(InvalidInput, match="Yrs refused"):
        yjs.check_update(DECODES_THEN_PANICS)


def test_a_few_bytes_declaring_millions_of_clients_cost_no_memory() -> None:
    """Yrs reserves room for the clients an update declares before reading them: 7 bytes
    declaring 2^28 took 512 MB to refuse, through any gateway connection or HTTP append."""
    import subprocess
    import sys

    script = ("import resource; from canvasdb.documents import yjs\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "for bad in (bytes([0xff, 0xff, 0xff, 0x7f, 1, 1, 0]), bytes([0xff, 0xff, 0xff, 0xff, 0x0f, 1, 1, 0])):\n"
              "    try:\n        yjs.check_update(bad)\n    except Exception as exc:\n        print(exc)\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    *refusals, grown_mib = out.splitlines()
    assert [r.split(":")[0] for r in refusals] == ["not a valid Yjs update"] * 2
    assert int(grown_mib) < 64, f"refusing 7 bytes took {grown_mib} MiB"
    # a real update of many clients (a merge, as an offline client sends it) still passes
    many = merge_updates(*[_one_client_edit(i) for i in range(300)])
    assert many[0] & 0x80, "the test's update declares 128 clients or more"
    yjs.check_update(many)


def _one_client_edit(i: int) -> bytes:
    doc = Doc()
    doc["m"] = m = Map()
    m[f"k{i}"] = i
    return doc.get_update()


async def test_a_new_peer_gets_the_stored_bytes_without_decoding(svc: Services, tenant: Tenant) -> None:
    """After compaction, a new peer is served the snapshot's own bytes and the updates after it
    as they were logged: nothing merged, nothing decoded."""
    await svc.documents.create(tenant.owner, tenant.project_id, "served")
    rng, peer = random.Random(1), Peer()
    for _ in range(30):
        peer.edit(rng)
    for update in peer.out:
        await svc.documents.append(tenant.owner, "served", update)
    await svc.documents.compact(tenant.org_id, "served")
    peer.out.clear()
    for _ in range(5):
        peer.edit(rng)
    tail = list(peer.out)
    for update in tail:
        await svc.documents.append(tenant.owner, "served", update)

    fresh = DocumentStore(svc.db)
    sync = await fresh.sync(tenant.org_id, "served")
    assert sync.updates[1:] == tail and len(sync.updates) == 6
    assert fresh._cache[(tenant.org_id, "served")].doc is None, "serving never decodes"
    assert sync.state_vector == peer.doc.get_state()
    assert sync.seq == 35

    joined = Doc()
    for update in sync.updates:
        joined.apply_update(update)
    assert joined.get("m", type=Map).to_py() == peer.doc.get("m", type=Map).to_py()
    assert str(joined.get("t", type=Text)) == str(peer.doc.get("t", type=Text))

    # A peer that has all but the last two edits gets only what it lacks.
    behind = Doc()
    for update in sync.updates[:-2]:
        behind.apply_update(update)
    missing = (await fresh.sync(tenant.org_id, "served", behind.get_state())).updates
    assert 0 < sum(map(len, missing)) < sum(map(len, tail))
    for update in missing:
        behind.apply_update(update)
    assert behind.get_state() == peer.doc.get_state()
    # Up to date: no structs, only delete sets (a vector does not say which deletions a peer saw).
    current = (await fresh.sync(tenant.org_id, "served", peer.doc.get_state())).updates
    assert not any(yjs.clock_ranges(update) for update in current)


async def test_appends_from_elsewhere_and_legacy_snapshots(svc: Services, tenant: Tenant) -> None:
    """A store that holds a document sees updates another process appended; a snapshot
    written before state vectors were stored still loads."""
    await svc.documents.create(tenant.owner, tenant.project_id, "shared-bytes")
    here, there = DocumentStore(svc.db), DocumentStore(svc.db)
    peer, rng = Peer(), random.Random(2)
    for i in range(10):
        peer.edit(rng)
        store = here if i % 2 else there
        for update in peer.out:
            await store.append(tenant.owner, "shared-bytes", update)
        peer.out.clear()
        assert (await here.sync(tenant.org_id, "shared-bytes")).state_vector == peer.doc.get_state()
    await svc.documents.compact(tenant.org_id, "shared-bytes")
    async with svc.db.transaction(tenant.org_id) as conn:
        await conn.execute("UPDATE doc_snapshots SET state_vector = NULL WHERE org_id = %s AND doc_id = %s",
                           (tenant.org_id, "shared-bytes"))
    sync = await DocumentStore(svc.db).sync(tenant.org_id, "shared-bytes")
    assert sync.state_vector == peer.doc.get_state() and len(sync.updates) == 1


async def test_updates_submitted_without_waiting_keep_the_state_vector(svc: Services, tenant: Tenant) -> None:
    """The gateway's path: updates queued one after another without awaiting each commit
    land in order in one group commit, and the held state vector, read only when a peer
    syncs, counts every one of them (and a later one after it was read)."""
    await svc.documents.create(tenant.owner, tenant.project_id, "queued")
    store, peer, rng = DocumentStore(svc.db), Peer(), random.Random(3)
    for _ in range(40):
        peer.edit(rng)
    futures = [store.submit_checked(tenant.org_id, "queued", u, user_id=tenant.owner.user_id)
               for u in peer.out]
    seqs = [(await f).seq for f in futures]
    assert seqs == list(range(1, len(peer.out) + 1))
    assert (await store.sync(tenant.org_id, "queued")).state_vector == peer.doc.get_state()
    peer.out.clear()
    peer.edit(rng)
    await store.submit_checked(tenant.org_id, "queued", peer.out[0], user_id=tenant.owner.user_id)
    sync = await store.sync(tenant.org_id, "queued")
    assert sync.state_vector == peer.doc.get_state() and sync.seq == len(seqs) + 1
