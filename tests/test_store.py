"""The Store API in one process: lifecycle, types, errors, caching, hygiene."""

from __future__ import annotations

import enum
import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

import shmstore
from shmstore import (
    CorruptStoreError,
    InvalidSnapshotError,
    SchemaMismatchError,
    SnapshotTooLargeError,
    StateStoreError,
    StateVersionError,
    Store,
    StoreExistsError,
    StoreNotFoundError,
)
from shmstore._names import reader_semaphore_name, segment_name
from shmstore._ring import Ring


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int
    color: Color = Color.RED


class Other(msgspec.Struct, frozen=True):
    x: int
    label: str


def shm_path(name: str) -> Path:
    return Path("/dev/shm") / segment_name(name).lstrip("/")


def test_create_set_get_round_trip(store_name: str) -> None:
    with Store.create(store_name, Point) as st:
        assert st.get() is None
        assert st.version == 0
        assert st.get_with_version() == (None, 0)
        assert st.set(Point(1, 2)) == 1
        assert st.set(Point(3, 4, Color.GREEN)) == 2
        assert st.get() == Point(3, 4, Color.GREEN)
        assert st.get_with_version() == (Point(3, 4, Color.GREEN), 2)
        with Store.open(store_name, Point) as other:
            assert other.get_with_version() == (Point(3, 4, Color.GREEN), 2)
            other.set(Point(5, 6))
        assert st.get_with_version() == (Point(5, 6), 3)


@pytest.mark.parametrize(
    ("tp", "value"),
    [(int, 42), (str, "hé"), (dict[str, int], {"a": 1}), (list[float], [1.5]), (bytes, b"\0\1")],
)
def test_any_msgspec_type(store_name: str, tp: Any, value: Any) -> None:
    with Store.create(store_name, tp) as st:
        st.set(value)
        with Store.open(store_name, tp) as reader:
            assert reader.get() == value


def test_errors_subclass_stdlib_bases() -> None:
    assert issubclass(StoreNotFoundError, FileNotFoundError)
    assert issubclass(StoreExistsError, FileExistsError)
    assert issubclass(SnapshotTooLargeError, ValueError)
    assert issubclass(InvalidSnapshotError, ValueError)
    for err in (StateVersionError, StoreNotFoundError, SchemaMismatchError, CorruptStoreError):
        assert issubclass(err, StateStoreError)


def test_create_twice_and_open_missing(store_name: str) -> None:
    with pytest.raises(StoreNotFoundError, match="no store named"):
        Store.open(store_name, Point)
    with Store.create(store_name, Point):
        with pytest.raises(StoreExistsError, match="already exists"):
            Store.create(store_name, Point)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("x" * 65, "limit is 64"),
        ("tab\there", "printable"),
        ("nul\0", "printable"),
        ("sp ace", "whitespace"),
    ],
)
def test_bad_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Store.create(name, int)
    with pytest.raises(ValueError, match=why):
        Store.open(name, int)


def test_long_names_fit_macos_limits() -> None:
    name = "é" * 32  # 64 bytes of UTF-8
    assert len(segment_name(name).encode()) <= 31
    assert len(reader_semaphore_name(name, 2**63, 4095, 2**64 - 1).encode()) <= 31
    assert segment_name(name) != segment_name("é" * 31)


def test_schema_mismatch_names_both_types(store_name: str) -> None:
    with Store.create(store_name, Point):
        with pytest.raises(SchemaMismatchError, match=r"test_store:Point.*test_store:Other"):
            Store.open(store_name, Other)


def test_untyped_open_reads_builtins_and_writes_checked_against_the_recorded_type(
    store_name: str,
) -> None:
    with Store.create(store_name, Point) as st:
        st.set(Point(1, 2, Color.GREEN))
        with Store.open(store_name) as raw:
            assert raw.get() == {"x": 1, "y": 2, "color": 2}
            # Refused as the typed set() refuses it (issue 21: the store describes itself).
            with pytest.raises(InvalidSnapshotError, match=r"would not decode as .*Point"):
                raw.set({"x": "not an int"})
            assert st.get_with_version() == (Point(1, 2, Color.GREEN), 1)
            assert raw.set({"x": 3, "y": 4, "color": 1}) == 2
        assert st.get() == Point(3, 4, Color.RED)


def test_untyped_store_is_writable_untyped(store_name: str) -> None:
    with Store.create(store_name) as st, Store.open(store_name) as raw:
        raw.set({"anything": [1, "two"]})
        assert st.get() == {"anything": [1, "two"]}


def test_cached_get_neither_copies_nor_decodes(
    store_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.create(store_name, Point) as writer, Store.open(store_name, Point) as st:
        writer.set(Point(1, 2))
        first = st.get()
        reads: list[int] = []
        real_read = Ring.read_newest_value

        def counting_read(ring: Ring, *args: Any) -> Any:
            value, version = real_read(ring, *args)
            reads.append(version)
            return value, version

        monkeypatch.setattr(Ring, "read_newest_value", counting_read)
        for _ in range(100):
            assert st.get() is first
            assert st.get_with_version()[0] is first
        assert reads == []
        writer.set(Point(3, 4))
        assert st.get() == Point(3, 4)
        assert reads == [2]


def test_oversize_value_is_refused_and_state_kept(
    store_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.create(store_name, bytes, slot_size=100, max_value_size=100) as st:
        st.set(b"good")
        lock_taken: list[int] = []
        lock_class = type(st._lock)
        real_enter = lock_class.__enter__

        def spying_enter(lock: Any) -> None:
            lock_taken.append(1)
            real_enter(lock)

        monkeypatch.setattr(lock_class, "__enter__", spying_enter)
        with pytest.raises(SnapshotTooLargeError, match=r"is 10[0-9] bytes.*at most 100"):
            st.set(b"x" * 100)
        assert lock_taken == []  # checked before taking the lock
        assert st.get_with_version() == (b"good", 1)
        assert st._ring.commits() == 1


def test_value_readers_could_not_decode_is_refused(store_name: str) -> None:
    with Store.create(store_name, Point) as st:
        st.set(Point(1, 1))
        with pytest.raises(InvalidSnapshotError, match="would not decode"):
            st.set(Point(2, 2, color=999))  # type: ignore[arg-type]
        with pytest.raises(InvalidSnapshotError, match="cannot encode"):
            st.set(object())  # type: ignore[arg-type]
        with pytest.raises(InvalidSnapshotError, match="would not decode"):
            st.set(Other(1, "wrong type"))  # type: ignore[arg-type]
        assert st.get_with_version() == (Point(1, 1), 1)
        with Store.open(store_name, Point) as reader:
            assert reader.get() == Point(1, 1)


def test_expected_version_conflict(store_name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="shmstore")
    with Store.create(store_name, int) as st:
        assert st.set(10, expected_version=0) == 1
        with pytest.raises(StateVersionError, match=r"expected version 0.*at version 1") as info:
            st.set(20, expected_version=0)
        assert (info.value.expected, info.value.actual) == (0, 1)
        assert st.get_with_version() == (10, 1)
        assert st._ring.conflicts() == 1
        # The core store stays quiet: the caller decides whether a conflict is worth a line.
        assert caplog.records == []
        assert st.try_set(30, expected_version=0) is None
        assert st._ring.conflicts() == 1  # try_set counts nothing
        assert st.set(20, expected_version=1) == 2
        assert st.try_set(30, expected_version=2) == 3


def test_closed_handle_raises_clear_error_and_close_is_idempotent(store_name: str) -> None:
    st = Store.create(store_name, int)
    st.set(1)
    st.close()
    st.close()
    for call in (st.get, st.get_with_version, lambda: st.version, lambda: st.set(2)):
        with pytest.raises(StateStoreError, match="is closed"):
            call()
    with Store.open(store_name, int) as again:  # close() did not unlink
        assert again.get() == 1


def test_unlink_removes_everything_and_attached_handles_keep_working(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(1)
        assert shm_path(store_name).exists()
        st.unlink()
        assert not any(store_name in p.name for p in Path("/dev/shm").iterdir())
        assert not shm_path(store_name).exists()
        st.set(2)
        assert st.get() == 2
        with pytest.raises(StoreNotFoundError):
            Store.open(store_name, int)


def test_segment_is_private_to_its_owner(store_name: str) -> None:
    old = os.umask(0)  # a permissive umask must not widen the mode
    try:
        with Store.create(store_name, int):
            assert stat.S_IMODE(shm_path(store_name).stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_mode_is_a_create_option(store_name: str) -> None:
    with Store.create(store_name, int, mode=0o640):
        assert stat.S_IMODE(shm_path(store_name).stat().st_mode) == 0o640
    with pytest.raises(ValueError, match="permission bits"):
        Store.create(store_name + "x", int, mode=0o4777)


def test_store_larger_than_shared_memory_is_a_clear_error(store_name: str) -> None:
    free = os.statvfs("/dev/shm")
    too_big = free.f_blocks * free.f_frsize * 2
    slot_size = 2**31 - 1
    slots = too_big // slot_size + 2
    with pytest.raises(StateStoreError, match="do not fit in shared memory"):
        Store.create(store_name, bytes, slots=slots, slot_size=slot_size)
    assert not shm_path(store_name).exists()


def test_exit_without_close_keeps_the_store(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(7)
        code = (
            "import shmstore, warnings; warnings.simplefilter('ignore');"
            f"s = shmstore.Store.open({store_name!r}, int); assert s.get() == 7"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        with Store.open(store_name, int) as again:
            assert again.get() == 7


def test_corrupted_header_is_refused_on_open(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(1)
        st._segment.map[0:8] = b"GARBAGE!"
        with pytest.raises(CorruptStoreError, match="bad magic"):
            Store.open(store_name, int)
        st._segment.map[0:8] = b"SHMSTORE"
        st._segment.map[16:20] = (7_000_000).to_bytes(4, "little")  # slot count
        with pytest.raises(CorruptStoreError):
            Store.open(store_name, int)


def test_zeroed_header_is_refused_within_the_open_wait(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st._segment.map[0:512] = bytes(512)  # looks like a create that never finished
        with pytest.raises(CorruptStoreError, match="bad magic"):
            Store.open(store_name, int)


def test_corrupted_slot_gives_valid_value_or_corrupt_error(store_name: str) -> None:
    with Store.create(store_name, Point, slots=2, slot_size=64) as st:
        st.set(Point(1, 2))
        base = st.geometry.slot_at(1) + 32
        st._segment.map[base : base + 8] = b"\xc1" * 8  # 0xc1 is never valid msgpack
        with Store.open(store_name, Point) as reader:
            with pytest.raises(CorruptStoreError, match="does not decode"):
                reader.get()
        st.set(Point(3, 4))  # a writer repairs the store by committing
        assert st.get() == Point(3, 4)


def test_threads_of_one_handle_never_overlap_in_the_critical_section(
    store_name: str, monkeypatch: pytest.MonkeyPatch, writer_lock: str
) -> None:
    """flock is per open file description, so two threads of one handle would both "hold" it
    (the handle's threading.Lock keeps them apart); the mutex is per thread. The first thread
    parks inside the critical section until the second one either gets in too (a failure) or
    half a second passes with it blocked on the lock."""
    inside = most = 0
    first_in = threading.Event()
    second_in = threading.Event()
    real_commit = Ring.commit

    def watched_commit(ring: Ring, payload: bytes, ts_ns: int) -> int:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        if inside == 2:
            second_in.set()
        if not first_in.is_set():
            first_in.set()
            second_in.wait(0.5)
        try:
            return real_commit(ring, payload, ts_ns)
        finally:
            inside -= 1

    monkeypatch.setattr(Ring, "commit", watched_commit)
    with Store.create(store_name, int, writer_lock=writer_lock) as st:
        first = threading.Thread(target=st.set, args=(1,))
        first.start()
        assert first_in.wait(10)
        second = threading.Thread(target=st.set, args=(2,))
        second.start()
        first.join()
        second.join()
        assert most == 1
        assert not second_in.is_set()
        assert st.get_with_version() == (2, 2)


def test_remove_is_quiet_about_missing_stores(store_name: str) -> None:
    assert shmstore.remove(store_name) is False
    Store.create(store_name, int).close()
    assert shmstore.remove(store_name) is True


def test_writer_lock_kind_is_validated(store_name: str) -> None:
    with pytest.raises(ValueError, match="writer_lock must be"):
        Store.create(store_name, int, writer_lock="spinlock")  # type: ignore[arg-type]
