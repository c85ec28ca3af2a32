"""Hardening round 2 (issue 11): each test reproduces one way the store was broken by attacking it.

Every test here was run against the code before the rebuild (8f2b0b0) and failed there, except
the ``fresh`` case of the other-user reader test, which guards a regression of the rebuild itself
(a reader of another user could not register at all). Races are reproduced statistically: the
race tests failed in most runs on the old code, never on the new. Crash scenarios run the victim
in a child interpreter, so a segfault fails one test instead of the run. The other-user tests run
as root and do the other user's part in a spawned child that drops to uid 65534 (``workers``);
sticky ``/dev/shm`` then applies to that child as it would to any other user.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import math
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from workers import (
    OTHER_UID,
    Rec,
    looping_writer,
    other_user_commits,
    other_user_removes,
    other_user_waits,
    reclaimer_stopped_in_sweep,
    register_and_die,
    sleep_in_huge_timeout,
    writer_stopped_at,
)

import shmstore
from shmstore import (
    AsyncStore,
    CheckpointError,
    CorruptStoreError,
    InvalidSnapshotError,
    StateVersionError,
    Store,
)
from shmstore._layout import OFF_HEAD
from shmstore._names import segment_name, semaphore_prefix
from shmstore._writelock import robust_mutex_supported

ctx = mp.get_context("spawn")
HANG = 60.0  # seconds: bounds a hang, never a performance goal
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
linux_only = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def run_child(store_name: str, script: str, **values: str) -> subprocess.CompletedProcess[str]:
    """Run *script* in a fresh interpreter with ``NAME`` (and *values*) defined: a segfault or a
    hang there fails the calling test only."""
    prelude = f"NAME = {store_name!r}\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", prelude + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def in_thread(fn: Callable[[], Any], timeout: float = HANG) -> Any:
    """``fn()`` in a daemon thread: its result, its exception, or a failure if it hangs."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"{getattr(fn, '__name__', fn)} still blocked after {timeout} s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def semaphore_files(store_name: str) -> list[Path]:
    prefix = "sem." + semaphore_prefix(store_name).lstrip("/")
    return [p for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)]


# ------------------------------------------------------------------ 1, 2: crashes


CLOSE_UNDER_ASYNC_WAITER = """
    import asyncio, time
    from shmstore import AsyncStore, StateStoreError, Store
    async def main():
        with Store.create(NAME, int) as writer:
            for _ in range(20):
                handle = AsyncStore.open(NAME, int)
                task = asyncio.ensure_future(handle.wait(writer.version, timeout=120))
                deadline = time.monotonic() + 60
                while writer.statistics().readers_registered == 0:  # the waiter sleeps now
                    assert time.monotonic() < deadline, "the async waiter never registered"
                    await asyncio.sleep(0.001)
                handle.store.close()  # the wrapped store, under the pending waiter
                for _ in range(5):
                    writer.set(writer.version + 1)  # wakes whatever is still registered
                try:
                    await asyncio.wait_for(task, 60)
                except StateStoreError:
                    pass
                else:
                    raise AssertionError("the waiter of a closed store was served")
                handle.close()
                assert writer.statistics().readers_registered == 0, "entry left behind"
    asyncio.run(main())
    print("survived")
"""


def test_closing_the_store_under_an_async_waiter_neither_crashes_nor_leaks_its_entry(
    store_name: str,
) -> None:
    result = run_child(store_name, CLOSE_UNDER_ASYNC_WAITER)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "survived" in result.stdout


STATISTICS_RACING_CLOSE = """
    import sys, threading
    from shmstore import StateStoreError, Store
    sys.setswitchinterval(1e-6)
    unexpected = []
    with Store.create(NAME, int) as owner:
        owner.set(1)
        for _ in range(300):
            st = Store.open(NAME, int)
            started = threading.Event()
            def read_statistics():
                started.set()
                try:
                    while True:
                        st.statistics()
                except StateStoreError as exc:
                    if "closed" not in str(exc):
                        unexpected.append(exc)
                except BaseException as exc:
                    unexpected.append(exc)
            threads = [threading.Thread(target=read_statistics) for _ in range(2)]
            for t in threads:
                t.start()
            started.wait()
            st.close()
            for t in threads:
                t.join()
    assert not unexpected, unexpected[:3]
    print("survived")
"""


def test_statistics_racing_close_never_crashes(store_name: str) -> None:
    result = run_child(store_name, STATISTICS_RACING_CLOSE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "survived" in result.stdout


READS_RACING_CLOSE = """
    import sys, threading
    from shmstore import StateStoreError, Store
    sys.setswitchinterval(1e-6)
    unexpected = []
    with Store.create(NAME, bytes, slot_size=20_000) as owner:
        owner.set(b"x")
        for round in range(1000):
            st = Store.open(NAME, bytes)
            reads = {
                "get": st.get,
                "get_with_version": st.get_with_version,
                "commits": lambda: st.commits,
                "conflicts": lambda: st.conflicts,
                "last_update_ns": lambda: st.last_update_ns,
                "app_counters": lambda: st.app_counters[0],
                "mirror_status": lambda: st.mirror_status,
                "subscription": lambda: next(iter(st.subscribe(after_version=0, timeout=0.001))),
            }
            started = threading.Barrier(len(reads) + 1)
            def read(label, fn):
                started.wait()
                try:
                    while True:
                        fn()
                        owner.set(b"y" * (SIZE + round % 900))  # a new version every read
                except StateStoreError:
                    pass  # closed, or lagged/timed out: all part of the contract
                except BaseException as exc:
                    unexpected.append((label, repr(exc)))
            threads = [threading.Thread(target=read, args=item) for item in reads.items()]
            for t in threads:
                t.start()
            started.wait()
            st.close()
            for t in threads:
                t.join()
    assert not unexpected, sorted(set(unexpected))[:5]
    print("survived")
"""


@pytest.mark.parametrize("size", [1, 8000], ids=["copied", "decoded-in-place"])
def test_reads_racing_close_raise_only_state_store_errors(store_name: str, size: int) -> None:
    result = run_child(store_name, READS_RACING_CLOSE.replace("SIZE", str(size)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "survived" in result.stdout


# ------------------------------------------------------------------ 3: Ctrl-C and the writer lock

FUTEX_SYSCALL = {"x86_64": 202, "aarch64": 98}

INTERRUPTED_RIGHT_AFTER_THE_LOCK = """
    import os, signal, threading, time
    from shmstore import Store
    with Store.create(NAME, int, writer_lock="mutex") as st:
        lock = st._lock
        main_tid = threading.get_native_id()
        holding = threading.Event()
        def holder():
            lock.acquire()  # this thread owns the mutex
            holding.set()
            # Until the main thread sleeps in the kernel on this very mutex (a futex wait on
            # its address), so that the interrupt lands right after its lock call returns.
            deadline = time.monotonic() + 60
            while True:
                with open(f"/proc/self/task/{main_tid}/syscall") as f:
                    fields = f.read().split()
                if fields[0] == str(FUTEX) and int(fields[1], 16) == lock.addr:
                    break
                assert time.monotonic() < deadline, fields
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGINT)  # pending: Python runs it after the lock call
            lock.release()
        thread = threading.Thread(target=holder)
        thread.start()
        holding.wait()
        try:
            st.set(1)
            outcome = "committed"
        except KeyboardInterrupt:
            outcome = "interrupted"
        thread.join()
        probe = []
        checker = threading.Thread(target=lambda: probe.append(lock.held_elsewhere()))
        checker.start()
        checker.join()
        print(outcome, "lock-held" if probe[0] else "lock-free")
"""


@linux_only
@pytest.mark.skipif(not robust_mutex_supported(), reason="needs robust mutexes")
@pytest.mark.skipif(platform.machine() not in FUTEX_SYSCALL, reason="futex number unknown here")
def test_ctrl_c_right_after_the_contended_lock_returns_does_not_keep_the_writer_lock(
    store_name: str,
) -> None:
    result = run_child(
        store_name,
        INTERRUPTED_RIGHT_AFTER_THE_LOCK.replace("FUTEX", str(FUTEX_SYSCALL[platform.machine()])),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["interrupted", "lock-free"]


def test_ctrl_c_right_after_statistics_probes_the_writer_lock_does_not_keep_it(
    store_name: str, writer_lock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        Store.create(store_name, int, writer_lock=writer_lock) as st,
        Store.open(store_name, int) as other,
    ):
        # The probe's lock call succeeds, then a Ctrl-C arrives before the next bytecode.
        if writer_lock == "mutex":
            trylock = st._lock._trylock

            def interrupted_trylock(addr: int) -> int:
                trylock(addr)
                raise KeyboardInterrupt

            monkeypatch.setattr(st._lock, "_trylock", interrupted_trylock)
        else:
            flock = fcntl.flock

            def interrupted_flock(fd: int, operation: int) -> None:
                flock(fd, operation)
                if operation & fcntl.LOCK_NB and fd == st._lock.fd:
                    raise KeyboardInterrupt

            monkeypatch.setattr(fcntl, "flock", interrupted_flock)
        with pytest.raises(KeyboardInterrupt):
            st.statistics()
        monkeypatch.undo()
        # Another handle (its own descriptor), in another thread (another mutex owner).
        assert not in_thread(other._lock.held_elsewhere), "the probe kept the writer lock"
        assert in_thread(lambda: other.set(1)) == 1


# ------------------------------------------------------------------ 4: a stopped writer


def test_a_stopped_writer_never_blocks_a_readers_timeout_close_or_async_close(
    store_name: str, writer_lock: str
) -> None:
    with Store.create(store_name, Rec, writer_lock=writer_lock) as owner:
        owner.set(Rec(0, b"x", 0))
        reached = ctx.Event()
        writer = ctx.Process(
            target=writer_stopped_at,
            args=(store_name, "commit", "self.write_slot(version, payload, ts_ns)", reached),
        )
        writer.start()
        try:
            assert reached.wait(HANG), "the writer never got inside its commit"
            os.kill(writer.pid, signal.SIGSTOP)  # stopped, holding the writer lock
            assert owner._lock.held_elsewhere()

            def reader_times_out_and_closes() -> None:
                reader = Store.open(store_name, Rec)
                try:
                    with pytest.raises(TimeoutError):
                        reader.wait(reader.version, timeout=0.5)
                finally:
                    reader.close()

            async def async_reader_times_out_and_closes() -> None:
                handle = AsyncStore.open(store_name, Rec)
                try:
                    with pytest.raises(TimeoutError):
                        await handle.wait(handle.version, timeout=0.5)
                finally:
                    handle.close()

            in_thread(reader_times_out_and_closes)
            in_thread(lambda: asyncio.run(async_reader_times_out_and_closes()))
        finally:
            writer.kill()
            writer.join(HANG)


def test_a_process_stopped_holding_the_registry_lock_never_blocks_async_timeouts_or_close(
    store_name: str,
) -> None:
    with Store.create(store_name, int) as owner:
        reached = ctx.Event()
        tool = ctx.Process(target=reclaimer_stopped_in_sweep, args=(store_name, reached))
        tool.start()
        try:
            assert reached.wait(HANG), "the reclaimer never got inside its sweep"
            os.kill(tool.pid, signal.SIGSTOP)

            def reader_times_out_and_closes() -> None:
                reader = Store.open(store_name, int)
                try:
                    with pytest.raises(TimeoutError):
                        reader.wait(0, timeout=0.5)
                finally:
                    reader.close()

            async def async_reader_times_out_and_closes() -> None:
                handle = AsyncStore.open(store_name, int)
                try:
                    with pytest.raises(TimeoutError):
                        await handle.wait(0, timeout=0.5)
                finally:
                    handle.close()

            in_thread(reader_times_out_and_closes)
            in_thread(lambda: asyncio.run(async_reader_times_out_and_closes()))
        finally:
            tool.kill()
            tool.join(HANG)
        assert owner.version == 0


# ------------------------------------------------------------------ 5, 18: fork


def test_a_child_forked_while_a_thread_checkpoints_can_checkpoint(
    store_name: str, tmp_path: Path
) -> None:
    with Store.create(store_name, int) as st:
        st.set(1)
        # A parent thread in the middle of a checkpoint at fork time (the FSM layer has one).
        st._checkpoint_lock.acquire()
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - reports through its exit status
                done = threading.Event()

                def checkpoint() -> None:
                    st.checkpoint(tmp_path / "child.ckpt")
                    done.set()

                threading.Thread(target=checkpoint, daemon=True).start()
                os._exit(0 if done.wait(HANG) else 3)
        finally:
            st._checkpoint_lock.release()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child deadlocked in checkpoint()"
        assert (tmp_path / "child.ckpt").exists()


ASYNC_WAIT_AFTER_FORK = """
    import asyncio, os, threading
    from shmstore import AsyncStore, Store
    with Store.create(NAME, int) as writer:
        handle = AsyncStore.open(NAME, int)
        loop = asyncio.new_event_loop()
        parked = threading.Event()
        got = []
        async def parent_waits():
            task = asyncio.ensure_future(handle.wait(0, timeout=120))
            await asyncio.sleep(0)
            parked.set()  # a coroutine of the parent waits at fork time
            got.append(await task)
        thread = threading.Thread(target=lambda: loop.run_until_complete(parent_waits()))
        thread.start()
        assert parked.wait(60)
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            async def child_waits():
                task = asyncio.ensure_future(handle.wait(0, timeout=30))
                await asyncio.sleep(0)
                os.write(ready_w, b"r")  # parked: now the parent commits
                return await task
            try:
                code = 0 if asyncio.run(child_waits()) == 1 else 4
            except TimeoutError:
                code = 3
            except BaseException:
                code = 5
            os._exit(code)
        assert os.read(ready_r, 1) == b"r"
        writer.set(1)
        _, status = os.waitpid(pid, 0)
        thread.join(60)
        loop.close()
        handle.close()
        assert got == [1], got
        print("child exit", os.waitstatus_to_exitcode(status))
"""


def test_a_forked_childs_async_wait_is_served(store_name: str) -> None:
    result = run_child(store_name, ASYNC_WAIT_AFTER_FORK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["child", "exit", "0"], "exit 3: the child was never served"


# ------------------------------------------------------------------ 6, 7, 8: semaphores


def test_closing_a_handle_of_a_removed_store_does_not_silence_a_reader_of_its_successor(
    store_name: str,
) -> None:
    old_owner = Store.create(store_name, int)
    old_reader = Store.open(store_name, int)
    try:
        with pytest.raises(TimeoutError):
            old_reader.wait(0, timeout=0.01)  # registered at entry 0 of the old store
        old_owner.unlink()
        with Store.create(store_name, int) as owner, Store.open(store_name, int) as reader:
            with pytest.raises(TimeoutError):
                reader.wait(0, timeout=0.01)  # entry 0 of the new store
            old_reader.close()  # must not touch the new store's semaphores
            owner.set(1)
            # The reader is not asleep, so the commit's wake-up is still pending on its
            # semaphore. (A sleeping reader also re-reads the version once a second, which
            # would hide a lost wake-up as latency: the semaphore is the proof.)
            assert posted(reader), "the commit did not reach the new store's reader"
            assert reader.wait(0, timeout=HANG) == 1
    finally:
        old_reader.close()
        old_owner.close()


def posted(reader: Store[Any]) -> bool:
    """Whether a wake-up is pending on *reader*'s semaphore (it must be registered, awake)."""
    waiter = reader._gate.waiter
    assert waiter is not None, "the reader is not registered"
    return bool(waiter.sem.value == 1)


def _sleeping_reader(
    reader: Store[int], timeout: float = HANG
) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []

    def follow() -> None:
        try:
            got.append(reader.wait(0, timeout=timeout))
        except BaseException as exc:
            got.append(exc)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread, got


@root_only
@pytest.mark.parametrize(
    ("mode", "group"), [(0o666, None), (0o660, OTHER_UID)], ids=["world-0666", "group-0660"]
)
def test_another_users_writer_wakes_readers_of_a_store_it_may_write(
    store_name: str, mode: int, group: int | None
) -> None:
    with Store.create(store_name, int, mode=mode) as owner:
        if group is not None:
            os.chown(Path("/dev/shm") / segment_name(store_name).lstrip("/"), -1, group)
        with Store.open(store_name, int) as reader:
            with pytest.raises(TimeoutError):
                reader.wait(0, timeout=0.01)  # registered: its semaphore exists now
            for sem in semaphore_files(store_name):
                assert sem.stat().st_mode & 0o777 == mode, f"{sem.name}: umask applied"
                if group is not None:
                    assert sem.stat().st_gid == group
            results = ctx.Queue()
            writer = ctx.Process(target=other_user_commits, args=(store_name, results))
            writer.start()
            assert results.get(timeout=HANG) == ("committed", 1)
            writer.join(HANG)
            assert posted(reader), "the other user's commit did not post the reader"
            assert reader.wait(0, timeout=HANG) == 1
        assert owner.version == 1


@root_only
@pytest.mark.parametrize("dead_reader", [True, False], ids=["reclaiming-roots-dead-entry", "fresh"])
def test_another_users_reader_waits_on_a_world_writable_store_even_reclaiming_a_dead_entry(
    store_name: str, dead_reader: bool
) -> None:
    with Store.create(store_name, int, mode=0o666, max_readers=1) as owner:
        if dead_reader:
            dead = ctx.Process(target=register_and_die, args=(store_name,))
            dead.start()
            dead.join(HANG)
            assert dead.exitcode == 0
            assert owner.statistics().readers_registered == 1  # root's dead entry and semaphore
        registered = ctx.Event()
        results = ctx.Queue()
        reader = ctx.Process(target=other_user_waits, args=(store_name, registered, results))
        reader.start()
        try:
            assert registered.wait(HANG)
            assert results.get(timeout=HANG) == ("first wait", "TimeoutError")
            owner.set(1)
            assert results.get(timeout=HANG + 10) == ("second wait", 1)
        finally:
            reader.join(HANG)
        assert reader.exitcode == 0


# ------------------------------------------------------------------ 9: values never change


class Frame(msgspec.Struct):
    data: memoryview


class RawFrame(msgspec.Struct):
    data: msgspec.Raw


LARGE = 300 * 1024  # past the 256 KiB above which reads went through a reused buffer


def _frame(kind: type[Any], fill: bytes) -> Any:
    if kind is Frame:
        return Frame(memoryview(fill * LARGE))
    return RawFrame(msgspec.Raw(msgspec.msgpack.encode(fill * LARGE)))


@pytest.mark.parametrize("kind", [Frame, RawFrame], ids=["memoryview", "Raw"])
def test_a_returned_large_value_never_changes_on_later_reads(
    store_name: str, kind: type[Any]
) -> None:
    other_name = f"{store_name}-other"
    size = LARGE + 1024
    try:
        with (
            Store.create(store_name, kind, slot_size=size) as writer,
            Store.open(store_name, kind) as reader,
            Store.create(other_name, kind, slot_size=size) as other_writer,
            Store.open(other_name, kind) as other_reader,
        ):
            writer.set(_frame(kind, b"a"))
            first = reader.get()
            before = bytes(first.data)
            writer.set(_frame(kind, b"b"))
            assert bytes(reader.get().data) != before  # a read of the same store
            other_writer.set(_frame(kind, b"c"))
            assert bytes(other_reader.get().data) != before  # and one of another store
            assert bytes(first.data) == before, "a value returned earlier changed"
    finally:
        shmstore.remove(other_name)


# ------------------------------------------------------------------ 10-16: the error contract


def test_setting_a_recursive_or_absurdly_deep_value_is_an_invalid_snapshot(
    store_name: str,
) -> None:
    recursive: list[Any] = []
    recursive.append(recursive)
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with Store.create(store_name) as st:
        for value in (recursive, deep):
            with pytest.raises(InvalidSnapshotError):
                st.set(value)
        assert st.version == 0


@pytest.mark.parametrize(
    "payload",
    [b"\x91" * 100_000 + b"\xc0", b"\xa2\xff\xfe", b"\x81\xa2\xff\xfe\x01"],
    ids=["deep-nesting", "bad-utf8-str", "bad-utf8-key"],
)
def test_a_damaged_slot_reads_as_a_corrupt_store(store_name: str, payload: bytes) -> None:
    with Store.create(store_name, slot_size=200_000) as writer, Store.open(store_name) as reader:
        writer._lock.acquire()  # publish raw bytes that no set() would have let through
        try:
            writer._ring.commit(payload, time.time_ns())
        finally:
            writer._lock.release()
        with pytest.raises(CorruptStoreError):
            reader.get()


@pytest.mark.parametrize("head", [2**62, 2**63, 2**64 - 1], ids=["2^62", "2^63", "2^64-1"])
def test_a_damaged_header_version_makes_set_a_corrupt_store_error(
    store_name: str, head: int
) -> None:
    with Store.create(store_name, int) as st:
        st._ring.words[OFF_HEAD // 8] = head
        with pytest.raises(CorruptStoreError, match="damaged"):
            st.set(1)


@pytest.mark.parametrize("forever", [math.inf, sys.float_info.max], ids=["inf", "float-max"])
def test_wait_with_an_infinite_or_huge_timeout_waits_until_a_commit(
    store_name: str, forever: float
) -> None:
    with Store.create(store_name, int) as writer, Store.open(store_name, int) as reader:
        # Two threads: one sleeps on the semaphore, the other on the handle's condition.
        sleepers = [_sleeping_reader(reader, forever) for _ in range(2)]
        writer.set(1)
        for thread, got in sleepers:
            thread.join(HANG)
            assert got == [1]

        async def async_wait() -> int:
            handle = AsyncStore.open(store_name, int)
            try:
                task = asyncio.ensure_future(handle.wait(1, timeout=forever))
                await asyncio.sleep(0)
                writer.set(2)
                return await asyncio.wait_for(task, HANG)
            finally:
                handle.close()

        assert asyncio.run(async_wait()) == 2


def test_wait_with_a_nan_timeout_is_a_value_error(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        with pytest.raises(ValueError, match="nan"):
            st.wait(0, timeout=math.nan)

        async def async_wait() -> None:
            handle = AsyncStore.open(store_name, int)
            try:
                with pytest.raises(ValueError, match="nan"):
                    await handle.wait(0, timeout=math.nan)
            finally:
                handle.close()

        asyncio.run(async_wait())
        assert st.statistics().readers_registered == 0


def test_wait_with_the_largest_float_timeout_sleeps_without_spinning(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        waiting = ctx.Event()
        results = ctx.Queue()
        reader = ctx.Process(target=sleep_in_huge_timeout, args=(store_name, waiting, results))
        reader.start()
        try:
            assert waiting.wait(HANG)
            time.sleep(2.0)  # the measurement window, not synchronization
            st.set(1)
            got, cpu, wall = results.get(timeout=HANG)
        finally:
            reader.join(HANG)
        assert got == 1
        assert wall >= 1.5
        # Asleep, the reader uses milliseconds; spinning, it used a core for the whole window.
        assert cpu < 0.2 * wall, f"{cpu:.2f} s of CPU in {wall:.2f} s asleep"


def test_checkpoint_into_a_missing_directory_is_a_checkpoint_error(
    store_name: str, tmp_path: Path
) -> None:
    with Store.create(store_name, int) as st:
        st.set(1)
        with pytest.raises(CheckpointError, match="missing"):
            st.checkpoint(tmp_path / "missing" / "state.ckpt")


@root_only
def test_removing_another_users_store_is_a_store_permission_error(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        results = ctx.Queue()
        child = ctx.Process(target=other_user_removes, args=(store_name, results))
        child.start()
        try:
            got = results.get(timeout=HANG)
        finally:
            child.join(HANG)
        assert got == ("error", "StorePermissionError")
        st.set(1)
        with Store.open(store_name, int) as still_there:
            assert still_there.get() == 1


def test_subscribing_after_a_negative_version_is_a_value_error(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(1)
        with pytest.raises(ValueError, match="after_version"):
            st.subscribe(after_version=-1)
        handle = AsyncStore.open(store_name, int)
        try:
            with pytest.raises(ValueError, match="after_version"):
                handle.subscribe(after_version=-5)
        finally:
            handle.close()


# ------------------------------------------------------------------ 17: asyncio


def test_a_loop_closed_while_its_coroutine_waits_does_not_break_the_handle(
    store_name: str,
) -> None:
    with Store.create(store_name, int) as writer:
        handle = AsyncStore.open(store_name, int)
        try:
            doomed = asyncio.new_event_loop()
            orphan = doomed.create_task(handle.wait(0, timeout=HANG))
            doomed.run_until_complete(asyncio.sleep(0))  # the coroutine now waits
            deadline = time.monotonic() + HANG
            while writer.statistics().readers_registered == 0:
                assert time.monotonic() < deadline, "the coroutine never started waiting"
                time.sleep(0.001)
            doomed.close()  # with its coroutine still waiting
            writer.set(1)  # the waiter's loop is gone: must be skipped, not kill the server

            async def later_wait() -> int:
                pending = asyncio.ensure_future(handle.wait(1, timeout=HANG))
                await asyncio.sleep(0)
                writer.set(2)
                return await pending

            assert asyncio.run(later_wait()) == 2
            assert not orphan.done()  # its loop is gone: nobody settled it
            # asyncio logs "Task was destroyed but it is pending!" when the orphan is collected:
            # collect it now, inside pytest's log capture, not at interpreter exit.
            del orphan
            gc.collect()
        finally:
            handle.close()  # must not raise either


# ------------------------------------------------------------------ 22, 23: quiet, consistent


def test_a_caught_cas_conflict_in_the_core_store_logs_nothing(
    store_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with Store.create(store_name, int) as st:
        st.set(1)
        with caplog.at_level(logging.DEBUG, logger="shmstore"):
            with pytest.raises(StateVersionError):
                st.set(2, expected_version=0)
        assert [r for r in caplog.records if r.name.startswith("shmstore")] == []
        assert st.conflicts == 1


def test_statistics_is_one_consistent_reading_under_a_busy_writer(store_name: str) -> None:
    with Store.create(store_name, Rec, slots=4, slot_size=4096) as st:
        ready = ctx.Event()
        writer = ctx.Process(target=looping_writer, args=(store_name, ready))
        writer.start()
        try:
            assert ready.wait(HANG)
            calls = 20_000
            mixed = []
            first = st.version
            for _ in range(calls):
                stats = st.statistics()
                if stats.commits != stats.version:  # created empty: every version a commit
                    mixed.append((stats.version, stats.commits))
            last = st.version
        finally:
            writer.kill()
            writer.join(HANG)
        assert last > first, "the writer made no progress: the test proved nothing"
        assert not mixed, f"{len(mixed)} of {calls} readings mixed two versions: {mixed[:5]}"
