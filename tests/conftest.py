"""Shared fixtures: unique store names that are always removed, and a /dev/shm leak check."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmstore
from shmstore._writelock import robust_mutex_supported

SHM = Path("/dev/shm")


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


def _our_objects() -> set[str]:
    if not SHM.is_dir():
        return set()
    return {p.name for p in SHM.iterdir() if "shmstore." in p.name}


@pytest.fixture(scope="session", autouse=True)
def dev_shm_left_as_found() -> Iterator[None]:
    """The suite must leave /dev/shm exactly as it found it."""
    before = _our_objects()
    yield
    leaked = _our_objects() - before
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
    """A fresh store name; whatever the test created under it is removed, pass or fail."""
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    shmstore.remove(name)


@pytest.fixture(params=["mutex", "flock"])
def writer_lock(request: pytest.FixtureRequest) -> str:
    """Both writer-lock implementations, for the tests about serializing writers."""
    kind: str = request.param
    if kind == "mutex" and not robust_mutex_supported():
        pytest.skip("this platform has no robust mutexes")
    return kind
