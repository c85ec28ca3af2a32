"""wait_any / wait_any_async: one sleeping thread, one semaphore, several stores."""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_multiprocess import JOIN
from test_multiprocess import collect as collect_from
from test_waiting import semaphores_of, wait_for_registrations
from wait_any_workers import (
    block_in_wait_any,
    commit_many,
    follow_any,
    follow_any_async,
    follow_until,
    sleep_in_wait_any,
)
from wake_workers import register

import shmstore
from shmstore import AsyncStore, StateStoreError, Store, _wait_any, wait_any, wait_any_async

ctx = mp.get_context("spawn")


@pytest.fixture(autouse=True)
def uncapped_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sleep up to 30 s at a time, not 1 s: a wake-up that never comes must fail a test (a
    ``collect`` here gets its result within 20 s), not be covered by the next look-up."""
    monkeypatch.setattr(_wait_any, "_MAX_SLEEP", 30.0)


def collect(results: Any, procs: list[Any], n: int) -> list[Any]:
    started = time.monotonic()
    got = collect_from(results, procs, n)
    assert time.monotonic() - started < 20, "a wake-up came late (only the 30 s sleep ended)"
    return got


@pytest.fixture
def names(store_name: str) -> Iterator[list[str]]:
    """Three store names of this run, created empty and removed afterwards."""
    got = [f"{store_name}-{i}" for i in range(3)]
    for name in got:
        Store.create(name, int, slot_size=64, max_value_size=1 << 20).close()
    yield got
    for name in got:
        shmstore.remove(name)


def sleeping_thread(
    pending: dict[Store[int], int], timeout: float = 60
) -> tuple[threading.Thread, list[object]]:
    """``wait_any`` in a thread of this process; its outcome lands in the returned list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(wait_any(pending, timeout=timeout))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def registered(st: Store[int]) -> int:
    return len(st._registry.entries())


# ------------------------------------------------------------------ waking


def test_any_of_several_stores_wakes_it(names: list[str]) -> None:
    stores = [Store.open(name, int) for name in names]
    try:
        results = ctx.Queue()
        child = ctx.Process(target=follow_any, args=(names, 3, results))
        child.start()
        for round_, st in enumerate([stores[2], stores[0], stores[1]]):
            for other in stores:
                wait_for_registrations(other, 1)  # asleep on all three
            st.set(round_)
            (got,) = collect(results, [child], 1)
            assert got == {st.name: 1}
            # it gives every registration back before it returns, then waits again
        child.join(JOIN)
        assert child.exitcode == 0
        assert [registered(st) for st in stores] == [0, 0, 0]
        assert [semaphores_of(name) for name in names] == [set(), set(), set()]
    finally:
        for st in stores:
            st.close()


def test_async_any_of_several_stores_wakes_it(names: list[str]) -> None:
    stores = [Store.open(name, int) for name in names]
    try:
        results = ctx.Queue()
        child = ctx.Process(target=follow_any_async, args=(names, 2, results))
        child.start()
        for round_, st in enumerate([stores[1], stores[2]]):
            for other in stores:
                wait_for_registrations(other, 1)
            st.set(round_)
            (got,) = collect(results, [child], 1)
            assert got == {st.name: 1}
        child.join(JOIN)
        assert child.exitcode == 0
        assert [registered(st) for st in stores] == [0, 0, 0]
    finally:
        for st in stores:
            st.close()


def test_one_semaphore_registered_in_every_store_and_no_thread_per_store(
    names: list[str],
) -> None:
    stores = [Store.open(name, int) for name in names]
    try:
        threads_before = threading.active_count()
        thread, out = sleeping_thread(dict.fromkeys(stores, 0))
        for st in stores:
            wait_for_registrations(st, 1)
        files = [semaphores_of(name) for name in names]
        assert [len(f) for f in files] == [1, 1, 1]
        inodes = {os.stat(Path("/dev/shm") / next(iter(f))).st_ino for f in files}
        assert len(inodes) == 1  # the three entries name one semaphore
        assert threading.active_count() == threads_before + 1  # only the waiting thread
        started = time.monotonic()
        stores[1].set(5)
        thread.join(JOIN)
        assert out == [{stores[1]: 1}]
        assert time.monotonic() - started < 20
        assert [registered(st) for st in stores] == [0, 0, 0]
        assert [semaphores_of(name) for name in names] == [set(), set(), set()]
    finally:
        for st in stores:
            st.close()


def test_returns_every_store_that_moved_without_registering(names: list[str]) -> None:
    stores = [Store.open(name, int) for name in names]
    try:
        stores[0].set(1)
        stores[2].set(1)
        stores[2].set(2)
        assert wait_any(dict.fromkeys(stores, 0)) == {stores[0]: 1, stores[2]: 2}
        assert wait_any({stores[2]: 1, stores[1]: 0}, timeout=0) == {stores[2]: 2}
        assert [registered(st) for st in stores] == [0, 0, 0]
    finally:
        for st in stores:
            st.close()


def test_two_writers_racing_into_one_semaphore_lose_no_wake_up(names: list[str]) -> None:
    """A writer skips its post when the shared semaphore holds another store's post: the
    waiter must still see that writer's commit (it re-reads every store on every wake-up)."""
    last = 300
    results = ctx.Queue()
    follower = ctx.Process(target=follow_until, args=(names[:2], last - 1, results))
    follower.start()
    with Store.open(names[0], int) as first:
        wait_for_registrations(first, 1)
    writers = [ctx.Process(target=commit_many, args=(name, last)) for name in names[:2]]
    for w in writers:
        w.start()
    ((calls, longest),) = collect_from(results, [follower, *writers], 1)
    for p in [follower, *writers]:
        p.join(JOIN)
        assert p.exitcode == 0
    assert calls >= 1
    assert longest < 20  # a lost wake-up sleeps ~30 s here (see follow_until)


# ------------------------------------------------------------------ time limits


def test_timeout_zero_is_a_non_blocking_check(names: list[str]) -> None:
    stores = [Store.open(name, int) for name in names]
    try:
        with pytest.raises(TimeoutError):
            wait_any(dict.fromkeys(stores, 0), timeout=0)
        assert [registered(st) for st in stores] == [0, 0, 0]
    finally:
        for st in stores:
            st.close()


def test_timeout_raises_the_error_store_wait_raises(names: list[str]) -> None:
    stores = [Store.open(name, int) for name in names]
    try:
        with Store.open(names[0], int) as alone, pytest.raises(TimeoutError) as from_wait:
            alone.wait(0, timeout=0.05)
        started = time.monotonic()
        with pytest.raises(TimeoutError) as from_wait_any:
            wait_any(dict.fromkeys(stores, 0), timeout=0.3)
        assert time.monotonic() - started >= 0.3
        assert type(from_wait_any.value) is type(from_wait.value)
        assert names[2] in str(from_wait_any.value)
        assert [registered(st) for st in stores] == [0, 0, 0]
        assert [semaphores_of(name) for name in names] == [set(), set(), set()]
    finally:
        for st in stores:
            st.close()


def test_async_timeout(names: list[str]) -> None:
    async def main() -> None:
        stores = [AsyncStore.open(name, int) for name in names]
        try:
            with pytest.raises(TimeoutError):
                await wait_any_async(dict.fromkeys(stores, 0), timeout=0)
            with pytest.raises(TimeoutError):
                await wait_any_async(dict.fromkeys(stores, 0), timeout=0.2)
            assert [registered(st.store) for st in stores] == [0, 0, 0]
        finally:
            for st in stores:
                st.close()

    asyncio.run(main())


# ------------------------------------------------------------------ cancellation and close


def test_cancelled_coroutine_leaves_no_registration_and_no_thread(names: list[str]) -> None:
    async def main() -> None:
        stores = [AsyncStore.open(name, int) for name in names]
        try:
            task = asyncio.create_task(wait_any_async(dict.fromkeys(stores, 0)))
            for st in stores:
                await asyncio.to_thread(wait_for_registrations, st.store, 1)
            assert any(t.name == "shmstore-wait-any" for t in threading.enumerate())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Nothing left once the cancelled coroutine has returned: no waiting, no polling.
            assert [registered(st.store) for st in stores] == [0, 0, 0]
            assert not any(t.name == "shmstore-wait-any" for t in threading.enumerate())
            assert [semaphores_of(name) for name in names] == [set(), set(), set()]
            # and the stores' own waiting still works
            await stores[0].set(1)
            assert await stores[0].wait(0, timeout=10) == 1
        finally:
            for st in stores:
                st.close()

    asyncio.run(main())


@pytest.mark.parametrize("closing", [0, 1], ids=["owner of the semaphore", "a sharer"])
def test_a_store_closed_while_waited_on_ends_the_wait(names: list[str], closing: int) -> None:
    stores = [Store.open(name, int) for name in names]
    try:
        thread, out = sleeping_thread(dict.fromkeys(stores, 0))
        for st in stores:
            wait_for_registrations(st, 1)
        stores[closing].close()
        thread.join(JOIN)
        assert not thread.is_alive()
        assert len(out) == 1
        assert isinstance(out[0], StateStoreError)
        assert names[closing] in str(out[0])
        with Store.open(names[closing], int) as again:
            assert registered(again) == 0
        assert [registered(st) for st in stores if not st.closed] == [0, 0]
        assert [semaphores_of(name) for name in names] == [set(), set(), set()]
    finally:
        for st in stores:
            st.close()


def test_a_sigkilled_waiter_is_reclaimed_like_any_reader(names: list[str]) -> None:
    stores = [Store.open(name, int) for name in names]
    try:
        child = ctx.Process(target=block_in_wait_any, args=(names,))
        child.start()
        for st in stores:
            wait_for_registrations(st, 1)
        os.kill(child.pid, signal.SIGKILL)
        child.join(JOIN)
        assert [st.reclaim_dead_readers() for st in stores] == [1, 1, 1]
        assert [registered(st) for st in stores] == [0, 0, 0]
        assert [semaphores_of(name) for name in names] == [set(), set(), set()]
    finally:
        for st in stores:
            st.close()


# ------------------------------------------------------------------ growth, polling, CPU


def test_a_store_growing_while_waited_on_wakes_it(names: list[str], store_name: str) -> None:
    grows = f"{store_name}-grows"
    try:
        with Store.create(grows, bytes, slot_size=64, max_value_size=1 << 20) as st:
            watched = [names[0], grows]
            results = ctx.Queue()
            child = ctx.Process(target=follow_any, args=(watched, 2, results))
            child.start()
            for round_ in (1, 2):
                wait_for_registrations(st, 1)
                capacity = st.capacity
                st.set(b"x" * (4 * capacity))  # larger than a slot: the store moves to a new ring
                assert st.capacity > capacity
                (got,) = collect(results, [child], 1)
                assert got == {grows: round_}
            child.join(JOIN)
            assert child.exitcode == 0
            assert st.statistics().growths == 2
            assert registered(st) == 0
    finally:
        shmstore.remove(grows)


def test_a_sleeping_wait_any_burns_no_cpu(names: list[str]) -> None:
    results = ctx.Queue()
    child = ctx.Process(target=sleep_in_wait_any, args=(names, 1.5, results))
    child.start()
    ((cpu, wall, sleeps),) = collect_from(results, [child], 1)
    child.join(JOIN)
    assert wall >= 1.5
    assert cpu / wall < 0.1  # asleep on one semaphore: nothing but the start and the end
    # ... and it went to sleep a handful of times (the 1 s cap), where polling with back-off
    # up to 5 ms would sleep some 300 times in 1.5 s.
    assert sleeps < 50, sleeps


def test_a_mix_with_a_read_only_polling_handle(names: list[str]) -> None:
    stores = [Store.open(name, int) for name in names]
    try:
        results = ctx.Queue()
        child = ctx.Process(
            target=follow_any, args=(names, 2, results), kwargs={"readonly": (names[1],)}
        )
        child.start()
        wait_for_registrations(stores[0], 1)
        wait_for_registrations(stores[2], 1)
        assert registered(stores[1]) == 0  # read-only: polled, never registered
        stores[1].set(1)  # only polling can see this one
        (got,) = collect(results, [child], 1)
        assert got == {names[1]: 1}
        wait_for_registrations(stores[0], 1)
        wait_for_registrations(stores[2], 1)
        stores[2].set(1)  # and the semaphore still wakes it
        (got,) = collect(results, [child], 1)
        assert got == {names[2]: 1}
        child.join(JOIN)
        assert child.exitcode == 0
    finally:
        for st in stores:
            st.close()


# ------------------------------------------------------------------ bad input


def test_bad_input_gets_clear_errors(names: list[str]) -> None:
    st = Store.open(names[0], int)
    closed = Store.open(names[1], int)
    closed.close()
    try:
        with pytest.raises(ValueError, match="empty"):
            wait_any({})
        with pytest.raises(TypeError, match="map"):
            wait_any([st])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="Store"):
            wait_any({"a store": 0})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="int"):
            wait_any({st: "0"})  # type: ignore[dict-item]
        with pytest.raises(StateStoreError, match="closed"):
            wait_any({st: 0, closed: 0})
        with pytest.raises(ValueError, match="nan"):
            wait_any({st: 0}, timeout=math.nan)
        with pytest.raises(StateStoreError, match="closed"):
            asyncio.run(wait_any_async({closed: 0}))
        assert registered(st) == 0
    finally:
        st.close()


def test_a_full_registry_raises_and_gives_the_other_registrations_back(
    names: list[str], store_name: str
) -> None:
    full = f"{store_name}-full"
    try:
        with (
            Store.create(full, int, max_readers=1) as st,
            Store.open(full, int) as occupant,
            Store.open(names[0], int) as other,
        ):
            register(occupant)  # takes the one entry, until it closes
            with pytest.raises(shmstore.RegistryFullError):
                wait_any({other: 0, st: 0}, timeout=10)
            assert registered(other) == 0
            assert semaphores_of(names[0]) == set()
    finally:
        shmstore.remove(full)
