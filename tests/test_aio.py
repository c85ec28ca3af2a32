"""The asyncio veneer: awaiting never blocks the loop and leaves nothing behind."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time

import pytest
from test_waiting import semaphores_of, wait_for_registrations
from workers import commit_sequence

from shmstore import AsyncStore, StateStoreError, Store, SubscriberLaggedError

ctx = mp.get_context("spawn")


def wait_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shmstore-wait-")]


def test_wait_does_not_block_the_event_loop(store_name: str) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncStore.create(store_name, int) as writer:
            reader = AsyncStore.open(store_name, int)
            try:
                ticks = 0
                stop = asyncio.Event()

                async def ticker() -> None:
                    nonlocal ticks
                    while not stop.is_set():
                        ticks += 1
                        await asyncio.sleep(0)

                task = asyncio.create_task(ticker())
                timer = threading.Timer(0.1, writer.store.set, args=(5,))
                timer.start()
                version = await reader.wait(0, timeout=10)
                stop.set()
                await task
                timer.join()
                return version, ticks
            finally:
                reader.close()

    version, ticks = asyncio.run(main())
    assert version == 1
    assert ticks > 10  # the loop kept running other tasks while we waited


def test_cancelled_wait_leaves_no_thread_entry_or_semaphore(store_name: str) -> None:
    async def main() -> None:
        async with AsyncStore.create(store_name, int) as st:
            task = asyncio.create_task(st.wait(0))
            await asyncio.to_thread(wait_for_registrations, st.store, 1)
            (thread,) = wait_threads()
            assert semaphores_of(store_name)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(thread.join, 5)
            assert not thread.is_alive()
            assert wait_threads() == []
            assert st.store._registry.entries() == []
            assert semaphores_of(store_name) == set()
            assert st.get() is None  # the handle itself is untouched

    asyncio.run(main())


def test_timeouts(store_name: str) -> None:
    async def main() -> None:
        async with AsyncStore.create(store_name, int) as st:
            with pytest.raises(TimeoutError, match="timeout=0"):
                await st.wait(0, timeout=0)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
                await st.wait(0, timeout=0.2)
            assert time.monotonic() - t0 >= 0.2
            await st.set(1)
            assert await st.wait(0, timeout=0) == 1

    asyncio.run(main())


def test_close_ends_the_background_thread_promptly(store_name: str) -> None:
    async def main() -> None:
        with Store.create(store_name, int):
            st = AsyncStore.open(store_name, int)
            task = asyncio.create_task(st.wait(0))
            await asyncio.to_thread(wait_for_registrations, st.store, 1)
            (thread,) = wait_threads()
            st.close()
            thread.join(0.5)
            assert not thread.is_alive()
            with pytest.raises(StateStoreError, match="closed while waiting"):
                await task

    asyncio.run(main())


def test_many_concurrent_waiters_share_one_thread(store_name: str) -> None:
    async def main() -> list[int]:
        async with AsyncStore.create(store_name, int) as st:
            tasks = [asyncio.create_task(st.wait(i % 3)) for i in range(30)]
            await asyncio.to_thread(wait_for_registrations, st.store, 1)
            assert len(wait_threads()) == 1
            for i in range(3):
                await st.set(i)
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert all(v >= 1 for v in results)
    assert wait_threads() == []


def test_async_subscription_follows_a_writer_process(store_name: str) -> None:
    count = 500

    async def main() -> list[tuple[int, int]]:
        async with AsyncStore.create(store_name, int, slots=1024, slot_size=64) as st:
            start = ctx.Barrier(2)
            writer = ctx.Process(target=commit_sequence, args=(store_name, count, start))
            writer.start()
            got: list[tuple[int, int]] = []
            try:
                async with st.subscribe(after_version=0, timeout=30) as sub:
                    await asyncio.to_thread(start.wait, 60)
                    async for version, value in sub:
                        got.append((version, value))
                        if version == count:
                            break
            finally:
                await asyncio.to_thread(writer.join, 60)
            assert writer.exitcode == 0
            return got

    assert asyncio.run(main()) == [(v, v - 1) for v in range(1, count + 1)]


def test_async_subscription_reports_lag_and_continues(store_name: str) -> None:
    async def main() -> None:
        async with AsyncStore.create(store_name, int, slots=2) as st:
            sub = st.subscribe(after_version=0)
            for i in range(5):
                await st.set(i)
            with pytest.raises(SubscriberLaggedError) as lag:
                await anext(sub)
            assert lag.value.missed == 4
            assert await anext(sub) == (5, 4)

    asyncio.run(main())
