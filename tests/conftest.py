"""Shared fixtures: unique store names that are always removed, and a /dev/shm leak check.

/dev/shm is shared: other programs, and other copies of this suite, create and remove stores
while we run. So the leak check counts only what *this run* created: every store name the tests
make starts with ``RUN_PREFIX`` (take names from the ``store_name`` fixture, or derive them from
one), and a segment is attributed by the store name in its header. A semaphore whose segment is
gone is attributed by the hash of the names this run handed out.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmstore
from shmstore._layout import HEADER_SIZE, MAGIC, NAME_FIELD, OFF_STORE_NAME
from shmstore._names import OS_PREFIX, segment_name
from shmstore._writelock import robust_mutex_supported

# Tests send Ctrl-C (SIGINT) to the processes they start and expect KeyboardInterrupt there. A
# suite started as a background job of a non-interactive shell inherits SIGINT *ignored*, Python
# then installs no handler, and children exec'd from it inherit the ignoring: their Ctrl-C does
# nothing (seen: `watch` ran on until its store went away; an interrupt never landed in set()).
# Restore the default so that every child starts with Python's own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHM = Path("/dev/shm")
# Unique per run (pid + random): two copies of the suite never share a store name.
RUN_PREFIX = f"t{os.getpid()}{uuid.uuid4().hex[:6]}-"
_issued: set[str] = set()  # OS base names (shmstore.<hash>) of every name handed out


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=60.0,
        help="duration of the slow chaos soak (run it with -m slow)",
    )
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=10_000,
        help="hypothesis examples for the slow segment fuzz (run it with -m slow)",
    )


def objects_of(name: str) -> set[str]:
    """The files in /dev/shm that belong to store *name*: its segment, the rings it grew into,
    its schema records and its reader semaphores."""
    base = segment_name(name).lstrip("/")
    if not SHM.is_dir():
        return set()
    return {
        p.name
        for p in SHM.iterdir()
        if p.name == base or p.name.startswith((f"sem.{base}.", f"{base}.g", f"{base}.s"))
    }


def _store_name_in(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            header = f.read(HEADER_SIZE)
    except OSError:
        return None  # removed meanwhile, or not ours to read
    if len(header) < HEADER_SIZE or header[: len(MAGIC)] != MAGIC:
        return None
    return (
        header[OFF_STORE_NAME : OFF_STORE_NAME + NAME_FIELD].rstrip(b"\0").decode(errors="replace")
    )


def _shmstore_objects() -> set[str]:
    if not SHM.is_dir():
        return set()
    return {p.name for p in SHM.iterdir() if OS_PREFIX in p.name}


def objects_of_this_run() -> set[str]:
    """shmstore objects in /dev/shm that this run created (its names are unique to it)."""
    ours = set()
    present = _shmstore_objects()
    segments = {n for n in present if n.startswith(OS_PREFIX)}
    mine = {n for n in segments if (_store_name_in(SHM / n) or "").startswith(RUN_PREFIX)}
    for n in present:
        if n in mine:
            ours.add(n)
        elif n.startswith("sem."):
            base = n[len("sem.") :].rsplit(".", 1)[0]
            if base in mine or base in _issued:
                ours.add(n)
        elif ".g" in n or ".s" in n:  # a ring the store grew into (<hash>.g<generation>), or
            base = n.rsplit(".", 1)[0]  # a schema record (<hash>.s<generation>)
            if base in mine or base in _issued:
                ours.add(n)
    return ours


@pytest.fixture(scope="session", autouse=True)
def dev_shm_left_as_found() -> Iterator[None]:
    """The suite must leave behind nothing it created (other programs' objects are not ours)."""
    yield
    leaked = objects_of_this_run()
    assert not leaked, f"tests left shared-memory objects behind: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def no_stray_children() -> Iterator[None]:
    """A failing test must not leave worker processes behind: the interpreter would wait for
    them at exit, and CI would hang instead of failing."""
    yield
    strays = multiprocessing.active_children()
    for child in strays:
        child.kill()
    for child in strays:
        child.join(10)


@pytest.fixture
def store_name() -> Iterator[str]:
    """A fresh store name of this run; whatever the test created under it is removed, pass or
    fail. Names derived from it (``store_name + "-pong"``) keep the run's prefix."""
    name = f"{RUN_PREFIX}{uuid.uuid4().hex[:10]}"
    _issued.add(segment_name(name).lstrip("/"))
    yield name
    shmstore.remove(name)


@pytest.fixture(params=["mutex", "flock"])
def writer_lock(request: pytest.FixtureRequest) -> str:
    """Both writer-lock implementations, for the tests about serializing writers."""
    kind: str = request.param
    if kind == "mutex" and not robust_mutex_supported():
        pytest.skip("this platform has no robust mutexes")
    return kind


@pytest.fixture
def names(store_name: str) -> Iterator[tuple[str, str]]:
    """An origin name and its replica's name, both removed at the end."""
    replica = f"{store_name}-r"
    yield store_name, replica
    shmstore.remove(replica)
    for name in (store_name, replica):  # removed, and nobody (a stray follower) made it again
        shmstore.remove(name)
        assert not Path("/dev/shm" + segment_name(name)).exists()
