"""shmstore.fsm.AsyncStateStore as a drop-in for the worker's original store: issue 12's facts,
one by one, plus the fan-out's promises (issue 10, issue 11 item 19, issue 16)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import multiprocessing as mp
import pickle
import re
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from test_multiprocess import JOIN, collect

import shmstore
from shmstore import RegistryFullError, Store, StoreNotFoundError
from shmstore.fsm import (
    MAX_QUEUE_SIZE,
    TEST_SUBSCRIBER_TIMEOUT,
    AsyncStateStore,
    FsmSnapshotDTO,
    FsmState,
    InvalidSnapshotError,
    StateStoreError,
    StateVersionError,
    TransitionStatus,
    create_initialized_store,
    create_store,
    create_transition,
    initial_snapshot,
    next_snapshot,
)
from shmstore.fsm._fanout import LOG_INTERVAL

ctx = mp.get_context("spawn")
R = TypeVar("R")
WAIT = 60.0  # seconds: a hang detector for awaits, not a performance bound

STORE_METRICS = {
    "total_sets",
    "total_gets",
    "version_conflicts",
    "subscriber_count",
    "last_update_ts",
    "creation_ts",
}


def run(coro_fn: Callable[[], Awaitable[R]]) -> R:
    async def main() -> R:
        return await coro_fn()

    return asyncio.run(main())


def snap(version: int, state: FsmState = FsmState.IDLE, **kw: Any) -> FsmSnapshotDTO:
    return FsmSnapshotDTO(version=version, state=state, **kw)


@pytest.fixture(params=["private", "named"])
def make_store(request: pytest.FixtureRequest, store_name: str) -> Callable[..., AsyncStateStore]:
    def make(initial: FsmSnapshotDTO | None = None, **options: Any) -> AsyncStateStore:
        name = store_name if request.param == "named" else None
        return AsyncStateStore(initial, name=name, **options)

    return make


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shmstore-fsm-watch")]


@pytest.fixture
def no_watcher_left() -> Iterator[None]:
    yield
    for thread in watcher_threads():
        thread.join(JOIN)
    assert not watcher_threads()


# ---------------------------------------------------------------- module surface


def test_errors_take_a_plain_message_and_constants() -> None:
    assert issubclass(StateStoreError, Exception)
    assert issubclass(StateVersionError, StateStoreError)
    assert issubclass(StateVersionError, shmstore.StateVersionError)
    assert str(StateStoreError("broken")) == "broken"
    error = StateVersionError("stale snapshot")
    assert str(error) == "stale snapshot"
    assert isinstance(error, StateStoreError)
    assert str(pickle.loads(pickle.dumps(error))) == "stale snapshot"
    assert StateVersionError.__module__ == "shmstore.fsm"
    assert MAX_QUEUE_SIZE == 64
    assert TEST_SUBSCRIBER_TIMEOUT == 5.0


# ---------------------------------------------------------------- construction and reading


def test_initial_state_is_current_but_not_a_set(
    make_store: Callable[..., AsyncStateStore],
) -> None:
    async def body() -> None:
        first = snap(3, reason="given")
        async with make_store(first) as st:
            assert await st.get() == first
            metrics = await st.get_metrics()
            assert metrics["total_sets"] == 0
            assert metrics["last_update_ts"] == 0.0
            assert type(metrics["last_update_ts"]) is float
            await st.set(snap(4))
            metrics = await st.get_metrics()
            assert metrics["total_sets"] == 1
            assert metrics["last_update_ts"] >= metrics["creation_ts"] > 0

    run(body)


def test_get_with_meta_shape(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store() as st:
            assert await st.get() is None
            got, meta = await st.get_with_meta()
            assert got is None
            assert set(meta) == {
                "store_metrics",
                "subscriber_count",
                "has_state",
                "current_version",
            }
            assert set(meta["store_metrics"]) == STORE_METRICS
            assert (meta["subscriber_count"], meta["has_state"], meta["current_version"]) == (
                0,
                False,
                -1,
            )
            await st.subscribe("a")
            stored = await st.set(snap(7))
            got, meta = await st.get_with_meta()
            assert got == stored
            assert (meta["subscriber_count"], meta["has_state"], meta["current_version"]) == (
                1,
                True,
                7,
            )
            assert meta["store_metrics"]["total_sets"] == 1
            assert meta["store_metrics"]["total_gets"] == 3

    run(body)


def test_metric_keys_and_value_types(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store() as st:
            empty = await st.get_metrics()
            assert (empty["current_version"], empty["current_state"]) == (-1, "UNINITIALIZED")
            await st.subscribe("a")
            await st.subscribe("b")
            await st.set(snap(2, FsmState.ACTIVE))
            with pytest.raises(StateVersionError):
                await st.set(snap(1), enforce_version=True)
            m = await st.get_metrics()
            assert STORE_METRICS | {
                "uptime_seconds",
                "current_version",
                "current_state",
                "active_subscribers",
            } <= set(m)
            ints = ("total_sets", "total_gets", "version_conflicts", "subscriber_count")
            assert [type(m[k]) for k in ints] == [int] * 4
            assert [type(m[k]) for k in ("last_update_ts", "creation_ts", "uptime_seconds")] == [
                float
            ] * 3
            assert (m["total_sets"], m["version_conflicts"], m["subscriber_count"]) == (1, 1, 2)
            assert m["active_subscribers"] == 2
            assert type(m["active_subscribers"]) is int
            assert (m["current_version"], m["current_state"]) == (2, "ACTIVE")

    run(body)


# ---------------------------------------------------------------- set()


def test_set_version_rules(
    make_store: Callable[..., AsyncStateStore], caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with make_store() as st:
            with pytest.raises(StateStoreError, match="None"):
                await st.set(None)  # type: ignore[arg-type]
            first = await st.set(snap(5), enforce_version=True)  # empty: nothing to conflict
            assert first.version == 5
            newer = snap(9)
            assert await st.set(newer, enforce_version=True) == newer  # kept as given
            for stale in (9, 3):
                with pytest.raises(StateVersionError):
                    await st.set(snap(stale, FsmState.ACTIVE), enforce_version=True)
            assert (await st.get()) == newer
            mine = snap(2, FsmState.ACTIVE, reason="late")
            stored = await st.set(mine)
            assert (stored.version, stored.reason, stored.snapshot_id) == (
                10,
                "late",
                mine.snapshot_id,
            )
            assert mine.version == 2  # the caller's object is untouched
            assert await st.get() == stored
            metrics = await st.get_metrics()
            assert (metrics["total_sets"], metrics["version_conflicts"]) == (3, 2)

    run(body)
    conflicts = [r for r in caplog.records if "version conflict" in r.getMessage()]
    assert len(conflicts) == 2
    assert all(r.levelname == "WARNING" for r in conflicts)


def test_a_refused_initial_state_leaves_nothing_open(
    make_store: Callable[..., AsyncStateStore],
) -> None:
    with pytest.raises(InvalidSnapshotError):
        make_store(snap(1, state=42))  # type: ignore[arg-type]
    gc.collect()  # an unclosed handle would warn (an error under this suite's filterwarnings)


def test_state_outside_the_enum_is_refused(make_store: Callable[..., AsyncStateStore]) -> None:
    """A deliberate difference: readers in other processes must decode what was written."""

    async def body() -> None:
        async with make_store(snap(1)) as st:
            with pytest.raises(InvalidSnapshotError):
                await st.set(snap(2, state=42))  # type: ignore[arg-type]
            assert issubclass(InvalidSnapshotError, StateStoreError)
            assert (await st.get()).version == 1  # type: ignore[union-attr]

    run(body)


# ---------------------------------------------------------------- subscribers


def test_local_subscribers_have_the_snapshot_when_set_returns(
    make_store: Callable[..., AsyncStateStore],
) -> None:
    async def body() -> None:
        async with make_store(initial_snapshot()) as st:
            queues = [await st.subscribe(f"s{i}") for i in range(3)]
            for q in queues:
                assert q.get_nowait().reason == "COLD_START"
            current = await st.get()
            assert current is not None
            for i in range(5):
                new_state = FsmState.ACTIVE if i % 2 == 0 else FsmState.IDLE
                t = create_transition(from_state=current.state, to_state=new_state, trigger=f"T{i}")
                current = await st.set(next_snapshot(current, new_state, f"tick {i}", t))
                for q in queues:  # no await in between: delivered inside set()
                    assert q.get_nowait() == current
                    assert q.empty()

    run(body)


def test_subscribe_defaults_and_initialize_if_empty(
    make_store: Callable[..., AsyncStateStore],
) -> None:
    async def body() -> None:
        async with make_store() as st:
            q = await st.subscribe()
            assert isinstance(q, asyncio.Queue)
            assert q.maxsize == 64
            assert q.empty()  # no snapshot yet
            assert (await st.get_metrics())["subscriber_ids"] == ["unknown"]
            cold = await st.initialize_if_empty()
            assert (cold.reason, cold.state, cold.version) == ("COLD_START", FsmState.BOOTING, 0)
            assert q.get_nowait() == cold  # subscribers are notified
            again = await st.initialize_if_empty()
            assert again == cold
            assert q.empty()
            assert (await st.get_metrics())["total_sets"] == 1
            await st.unsubscribe(q)
            await st.set(snap(1))
            assert q.empty()
            await st.unsubscribe(q)  # unknown now: ignored

    run(body)


def test_full_queue_keeps_the_newest(make_store: Callable[..., AsyncStateStore]) -> None:
    """A deliberate difference: the original kept the oldest 64."""

    async def body() -> None:
        async with make_store() as st:
            q = await st.subscribe("stalled")
            for v in range(1, 101):
                await st.set(snap(v))
            got = [q.get_nowait().version for _ in range(q.qsize())]
            assert got[-1] == 100
            assert got == sorted(got)
            assert len(got) <= MAX_QUEUE_SIZE

    run(body)


def test_health_check(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store() as st:
            health = await st.health_check()
            assert set(health) == {"healthy", "issues", "metrics"}
            assert health["healthy"] is False
            assert all(type(issue) is str for issue in health["issues"])
            await st.initialize_if_empty()
            for _ in range(101):
                await st.subscribe()
            health = await st.health_check()
            assert health["healthy"] is True  # many subscribers: an issue, not unhealthy
            assert [i for i in health["issues"] if "101 subscribers" in i]
            with pytest.raises(StateVersionError):
                await st.set(snap(0), enforce_version=True)  # 1 conflict for 1 set
            health = await st.health_check()
            assert health["healthy"] is False
            assert [i for i in health["issues"] if "conflict" in i]

    run(body)


# ---------------------------------------------------------------- event loops


def test_store_survives_its_event_loop(make_store: Callable[..., AsyncStateStore]) -> None:
    st = make_store(snap(0))  # made outside any event loop

    async def first_loop() -> asyncio.Queue[FsmSnapshotDTO]:
        q = await st.subscribe("long-lived")
        assert (await asyncio.wait_for(q.get(), WAIT)).version == 0
        await st.set(snap(1))
        assert (await asyncio.wait_for(q.get(), WAIT)).version == 1
        return q

    q = asyncio.run(first_loop())

    async def second_loop() -> None:
        await st.set(snap(2))
        assert q.get_nowait().version == 2
        fresh = await st.subscribe("fresh")
        assert (await asyncio.wait_for(fresh.get(), WAIT)).version == 2
        await st.set(snap(3))
        assert (await asyncio.wait_for(fresh.get(), WAIT)).version == 3
        assert q.get_nowait().version == 3
        await st.close()

    asyncio.run(second_loop())


def commit_from_another_process(name: str, versions: list[int], go: Any) -> None:
    """Wait for *go*, then commit a snapshot for each of *versions*, in order."""

    async def main() -> None:
        async with AsyncStateStore(name=name) as st:
            assert go.wait(JOIN)
            for v in versions:
                await st.set(snap(v, reason=f"remote {v}"))

    asyncio.run(main())


def test_named_store_survives_its_event_loop_for_other_processes_commits(
    store_name: str, no_watcher_left: None
) -> None:
    st = AsyncStateStore(snap(0), name=store_name)

    async def first_loop() -> asyncio.Queue[FsmSnapshotDTO]:
        q = await st.subscribe("across-loops")
        assert q.get_nowait().version == 0
        return q

    q = asyncio.run(first_loop())  # the loop that was current when the watcher started is gone

    async def second_loop() -> list[int]:
        # Only the old queue is awaited here: the store itself is not called in this loop.
        go = ctx.Event()
        p = ctx.Process(target=commit_from_another_process, args=(store_name, [1, 2, 3], go))
        p.start()
        go.set()
        got = [(await asyncio.wait_for(q.get(), WAIT)).version for _ in range(3)]
        await asyncio.to_thread(p.join, JOIN)
        assert p.exitcode == 0
        return got

    assert asyncio.run(second_loop()) == [1, 2, 3]

    async def third_loop() -> list[int]:
        fresh = await st.subscribe("fresh")
        fresh.get_nowait()
        go = ctx.Event()
        p = ctx.Process(target=commit_from_another_process, args=(store_name, [4, 5], go))
        p.start()
        go.set()
        got = [(await asyncio.wait_for(fresh.get(), WAIT)).version for _ in range(2)]
        await asyncio.to_thread(p.join, JOIN)
        assert p.exitcode == 0
        assert [q.get_nowait().version for _ in range(2)] == [4, 5]
        await st.close()
        return got

    assert asyncio.run(third_loop()) == [4, 5]


# ---------------------------------------------------------------- the registry (issue 11 item 19)


def test_one_registry_entry_per_process(store_name: str, no_watcher_left: None) -> None:
    async def body() -> None:
        stores = [AsyncStateStore(snap(0), name=store_name) for _ in range(3)]
        with Store.open(store_name, FsmSnapshotDTO) as probe:
            assert probe.statistics().readers_registered == 0
            for st in stores:
                for i in range(20):
                    await st.subscribe(f"s{i}")
            assert probe.statistics().readers_registered == 1
            assert len(watcher_threads()) == 1
            for st in stores:
                await st.close()
            assert probe.statistics().readers_registered == 0

    run(body)


def test_full_registry_is_an_error_of_subscribe(store_name: str, no_watcher_left: None) -> None:
    async def body() -> None:
        async with AsyncStateStore(snap(0), name=store_name, max_readers=1) as st:
            with Store.open(store_name, FsmSnapshotDTO) as other:
                with pytest.raises(TimeoutError):
                    other.wait(other.version, 0.01, spin=False)  # takes the only entry
                with pytest.raises(RegistryFullError, match="one entry per process"):
                    await st.subscribe("no room")
                assert (await st.get_metrics())["subscriber_count"] == 0
            q = await st.subscribe("room again")  # the entry was given back
            assert q.get_nowait().version == 0
            assert (await st.health_check())["healthy"] is True

    run(body)


def test_health_reports_a_watcher_that_failed(
    store_name: str, monkeypatch: pytest.MonkeyPatch, no_watcher_left: None
) -> None:
    real_wait = Store.wait

    def failing_wait(self: Store[Any], after: int, timeout: float | None = None, **kw: Any) -> int:
        if timeout is None:  # the watcher thread's endless wait
            raise StateStoreError("semaphore vanished")
        return real_wait(self, after, timeout, **kw)

    async def body() -> None:
        async with AsyncStateStore(snap(0), name=store_name) as st:
            monkeypatch.setattr(Store, "wait", failing_wait)
            await st.subscribe("victim")
            for thread in watcher_threads():
                await asyncio.to_thread(thread.join, JOIN)
            health = await st.health_check()
            assert health["healthy"] is False
            assert [i for i in health["issues"] if "semaphore vanished" in i]
            monkeypatch.setattr(Store, "wait", real_wait)
            await st.subscribe("retry")  # a new subscription starts a new watcher
            assert (await st.health_check())["healthy"] is True

    run(body)


def test_lagging_subscribers_log_one_clear_line(
    store_name: str, caplog: pytest.LogCaptureFixture, no_watcher_left: None
) -> None:
    async def body() -> None:
        async with AsyncStateStore(snap(0), name=store_name, slots=4) as st:
            q = await st.subscribe("behind")
            q.get_nowait()
            with Store.open(store_name, FsmSnapshotDTO) as other:
                for v in range(1, 11):  # no await: this loop cannot deliver in between
                    other.set(snap(v))
            await st.subscribe("late")  # catches up first
            got = [q.get_nowait().version for _ in range(q.qsize())]
            assert got == [10]

    run(body)
    lines = [r.getMessage() for r in caplog.records if "missed" in r.getMessage()]
    assert len(lines) == 1
    assert re.search(r"FSM subscribers missed 9 version\(s\) .* resuming at version 11", lines[0])
    assert "fell behind the ring: subscriber fell behind" not in caplog.text


# ---------------------------------------------------------------- lifecycle (issue 16)


def test_unlink_removes_the_named_store(store_name: str, no_watcher_left: None) -> None:
    async def body() -> None:
        st = AsyncStateStore(snap(1), name=store_name)
        q = await st.subscribe("before")
        st.unlink()
        with pytest.raises(StoreNotFoundError):
            Store.open(store_name, FsmSnapshotDTO)
        await st.subscribe("after")  # this process's watcher has the store open already
        assert (await st.set(snap(2))).version == 2  # this handle keeps its orphaned store
        assert [q.get_nowait().version for _ in range(2)] == [1, 2]  # subscribers go on
        await st.close()
        st.unlink()  # nothing left to remove: no error

        fresh = AsyncStateStore(snap(1), name=store_name)  # a new store under the name
        fresh.unlink()
        with pytest.raises(StoreNotFoundError, match="it was removed"):
            await fresh.subscribe("too late")  # nobody can open it to be woken any more
        await fresh.close()

        async with create_store() as private:
            private.unlink()  # a private store has no name: nothing to do
            assert (await private.set(snap(1))).version == 1

    run(body)
    assert shmstore.remove(store_name) is False


# ---------------------------------------------------------------- big snapshots


@pytest.mark.parametrize("size", [940_000, 4_000_000], ids=["940KB", "4MB"])
@pytest.mark.parametrize("factory", [create_store, create_initialized_store])
def test_big_snapshots_on_default_stores(factory: Callable[[], AsyncStateStore], size: int) -> None:
    async def body() -> None:
        async with factory() as st:
            q = await st.subscribe("big")
            while not q.empty():
                q.get_nowait()
            big = snap(100, context_data={"blob": "x" * size, "n": size})
            stored = await st.set(big)
            assert stored == big
            assert await st.get() == big
            assert q.get_nowait() == big

    run(body)


def test_max_value_size_bounds_a_snapshot(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store(snap(1), max_value_size=100_000) as st:
            assert (await st.set(snap(2, context_data={"b": "z" * 50_000}))).version == 2
            with pytest.raises(shmstore.SnapshotTooLargeError):
                await st.set(snap(3, context_data={"b": "z" * 200_000}))
            assert (await st.get()).version == 2  # type: ignore[union-attr]

    run(body)


def commit_growing_snapshots(name: str, sizes: list[int], go: Any, results: Any) -> None:
    """Wait for *go*, then commit one snapshot per size (a context blob of that many bytes)."""

    async def main() -> None:
        async with AsyncStateStore(name=name) as st:
            assert go.wait(JOIN)
            sent = []
            for i, size in enumerate(sizes, start=1):
                sent.append(await st.set(snap(i, context_data={"blob": "y" * size})))
            results.put(sent)

    asyncio.run(main())


def test_subscriber_in_another_process_follows_a_growing_store(
    store_name: str, no_watcher_left: None
) -> None:
    sizes = [100, 940_000, 200, 4_000_000, 300]

    async def body() -> tuple[list[FsmSnapshotDTO], list[FsmSnapshotDTO]]:
        async with AsyncStateStore(name=store_name) as st:
            q = await st.subscribe("follower")
            go, results = ctx.Event(), ctx.Queue()
            p = ctx.Process(target=commit_growing_snapshots, args=(store_name, sizes, go, results))
            p.start()
            go.set()
            received = [await asyncio.wait_for(q.get(), WAIT) for _ in sizes]
            (sent,) = await asyncio.to_thread(collect, results, [p], 1)
            await asyncio.to_thread(p.join, JOIN)
            assert p.exitcode == 0
            assert await st.get() == sent[-1]
            return received, sent

    received, sent = run(body)
    assert [s.version for s in received] == [1, 2, 3, 4, 5]
    assert received == sent


# ---------------------------------------------------------------- a realistic tick loop


TICKS = 60  # fewer than the queue (64) and the ring (64) hold: every version must arrive


def fsm_tick_loop(name: str, go: Any, results: Any) -> None:
    """The worker's FSM handler, as it calls the store: a tick loop of transitions."""

    async def main() -> None:
        async with AsyncStateStore(name=name) as st:
            current = await st.initialize_if_empty()
            assert go.wait(JOIN)
            sent = []
            for i in range(TICKS):
                if i % 10 == 9:
                    new_state, status, error = FsmState.ERROR_STATE, TransitionStatus.FAILED, "E!"
                else:
                    new_state = (
                        FsmState.ACTIVE if current.state != FsmState.ACTIVE else FsmState.IDLE
                    )
                    status, error = TransitionStatus.SUCCESS, ""
                transition = create_transition(
                    from_state=current.state,
                    to_state=new_state,
                    trigger=f"TICK_{i}",
                    status=status,
                    error_msg=error,
                )
                current = await st.set(next_snapshot(current, new_state, f"tick {i}", transition))
                sent.append(current)
                await asyncio.sleep(0.002)  # the handler's tick interval
            results.put(sent)

    asyncio.run(main())


def test_tick_loop_in_another_process_reaches_a_subscriber_in_order(
    store_name: str, no_watcher_left: None
) -> None:
    async def body() -> tuple[list[FsmSnapshotDTO], list[FsmSnapshotDTO]]:
        async with AsyncStateStore(name=store_name) as st:
            q = await st.subscribe("dashboard")
            go, results = ctx.Event(), ctx.Queue()
            p = ctx.Process(target=fsm_tick_loop, args=(store_name, go, results))
            p.start()
            first = await asyncio.wait_for(q.get(), WAIT)  # COLD_START, by the worker
            go.set()
            received = [first]
            while len(received) < TICKS + 1:
                received.append(await asyncio.wait_for(q.get(), WAIT))
            (sent,) = await asyncio.to_thread(collect, results, [p], 1)
            await asyncio.to_thread(p.join, JOIN)
            assert p.exitcode == 0
            assert q.empty()
            return received, sent

    received, sent = run(body)
    assert [s.version for s in received] == list(range(TICKS + 1))
    assert received[0].reason == "COLD_START"
    assert received[1:] == sent  # decoded in this process, equal field for field
    for got, want in zip(received[1:], sent, strict=True):
        assert dataclasses.asdict(got) == dataclasses.asdict(want)
    assert [s.history[-1].trigger_event for s in received[1:]] == [
        f"TICK_{i}" for i in range(TICKS)
    ]
    failed = [s for s in received if s.state == FsmState.ERROR_STATE]
    assert len(failed) == TICKS // 10
    assert all(s.history[-1].status == TransitionStatus.FAILED for s in failed)
    assert all(s.history[-1].error_message == "E!" for s in failed)
    assert len(received[-1].history) == TICKS  # within the default max_history of 100


def test_logging_stays_quiet_on_the_happy_path(
    make_store: Callable[..., AsyncStateStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="shmstore")

    async def body() -> None:
        async with make_store(initial_snapshot()) as st:
            q = await st.subscribe()
            current = await st.get()
            assert current is not None
            for i in range(20):
                current = await st.set(next_snapshot(current, FsmState.IDLE, f"{i}"))
                await q.get()

    run(body)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# ---------------------------------------------------------------- fork


def follow_after_fork(st: AsyncStateStore, ready: Any, results: Any) -> None:
    """In a forked child: the inherited store subscribes anew and reports what it receives."""

    async def main() -> None:
        q = await st.subscribe("child")
        q.get_nowait()
        ready.set()
        got = await asyncio.wait_for(q.get(), WAIT)
        results.put(got.version)
        await st.close()

    asyncio.run(main())


@pytest.mark.skipif(
    not hasattr(mp, "get_all_start_methods") or "fork" not in mp.get_all_start_methods(),
    reason="no fork",
)
def test_forked_child_subscribes_with_its_own_watcher(
    store_name: str, no_watcher_left: None
) -> None:
    fork = mp.get_context("fork")
    st = AsyncStateStore(snap(0), name=store_name)

    async def subscribe() -> asyncio.Queue[FsmSnapshotDTO]:
        return await st.subscribe("parent")

    q = asyncio.run(subscribe())  # the parent's watcher thread runs while we fork
    ready, results = fork.Event(), fork.Queue()
    p = fork.Process(target=follow_after_fork, args=(st, ready, results))
    p.start()
    assert ready.wait(JOIN)

    async def commit() -> None:
        await st.set(snap(1))
        assert q.get_nowait().version == 0
        assert q.get_nowait().version == 1
        await st.close()

    asyncio.run(commit())
    assert collect(results, [p], 1) == [1]
    p.join(JOIN)
    assert p.exitcode == 0


def test_an_undeliverable_version_is_reported_not_raised_by_set(
    make_store: Callable[..., AsyncStateStore],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_poll = shmstore.Subscription.poll
    broken: list[int] = []

    def poll_once_broken(self: shmstore.Subscription[Any]) -> Any:
        if not broken:
            broken.append(1)
            raise shmstore.CorruptStoreError("slot damaged")
        return real_poll(self)

    async def body() -> None:
        async with make_store(snap(0)) as st:
            q = await st.subscribe("s")
            q.get_nowait()
            monkeypatch.setattr(shmstore.Subscription, "poll", poll_once_broken)
            assert (await st.set(snap(1))).version == 1  # committed: set() does not fail
            health = await st.health_check()
            assert health["healthy"] is False
            assert [i for i in health["issues"] if "slot damaged" in i]
            await st.set(snap(2))  # delivery goes on after the damaged version
            assert q.get_nowait().version == 2

    run(body)
    assert "could not be delivered" in caplog.text


def test_drop_warnings_are_throttled(
    make_store: Callable[..., AsyncStateStore], caplog: pytest.LogCaptureFixture
) -> None:
    commits = 1000  # about 15 overflows of a stalled subscriber's queue

    async def body() -> float:
        async with make_store() as st:
            q = await st.subscribe("stalled")
            started = time.monotonic()
            for v in range(1, commits + 1):
                await st.set(snap(v))
            elapsed = time.monotonic() - started
            assert q.qsize() <= MAX_QUEUE_SIZE
            return elapsed

    elapsed = run(body)
    lines = [
        r.getMessage() for r in caplog.records if "'stalled' is not keeping up" in r.getMessage()
    ]
    assert lines
    assert len(lines) <= 1 + int(elapsed / LOG_INTERVAL)
    assert len(lines) < commits // MAX_QUEUE_SIZE


def test_a_private_store_needs_no_close() -> None:
    """The original had no close(): a private store dropped unclosed is released quietly."""

    async def body() -> None:
        for factory in (create_store, create_initialized_store):
            st = factory()
            q = await st.subscribe()
            await st.set(snap(5))
            assert q.qsize() >= 1
            del st

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(body)
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
