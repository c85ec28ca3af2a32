"""shmstore.fsm: the worker's store contract, in one process and across processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from test_multiprocess import JOIN, collect
from test_waiting import wait_for_registrations
from workers import (
    fsm_checkpointing_writer,
    fsm_follow,
    fsm_initialize,
    fsm_subscribe_forever,
)

import shmstore
from shmstore._checkpoint import read_checkpoint
from shmstore.fsm import (
    AsyncStateStore,
    FsmSnapshotDTO,
    FsmState,
    StateStoreError,
    StateVersionError,
    TransitionStatus,
    create_initialized_store,
    create_store,
    create_transition,
    initial_snapshot,
    next_snapshot,
)

ctx = mp.get_context("spawn")
R = TypeVar("R")


@pytest.fixture(params=["private", "named"])
def make_store(request: pytest.FixtureRequest, store_name: str) -> Callable[..., AsyncStateStore]:
    """Build an AsyncStateStore: private (memfd) or attached to a named shared store."""

    def make(initial: FsmSnapshotDTO | None = None, **options: Any) -> AsyncStateStore:
        name = store_name if request.param == "named" else None
        return AsyncStateStore(initial, name=name, **options)

    if request.param == "named":
        make.store_name = store_name  # type: ignore[attr-defined]
    return make


def shmstore_remove_named(make: Callable[..., AsyncStateStore]) -> None:
    """Between two lives of a named store, remove it, as a machine restart would."""
    name = getattr(make, "store_name", None)
    if name is not None:
        shmstore.remove(name)


def run(coro_fn: Callable[[], Awaitable[R]]) -> R:
    async def main() -> R:
        return await coro_fn()

    return asyncio.run(main())


async def delivered(st: AsyncStateStore, version: int) -> None:
    """Until the pump has handed *version* to every subscriber (a condition, not a sleep)."""
    deadline = asyncio.get_running_loop().time() + 10
    while any(sub.last_version < version for sub in st._fanout.subscribers.values()):
        assert asyncio.get_running_loop().time() < deadline, "pump did not deliver"
        await asyncio.sleep(0)


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shmstore-fsm-watch")]


def snap(version: int, state: FsmState = FsmState.IDLE, **kw: Any) -> FsmSnapshotDTO:
    return FsmSnapshotDTO(version=version, state=state, **kw)


# ---------------------------------------------------------------- helpers and types


def test_initial_snapshot() -> None:
    s = initial_snapshot()
    assert (s.version, s.state, s.reason, s.source_module) == (
        0,
        FsmState.BOOTING,
        "COLD_START",
        "initial_boot",
    )
    assert s.history == ()
    assert s.prev_state is None


def test_next_snapshot_bumps_version_only_on_state_change() -> None:
    s0 = initial_snapshot()
    s0 = msgspec.structs.replace(s0, context_data={"k": 1})
    s1 = next_snapshot(s0, FsmState.IDLE, "booted")
    assert (s1.version, s1.state, s1.prev_state) == (1, FsmState.IDLE, FsmState.BOOTING)
    assert s1.fsm_instance_id == s0.fsm_instance_id
    assert s1.context_data == {"k": 1}
    assert s1.context_data is not s0.context_data
    assert s1.snapshot_id != s0.snapshot_id
    same = next_snapshot(s1, FsmState.IDLE, "still idle")
    assert same.version == 1
    t = create_transition(FsmState.IDLE, FsmState.ACTIVE, "GO")
    s2 = next_snapshot(s1, FsmState.ACTIVE, "go", t)
    assert s2.history == (t,)
    assert t.status is TransitionStatus.SUCCESS


def test_add_transition_is_bounded_and_immutable() -> None:
    s = initial_snapshot()
    t = [create_transition(FsmState.IDLE, FsmState.ACTIVE, f"E{i}") for i in range(5)]
    s2 = s.add_transition(t[0])
    assert s.history == ()
    assert s2.history == (t[0],)
    s3 = s2
    for tr in t[1:]:
        s3 = s3.add_transition(tr, max_history=3)
    assert s3.history == tuple(t[2:])
    with pytest.raises(AttributeError):
        s3.version = 9  # type: ignore[misc]


# ---------------------------------------------------------------- set / get


def test_set_and_get(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store() as st:
            assert await st.get() is None
            stored = await st.set(snap(1))
            assert (
                await st.get()
                == stored
                == snap(
                    1,
                    ts_mono=stored.ts_mono,
                    ts_wall=stored.ts_wall,
                    snapshot_id=stored.snapshot_id,
                    fsm_instance_id=stored.fsm_instance_id,
                )
            )
            got, meta = await st.get_with_meta()
            assert got == stored
            assert meta["has_state"] is True
            assert meta["current_version"] == 1
            assert meta["subscriber_count"] == 0
            assert meta["store_metrics"]["total_sets"] == 1

    run(body)


def test_set_none_is_refused(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store(snap(1)) as st:
            with pytest.raises(StateStoreError, match="cannot set None"):
                await st.set(None)  # type: ignore[arg-type]
            assert (await st.get()) is not None
            assert (await st.get_metrics())["total_sets"] == 0  # the initial state is no set

    run(body)


def test_stale_version_is_auto_incremented_without_touching_the_caller(
    make_store: Callable[..., AsyncStateStore],
) -> None:
    async def body() -> None:
        async with make_store(snap(5)) as st:
            mine = snap(3, FsmState.ACTIVE)
            stored = await st.set(mine)
            assert stored.version == 6
            assert mine.version == 3
            assert (await st.get()).version == 6  # type: ignore[union-attr]
            assert (await st.set(snap(10))).version == 10

    run(body)


def test_enforced_version_conflict_is_raised_counted_logged(
    make_store: Callable[..., AsyncStateStore], caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with make_store(snap(5)) as st:
            with pytest.raises(StateVersionError, match="not newer than the stored version 5"):
                await st.set(snap(5, FsmState.ACTIVE), enforce_version=True)
            current = await st.get()
            assert current is not None
            assert (current.version, current.state) == (5, FsmState.IDLE)
            metrics = await st.get_metrics()
            assert metrics["version_conflicts"] == 1
            assert metrics["total_sets"] == 0  # the initial state is no set
            assert (await st.set(snap(6), enforce_version=True)).version == 6

    run(body)
    assert any(r.levelname == "WARNING" and "version conflict" in r.message for r in caplog.records)


def test_undecodable_snapshot_is_refused_and_previous_kept(
    make_store: Callable[..., AsyncStateStore],
) -> None:
    async def body() -> None:
        async with make_store(snap(1)) as st:
            before = await st.get()
            with pytest.raises(StateStoreError, match="would not decode"):
                await st.set(snap(2, state=999))  # type: ignore[arg-type]
            assert await st.get() == before

    run(body)


def test_history_is_trimmed_to_max_history(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store(max_history=10) as st:
            s = snap(1)
            for i in range(25):
                s = s.add_transition(create_transition(FsmState.IDLE, FsmState.ACTIVE, f"E{i}"))
            stored = await st.set(s)
            assert len(stored.history) == 10
            assert stored.history[-1].trigger_event == "E24"
            assert len(s.history) == 25  # the caller's snapshot is untouched

    run(body)


def test_large_context_round_trips(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store() as st:
            context = {f"key_{i}": {"n": i, "s": "v" * 20, "l": [i, i + 1]} for i in range(100)}
            await st.set(snap(1, context_data=context))
            got = await st.get()
            assert got is not None
            assert got.context_data == context

    run(body)


def test_thousand_rapid_transitions(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store(initial_snapshot()) as st:
            current = await st.get()
            assert current is not None
            states = [FsmState.IDLE, FsmState.ACTIVE]
            for i in range(1000):
                new_state = states[i % 2]
                t = create_transition(current.state, new_state, f"E{i}")
                current = await st.set(next_snapshot(current, new_state, f"step {i}", t))
            final = await st.get()
            assert final is not None
            assert final.version == 1000
            assert len(final.history) == 100
            assert (await st.get_metrics())["total_sets"] == 1000  # the initial state is no set

    run(body)


def test_cached_get_returns_the_same_object(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store(snap(1)) as st:
            first = await st.get()
            for _ in range(50):
                assert (await st.get()) is first
            assert (await st.get_metrics())["total_gets"] == 51

    run(body)


# ---------------------------------------------------------------- subscriptions


def test_subscriber_gets_current_then_every_commit_in_order(
    make_store: Callable[..., AsyncStateStore],
) -> None:
    async def body() -> None:
        async with make_store(snap(1)) as st:
            q = await st.subscribe("s1")
            assert (await q.get()).version == 1
            for v in range(2, 12):
                await st.set(snap(v, reason=f"r{v}"))
            got = [(await asyncio.wait_for(q.get(), 5)).version for _ in range(10)]
            assert got == list(range(2, 12))

    run(body)


def test_multiple_subscribers_and_unsubscribe(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store() as st:
            qa = await st.subscribe("a")
            qb = await st.subscribe("b")
            assert (await st.get_metrics())["active_subscribers"] == 2
            await st.set(snap(1))
            assert (await asyncio.wait_for(qa.get(), 5)).version == 1
            assert (await asyncio.wait_for(qb.get(), 5)).version == 1
            await st.unsubscribe(qa)
            await st.set(snap(2))
            assert (await asyncio.wait_for(qb.get(), 5)).version == 2
            assert qa.empty()
            _, meta = await st.get_with_meta()
            assert meta["subscriber_count"] == 1
            await st.unsubscribe(qb)
            assert not watcher_threads()  # no subscribers, no background work

    run(body)


def test_overflowing_subscriber_keeps_the_newest(
    make_store: Callable[..., AsyncStateStore], caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with make_store(snap(0)) as st:
            slow = await st.subscribe("slow-consumer")
            for v in range(1, 201):
                await st.set(snap(v))
                await asyncio.sleep(0)  # let the pump deliver as commits happen
            await delivered(st, 201)  # store version: the initial snapshot was version 1
            items = []
            while not slow.empty():
                items.append(slow.get_nowait().version)
            assert items[-1] == 200
            assert len(items) <= 64
            assert items == sorted(items)

    run(body)
    warnings = [r.message for r in caplog.records if "slow-consumer" in r.message]
    assert warnings
    assert "dropped" in warnings[0]


def test_subscribers_whose_queue_fails_are_removed_with_one_log_line(
    make_store: Callable[..., AsyncStateStore], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_item: object) -> None:
        raise RuntimeError("consumer is gone")

    async def body() -> None:
        async with make_store(snap(0)) as st:
            healthy = await st.subscribe("healthy")
            for name in ("ghost-1", "ghost-2"):
                q = await st.subscribe(name)
                q.put_nowait = broken  # type: ignore[method-assign]
            await st.set(snap(1))
            await delivered(st, 2)
            metrics = await st.get_metrics()
            assert metrics["active_subscribers"] == 1
            assert metrics["subscriber_ids"] == ["healthy"]
            assert [healthy.get_nowait().version for _ in range(2)] == [0, 1]

    run(body)
    lines = [r.message for r in caplog.records if "dead subscriber" in r.message]
    assert lines == ["removed 2 dead subscriber(s): 'ghost-1', 'ghost-2'"]


def test_two_hundred_subscribers_see_a_hundred_updates(
    make_store: Callable[..., AsyncStateStore],
) -> None:
    async def body() -> None:
        async with make_store() as st:
            queues = [await st.subscribe(f"s{i}") for i in range(200)]
            health = await st.health_check()
            assert any("200 subscribers" in issue for issue in health["issues"])
            for v in range(1, 101):
                await st.set(snap(v))
                await asyncio.sleep(0)
            await delivered(st, 100)
            for q in queues:
                versions = [q.get_nowait().version for _ in range(q.qsize())]
                assert versions[-1] == 100
                assert versions == sorted(versions)

    run(body)


def test_slow_and_fast_consumers(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> tuple[list[int], list[int]]:
        async with make_store() as st:
            fast_q = await st.subscribe("fast")
            slow_q = await st.subscribe("slow")
            fast: list[int] = []
            slow: list[int] = []

            async def consume(
                q: asyncio.Queue[FsmSnapshotDTO], out: list[int], delay: float
            ) -> None:
                while True:
                    s = await q.get()
                    out.append(s.version)
                    if s.version == 300:
                        return
                    await asyncio.sleep(delay)

            tasks = [
                asyncio.create_task(consume(fast_q, fast, 0)),
                asyncio.create_task(consume(slow_q, slow, 0.002)),
            ]
            for v in range(1, 301):
                await st.set(snap(v))
                await asyncio.sleep(0)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            return fast, slow

    fast, slow = run(body)
    assert fast == list(range(1, 301))  # the fast one saw everything, in order
    assert slow[-1] == 300  # the slow one ends on the latest state
    assert slow == sorted(slow)
    assert len(slow) < 300  # and was shed load instead of holding up the writer


def test_concurrent_gets_sets_and_subscribes(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store(snap(0)) as st:

            async def setter(k: int) -> None:
                for _ in range(50):
                    current = await st.get()
                    assert current is not None
                    await st.set(snap(current.version))  # stale: auto-incremented
                    await asyncio.sleep(0)

            async def getter() -> None:
                last = -1
                for _ in range(200):
                    s = await st.get()
                    assert s is not None
                    assert s.version >= last
                    last = s.version
                    await asyncio.sleep(0)

            async def subscriber(k: int) -> int:
                q = await st.subscribe(f"c{k}")
                first = await q.get()
                await st.unsubscribe(q)
                return first.version

            await asyncio.gather(
                *(setter(k) for k in range(4)),
                *(getter() for _ in range(4)),
                *(subscriber(k) for k in range(10)),
            )
            final = await st.get()
            assert final is not None
            assert final.version == 200  # every set got its own version
            assert (await st.get_metrics())["total_sets"] == 200  # the initial state is no set

    run(body)


# ---------------------------------------------------------------- metrics, health, lifecycle


def test_metrics_and_health(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store() as st:
            m = await st.get_metrics()
            assert m["current_state"] == "UNINITIALIZED"
            assert m["current_version"] == -1
            assert m["last_update_ts"] == 0.0
            assert m["uptime_seconds"] >= 0
            health = await st.health_check()
            assert health["healthy"] is False
            assert "empty" in health["issues"][0]
            await st.initialize_if_empty()
            health = await st.health_check()
            assert health == {"healthy": True, "issues": [], "metrics": health["metrics"]}
            assert health["metrics"]["current_state"] == "BOOTING"
            assert health["metrics"]["last_update_ts"] >= health["metrics"]["creation_ts"]
            for v in range(1, 10):
                await st.set(snap(v))
            with pytest.raises(StateVersionError):
                await st.set(snap(1), enforce_version=True)
            assert (await st.health_check())["healthy"] is True  # 1 conflict in 10 sets
            with pytest.raises(StateVersionError):
                await st.set(snap(1), enforce_version=True)
            health = await st.health_check()
            assert health["healthy"] is False
            assert "version conflict" in health["issues"][0]

    run(body)


def test_initialize_if_empty_only_once(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        async with make_store() as st:
            first = await st.initialize_if_empty()
            second = await st.initialize_if_empty()
            assert first.snapshot_id == second.snapshot_id
            assert (await st.get_metrics())["total_sets"] == 1

    run(body)


def test_factories() -> None:
    async def body() -> None:
        async with create_store() as empty, create_initialized_store() as ready:
            assert await empty.get() is None
            got = await ready.get()
            assert got is not None
            assert got.reason == "COLD_START"
        async with create_store(snap(4)) as given:
            assert (await given.get()).version == 4  # type: ignore[union-attr]

    run(body)


def dev_shm_in_use() -> set[str]:
    """The /dev/shm objects this process has mapped or open (segments and semaphores): on a
    shared machine, other programs' objects in /dev/shm come and go and are not ours."""
    used = {line.split(maxsplit=5)[-1] for line in Path("/proc/self/maps").read_text().splitlines()}
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            used.add(os.readlink(fd))
    return {path for path in used if path.startswith("/dev/shm/")}


def test_private_store_leaves_no_name(store_name: str) -> None:
    before = dev_shm_in_use()

    async def body() -> None:
        async with AsyncStateStore(snap(1)) as st:
            q = await st.subscribe()
            await st.set(snap(2))
            assert (await asyncio.wait_for(q.get(), 5)).version == 1
            assert (await asyncio.wait_for(q.get(), 5)).version == 2
            assert st.name is None
            assert dev_shm_in_use() == before

    run(body)


def test_closed_store_refuses_subscriptions(make_store: Callable[..., AsyncStateStore]) -> None:
    async def body() -> None:
        st = make_store()
        await st.close()
        await st.close()
        with pytest.raises(StateStoreError, match="closed"):
            await st.subscribe()

    run(body)


# ---------------------------------------------------------------- across processes


def test_subscriber_process_follows_a_writer(store_name: str) -> None:
    count = 50

    async def body() -> list[Any]:
        async with AsyncStateStore(snap(0), name=store_name) as st:
            ready = ctx.Event()
            results = ctx.Queue()
            p = ctx.Process(target=fsm_follow, args=(store_name, count, ready, results))
            p.start()
            assert await asyncio.to_thread(ready.wait, JOIN)
            for v in range(1, count):
                await st.set(snap(v, reason=f"r{v}"))
            (seen,) = await asyncio.to_thread(collect, results, [p], 1)
            await asyncio.to_thread(p.join, JOIN)
            assert p.exitcode == 0
            return seen

    seen = run(body)
    assert [v for v, _r in seen] == list(range(count))
    assert [r for _v, r in seen][1:] == [f"r{v}" for v in range(1, count)]


def test_initialize_race_across_four_processes(store_name: str) -> None:
    procs_n = 4
    start = ctx.Barrier(procs_n)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=fsm_initialize, args=(store_name, start, results))
        for _ in range(procs_n)
    ]
    for p in procs:
        p.start()
    ids = collect(results, procs, procs_n)
    for p in procs:
        p.join(JOIN)
        assert p.exitcode == 0
    assert len(set(ids)) == 1

    async def body() -> dict[str, Any]:
        async with AsyncStateStore(name=store_name) as st:
            got = await st.get()
            assert got is not None
            assert got.snapshot_id == ids[0]
            return await st.get_metrics()

    assert run(body)["total_sets"] == 1


def test_killed_subscriber_process_is_reclaimed(
    store_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shmstore")

    async def body() -> None:
        async with AsyncStateStore(snap(0), name=store_name) as st:
            ready = ctx.Event()
            p = ctx.Process(target=fsm_subscribe_forever, args=(store_name, ready))
            p.start()
            assert await asyncio.to_thread(ready.wait, JOIN)
            await asyncio.to_thread(wait_for_registrations, st._store, 1)
            p.kill()
            await asyncio.to_thread(p.join, JOIN)
            await st.set(snap(1))
            await st.set(snap(2))
            assert st._store._registry.entries() == []

    run(body)
    assert "reclaimed 1 registry entry of dead readers" in caplog.text


def test_shared_store_outlives_its_handles(store_name: str) -> None:
    async def body() -> None:
        async with AsyncStateStore(snap(3), name=store_name):
            pass
        async with AsyncStateStore(name=store_name) as again:
            assert (await again.get()).version == 3  # type: ignore[union-attr]
        shmstore.remove(store_name)

    run(body)


# ---------------------------------------------------------------- checkpoints


def test_automatic_checkpoints_and_restore_on_start(
    make_store: Callable[..., AsyncStateStore], tmp_path: Path
) -> None:
    path = tmp_path / "fsm.ckpt"

    async def first_life() -> FsmSnapshotDTO:
        async with make_store(checkpoint_path=path, checkpoint_every=3) as st:
            current = await st.initialize_if_empty()
            for v in range(1, 8):
                current = await st.set(snap(v, reason=f"step {v}"))
            if st._checkpointing is not None:
                await st._checkpointing
            assert read_checkpoint(path).version >= 6  # written while running, every 3
            return current  # close() writes the final state

    last = run(first_life)
    assert read_checkpoint(path).version == 8
    shmstore_remove_named(make_store)

    async def second_life() -> None:
        async with make_store(checkpoint_path=path) as st:
            restored = await st.get()
            assert restored == last
            assert st._store.version == 8
            assert (await st.set(snap(100))).version == 100
            assert st._store.version == 9  # version continuity

    run(second_life)


def test_checkpoint_interval_and_manual_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "fsm.ckpt"

    async def body() -> None:
        async with AsyncStateStore(
            checkpoint_path=path, checkpoint_every=None, checkpoint_interval=3600
        ) as st:
            await st.set(snap(1))
            assert not path.exists()  # neither due by count nor by time
            assert await st.checkpoint() == 1
            assert read_checkpoint(path).version == 1
        async with AsyncStateStore() as plain:
            with pytest.raises(StateStoreError, match="no checkpoint_path"):
                await plain.checkpoint()

    run(body)
    with pytest.raises(ValueError, match="checkpoint_every"):
        AsyncStateStore(checkpoint_path=path, checkpoint_every=0)


def test_restore_after_the_writer_process_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "fsm.ckpt"
    ctx_ = mp.get_context("spawn")
    ready = ctx_.Event()
    p = ctx_.Process(target=fsm_checkpointing_writer, args=(str(path), ready))
    p.start()
    assert ready.wait(JOIN)
    p.kill()
    p.join(JOIN)

    async def body() -> None:
        async with AsyncStateStore(checkpoint_path=path) as st:
            restored = await st.get()
            assert restored is not None
            assert (restored.version, restored.reason) == (22, "r22")

    run(body)


def test_corrupt_checkpoint_on_start_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "fsm.ckpt"
    path.write_bytes(b"SHMCKPT1" + b"\0" * 10)
    with pytest.raises(shmstore.CheckpointError, match="truncated"):
        AsyncStateStore(checkpoint_path=path)
