"""Waiting and subscriptions: semaphore wake-ups across processes, liveness, lag."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_multiprocess import JOIN, collect
from wake_workers import interrupted_in_a_lone_wait, register
from workers import (
    block_forever_in_wait,
    ping_pong_echo,
    sleep_in_wait,
    subscribe_all,
    wait_until,
)

import shmstore
from shmstore import RegistryFullError, StateStoreError, Store, SubscriberLaggedError, _waiting
from shmstore._names import semaphore_prefix

ctx = mp.get_context("spawn")


def wait_for_registrations(st: Store[int], count: int) -> None:
    """Readiness of other processes: poll the registry, which has no event to wait on."""
    deadline = time.monotonic() + JOIN
    while sum(alive for _i, _pid, alive in st._registry.entries()) < count:
        assert time.monotonic() < deadline, "readers did not register"
        time.sleep(0.005)


def semaphores_of(name: str) -> set[str]:
    prefix = "sem." + semaphore_prefix(name).lstrip("/")
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)}


def test_commit_wakes_every_waiting_process(store_name: str) -> None:
    readers, commits = 4, 50
    with Store.create(store_name, int) as st:
        results = ctx.Queue()
        procs = [
            ctx.Process(target=wait_until, args=(store_name, commits, results))
            for _ in range(readers)
        ]
        for p in procs:
            p.start()
        wait_for_registrations(st, readers)
        for i in range(commits):
            st.set(i)
            time.sleep(0.002)  # pacing: commits a few ms apart, as the scenario asks
        reports = collect(results, procs, readers)
        for p in procs:
            p.join(JOIN)
            assert p.exitcode == 0
    assert len({pid for pid, _seen, _final in reports}) == readers
    for _pid, seen, final in reports:
        assert final == commits
        assert seen >= 1


def test_a_sleeping_reader_burns_no_cpu(store_name: str) -> None:
    with Store.create(store_name, int):
        results = ctx.Queue()
        p = ctx.Process(target=sleep_in_wait, args=(store_name, 1.5, results))
        p.start()
        ((cpu, wall),) = collect(results, [p], 1)
        p.join(JOIN)
    assert wall >= 1.5
    assert cpu / wall < 0.1


def test_timeout_raises_after_the_timeout(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(1)
        assert st.wait(0, timeout=0) == 1  # non-blocking check, satisfied
        with pytest.raises(TimeoutError, match="timeout=0"):
            st.wait(1, timeout=0)
        assert st._registry.entries() == []  # timeout=0 never registers
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no version after 1 within 0.3 s"):
            st.wait(1, timeout=0.3)
        assert time.monotonic() - t0 >= 0.3
        assert st._gate.waiter is not None  # registered: the next waits sleep as the lone waiter
        for timeout in (0.3, 1.5):  # 1.5 s: longer than one semaphore sleep (capped at 1 s)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match=rf"no version after 1 within {timeout} s"):
                st.wait(1, timeout=timeout, spin=False)
            assert time.monotonic() - t0 >= timeout
        assert st.get_with_version() == (1, 1)


@pytest.mark.parametrize("spin", [False, True], ids=["sleep-only", "adaptive-spin"])
def test_no_lost_wake_up_in_ten_thousand_round_trips(store_name: str, spin: bool) -> None:
    rounds = 10_000
    pong_name = store_name + "-pong"
    try:
        with Store.create(store_name, int) as ping, Store.create(pong_name, int) as pong:
            echo = ctx.Process(target=ping_pong_echo, args=(store_name, pong_name, rounds, spin))
            echo.start()
            for i in range(1, rounds + 1):
                assert ping.set(i) == i
                # A lost wake-up on either side shows up as a late one: sleeps are capped.
                assert pong.wait(i - 1, timeout=10, spin=spin) == i
            assert pong.statistics().late_wakeups == 0
            echo.join(JOIN)
            assert echo.exitcode == 0  # it checks its own late wake-ups
            assert pong.get() == rounds
    finally:
        shmstore.remove(pong_name)


def test_dead_reader_is_reclaimed_by_the_next_commits(
    store_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shmstore")
    with Store.create(store_name, int) as st:
        p = ctx.Process(target=block_forever_in_wait, args=(store_name,))
        p.start()
        wait_for_registrations(st, 1)
        assert len(semaphores_of(store_name)) == 1
        p.kill()
        p.join(JOIN)
        ((_index, _pid, alive),) = st._registry.entries()
        assert not alive
        st.set(1)  # posts the dead reader's semaphore, which nobody consumes
        st.set(2)  # finds that wake-up unconsumed: sweeps
        assert st._registry.entries() == []
        assert semaphores_of(store_name) == set()
        assert "reclaimed 1 registry entry of dead readers" in caplog.text


def test_dead_reader_is_reclaimed_by_the_next_registration_despite_pid_reuse(
    store_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shmstore")
    with Store.create(store_name, int) as st:
        p = ctx.Process(target=block_forever_in_wait, args=(store_name,))
        p.start()
        wait_for_registrations(st, 1)
        p.kill()
        p.join(JOIN)
        # Pretend the dead reader's PID now belongs to a live process (ours): liveness comes
        # from the kernel-held lock, so the entry must still be reclaimed.
        ((index, _pid, _alive),) = st._registry.entries()
        st._registry._q[st._registry._word(index, 1)] = os.getpid()
        with Store.open(store_name, int) as newcomer:
            with pytest.raises(TimeoutError):
                newcomer.wait(0, timeout=0.01)  # registers: takes over the dead entry
            assert [(i, pid) for i, pid, _a in st._registry.entries()] == [(0, os.getpid())]
        assert "reclaimed 1 registry entry of dead readers" in caplog.text


def test_registry_full_is_a_clear_error_and_disturbs_nothing(store_name: str) -> None:
    with Store.create(store_name, int, max_readers=2) as st:
        st.set(1)
        first, second, third = (Store.open(store_name, int) for _ in range(3))
        try:
            for reader in (first, second):
                with pytest.raises(TimeoutError):
                    reader.wait(1, timeout=0.01)
            with pytest.raises(RegistryFullError, match=r"all 2 reader entries.*max_readers"):
                third.wait(1, timeout=0.01)
            assert third.get() == 1
            st.set(2)
            assert first.wait(1, timeout=5) == 2
            assert second.wait(1, timeout=5) == 2
            first.close()  # frees an entry
            with pytest.raises(TimeoutError):
                third.wait(2, timeout=0.01)
        finally:
            for reader in (first, second, third):
                reader.close()


def test_several_threads_of_one_handle_all_wake(store_name: str) -> None:
    with Store.create(store_name, int) as writer, Store.open(store_name, int) as st:
        got: list[int] = []
        afters = [0, 0, 0, 1]

        def waiter(after: int) -> None:
            got.append(st.wait(after, timeout=30))

        threads = [threading.Thread(target=waiter, args=(a,)) for a in afters]
        for t in threads:
            t.start()
        wait_for_registrations(writer, 1)
        writer.set(1)
        writer.set(2)
        for t in threads:
            t.join(JOIN)
        assert len(got) == 4
        assert all(v >= 1 for v in got)
        assert max(got) == 2
        assert len(st._registry.entries()) == 1  # one entry per handle, whatever the threads


def test_close_wakes_a_thread_blocked_in_wait(store_name: str) -> None:
    with Store.create(store_name, int) as writer:
        st = Store.open(store_name, int)
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                st.wait(0, timeout=30)
            except StateStoreError as exc:
                errors.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        wait_for_registrations(writer, 1)
        st.close()
        t.join(5)
        assert not t.is_alive()
        assert errors
        assert writer._registry.entries() == []
        assert semaphores_of(store_name) == set()


def test_polling_fallback_where_semaphores_cannot_time_out(
    store_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_waiting, "TIMED_WAIT", False)
    with Store.create(store_name, int) as writer, Store.open(store_name, int) as st:
        timer = threading.Timer(0.05, writer.set, args=(7,))
        timer.start()
        assert st.wait(0, timeout=10) == 1
        timer.join()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            st.wait(1, timeout=0.2)
        assert time.monotonic() - t0 >= 0.2
        assert writer._registry.entries() == []  # polling registers nothing


def test_subscriber_in_another_process_sees_every_version_in_order(store_name: str) -> None:
    count = 2000
    with Store.create(store_name, int, slots=4096, slot_size=64) as st:
        results = ctx.Queue()
        p = ctx.Process(target=subscribe_all, args=(store_name, count, results))
        p.start()
        for i in range(count):
            st.set(i * 3)
        (got,) = collect(results, [p], 1)
        p.join(JOIN)
    assert got == [(v, (v - 1) * 3) for v in range(1, count + 1)]


def test_subscription_starts_with_the_current_value(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(10)
        st.set(20)
        with st.subscribe() as sub:
            assert next(sub) == (2, 20)
            assert sub.poll() is None
            st.set(30)
            assert next(sub) == (3, 30)
        with st.subscribe(after_version=0) as replay:
            assert [next(replay) for _ in range(3)] == [(1, 10), (2, 20), (3, 30)]


def test_lagging_subscriber_is_told_exactly_how_many_it_missed(store_name: str) -> None:
    with Store.create(store_name, int, slots=4) as st:
        st.set(0)
        sub = st.subscribe()
        assert next(sub) == (1, 0)
        for i in range(1, 11):
            st.set(i)  # versions 2..11; the ring keeps the last 4
        with pytest.raises(SubscriberLaggedError) as lag:
            next(sub)
        assert lag.value.missed == 11 - 2  # versions 2..10 are gone; 11 comes next
        assert lag.value.resume_version == 11
        assert next(sub) == (11, 10)
        assert sub.missed == 9
        st.set(11)
        assert next(sub) == (12, 11)


def test_subscription_times_out(store_name: str) -> None:
    with Store.create(store_name, int) as st, st.subscribe(timeout=0.05) as sub:
        with pytest.raises(TimeoutError):
            next(sub)


@pytest.mark.parametrize("lone", [False, True], ids=["registering", "registered"])
def test_a_lost_wake_up_shows_as_a_late_one(
    store_name: str, monkeypatch: pytest.MonkeyPatch, lone: bool
) -> None:
    """The detector the lost-wake-up tests rely on: sleeps are capped, so a lost post delays a
    reader instead of stranding it -- and is counted. Both for a first wait (which registers)
    and for a registered handle's lone waiter (straight to the semaphore)."""
    with Store.create(store_name, int) as writer, Store.open(store_name, int) as reader:
        if lone:
            register(reader)
        monkeypatch.setattr(writer._registry, "notify", lambda: None)  # a lost wake-up
        got: list[int] = []
        t = threading.Thread(target=lambda: got.append(reader.wait(0, timeout=60, spin=False)))
        t.start()
        deadline = time.monotonic() + JOIN
        while not reader._gate._sleeper:  # asleep on its semaphore (no event to wait on)
            assert time.monotonic() < deadline
            time.sleep(0.005)
        writer.set(1)
        t.join(60)
        assert got == [1]  # late, not never
        assert reader.statistics().late_wakeups == 1
        assert writer.statistics().late_wakeups == 0


def asleep(st: Store[int]) -> None:
    """Until a thread of *st* sleeps on its semaphore (no event to wait on: poll)."""
    deadline = time.monotonic() + JOIN
    while not st._gate._sleeper:
        assert time.monotonic() < deadline, "nobody went to sleep"
        time.sleep(0.005)


def parked(st: Store[int], count: int) -> None:
    """Until *count* threads of *st* wait for its sleeper (no event to wait on: poll)."""
    deadline = time.monotonic() + JOIN
    while st._gate._parked < count:
        assert time.monotonic() < deadline, "the other waiters did not arrive"
        time.sleep(0.005)


def test_threads_that_join_a_lone_sleeper_all_wake(store_name: str) -> None:
    """A thread alone sleeps on the semaphore without the shared machinery; threads arriving
    meanwhile wait for it, and its wake-up wakes them too."""
    with Store.create(store_name, int) as writer, Store.open(store_name, int) as st:
        register(st)
        got: list[int] = []
        first = threading.Thread(target=lambda: got.append(st.wait(0, timeout=60, spin=False)))
        first.start()
        asleep(st)

        def join(spin: bool) -> None:
            got.append(st.wait(0, timeout=60, spin=spin))

        others = [threading.Thread(target=join, args=(spin,)) for spin in (False, True)]
        for t in others:
            t.start()
        parked(st, 2)
        writer.set(1)
        for t in [first, *others]:
            t.join(JOIN)
            assert not t.is_alive()
        assert got == [1, 1, 1]
        assert st.statistics().late_wakeups == 0  # the commit's post woke them, not the cap
        assert len(st._registry.entries()) == 1


def test_close_ends_a_lone_sleepers_wait(store_name: str) -> None:
    with Store.create(store_name, int) as writer:
        st = Store.open(store_name, int)
        register(st)
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                st.wait(0, timeout=60, spin=False)
            except StateStoreError as exc:
                errors.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        asleep(st)
        st.close()
        t.join(JOIN)
        assert not t.is_alive()
        assert len(errors) == 1
        assert "closed" in str(errors[0])
        assert writer._registry.entries() == []
        assert semaphores_of(store_name) == set()


def test_a_coroutine_joins_a_lone_sleeping_thread(store_name: str) -> None:
    """The coroutines' server thread waits for the lone sleeper like any thread; one commit
    resolves both, through the one registry entry."""
    with Store.create(store_name, int) as writer, Store.open(store_name, int) as st:
        register(st)
        got: list[int] = []
        t = threading.Thread(target=lambda: got.append(st.wait(0, timeout=60, spin=False)))
        t.start()
        asleep(st)

        async def main() -> int:
            task = asyncio.ensure_future(st.wait_async(0, timeout=60))
            deadline = time.monotonic() + JOIN
            while st._gate._parked < 1:  # the server thread waits for the sleeper
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            writer.set(1)
            return await task

        assert asyncio.run(main()) == 1
        t.join(JOIN)
        assert got == [1]
        assert st.statistics().late_wakeups == 0
        assert len(st._registry.entries()) == 1


def test_ctrl_c_ends_a_lone_sleepers_wait_and_leaves_the_gate_usable(store_name: str) -> None:
    with Store.create(store_name, int):
        results = ctx.Queue()
        p = ctx.Process(target=interrupted_in_a_lone_wait, args=(store_name, results))
        p.start()
        assert collect(results, [p], 1) == ["registered"]
        # Best effort to land the signal in the semaphore sleep (a signal just before it is seen
        # when the capped sleep ends, within a second): the main thread shows as sleeping.
        stat = Path(f"/proc/{p.pid}/stat")
        deadline = time.monotonic() + JOIN
        while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "S":
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(p.pid, signal.SIGINT)
        (report,) = collect(results, [p], 1)
        p.join(JOIN)
        assert p.exitcode == 0
    assert report == ("interrupted", False, 0)


def test_the_writer_posts_a_new_claim_of_a_reused_entry(store_name: str) -> None:
    """The writer caches each entry's semaphore by claim; a new claim of the same entry (a new
    generation, a new semaphore) must be posted, not the previous claimant's."""
    with Store.create(store_name, int) as writer:
        with Store.open(store_name, int) as first:
            register(first)
            writer.set(1)  # the writer opens and caches the first claim's semaphore
            assert [index for index, _pid, _alive in writer._registry.entries()] == [0]
        with Store.open(store_name, int) as second:
            register(second)
            assert [index for index, _pid, _alive in writer._registry.entries()] == [0]
            got: list[int] = []
            t = threading.Thread(target=lambda: got.append(second.wait(1, timeout=60, spin=False)))
            t.start()
            asleep(second)
            writer.set(2)
            t.join(JOIN)
            assert got == [2]
            assert second.statistics().late_wakeups == 0  # posted, not woken by the cap
