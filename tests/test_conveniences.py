"""``Store.open_or_create`` and ``Store.update`` / ``AsyncStore.update``, with real processes."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any

import pytest
from perm_workers import STEP, bumper, incrementer, open_or_create_racer

from shmstore import AsyncStore, SchemaMismatchError, StateVersionError, Store

ctx = mp.get_context("spawn")
JOIN = 120  # seconds: a hang detector, not a performance bound


# ------------------------------------------------------------------ open_or_create


@pytest.mark.parametrize("round_", range(3))
def test_racing_open_or_create_makes_one_store_with_one_creator(
    store_name: str, round_: int
) -> None:
    racers = 8
    start = ctx.Barrier(racers)
    pipes = [ctx.Pipe() for _ in range(racers)]
    procs = [
        ctx.Process(target=open_or_create_racer, args=(store_name, start, child))
        for _parent, child in pipes
    ]
    for p in procs:
        p.start()
    reports = []
    for parent, _child in pipes:
        assert parent.poll(JOIN), "a racer did not report"
        reports.append(parent.recv())
    for p in procs:
        p.join(JOIN)
        assert p.exitcode == 0
    creators = [pid for created, _ns, _slots, pid in reports if created]
    assert len(creators) == 1, f"creators: {creators}"
    assert len({created_ns for _c, created_ns, _s, _p in reports}) == 1
    assert {slots for _c, _ns, slots, _p in reports} == {4}
    with Store.open(store_name, int) as st:
        assert st.created_ns == reports[0][1]


def test_open_or_create_opens_an_existing_store_as_it_is(store_name: str) -> None:
    with Store.create(store_name, int, slots=2) as first:
        first.set(5)
        with Store.open_or_create(store_name, int, slots=16) as second:
            assert second.geometry.slots == 2  # the existing store keeps its geometry
            assert second.get() == 5
            assert second.created_ns == first.created_ns
        with pytest.raises(SchemaMismatchError):
            Store.open_or_create(store_name, str)


def test_async_open_or_create(store_name: str) -> None:
    async def main() -> None:
        async with AsyncStore.open_or_create(store_name, int) as a:
            await a.set(1)
            async with AsyncStore.open_or_create(store_name, int) as b:
                assert b.get() == 1
                assert b.created_ns == a.created_ns

    asyncio.run(main())


# ------------------------------------------------------------------ update


def test_update_starts_from_none_on_an_empty_store(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        seen: list[int | None] = []

        def bump(value: int | None) -> int:
            seen.append(value)
            return (value or 0) + 1

        assert st.update(bump) == 1
        assert st.update(bump) == 2
        assert seen == [None, 1]
        assert st.get() == 2


@pytest.mark.parametrize(("sync_procs", "async_procs"), [(4, 0), (0, 3), (2, 2)])
def test_concurrent_updates_from_many_processes_lose_nothing(
    store_name: str, sync_procs: int, async_procs: int
) -> None:
    per_process = 300
    n = sync_procs + async_procs
    with Store.create(store_name, int) as st:
        st.set(0)
        start = ctx.Barrier(n)
        procs = [
            ctx.Process(target=incrementer, args=(store_name, start, per_process, i >= sync_procs))
            for i in range(n)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(JOIN)
            assert p.exitcode == 0
        assert st.get() == n * per_process
        assert st.version == 1 + n * per_process  # one commit per increment, none lost or extra


class _Bumped:
    """An *fn* for ``update`` that makes a real other process commit before returning, so
    every attempt of the update conflicts."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.calls = 0

    def __call__(self, value: int | None) -> int:
        self.calls += 1
        self.conn.send("bump")
        assert self.conn.poll(STEP), "the bumper did not answer"
        self.conn.recv()
        return -1


def _with_bumper(store_name: str, body: Any) -> None:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=bumper, args=(store_name, child))
    proc.start()
    try:
        assert parent.poll(JOIN)
        assert parent.recv() == "ready"
        body(parent)
        parent.send("stop")
    finally:
        proc.join(JOIN)
    assert proc.exitcode == 0


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_update_gives_up_after_its_retries(store_name: str, retries: int) -> None:
    with Store.create(store_name, int) as st:
        st.set(1)

        def body(conn: Connection) -> None:
            fn = _Bumped(conn)
            with pytest.raises(StateVersionError, match="gave up") as info:
                st.update(fn, retries=retries)
            assert fn.calls == retries + 1
            assert info.value.actual == st.version

        _with_bumper(store_name, body)
        assert st.get() == (retries + 1) * 10  # the bumper's last value, never the update's
        assert st.version == 1 + retries + 1  # only the bumper's commits
        assert st.conflicts == 0  # update uses try_set: conflicts it expects are not counted


def test_async_update_gives_up_after_its_retries(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(1)

        def body(conn: Connection) -> None:
            fn = _Bumped(conn)

            async def main() -> None:
                async with AsyncStore.open(store_name, int) as ast:
                    with pytest.raises(StateVersionError):
                        await ast.update(fn, retries=2)

            asyncio.run(main())
            assert fn.calls == 3

        _with_bumper(store_name, body)
        assert st.version == 1 + 3


def test_update_retries_until_it_wins_when_unbounded(store_name: str) -> None:
    """Conflicts on the first attempts, then a quiet store: the update lands on the newest
    value, exactly once."""
    with Store.create(store_name, int) as st:
        st.set(1)

        def body(conn: Connection) -> None:
            inner = _Bumped(conn)

            def fn(value: int | None) -> int:
                if inner.calls < 3:
                    inner(value)
                return (value or 0) + 1_000_000

            version = st.update(fn)
            assert inner.calls == 3
            assert version == st.version == 1 + 3 + 1

        _with_bumper(store_name, body)
        assert st.get() == 1_000_030  # on top of the bumper's last value (30, at version 4)
