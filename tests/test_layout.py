"""The binary layout: offsets, sizes and header validation, on plain buffers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmstore import CorruptStoreError
from shmstore import _layout as L


def test_live_words_are_aligned_and_head_has_its_own_cache_line() -> None:
    for off in (L.OFF_HEAD, L.OFF_BASE_VERSION, L.OFF_CONFLICTS, L.OFF_REG_HIGH):
        assert off % 8 == 0
    assert L.OFF_HEAD % L.CACHE_LINE == 0
    assert L.OFF_BASE_VERSION >= L.OFF_HEAD + L.CACHE_LINE
    assert L.HEADER.size <= L.OFF_HEAD
    assert L.OFF_STORE_NAME + L.NAME_FIELD <= L.HEADER_SIZE


def test_geometry_offsets() -> None:
    g = L.Geometry(slots=8, slot_size=100, registry_capacity=64)
    assert g.registry_at == 512
    assert g.slots_at == 512 + 64 * 32
    assert g.stride == 192  # 32-byte slot header + 100, rounded up to 64
    assert g.slot_at(0) == g.slots_at
    assert g.slot_at(9) == g.slots_at + g.stride  # message 9 lives in slot 9 % 8
    assert g.total_size % L.PAGE == 0
    assert g.total_size >= g.slots_at + 8 * g.stride
    for v in range(20):
        assert g.slot_at(v) % L.CACHE_LINE == 0


@pytest.mark.parametrize(
    ("slots", "slot_size", "registry"),
    [(1, 10, 1), (0, 10, 1), (2, 0, 1), (2, 10, 0), (L.MAX_SLOTS + 1, 10, 1), (2, 2**31, 1)],
)
def test_impossible_geometry_is_refused(slots: int, slot_size: int, registry: int) -> None:
    with pytest.raises(ValueError, match="must be between"):
        L.Geometry(slots, slot_size, registry)


def _segment(geometry: L.Geometry) -> bytearray:
    buf = bytearray(geometry.total_size)
    header = L.pack_header(geometry, 0, 123, b"f" * 16, magic=L.MAGIC)
    buf[: len(header)] = header
    buf[L.OFF_STORE_NAME : L.OFF_STORE_NAME + 64] = L.name_field("store")
    return buf


@given(
    slots=st.integers(2, 64),
    slot_size=st.integers(1, 1 << 16),
    registry=st.integers(1, 128),
)
def test_header_round_trip(slots: int, slot_size: int, registry: int) -> None:
    g = L.Geometry(slots, slot_size, registry)
    info = L.read_header(_segment(g), g.total_size)
    assert info.geometry == g
    assert info.created_ns == 123
    assert info.fingerprint == b"f" * 16
    assert info.store_name == "store"


def test_header_validation_names_the_problem() -> None:
    g = L.Geometry(4, 1000, 4)
    good = _segment(g)
    with pytest.raises(CorruptStoreError, match="smaller than a store header"):
        L.read_header(good, 100)
    bad = bytearray(good)
    bad[0:8] = b"NOTASTOR"
    with pytest.raises(CorruptStoreError, match="bad magic"):
        L.read_header(bad, g.total_size)
    bad = bytearray(good)
    bad[8] = 99
    with pytest.raises(CorruptStoreError, match="layout version 99"):
        L.read_header(bad, g.total_size)
    with pytest.raises(CorruptStoreError, match="segment has"):
        L.read_header(good, g.total_size - L.PAGE)
    bad = bytearray(good)
    bad[16:20] = (1).to_bytes(4, "little")  # one slot
    with pytest.raises(CorruptStoreError, match="impossible geometry"):
        L.read_header(bad, g.total_size)


def test_name_field_cuts_at_character_boundary() -> None:
    field = L.name_field("é" * 40)  # 80 bytes of UTF-8
    assert len(field) == 64
    assert field.rstrip(b"\0").decode("utf-8") == "é" * 32


def test_the_schema_generation_word_is_aligned_and_rarely_written_next_to_head() -> None:
    # Written only by an evolution (like the exclusive-writer pid at 72), read by every commit:
    # on HEAD's cache line the commit's extra load costs no extra line.
    assert L.OFF_SCHEMA % 8 == 0
    assert L.OFF_HEAD < L.OFF_SCHEMA < L.OFF_HEAD + L.CACHE_LINE
    assert L.OFF_SCHEMA not in (L.OFF_EXCLUSIVE, L.OFF_HEAD)
    assert L.W_SCHEMA * 8 == L.OFF_SCHEMA
