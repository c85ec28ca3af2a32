"""WaitSet: wait_any's registrations kept across waits, until close()."""

from __future__ import annotations

import asyncio
import contextlib
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
from test_wait_any import collect
from test_waiting import semaphores_of, wait_for_registrations
from wait_any_workers import (
    block_in_wait_set,
    commit_many,
    follow_until_with_wait_set,
    follow_with_wait_set,
    sleep_in_wait_set,
)

import shmstore
from shmstore import AsyncStore, StateStoreError, Store, WaitSet, _wait_any

ctx = mp.get_context("spawn")


@pytest.fixture(autouse=True)
def uncapped_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sleep up to 30 s at a time, not 1 s: a wake-up that never comes must fail a test, not be
    covered by the next look-up."""
    monkeypatch.setattr(_wait_any, "_MAX_SLEEP", 30.0)


@pytest.fixture
def names(store_name: str) -> Iterator[list[str]]:
    """Three store names of this run, created empty and removed afterwards."""
    got = [f"{store_name}-{i}" for i in range(3)]
    for name in got:
        Store.create(name, int, slot_size=64, max_value_size=1 << 20).close()
    yield got
    for name in got:
        shmstore.remove(name)


@pytest.fixture
def stores(names: list[str]) -> Iterator[list[Store[int]]]:
    handles = [Store.open(name, int) for name in names]
    yield handles
    for st in handles:
        st.close()


def registrations(st: Store[int]) -> list[tuple[int, int, bool]]:
    return st._registry.entries()


def register(waiting: WaitSet[Any], stores: list[Store[int]]) -> None:
    """Make *waiting* register (its first wait that sleeps does), without a commit."""
    with pytest.raises(TimeoutError):
        waiting.wait({st: st.version for st in stores}, timeout=0.05)


def waiting_thread(
    waiting: WaitSet[Any], pending: dict[Any, int], timeout: float = 60
) -> tuple[threading.Thread, list[object]]:
    """``waiting.wait(pending)`` in a thread of this process; its outcome lands in the list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(waiting.wait(pending, timeout=timeout))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def asleep(waiting: WaitSet[Any]) -> None:
    """Until a thread of this process waits on *waiting* (registered; maybe not yet asleep,
    which only makes a wake-up find a pending post)."""
    deadline = time.monotonic() + JOIN
    while not (waiting._busy and not waiting._unregistered):
        assert time.monotonic() < deadline
        time.sleep(0.005)


# ------------------------------------------------------------------ waking, reuse


def test_any_member_wakes_it_and_the_registrations_are_kept(
    names: list[str], stores: list[Store[int]]
) -> None:
    results, go = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=follow_with_wait_set, args=(names, 6, results, go))
    child.start()
    try:
        for st in stores:
            wait_for_registrations(st, 1)
        first = [registrations(st) for st in stores]
        files = [semaphores_of(name) for name in names]
        assert [len(f) for f in files] == [1, 1, 1]
        inodes = {os.stat(Path("/dev/shm") / next(iter(f))).st_ino for f in files}
        assert len(inodes) == 1  # one semaphore, named in every store's registry
        for round_, st in enumerate([stores[2], stores[0], stores[1]] * 2):
            st.set(round_)
            (got,) = collect(results, [child], 1)
            assert got == {st.name: round_ // 3 + 1}
            # Between waits, nothing was given back or claimed anew: the same entries (index,
            # owner) and the same semaphore names, where wait_any would make fresh ones.
            if round_ < 5:  # (after the last round, the child closes the set)
                assert [registrations(other) for other in stores] == first
                assert [semaphores_of(name) for name in names] == files
        # close() gave every registration back, with the process still alive
        assert collect(results, [child], 1) == ["closed"]
        assert [registrations(st) for st in stores] == [[], [], []]
        assert [semaphores_of(name) for name in names] == [set(), set(), set()]
    finally:
        go.set()
        child.join(JOIN)
    assert child.exitcode == 0


def test_two_writers_racing_into_one_semaphore_lose_no_wake_up(names: list[str]) -> None:
    last = 300
    results = ctx.Queue()
    follower = ctx.Process(target=follow_until_with_wait_set, args=(names[:2], last, results))
    follower.start()
    with Store.open(names[0], int) as first:
        wait_for_registrations(first, 1)
    writers = [ctx.Process(target=commit_many, args=(name, last + 1)) for name in names[:2]]
    for w in writers:
        w.start()
    ((calls, longest),) = collect_from(results, [follower, *writers], 1)
    for p in [follower, *writers]:
        p.join(JOIN)
        assert p.exitcode == 0
    assert calls >= 1
    assert longest < 20  # a lost wake-up sleeps ~30 s here


def test_returns_every_member_that_moved_and_timeout_zero_registers_nothing(
    stores: list[Store[int]],
) -> None:
    with WaitSet(stores) as waiting:
        with pytest.raises(TimeoutError):
            waiting.wait(dict.fromkeys(stores, 0), timeout=0)
        stores[0].set(1)
        stores[2].set(1)
        assert waiting.wait(dict.fromkeys(stores, 0)) == {stores[0]: 1, stores[2]: 1}
        assert waiting.wait({stores[2]: 0, stores[1]: 0}, timeout=0) == {stores[2]: 1}
        assert [registrations(st) for st in stores] == [[], [], []]


def test_a_timeout_raises_store_waits_error_and_keeps_the_registrations(
    stores: list[Store[int]], names: list[str]
) -> None:
    with WaitSet(stores) as waiting:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=names[1]):
            waiting.wait(dict.fromkeys(stores, 0), timeout=0.2)
        assert time.monotonic() - started >= 0.2
        kept = [registrations(st) for st in stores]
        assert [len(k) for k in kept] == [1, 1, 1]
        thread, out = waiting_thread(waiting, {stores[1]: 0})  # a subset of the members
        asleep(waiting)
        stores[1].set(7)
        thread.join(JOIN)
        assert out == [{stores[1]: 1}]
        assert [registrations(st) for st in stores] == kept


# ------------------------------------------------------------------ close


def test_close_gives_every_registration_back(stores: list[Store[int]], names: list[str]) -> None:
    waiting = WaitSet(stores)
    register(waiting, stores)
    assert [len(registrations(st)) for st in stores] == [1, 1, 1]
    waiting.close()
    assert [registrations(st) for st in stores] == [[], [], []]
    assert [semaphores_of(name) for name in names] == [set(), set(), set()]
    with pytest.raises(StateStoreError, match="closed"):
        waiting.wait(dict.fromkeys(stores, 0), timeout=0)
    waiting.close()  # idempotent


def test_close_from_another_thread_ends_the_wait(stores: list[Store[int]]) -> None:
    waiting = WaitSet(stores)
    thread, out = waiting_thread(waiting, dict.fromkeys(stores, 0))
    asleep(waiting)
    waiting.close()  # returns once the waiting thread has left
    thread.join(JOIN)
    assert len(out) == 1
    assert isinstance(out[0], StateStoreError)
    assert "WaitSet" in str(out[0])
    assert [registrations(st) for st in stores] == [[], [], []]


@pytest.mark.parametrize("closing", [0, 2], ids=["owner of the semaphore", "a sharer"])
@pytest.mark.parametrize("in_pending", [True, False], ids=["pending", "not pending"])
def test_a_member_closed_while_waited_on_ends_the_wait(
    names: list[str], stores: list[Store[int]], closing: int, in_pending: bool
) -> None:
    with WaitSet(stores) as waiting:
        pending = {st: 0 for i, st in enumerate(stores) if in_pending or i != closing}
        thread, out = waiting_thread(waiting, pending)
        asleep(waiting)
        stores[closing].close()
        thread.join(JOIN)
        assert not thread.is_alive()
        assert len(out) == 1
        assert isinstance(out[0], StateStoreError), out
        assert names[closing] in str(out[0])
        # and so does every later wait, at once: the set has lost a member
        started = time.monotonic()
        with pytest.raises(StateStoreError, match=names[closing]):
            waiting.wait({stores[1]: 0}, timeout=30)
        assert time.monotonic() - started < 20
    assert [registrations(st) for st in stores if not st.closed] == [[], []]
    assert [semaphores_of(name) for name in names] == [set(), set(), set()]


def test_a_sigkilled_owner_is_reclaimed_like_any_reader(
    names: list[str], stores: list[Store[int]]
) -> None:
    child = ctx.Process(target=block_in_wait_set, args=(names,))
    child.start()
    for st in stores:
        wait_for_registrations(st, 1)
    os.kill(child.pid, signal.SIGKILL)
    child.join(JOIN)
    assert [st.reclaim_dead_readers() for st in stores] == [1, 1, 1]
    assert [registrations(st) for st in stores] == [[], [], []]
    assert [semaphores_of(name) for name in names] == [set(), set(), set()]


# ------------------------------------------------------------------ one waiter, CPU, polling


def test_one_waiting_thread_at_a_time(stores: list[Store[int]]) -> None:
    with WaitSet(stores) as waiting:
        thread, out = waiting_thread(waiting, dict.fromkeys(stores, 0))
        asleep(waiting)
        with pytest.raises(StateStoreError, match="one at a time"):
            waiting.wait(dict.fromkeys(stores, 0), timeout=10)
        stores[0].set(1)  # the first waiter is unharmed
        thread.join(JOIN)
        assert out == [{stores[0]: 1}]


def test_a_sleeping_wait_set_burns_no_cpu(names: list[str]) -> None:
    results = ctx.Queue()
    child = ctx.Process(target=sleep_in_wait_set, args=(names, 1.5, results))
    child.start()
    ((cpu, wall, sleeps),) = collect_from(results, [child], 1)
    child.join(JOIN)
    assert wall >= 1.5
    assert cpu / wall < 0.1
    assert sleeps < 50, sleeps  # polling with back-off up to 5 ms: some 300 in 1.5 s


def test_only_read_only_members_are_polled(names: list[str], stores: list[Store[int]]) -> None:
    with Store.open(names[1], int, readonly=True) as ro:
        members = [stores[0], ro, stores[2]]
        with WaitSet(members) as waiting:
            register(waiting, members)
            assert waiting.polled == [ro]
            assert [len(registrations(st)) for st in stores] == [1, 0, 1]
            thread, out = waiting_thread(waiting, dict.fromkeys(members, 0))
            asleep(waiting)
            stores[1].set(1)  # only polling sees this one
            thread.join(JOIN)
            assert out == [{ro: 1}]


def test_bad_input_gets_clear_errors(names: list[str], stores: list[Store[int]]) -> None:
    with pytest.raises(ValueError, match="at least one"):
        WaitSet([])
    with pytest.raises(TypeError, match="iterable"):
        WaitSet(stores[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Store"):
        WaitSet(["a store"])  # type: ignore[list-item]
    with Store.open(names[0], int) as outsider, WaitSet(stores[1:]) as waiting:
        with pytest.raises(ValueError, match="not a member"):
            waiting.wait({outsider: 0}, timeout=0)
        with pytest.raises(TypeError, match="int"):
            waiting.wait({stores[1]: "0"}, timeout=0)  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="map"):
            waiting.wait([stores[1]])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty"):
            waiting.wait({})


# ------------------------------------------------------------------ asyncio


def test_async_wait_reuse_and_cancel(names: list[str]) -> None:
    async def main() -> None:
        handles = [AsyncStore.open(name, int) for name in names]
        try:
            with WaitSet(handles) as waiting:
                task = asyncio.create_task(waiting.wait_async(dict.fromkeys(handles, 0)))
                for st in handles:
                    await asyncio.to_thread(wait_for_registrations, st.store, 1)
                kept = [registrations(st.store) for st in handles]
                await handles[1].set(1)
                assert await asyncio.wait_for(task, JOIN) == {handles[1]: 1}
                assert not any(t.name == "shmstore-wait-any" for t in threading.enumerate())

                task = asyncio.create_task(waiting.wait_async({handles[0]: 0}))
                await asyncio.to_thread(asleep, waiting)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # No thread left; the registrations stay with the set, and it serves again.
                assert not any(t.name == "shmstore-wait-any" for t in threading.enumerate())
                assert [registrations(st.store) for st in handles] == kept
                task = asyncio.create_task(waiting.wait_async({handles[2]: 0}, timeout=JOIN))
                await asyncio.to_thread(asleep, waiting)
                await handles[2].set(1)
                assert await task == {handles[2]: 1}
                with pytest.raises(TimeoutError):
                    await waiting.wait_async({handles[0]: 0}, timeout=0.1)
            assert [registrations(st.store) for st in handles] == [[], [], []]
            assert [semaphores_of(name) for name in names] == [set(), set(), set()]
        finally:
            for st in handles:
                st.close()

    asyncio.run(main())


def test_close_while_a_coroutine_waits(names: list[str]) -> None:
    async def main() -> None:
        handles = [AsyncStore.open(name, int) for name in names]
        try:
            waiting = WaitSet(handles)
            task = asyncio.create_task(waiting.wait_async(dict.fromkeys(handles, 0)))
            await asyncio.to_thread(asleep, waiting)
            await asyncio.to_thread(waiting.close)
            with pytest.raises(StateStoreError, match="WaitSet"):
                await task
            assert [registrations(st.store) for st in handles] == [[], [], []]
        finally:
            for st in handles:
                st.close()

    asyncio.run(main())


def test_wait_any_is_a_wait_set_for_one_call(stores: list[Store[int]]) -> None:
    with contextlib.suppress(TimeoutError):
        shmstore.wait_any(dict.fromkeys(stores, 0), timeout=0.05)
    assert [registrations(st) for st in stores] == [[], [], []]
