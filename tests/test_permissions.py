"""Least privilege: read-only handles, group-based sharing, and what removal means for handles.

A read-only handle maps the segment ``PROT_READ`` and must never change a byte of it, whatever
public API is called; the other-user tests run their second user as uid 65534 in a spawned child
that drops root (they need root to do that, and are skipped otherwise).
"""

from __future__ import annotations

import asyncio
import grp
import multiprocessing as mp
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from perm_workers import (
    STEP,
    bumper,
    other_user_create,
    other_user_follow_growth,
    other_user_session,
    registered_reader,
)

import shmstore
from shmstore import AsyncStore, Store, StorePermissionError
from shmstore._layout import OFF_MUTEX
from shmstore._names import segment_name
from shmstore._segment import Segment
from shmstore._writelock import FlockLock, RobustMutexLock
from shmstore.metrics import prometheus_text

ctx = mp.get_context("spawn")
OTHER_UID = 65534  # nobody
OTHER_GID = 65534
SHARED_GID = 4242  # a group only the test's "other user" is made a member of
JOIN = 60

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching to a second uid (65534) needs root"
)


def segment_path(name: str) -> Path:
    return Path("/dev/shm") / segment_name(name).lstrip("/")


def segment_bytes(name: str) -> bytes:
    return segment_path(name).read_bytes()


def maps_perms(name: str) -> list[str]:
    """The permission column of every mapping of store *name*'s segment in this process."""
    inode = segment_path(name).stat().st_ino
    perms = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and int(fields[4]) == inode and fields[5].startswith("/dev/shm/"):
                perms.append(fields[1])
    return perms


# ------------------------------------------------------------------ the read-only mapping


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_a_readonly_handle_maps_the_segment_prot_read(store_name: str) -> None:
    with Store.create(store_name, int) as writer:
        writer.set(1)
        before = maps_perms(store_name)
        assert before == ["rw-s"]
        with Store.open(store_name, int, readonly=True) as reader:
            assert reader.readonly
            assert not reader.writable
            assert sorted(maps_perms(store_name)) == ["r--s", "rw-s"]
        assert maps_perms(store_name) == ["rw-s"]


def test_writing_through_a_readonly_mapping_is_refused(store_name: str) -> None:
    with Store.create(store_name, int):
        segment = Segment.open(store_name, readonly=True)
        try:
            assert segment.readonly
            with pytest.raises(TypeError):
                segment.map[0:1] = b"x"
            with pytest.raises(TypeError):
                memoryview(segment.map).cast("Q")[0] = 1
        finally:
            segment.close()


def test_every_write_api_of_a_readonly_handle_fails_cleanly_and_changes_nothing(
    store_name: str, tmp_path: Path
) -> None:
    with Store.create(store_name, int, slots=4) as writer:
        writer.set(7)
        with Store.open(store_name, int, readonly=True) as reader:
            before = segment_bytes(store_name)
            writes: list[Any] = [
                lambda: reader.set(8),
                lambda: reader.set(8, expected_version=1),
                lambda: reader.try_set(8, 1),
                lambda: reader.update(lambda v: (v or 0) + 1),
                lambda: reader.update(lambda v: (v or 0) + 1, retries=3),
                lambda: reader.app_counters.increment(0),
                reader.reclaim_dead_readers,
                reader.unlink,
            ]
            for write in writes:
                with pytest.raises(StorePermissionError, match="read-only"):
                    write()
            # Everything a reader may do, in the same breath: none of it writes either.
            assert reader.get() == 7
            assert reader.get_with_version() == (7, 1)
            assert reader.version == 1
            assert reader.app_counters[0] == 0
            stats = reader.statistics()
            assert (stats.readonly, stats.wait_mode, stats.removed) == (True, "poll", False)
            assert stats.writer_lock_held is False
            with pytest.raises(TimeoutError):
                reader.wait(1, timeout=0.05)
            assert reader.checkpoint(tmp_path / "ro.ckpt") == 1
            sub = reader.subscribe()
            assert next(sub) == (1, 7)
            assert segment_bytes(store_name) == before
        assert writer.get() == 7
        assert writer.version == 1
        assert writer.set(9) == 2


def test_async_writes_of_a_readonly_handle_fail_cleanly(store_name: str) -> None:
    async def main() -> None:
        async with AsyncStore.open(store_name, int, readonly=True) as reader:
            assert reader.readonly
            assert reader.wait_mode == "poll"
            with pytest.raises(StorePermissionError):
                await reader.set(1)
            with pytest.raises(StorePermissionError):
                await reader.update(lambda v: (v or 0) + 1)

    with Store.create(store_name, int) as writer:
        writer.set(0)
        before = segment_bytes(store_name)
        asyncio.run(main())
        assert segment_bytes(store_name) == before


def test_readonly_false_demands_write_access_and_true_never_takes_it(store_name: str) -> None:
    with Store.create(store_name, int) as writer:
        with Store.open(store_name, int) as default:  # root may write: the default is read-write
            assert not default.readonly
            assert default.wait_mode == "semaphore"
        with Store.open(store_name, int, readonly=False) as rw:
            assert rw.writable
        writer.set(3)


def test_a_readonly_handle_waits_by_polling_for_another_processes_commit(store_name: str) -> None:
    """Threads and coroutines of a read-only handle see commits of a real other process; the
    handle never takes a registry entry (registering writes the segment)."""
    parent, child = ctx.Pipe()
    with Store.create(store_name, int) as writer:
        writer.set(1)
        proc = ctx.Process(target=bumper, args=(store_name, child))
        proc.start()
        try:
            assert parent.poll(JOIN)
            assert parent.recv() == "ready"
            with Store.open(store_name, int, readonly=True) as reader:
                parent.send("bump")
                assert reader.wait(1, timeout=STEP) == 2

                async def wait_async() -> int:
                    return await reader.wait_async(2, timeout=STEP)

                async def both() -> int:
                    task = asyncio.ensure_future(wait_async())
                    await asyncio.sleep(0)
                    parent.send("bump")
                    return await task

                assert asyncio.run(both()) == 3
                assert reader.statistics().readers_registered == 0
                assert writer.statistics().readers_registered == 0
            assert parent.poll(JOIN)
            assert parent.recv() == 2
            parent.send("stop")
        finally:
            proc.join(JOIN)
        assert proc.exitcode == 0


def test_closing_a_readonly_handle_ends_its_polling_waiters(store_name: str) -> None:
    async def main(reader: Store[int]) -> None:
        task = asyncio.ensure_future(reader.wait_async(5, timeout=STEP))
        await asyncio.sleep(0.01)
        reader.close()
        with pytest.raises(shmstore.StateStoreError, match="closed"):
            await task

    with Store.create(store_name, int):
        reader = Store.open(store_name, int, readonly=True)
        asyncio.run(main(reader))
        assert reader.closed


def test_writer_lock_held_is_seen_by_a_readonly_handle_without_taking_it(
    store_name: str, writer_lock: str
) -> None:
    """statistics() of a read-only handle only *looks* at the writer lock (the mutex word, or a
    shared flock probe): it sees another holder, and the segment's bytes do not change."""
    with Store.create(store_name, int, writer_lock=writer_lock):
        holder = Segment.open(store_name)
        lock: Any = (
            RobustMutexLock(holder.map, OFF_MUTEX, store_name)
            if writer_lock == "mutex"
            else FlockLock(holder.fd)
        )
        try:
            with Store.open(store_name, int, readonly=True) as reader:
                assert reader.statistics().writer_lock_held is False
                with lock:
                    before = segment_bytes(store_name)
                    assert reader.statistics().writer_lock_held is True
                    assert segment_bytes(store_name) == before
                assert reader.statistics().writer_lock_held is False
        finally:
            lock.close()
            holder.close()


def test_a_readonly_handle_counts_live_and_dead_readers_without_touching_them(
    store_name: str,
) -> None:
    """statistics() probes the readers' liveness locks with a query that needs no write access,
    and a read-only handle reclaims nothing: the dead reader's entry stays for a writer."""
    with Store.create(store_name, int) as writer:
        writer.set(1)
        conns, procs = [], []
        for _ in range(2):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=registered_reader, args=(store_name, child))
            proc.start()
            assert parent.poll(JOIN)
            assert parent.recv() == "registered"
            conns.append(parent)
            procs.append(proc)
        procs[0].kill()
        procs[0].join(JOIN)
        with Store.open(store_name, int, readonly=True) as reader:
            before = segment_bytes(store_name)
            stats = reader.statistics()
            assert (stats.readers_registered, stats.readers_alive) == (2, 1)
            assert segment_bytes(store_name) == before
        conns[1].send("go")
        procs[1].join(JOIN)
        assert procs[1].exitcode == 0
        assert writer.reclaim_dead_readers() == 1  # the writer still finds the dead entry


def test_a_forked_child_keeps_a_readonly_handle_readonly(store_name: str) -> None:
    """After fork() the handle reopens its own descriptor: read-only again, and it still reads,
    polls and refuses writes."""
    with Store.create(store_name, int) as writer:
        writer.set(1)
        with Store.open(store_name, int, readonly=True) as reader:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through its exit status
                try:
                    os.close(read_fd)
                    ok = reader.readonly and reader.get() == 1 and reader.wait_mode == "poll"
                    try:
                        reader.set(5)
                        ok = False
                    except StorePermissionError:
                        pass
                    os.write(write_fd, b"x")
                    ok = ok and reader.wait(1, timeout=STEP) == 2 and reader.get() == 2
                    os._exit(0 if ok else 3)
                except BaseException:
                    os._exit(4)
            os.close(write_fd)
            assert os.read(read_fd, 1) == b"x"
            os.close(read_fd)
            writer.set(2)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert writer.get() == 2


# ------------------------------------------------------------------ removal and replacement


def test_statistics_say_when_the_store_was_removed_or_replaced(store_name: str) -> None:
    old = Store.create(store_name, int)
    reader = Store.open(store_name, int, readonly=True)
    try:
        assert not old.statistics().removed
        assert not reader.statistics().removed
        old.unlink()
        assert old.statistics().removed
        assert reader.statistics().removed
        assert old.statistics().as_dict()["removed"] is True  # what `shmstore stat` prints
        assert f'shmstore_removed{{store="{store_name}",type="builtins:int"}} 1' in (
            prometheus_text([old.statistics()])
        )
        # The orphan still works for the handles that have it, and nobody else sees it.
        assert old.set(5) == 1
        assert reader.get() == 5
        with Store.create(store_name, int) as new:
            assert not new.statistics().removed
            assert old.statistics().removed  # replaced: the name points elsewhere now
            assert new.get() is None
    finally:
        reader.close()
        old.close()


def test_a_private_store_is_never_removed() -> None:
    with Store.private(int) as st:
        assert st.statistics().removed is False


# ------------------------------------------------------------------ groups


def test_group_option_sets_the_segments_group(store_name: str) -> None:
    with Store.create(store_name, int, mode=0o640, group=os.getegid()):
        info = segment_path(store_name).stat()
        assert info.st_gid == os.getegid()
        assert stat.S_IMODE(info.st_mode) == 0o640


@needs_root
def test_group_option_accepts_a_name_and_any_gid_for_root(store_name: str) -> None:
    with Store.create(store_name, int, group="nogroup" if _has_group("nogroup") else SHARED_GID):
        assert segment_path(store_name).stat().st_gid in (SHARED_GID, _gid_of("nogroup"))
    shmstore.remove(store_name)
    with Store.create(store_name, int, group=SHARED_GID):
        assert segment_path(store_name).stat().st_gid == SHARED_GID


def test_bad_group_options_are_refused_before_anything_is_created(store_name: str) -> None:
    with pytest.raises(ValueError, match="no group named"):
        Store.create(store_name, int, group="no-such-group-shmstore")
    with pytest.raises(TypeError, match="group must be"):
        Store.create(store_name, int, group=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gid"):
        Store.create(store_name, int, group=-1)
    assert not segment_path(store_name).exists()


@needs_root
def test_a_user_cannot_give_a_store_a_group_it_is_not_in(store_name: str) -> None:
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=other_user_create,
        args=(store_name, child),
        kwargs={"uid": OTHER_UID, "gid": OTHER_GID, "groups": [], "group": SHARED_GID},
    )
    proc.start()
    assert parent.poll(JOIN)
    outcome = parent.recv()
    proc.join(JOIN)
    assert outcome[0] == "StorePermissionError"
    assert "group 4242" in outcome[1]
    assert not segment_path(store_name).exists()  # the failed create left nothing behind
    # ... and a member may.
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=other_user_create,
        args=(store_name, child),
        kwargs={"uid": OTHER_UID, "gid": OTHER_GID, "groups": [SHARED_GID], "group": SHARED_GID},
    )
    proc.start()
    assert parent.poll(JOIN)
    assert parent.recv() == ("ok", SHARED_GID)
    proc.join(JOIN)
    shmstore.remove(store_name)
    # A group that grants nothing beyond what everyone gets does not matter: no error (this is
    # what lets an "other" writer of a 0o666 store grow it into a new ring).
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=other_user_create,
        args=(store_name, child),
        kwargs={
            "uid": OTHER_UID,
            "gid": OTHER_GID,
            "groups": [],
            "group": SHARED_GID,
            "mode": 0o666,
        },
    )
    proc.start()
    assert parent.poll(JOIN)
    assert parent.recv() == ("ok", OTHER_GID)
    proc.join(JOIN)


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


# ------------------------------------------------------------------ a second user


def run_other_user(
    store_name: str, writer: Store[int], groups: list[int], plan: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run ``other_user_session`` as uid 65534 with *groups*; when it opened the store, commit
    once for it to wait for, and collect its final report."""
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=other_user_session,
        args=(store_name, child),
        kwargs={"uid": OTHER_UID, "gid": OTHER_GID, "groups": groups, "plan": plan},
    )
    proc.start()
    try:
        assert parent.poll(JOIN), "the other user's process did not report"
        first: dict[str, Any] = parent.recv()
        if first["open"] != "ok":
            return first, None
        after = writer.version
        parent.send({"wait_for": after})
        writer.set(after * 100 + 1)
        assert parent.poll(JOIN), "the other user's process did not report after the commit"
        done: dict[str, Any] = parent.recv()
        return first, done
    finally:
        proc.join(JOIN)
        assert proc.exitcode == 0


@needs_root
def test_0o640_group_members_read_only_and_wait_by_polling(store_name: str) -> None:
    with Store.create(store_name, int, mode=0o640, group=SHARED_GID) as writer:
        writer.set(42)
        before = writer.statistics()
        first, done = run_other_user(store_name, writer, [SHARED_GID], {})
        assert first["euid"] == OTHER_UID
        assert first["open"] == "ok"
        assert first["readonly"] is True
        assert first["writable"] is False
        assert first["wait_mode"] == first["stats_wait_mode"] == "poll"
        assert first["stats_readonly"] is True
        assert (first["value"], first["version"]) == (42, 1)
        assert first["set"][0] == "StorePermissionError"
        assert first["update"][0] == "StorePermissionError"
        assert first["unlink"][0] == "StorePermissionError"
        assert done is not None
        assert done["waited"] == ("ok", 2)
        # The reader wrote nothing: no commit, no conflict, no registry entry.
        after = writer.statistics()
        assert (after.version, after.conflicts) == (2, before.conflicts)
        assert after.readers_registered == 0
        assert writer.get() == 101


@needs_root
def test_0o640_group_members_cannot_demand_write_access(store_name: str) -> None:
    with Store.create(store_name, int, mode=0o640, group=SHARED_GID) as writer:
        first, _ = run_other_user(store_name, writer, [SHARED_GID], {"readonly": False})
        assert first["open"] == "StorePermissionError"
        assert "write" in first["message"]


@needs_root
@pytest.mark.parametrize("mode", [0o640, 0o660])
def test_non_members_get_nothing(store_name: str, mode: int) -> None:
    with Store.create(store_name, int, mode=mode, group=SHARED_GID) as writer:
        first, _ = run_other_user(store_name, writer, [], {"readonly": True})
        assert first["open"] == "StorePermissionError"
        first, _ = run_other_user(store_name, writer, [], {})
        assert first["open"] == "StorePermissionError"
        assert "to read" in first["message"]  # not even that: the error says so


@needs_root
def test_another_users_store_is_refused_without_allow_other_owner(store_name: str) -> None:
    with Store.create(store_name, int, mode=0o640, group=SHARED_GID) as writer:
        first, _ = run_other_user(store_name, writer, [SHARED_GID], {"allow_other_owner": False})
        assert first["open"] == "StorePermissionError"
        assert "allow_other_owner" in first["message"]


@needs_root
def test_0o660_group_members_wait_on_semaphores_and_write(store_name: str) -> None:
    """A member writes and sleeps on a semaphore; the semaphores follow the store's mode and
    group, so root's commit wakes the member and the member's commit wakes root."""
    with Store.create(store_name, int, mode=0o660, group=SHARED_GID) as writer:
        writer.set(1)
        # Root registers as a waiter first, so the member's commit must post root's semaphore.
        waiter = Store.open(store_name, int)
        try:
            with pytest.raises(TimeoutError):
                waiter.wait(10, timeout=0.01)  # registers this handle
            sems = sorted(
                Path("/dev/shm").glob("sem." + segment_name(store_name).lstrip("/") + "*")
            )
            assert sems, "root's wait registered no semaphore"
            for sem in sems:
                info = sem.stat()
                assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (SHARED_GID, 0o660)
            # Sleeps through root's own commit (version 4) until the member's (5) posts it;
            # a post the member could not make would end it with TimeoutError instead.
            woken: list[Any] = []
            sleeper = threading.Thread(target=lambda: woken.append(waiter.wait(4, timeout=STEP)))
            sleeper.start()
            try:
                first, done = run_other_user(store_name, writer, [SHARED_GID], {"commit": 555})
            finally:
                sleeper.join(JOIN + STEP)
            assert first["open"] == "ok"
            assert first["readonly"] is False
            assert first["wait_mode"] == "semaphore"
            assert first["set"] == ("ok", 2)
            assert first["update"] == ("ok", 3)
            assert first["unlink"][0] == "StorePermissionError"  # writing is not removing
            assert segment_path(store_name).exists()
            assert done is not None
            assert done["waited"] == ("ok", 4)
            assert done["commit"] == ("ok", 5)
            assert woken == [5]
            assert waiter.get() == 555
        finally:
            waiter.close()


# ------------------------------------------------------------------ a store that grows


def generation_files(name: str) -> list[Path]:
    return sorted(Path("/dev/shm").glob(segment_name(name).lstrip("/") + ".g*"))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_a_readonly_handle_follows_growth_with_a_readonly_mapping(store_name: str) -> None:
    with Store.create(store_name, bytes, slot_size=4096) as writer:
        writer.set(b"small")
        with Store.open(store_name, bytes, readonly=True) as reader:
            assert reader.get() == b"small"
            writer.set(b"x" * 100_000)  # grows the store into a ring of its own segment
            (grown,) = generation_files(store_name)
            assert reader.get() == b"x" * 100_000
            inode = grown.stat().st_ino
            with open("/proc/self/maps") as f:
                perms = sorted(line.split()[1] for line in f if f" {inode} " in line)
            assert perms == ["r--s", "rw-s"]  # the reader's mapping of it, and the writer's
            with pytest.raises(StorePermissionError):
                reader.set(b"y" * 200_000)


@needs_root
def test_a_grown_ring_keeps_the_stores_mode_and_group_for_its_readers(store_name: str) -> None:
    """The writer (root) grows a 0o640 store while a group member reads it: the new ring's
    segment gets the store's group, so the member follows it."""
    with Store.create(store_name, bytes, slot_size=4096, mode=0o640, group=SHARED_GID) as writer:
        writer.set(b"small")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=other_user_follow_growth,
            args=(store_name, child),
            kwargs={"uid": OTHER_UID, "gid": OTHER_GID, "groups": [SHARED_GID]},
        )
        proc.start()
        try:
            assert parent.poll(JOIN)
            assert parent.recv() == ("ready", 1)
            writer.set(b"x" * 100_000)
            for grown in generation_files(store_name):
                info = grown.stat()
                assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (SHARED_GID, 0o640)
            assert parent.poll(JOIN)
            assert parent.recv() == ("ok", (2, 100_000, True))
        finally:
            proc.join(JOIN)
        assert proc.exitcode == 0
