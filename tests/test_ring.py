"""The seqlock ring on a plain bytearray: the algorithm without shared memory."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

import shmstore
from shmstore import CorruptStoreError, _ring
from shmstore._layout import OFF_HEAD, SLOT_HEADER_SIZE, Geometry
from shmstore._ring import Ring

GEOMETRY = Geometry(slots=4, slot_size=256, registry_capacity=1)


def ring(crc: bool = False) -> Ring:
    return Ring(bytearray(GEOMETRY.total_size), GEOMETRY, crc=crc)


def seq_of(r: Ring, version: int) -> int:
    return int(r.words[GEOMETRY.slot_at(version) // 8])


def test_empty_ring_reads_none() -> None:
    assert ring().read_newest() == (None, 0, 0)


def test_commit_publishes_in_order_and_slots_encode_identity() -> None:
    r = ring()
    for m in range(1, 10):
        assert r.commit(bytes([m]) * m, ts_ns=m * 1000) == m
        assert r.head() == m
        assert seq_of(r, m) == 2 * m
        assert r.read_newest() == (bytes([m]) * m, m, m * 1000)
    assert r.commits() == 9
    assert r.last_update_ns() == 9000
    # versions 6..9 are still in the ring; 5 was overwritten by 9 (same slot)
    assert r.read(6) == (bytes([6]) * 6, 6000)
    assert r.read(5) is None


def test_writer_killed_mid_write_leaves_head_readable() -> None:
    r = ring()
    r.commit(b"committed", ts_ns=1)
    # A writer that died after marking slot 2 odd and scribbling half a payload:
    base = GEOMETRY.slot_at(2)
    r.words[base // 8] = 2 * 2 - 1
    r._buf[base + SLOT_HEADER_SIZE : base + SLOT_HEADER_SIZE + 4] = b"junk"
    assert r.read_newest() == (b"committed", 1, 1)
    # ... and the next writer simply overwrites the odd slot.
    assert r.commit(b"next", ts_ns=2) == 2
    assert r.read_newest() == (b"next", 2, 2)


def test_length_beyond_slot_is_corruption_not_an_allocation() -> None:
    r = ring()
    r.commit(b"x", ts_ns=1)
    base = GEOMETRY.slot_at(1)
    r._i[base // 4 + 2] = 2**32 - 1
    with pytest.raises(CorruptStoreError, match="more than the slot size"):
        r.read_newest()


def test_slot_that_never_matches_head_raises_within_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_ring, "READ_DEADLINE", 0.05)
    r = ring()
    r.commit(b"x", ts_ns=1)
    r.words[GEOMETRY.slot_at(1) // 8] = 12345  # seq names some other message
    with pytest.raises(CorruptStoreError, match="damaged"):
        r.read_newest()


def test_crc_detects_a_changed_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ring, "READ_DEADLINE", 0.05)
    r = ring(crc=True)
    r.commit(b"hello", ts_ns=1)
    assert r.read_newest()[0] == b"hello"
    base = GEOMETRY.slot_at(1) + SLOT_HEADER_SIZE
    r._buf[base] = ord("j")
    with pytest.raises(CorruptStoreError):
        r.read_newest()


def test_head_is_where_the_layout_says() -> None:
    r = ring()
    r.commit(b"a", ts_ns=1)
    r.commit(b"b", ts_ns=1)
    assert int.from_bytes(r._buf[OFF_HEAD : OFF_HEAD + 8], "little") == 2


def test_counters_are_never_stored_with_pack_into() -> None:
    """struct.pack_into zero-fills its target before writing, so a concurrent reader can see a
    transient seq == 0 (even, "stable") and take a torn copy. Nothing in the package may use it."""
    package = Path(shmstore.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Name):
                name = node.id
            if name == "pack_into":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_large_payloads_use_a_per_thread_buffer() -> None:
    geometry = Geometry(slots=2, slot_size=_ring.LARGE_PAYLOAD * 2, registry_capacity=1)
    r = Ring(bytearray(geometry.total_size), geometry, crc=True)
    big = bytes(range(256)) * (_ring.LARGE_PAYLOAD // 256 + 3)
    r.commit(big, ts_ns=1)
    first, version, _ts = r.read_newest()
    assert version == 1
    assert first == big
    assert isinstance(first, memoryview)  # a view of this thread's reusable buffer
    small = b"small"
    r.commit(small, ts_ns=2)
    assert r.read_newest()[0] == small  # small payloads are plain bytes

    seen: list[object] = []
    other = threading.Thread(target=lambda: seen.append(r.read(1)))
    other.start()
    other.join()
    got = seen[0]
    assert isinstance(got, tuple)
    assert got[0] == big
    assert got[0].obj is not first.obj  # each thread copies into its own buffer


# ------------------------------------------------------------------ the one-frame decoded read


def test_decoded_read_refuses_what_the_copying_read_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_ring, "READ_DEADLINE", 0.05)
    r = ring()
    assert r.read_newest_value(bytes, False) == (None, 0)
    r.commit(b"x", ts_ns=1)
    assert r.read_newest_value(bytes, True) == (b"x", 1)
    r._i[GEOMETRY.slot_at(1) // 4 + 2] = 2**32 - 1
    with pytest.raises(CorruptStoreError, match="more than the slot size"):
        r.read_newest_value(bytes, False)
    r.commit(b"y", ts_ns=2)
    r.words[GEOMETRY.slot_at(2) // 8] = 12345
    with pytest.raises(CorruptStoreError, match="damaged"):
        r.read_newest_value(bytes, True)
    c = ring(crc=True)
    c.commit(b"hello", ts_ns=1)
    c._buf[GEOMETRY.slot_at(1) + SLOT_HEADER_SIZE] = ord("j")
    with pytest.raises(CorruptStoreError):
        c.read_newest_value(bytes, False)


def test_in_place_decode_reads_the_mapping_and_a_stable_failure_is_reported() -> None:
    geometry = Geometry(slots=2, slot_size=3 * _ring.IN_PLACE_MIN, registry_capacity=1)
    r = Ring(bytearray(geometry.total_size), geometry, crc=False)
    big = bytes(range(256)) * (2 * _ring.IN_PLACE_MIN // 256)
    r.commit(big, ts_ns=1)
    seen: list[type] = []

    def decode(data: bytes | memoryview) -> bytes:
        seen.append(type(data))
        return bytes(data)

    assert r.read_newest_value(decode, True) == (big, 1)
    assert r.read_newest_value(decode, False) == (big, 1)
    # In place: no copy; otherwise a private copy (bytes of a shared mapping; here a bytearray).
    assert seen == [memoryview, bytearray]

    def broken(data: bytes | memoryview) -> bytes:
        raise UnicodeDecodeError("utf-8", b"", 0, 1, "not msgspec's error")

    with pytest.raises(_ring.DecodeFailed) as failed:
        r.read_newest_value(broken, True)
    assert isinstance(failed.value.cause, UnicodeDecodeError)
    assert failed.value.version == 1


def test_in_place_decode_of_a_torn_buffer_is_thrown_away() -> None:
    geometry = Geometry(slots=2, slot_size=2 * _ring.IN_PLACE_MIN, registry_capacity=1)
    r = Ring(bytearray(geometry.total_size), geometry, crc=False)
    r.commit(b"a" * _ring.IN_PLACE_MIN, ts_ns=1)
    calls = 0

    def racing_decode(data: bytes | memoryview) -> bytes:
        # The writer laps the slot while we decode: what we decoded is garbage, and the
        # seq re-check must throw it away (and retry) instead of returning it.
        nonlocal calls
        calls += 1
        if calls == 1:
            r.commit(b"b" * _ring.IN_PLACE_MIN, ts_ns=2)
            r.commit(b"c" * _ring.IN_PLACE_MIN, ts_ns=3)
            return b"garbage"
        return bytes(data)

    assert r.read_newest_value(racing_decode, True) == (b"c" * _ring.IN_PLACE_MIN, 3)
    assert calls == 2
