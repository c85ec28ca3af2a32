"""Process entry points for the wait_any tests (importable by spawned children)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Callable
from typing import Any

import shmstore
from shmstore import Store, _wait_any


def follow_any(names: list[str], rounds: int, results: Any, readonly: tuple[str, ...] = ()) -> None:
    """``wait_any`` over the stores *names* for *rounds* rounds; report each round's
    ``{name: version}``. Stores named in *readonly* are opened read-only (they poll). Sleeps
    are not capped at a second: a wake-up that does not arrive shows as a ~30 s round."""
    _wait_any._MAX_SLEEP = 30.0  # type: ignore[misc]
    stores = [Store.open(name, readonly=name in readonly) for name in names]  # any type
    try:
        seen = {st: st.version for st in stores}
        for _ in range(rounds):
            moved = shmstore.wait_any(seen, timeout=60)
            seen.update(moved)
            results.put({st.name: version for st, version in moved.items()})
    finally:
        for st in stores:
            st.close()


def follow_any_async(names: list[str], rounds: int, results: Any) -> None:
    """:func:`follow_any` with ``wait_any_async`` over AsyncStore handles."""
    _wait_any._MAX_SLEEP = 30.0  # type: ignore[misc]

    async def main() -> None:
        stores = [shmstore.AsyncStore.open(name, int) for name in names]
        try:
            seen = {st: st.version for st in stores}
            for _ in range(rounds):
                moved = await shmstore.wait_any_async(seen, timeout=60)
                seen.update(moved)
                results.put({st.name: version for st, version in moved.items()})
        finally:
            for st in stores:
                st.close()

    asyncio.run(main())


def sleep_in_wait_any(names: list[str], seconds: float, results: Any) -> None:
    """Block in ``wait_any`` with nothing committed; report (CPU seconds, wall seconds, times
    this process went to sleep): a poll would sleep hundreds of times, however cheaply."""
    stores = [Store.open(name, int) for name in names]
    try:
        switches0 = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
        cpu0, wall0 = time.process_time(), time.monotonic()
        with contextlib.suppress(TimeoutError):
            shmstore.wait_any({st: st.version for st in stores}, timeout=seconds)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches0
        results.put((cpu, wall, switches))
    finally:
        for st in stores:
            st.close()


def block_in_wait_any(names: list[str]) -> None:
    """Wait on the stores forever (the test kills this process)."""
    stores = [Store.open(name, int) for name in names]
    shmstore.wait_any({st: st.version for st in stores}, timeout=None)


def follow_until(names: list[str], last: int, results: Any) -> None:
    """Follow every store until each has reached version *last*; report how many calls it
    took and the longest single call. Sleeps are not capped at a second here, so a lost
    wake-up shows as a call of ~30 s rather than being papered over by the next look-up."""
    _wait_any._MAX_SLEEP = 30.0  # type: ignore[misc]
    stores = [Store.open(name, int) for name in names]
    try:
        results.put(_follow(stores, shmstore.wait_any, last))
    finally:
        for st in stores:
            st.close()


def _follow(
    stores: list[Store[int]], wait: Callable[..., dict[Any, int]], last: int
) -> tuple[int, float]:
    """Calls of ``wait(pending, timeout=60)`` until every store reached *last*: how many, and
    the longest."""
    seen = {st: st.version for st in stores}
    calls, longest = 0, 0.0
    while min(seen.values()) < last:
        pending = {st: v for st, v in seen.items() if v < last}
        started = time.monotonic()
        seen.update(wait(pending, timeout=60))
        longest = max(longest, time.monotonic() - started)
        calls += 1
    return calls, longest


def commit_many(name: str, count: int) -> None:
    with Store.open(name, int) as st:
        for i in range(count):
            st.set(i)


# ------------------------------------------------------------------ WaitSet


def follow_with_wait_set(names: list[str], rounds: int, results: Any, go: Any) -> None:
    """One ``WaitSet`` over the stores *names* for *rounds* rounds; report each round's
    ``{name: version}``, then wait for *go* before closing (so that the parent can look at the
    registries while this process still lives). Sleeps are not capped at a second."""
    _wait_any._MAX_SLEEP = 30.0  # type: ignore[misc]
    stores = [Store.open(name, int) for name in names]
    try:
        with shmstore.WaitSet(stores) as waiting:
            seen = {st: st.version for st in stores}
            for _ in range(rounds):
                moved = waiting.wait(seen, timeout=60)
                seen.update(moved)
                results.put({st.name: version for st, version in moved.items()})
        results.put("closed")
        go.wait(60)
    finally:
        for st in stores:
            st.close()


def block_in_wait_set(names: list[str]) -> None:
    """Wait on the stores through a WaitSet forever (the test kills this process)."""
    stores = [Store.open(name, int) for name in names]
    waiting = shmstore.WaitSet(stores)
    waiting.wait({st: st.version for st in stores}, timeout=None)


def sleep_in_wait_set(names: list[str], seconds: float, results: Any) -> None:
    """:func:`sleep_in_wait_any` for a WaitSet that registered on an earlier wait."""
    stores = [Store.open(name, int) for name in names]
    try:
        with shmstore.WaitSet(stores) as waiting:
            seen = {st: st.version for st in stores}
            with contextlib.suppress(TimeoutError):
                waiting.wait(seen, timeout=0.01)  # registers
            switches0 = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            cpu0, wall0 = time.process_time(), time.monotonic()
            with contextlib.suppress(TimeoutError):
                waiting.wait(seen, timeout=seconds)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches0
        results.put((cpu, wall, switches))
    finally:
        for st in stores:
            st.close()


def follow_until_with_wait_set(names: list[str], last: int, results: Any) -> None:
    """:func:`follow_until` with one WaitSet kept for every call."""
    _wait_any._MAX_SLEEP = 30.0  # type: ignore[misc]
    stores = [Store.open(name, int) for name in names]
    try:
        with shmstore.WaitSet(stores) as waiting:
            outcome = _follow(stores, waiting.wait, last)
        results.put(outcome)
    finally:
        for st in stores:
            st.close()
