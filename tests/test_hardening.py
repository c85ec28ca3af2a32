"""Hostile and unusual conditions: other owners, a full /dev/shm, fork(), fuzzed segments."""

from __future__ import annotations

import enum
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmstore import (
    CorruptStoreError,
    SchemaMismatchError,
    Store,
    StorePermissionError,
    SubscriberLaggedError,
    _provision,
    _ring,
)
from shmstore._names import segment_name

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


class Mood(enum.IntEnum):
    CALM = 1
    EXCITED = 2


class Reading(msgspec.Struct, frozen=True):
    sensor: str
    value: float
    mood: Mood
    samples: list[int]


def shm_path(name: str) -> Path:
    return Path("/dev/shm") / segment_name(name).lstrip("/")


# ---------------------------------------------------------------- ownership


@root_only
def test_segment_of_another_owner_is_refused_unless_allowed(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(5)
        os.chown(shm_path(store_name), 12345, -1)
        with pytest.raises(StorePermissionError, match=r"owned by uid 12345.*allow_other_owner"):
            Store.open(store_name, int)
        with Store.open(store_name, int, allow_other_owner=True) as anyway:
            assert anyway.get() == 5


# ---------------------------------------------------------------- resource limits


SMALL_SHM = """
import sys
from shmstore import StateStoreError, Store
small = Store.create("fits", bytes, slots=2, slot_size=100_000)  # ~200 KB of a 1 MB tmpfs
small.set(b"x" * 90_000)
try:
    Store.create("too-big", bytes, slots=4, slot_size=1_000_000)  # 4 MB
except StateStoreError as exc:
    print("refused:", exc)
    assert small.get() == b"x" * 90_000
    sys.exit(0)
sys.exit("a store larger than /dev/shm was created")
"""


@root_only
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_store_larger_than_a_small_dev_shm_is_a_clear_error() -> None:
    """A private mount namespace with a 1 MB tmpfs on /dev/shm: the real one is untouched."""
    script = f'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -c "$SCRIPT"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env={**os.environ, "SCRIPT": SMALL_SHM},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "Operation not permitted" in result.stderr:
        pytest.skip("this container does not allow mount namespaces")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "do not fit in shared memory" in result.stdout
    assert "No space left on device" in result.stdout


# ---------------------------------------------------------------- fork


def test_forked_child_never_shares_the_parents_writer_lock(
    store_name: str, writer_lock: str
) -> None:
    with Store.create(store_name, int, writer_lock=writer_lock) as st:
        st.set(1)
        st._lock.acquire()  # the parent is inside a commit
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through its exit status
                code = 0 if st._lock.held_elsewhere() else 3
                os._exit(code)
            _, status = os.waitpid(pid, 0)
        finally:
            st._lock.release()
        assert os.waitstatus_to_exitcode(status) == 0, "the child could take the parent's lock"


def test_forked_child_can_use_an_inherited_handle(store_name: str, writer_lock: str) -> None:
    with Store.create(store_name, int, writer_lock=writer_lock) as st:
        st.set(1)
        with pytest.raises(TimeoutError):
            st.wait(1, timeout=0.01)  # the parent is a registered reader
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            try:
                os.close(read_fd)
                ok = st.get() == 1 and st.set(2) == 2
                os.write(write_fd, b"x")  # "committed; now wake me"
                ok = ok and st.wait(2, timeout=10) == 3  # its own registry entry
                os._exit(0 if ok else 3)
            except BaseException:
                os._exit(4)
        os.close(write_fd)
        assert os.read(read_fd, 1) == b"x"
        os.close(read_fd)
        assert st.get_with_version() == (2, 2)
        deadline = time.monotonic() + 30
        while len(st._registry.entries()) < 2:  # parent's entry and the child's
            assert time.monotonic() < deadline
            time.sleep(0.005)
        st.set(3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


# ---------------------------------------------------------------- fuzzed segments


def _fuzz_cases(store_name: str, examples: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ring, "READ_DEADLINE", 0.02)
    monkeypatch.setattr(_provision, "OPEN_WAIT", 0.02)
    writer = Store.create(store_name, Reading, slots=4, slot_size=512, max_readers=4)
    try:
        for i in range(6):
            writer.set(Reading("t1", i / 3, Mood.CALM, list(range(i))))
        pristine = bytes(writer._segment.map)
        size = len(pristine)
        geometry = writer.geometry
        # Structure first: header words and slot headers get plausible little integers (slot
        # counts, lengths, versions) far more often than uniform random bytes would produce.
        fields = [*range(0, 64, 4), 64, 128, 136, 152, 256]
        for version in range(geometry.slots):
            base = geometry.slot_at(version)
            fields += [base, base + 8, base + 12, base + 32]
        offset = st.one_of(st.sampled_from(fields), st.integers(0, 600), st.integers(0, size - 1))
        value = st.one_of(
            st.binary(min_size=1, max_size=8),
            st.integers(0, 2**20).map(lambda n: n.to_bytes(4, "little")),
            st.integers(0, 2**40).map(lambda n: n.to_bytes(8, "little")),
        )
        mutation = st.tuples(offset, value)

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(mutation, min_size=1, max_size=6))
        def case(mutations: list[tuple[int, bytes]]) -> None:
            m = writer._segment.map
            m[:] = pristine
            for offset, data in mutations:
                chunk = data[: size - offset]
                m[offset : offset + len(chunk)] = chunk
            started = time.monotonic()
            try:
                with Store.open(store_name, Reading) as reader:
                    value, version = reader.get_with_version()
                    assert value is None or isinstance(value, Reading)
                    assert isinstance(version, int)
                    sub = reader.subscribe(after_version=0)
                    for _ in range(3):
                        try:
                            item = sub.poll()
                        except CorruptStoreError:
                            break
                        if item is None:
                            break
                        assert isinstance(item[1], Reading)
            except (CorruptStoreError, SchemaMismatchError, SubscriberLaggedError):
                pass  # the documented outcomes; anything else escaping is a finding
            assert time.monotonic() - started < 5, "a damaged segment took too long"

        case()
    finally:
        writer.close()


def test_fuzzed_segments_never_hang_or_crash(
    store_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fuzz_cases(store_name, 500, monkeypatch)


@pytest.mark.slow
def test_fuzzed_segments_long(
    store_name: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    _fuzz_cases(store_name, request.config.getoption("--fuzz-examples"), monkeypatch)
