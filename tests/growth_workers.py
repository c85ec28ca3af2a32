"""Child-process bodies for the growth tests (spawned: importable by name)."""

from __future__ import annotations

import os
import signal
from multiprocessing.synchronize import Event
from typing import Any

from workers import freeze_at

from shmstore import StateVersionError, Store, _growth

JOIN = 60


def blob(version: int, size: int) -> bytes:
    """A self-checking value: its version, then filler."""
    return version.to_bytes(8, "little") + bytes([version % 251]) * (size - 8)


def check_blob(value: bytes) -> int:
    version = int.from_bytes(value[:8], "little")
    assert value[8:] == bytes([version % 251]) * (len(value) - 8), "torn or mixed value"
    return version


def reader(name: str, opened: Event, go: Event, results: Any) -> None:
    st = Store.open(name, bytes)
    try:
        value = st.get()
        assert value is not None
        opened.set()
        go.wait(JOIN)
        value, version = st.get_with_version()
        assert value is not None
        results.put(("reader", version, len(value), check_blob(value)))
    finally:
        st.close()


def waiter(name: str, after: int, results: Any) -> None:
    st = Store.open(name, bytes)
    try:
        version = st.wait(after, timeout=JOIN, spin=False)
        value = st.get()
        assert value is not None
        results.put(("waiter", version, len(value), check_blob(value)))
    finally:
        st.close()


def subscriber(name: str, until: int, results: Any) -> None:
    st = Store.open(name, bytes)
    seen = []
    try:
        with st.subscribe(after_version=0, timeout=JOIN) as sub:
            for version, value in sub:
                assert check_blob(value) == version
                seen.append((version, len(value)))
                if version >= until:
                    break
        results.put(("subscriber", seen, sub.missed))
    finally:
        st.close()


def second_writer(name: str, opened: Event, go: Event, results: Any) -> None:
    st = Store.open(name, bytes)
    try:
        stale = st.version
        opened.set()
        go.wait(JOIN)
        value, version = st.get_with_version()
        assert value is not None
        try:
            st.set(blob(99, 16), expected_version=stale)
            stale_refused = False
        except StateVersionError:
            stale_refused = True
        new = st.set(blob(version + 1, len(value) + 1000), expected_version=version)
        results.put(("writer", stale_refused, new, st.capacity))
    finally:
        st.close()


def grower_frozen_at(name: str, marker: str, reached: Event) -> None:
    """Commit a value that makes the store grow, freezing inside the move at *marker*."""
    st = Store.open(name, bytes)
    version = st.version
    freeze_at(_growth.grow, marker, reached)
    st.set(blob(version + 1, 3 * st.capacity))


def grower(name: str, started: Event) -> None:
    """Grow the store again and again until killed."""
    st = Store.open(name, bytes)
    started.set()
    size = 1024
    while True:
        version = st.version
        size = size * 2 if size < (2 << 20) else 1024
        st.set(blob(version + 1, size))


def sigstop_self() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)
