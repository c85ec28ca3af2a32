"""Values that grow: a store moves to a larger ring and every handle follows (issue 13)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
from pathlib import Path

import pytest
from growth_workers import (
    blob,
    check_blob,
    grower,
    grower_frozen_at,
    reader,
    second_writer,
    subscriber,
    waiter,
)
from test_waiting import wait_for_registrations

import shmstore
from shmstore import CorruptStoreError, SnapshotTooLargeError, Store
from shmstore._names import generation_segment_name, segment_name
from shmstore.metrics import prometheus_text

ctx = mp.get_context("spawn")
JOIN = 60
SHM = Path("/dev/shm")


def generations_on_disk(name: str) -> set[str]:
    prefix = segment_name(name).lstrip("/") + ".g"
    return {p.name for p in SHM.iterdir() if p.name.startswith(prefix)}


def gen_file(st: Store[bytes], generation: int) -> str:
    return generation_segment_name(st.name, st.created_ns, generation).lstrip("/")


def test_a_value_that_does_not_fit_grows_the_store(store_name: str) -> None:
    with Store.create(store_name, bytes, slot_size=4096) as st:
        assert st.set(b"small") == 1
        assert st.capacity == 4096
        big = blob(2, 1 << 20)
        assert st.set(big) == 2
        assert st.get_with_version() == (big, 2)
        assert st.capacity >= 1 << 20
        stats = st.statistics()
        assert (stats.growths, stats.version, stats.commits) == (1, 2, 2)
        assert stats.slot_size == st.capacity
        assert generations_on_disk(store_name) == {gen_file(st, 1)}
        # Geometric: a little more does not move again; 4 MiB does, and the old ring's name goes.
        assert st.set(blob(3, (1 << 20) + 100)) == 3
        assert st.statistics().growths == 1
        assert st.set(blob(4, 4 << 20)) == 4
        assert st.statistics().growths == 2
        assert generations_on_disk(store_name) == {gen_file(st, 2)}
        text = prometheus_text([st.statistics()])
        assert "shmstore_growths_total" in text
        assert f'shmstore_slot_size_bytes{{store="{store_name}"' in text
        with Store.open(store_name, bytes) as late:  # opened after the moves
            assert late.get_with_version() == (blob(4, 4 << 20), 4)
            assert late.capacity == st.capacity
        st.unlink()
        assert generations_on_disk(store_name) == set()


def test_max_value_size_is_the_only_ceiling_and_refusal_keeps_the_state(store_name: str) -> None:
    with Store.create(store_name, bytes, slot_size=1024, max_value_size=64 * 1024) as st:
        st.set(blob(1, 60 * 1024))
        with pytest.raises(SnapshotTooLargeError, match="max_value_size"):
            st.set(b"x" * (64 * 1024 + 1))
        assert st.get_with_version() == (blob(1, 60 * 1024), 1)
    with pytest.raises(ValueError, match="max_value_size must be between"):
        Store.create(store_name, bytes, slot_size=4096, max_value_size=100)


def test_default_stores_start_small(store_name: str) -> None:
    with Store.create(store_name, bytes) as st:
        assert (SHM / segment_name(store_name).lstrip("/")).stat().st_size < 64 * 1024
        assert st.max_value_size == 64 << 20
        st.set(blob(1, 10 << 20))  # and grow when a value needs it
        assert st.get() == blob(1, 10 << 20)


def test_every_handle_in_other_processes_follows_a_growth_from_4k_to_4m(store_name: str) -> None:
    sizes = [1000, 8 << 10, 64 << 10, 1 << 20, 4 << 20]  # versions 1..5, four moves
    with Store.create(store_name, bytes, slots=8, slot_size=4096) as st:
        st.set(blob(1, sizes[0]))
        results = ctx.Queue()
        go = ctx.Event()
        opened = [ctx.Event(), ctx.Event()]
        procs = [
            ctx.Process(target=reader, args=(store_name, opened[0], go, results)),
            ctx.Process(target=second_writer, args=(store_name, opened[1], go, results)),
            ctx.Process(target=waiter, args=(store_name, 1, results)),
            ctx.Process(target=subscriber, args=(store_name, len(sizes) + 1, results)),
        ]
        for p in procs:
            p.start()
        for event in opened:
            assert event.wait(JOIN)
        wait_for_registrations(st, 2)  # the waiter and the subscriber sleep on semaphores
        for version, size in enumerate(sizes[1:], start=2):
            assert st.set(blob(version, size)) == version
        assert st.statistics().growths == 4
        go.set()
        got = {}
        for _ in procs:
            item = results.get(timeout=JOIN)
            got[item[0]] = item[1:]
        for p in procs:
            p.join(JOIN)
            assert p.exitcode == 0
        assert got["waiter"][0] >= 2  # woke across the first move
        assert got["reader"][0] == len(sizes)  # opened before the moves, reads the newest
        stale_refused, new_version, capacity = got["writer"]
        assert stale_refused  # compare-and-set against a version read before the moves
        assert new_version == len(sizes) + 1  # and against the current one, into the new ring
        assert capacity >= (4 << 20) + 1000
        seen, missed = got["subscriber"]
        assert [v for v, _n in seen] == list(range(1, len(sizes) + 2))  # every version, in order
        assert missed == 0
        assert check_blob(st.get() or b"") == len(sizes) + 1
        st.unlink()
    assert generations_on_disk(store_name) == set()


@pytest.mark.parametrize(
    "marker",
    [
        "write_generation_header(segment.map",  # new segment exists, nothing in it
        "ring.write_slot(version, got[0], got[1])",  # copying the old versions
        "publish_generation(segment.map)",  # copied, not yet a generation
        "ring.take_over()",  # published, GENERATION not yet moved
        # moved, old names still there
        "unlink_generations(name, created_ns, range(1, generation))",
        "return ring, segment",  # moved; the commit itself not yet made
    ],
)
def test_writer_frozen_and_killed_at_each_step_of_a_move_loses_nothing(
    store_name: str, marker: str
) -> None:
    with Store.create(store_name, bytes, slots=4, slot_size=4096) as st:
        for v in range(1, 4):
            st.set(blob(v, 3000))
        st.set(blob(4, 10_000))  # one move already: generation 1 exists
        reached = ctx.Event()
        p = ctx.Process(target=grower_frozen_at, args=(store_name, marker, reached))
        p.start()
        assert reached.wait(JOIN)
        assert st._lock.held_elsewhere()
        p.kill()
        p.join(JOIN)
        # Readable at the last committed version, by this handle and by a new one.
        assert st.get_with_version() == (blob(4, 10_000), 4)
        with Store.open(store_name, bytes) as fresh:
            assert fresh.get_with_version() == (blob(4, 10_000), 4)
            # The next writer finishes or restarts the move, and everyone follows.
            assert fresh.set(blob(5, 100_000)) == 5
        assert st.get_with_version() == (blob(5, 100_000), 5)
        assert st.set(blob(6, 200_000)) == 6
        with st.subscribe(after_version=2) as sub:  # the ring still holds the versions it did
            assert [next(sub)[0] for _ in range(4)] == [3, 4, 5, 6]
        st.unlink()
    assert generations_on_disk(store_name) == set()


def test_writers_killed_mid_growth_many_times(store_name: str) -> None:
    rng = random.Random(1234)
    with Store.create(store_name, bytes, slots=4, slot_size=1024) as st:
        st.set(blob(1, 100))
        for _ in range(8):
            started = ctx.Event()
            p = ctx.Process(target=grower, args=(store_name, started))
            p.start()
            assert started.wait(JOIN)
            before = st.version
            while st.version < before + rng.randint(1, 12):  # let it commit (and grow) a while
                st.wait(st.version, timeout=JOIN, spin=False)
            p.kill()
            p.join(JOIN)
            value, version = st.get_with_version()
            assert value is not None
            assert check_blob(value) == version
            assert st.set(blob(version + 1, 3 << 20)) == version + 1  # the next writer moves on
        st.unlink()
    assert generations_on_disk(store_name) == set()


def test_checkpoint_of_a_large_value_restores_into_a_small_store(
    store_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "big.ckpt"
    with Store.create(store_name, bytes, slot_size=4096) as st:
        st.set(blob(1, 1 << 20))
        st.checkpoint(path)
        st.unlink()
    with Store.create(store_name, bytes, slot_size=4096, restore_from=path) as st:
        assert st.get_with_version() == (blob(1, 1 << 20), 1)
        assert st.set(blob(2, 2 << 20)) == 2
        st.unlink()


def test_async_store_handles_follow_a_growth(store_name: str) -> None:
    import asyncio  # noqa: PLC0415

    from shmstore import AsyncStore  # noqa: PLC0415

    async def main() -> None:
        with Store.create(store_name, bytes, slot_size=4096) as writer:
            writer.set(blob(1, 100))
            reader = AsyncStore.open(store_name, bytes)
            try:
                waiting = asyncio.create_task(reader.wait(1, timeout=JOIN))
                await asyncio.to_thread(wait_for_registrations, writer, 1)
                writer.set(blob(2, 2 << 20))  # moves the store while the coroutine sleeps
                assert await waiting == 2
                assert reader.get_with_version() == (blob(2, 2 << 20), 2)
                assert reader.capacity >= 2 << 20
                assert await reader.set(blob(3, 3 << 20)) == 3  # and writes into the new ring
            finally:
                reader.close()
            assert writer.get_with_version() == (blob(3, 3 << 20), 3)
            writer.unlink()

    asyncio.run(main())


def test_an_orphan_that_grows_never_touches_the_new_store_of_its_name(store_name: str) -> None:
    """Issue 20, item 1: a handle of a removed store that grows used to take the new store's
    ring ``.g1`` for a dead writer's leftover, unlink it and put its own in its place."""
    orphan = Store.create(store_name, bytes, slots=4, slot_size=1024)
    try:
        orphan.set(b"old")
        orphan.unlink()  # the name is free; the handle lives on, orphaned
        with Store.create(store_name, bytes, slots=4, slot_size=1024) as new:
            new.set(blob(1, 3000))  # the new store moves to its generation 1
            assert new.statistics().growths == 1
            (ring,) = generations_on_disk(store_name)
            assert ring == gen_file(new, 1)
            orphan.set(blob(2, 3000))  # the orphan grows to *its* generation 1
            assert orphan.get_with_version() == (blob(2, 3000), 2)
            assert gen_file(new, 1) in generations_on_disk(store_name)  # still there
            with Store.open(store_name, bytes) as fresh:
                assert fresh.get_with_version() == (blob(1, 3000), 1)
            new.set(blob(3, 5000))  # the new store commits and grows on, unharmed
            orphan.set(blob(4, 9000))
            with Store.open(store_name, bytes) as fresh:
                assert fresh.get_with_version() == (blob(3, 5000), 2)
            assert orphan.get_with_version() == (blob(4, 9000), 3)
    finally:
        orphan.close()
    shmstore.remove(store_name)
    assert generations_on_disk(store_name) == set()  # every ring of every incarnation


def test_a_clash_of_ring_names_is_refused_and_never_removed(store_name: str) -> None:
    """Should two incarnations' ring names ever clash (30 bits of hash), the ring's header says
    whose it is: the orphan neither removes the other store's ring nor uses it."""
    orphan = Store.create(store_name, bytes, slots=4, slot_size=1024)
    try:
        orphan.set(b"old")
        orphan.unlink()
        with Store.create(store_name, bytes, slots=4, slot_size=1024) as new:
            new.set(blob(1, 3000))
            # The clash, made by hand: the orphan's generation-1 name is the new store's ring.
            os.link(SHM / gen_file(new, 1), SHM / gen_file(orphan, 1))
            with pytest.raises(CorruptStoreError, match="is taken by a ring of the store"):
                orphan.set(blob(2, 3000))
            assert orphan.get_with_version() == (b"old", 1)
            assert {gen_file(new, 1), gen_file(orphan, 1)} <= generations_on_disk(store_name)
            with Store.open(store_name, bytes) as fresh:
                assert fresh.get_with_version() == (blob(1, 3000), 1)
    finally:
        orphan.close()
