"""Process entry points for the multi-process tests (importable by spawned children).

Records are self-checking: the payload of message *seq* is derived from *seq* alone, its length
changes on every commit, and a CRC ties the two together, so a reader can tell a torn or
mismatched value from a good one without knowing anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import signal
import sys
import time
import zlib
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import msgspec

from shmstore import CorruptStoreError, StateStoreError, StateVersionError, Store, _ring, remove
from shmstore._checkpoint import write_checkpoint
from shmstore._registry import Registry
from shmstore._ring import Ring
from shmstore.fsm import AsyncStateStore

MAX_BLOB = 3000
BARRIER_WAIT = 60  # a dead sibling must fail the test, not hang it


class Rec(msgspec.Struct, array_like=True, frozen=True):
    seq: int
    blob: bytes
    check: int


def make_rec(seq: int, max_blob: int = MAX_BLOB, min_blob: int = 0) -> Rec:
    n = 1 + min_blob + (seq * 7919) % (max_blob - min_blob)
    blob = (seq.to_bytes(8, "little") * (n // 8 + 1))[:n]
    return Rec(seq, blob, zlib.crc32(blob) ^ seq)


def rec_ok(rec: Any, max_blob: int = MAX_BLOB) -> bool:
    """Content derived from seq, with the length from either generator (min_blob 0 or not)."""
    if not isinstance(rec, Rec):
        return False
    n = len(rec.blob)
    blob = (rec.seq.to_bytes(8, "little") * (n // 8 + 1))[:n]
    return 1 <= n <= max_blob and rec.blob == blob and rec.check == zlib.crc32(blob) ^ rec.seq


# ------------------------------------------------------------------ torture


def torture_reader(
    name: str,
    final: int,
    start: Barrier,
    results: Any,
    *,
    recheck: bool,
    max_blob: int,
    until_bad: bool = False,
) -> None:
    """Read until the writer's final version (or, with *until_bad*, until the first bad read
    after a good one, or a minute); report (reads, bad, regressions, distinct).

    With *until_bad* (the negative control) each read goes through the same seqlock read as
    ``get()`` but yields the CPU halfway through taking the bytes: on a loaded machine the two
    processes otherwise rarely overlap inside one copy, and the control must show tearing there
    too."""
    st = Store.open(name, Rec)
    st._ring.verify = recheck
    reads = bad = regressions = 0
    last = 0
    seen = set()
    decode = st._codec.raw_decode

    def halting_decode(data: bytes | memoryview) -> Rec:
        half = len(data) // 2
        head = bytes(data[:half])
        os.sched_yield()  # the writer may lap us right here
        return decode(head + bytes(data[half:]))

    def read() -> tuple[Rec | None, int]:
        if not until_bad:
            return st.get_with_version()
        try:
            return st._ring.read_newest_value(halting_decode, True)
        except _ring.DecodeFailed as failed:
            raise CorruptStoreError(str(failed)) from failed

    start.wait(BARRIER_WAIT)
    give_up = time.monotonic() + 60
    try:
        while last < final:
            if until_bad and ((bad and reads) or time.monotonic() > give_up):
                break
            try:
                rec, version = read()
            except CorruptStoreError:
                bad += 1
                continue
            reads += 1
            if version < last:
                regressions += 1
            last = version
            if rec is None:
                continue
            # In the real test the writer commits make_rec(v) as version v, so the pair is
            # checked too; the negative control's writer cycles a few payloads, so there only
            # the content is.
            if not rec_ok(rec, max_blob) or (recheck and rec.seq != version):
                bad += 1
            seen.add(version)
    finally:
        st.close()
    results.put((reads, bad, regressions, len(seen)))


def torture_writer(
    name: str, commits: int, start: Barrier, max_blob: int, min_blob: int = 0
) -> None:
    st = Store.open(name, Rec)
    start.wait(BARRIER_WAIT)
    try:
        for v in range(1, commits + 1):
            assert st.set(make_rec(v, max_blob, min_blob)) == v
    finally:
        st.close()


def raw_writer(name: str, stop: Event, start: Barrier, max_blob: int) -> None:
    """The negative control's writer: commits pre-encoded payloads as fast as memcpy allows,
    so that a reader without the re-check is lapped mid-copy often."""
    st = Store.open(name, Rec)
    payloads = [st._codec.encode(make_rec(s, max_blob)) for s in range(1, 33)]
    ring = st._ring
    start.wait(BARRIER_WAIT)
    try:
        i = 0
        while not stop.is_set():
            for data in payloads:
                with st._lock:
                    ring.commit(data, i)
            i += 1
            if i % 1_000_000 == 0:
                break
    finally:
        st.close()


# ------------------------------------------------------------------ killed writers


def looping_writer(name: str, ready: Event) -> None:
    """Commit make_rec(version) forever; set *ready* after a first batch."""
    quiet_conflicts()
    st = Store.open(name, Rec)
    n = 0
    while True:
        version = st.version
        try:
            st.set(make_rec(version + 1), expected_version=version)
        except StateVersionError:
            continue
        n += 1
        if n == 50:
            ready.set()


def freeze_at(function: Any, marker: str, reached: Event) -> None:
    """From now on, freeze this process when *function* reaches its line containing *marker*
    (every earlier line executed), after setting *reached*: a test then kills it right there."""
    lines, first = inspect.getsourcelines(function)
    target = first + next(i for i, line in enumerate(lines) if marker in line)
    code = function.__code__

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == target:
                reached.set()
                while True:
                    signal.pause()
            return local

        return local

    sys.settrace(tracer)


def writer_stopped_at(name: str, function: str, marker: str, reached: Event) -> None:
    """Commit once, but freeze inside ``Ring.<function>`` at *marker*."""
    st = Store.open(name, Rec)
    version = st.version
    freeze_at(getattr(Ring, function), marker, reached)
    st.set(make_rec(version + 1))


# ------------------------------------------------------------------ CAS


def cas_incrementer(name: str, count: int, start: Barrier, results: Any) -> None:
    quiet_conflicts()
    st = Store.open(name, int)
    conflicts = 0
    start.wait(BARRIER_WAIT)
    try:
        done = 0
        while done < count:
            value, version = st.get_with_version()
            assert value is not None
            try:
                st.set(value + 1, expected_version=version)
                done += 1
            except StateVersionError:
                conflicts += 1
    finally:
        st.close()
    results.put((os.getpid(), conflicts))


def random_pause() -> None:
    time.sleep(random.uniform(0, 0.02))


# ------------------------------------------------------------------ waiting


def wait_until(name: str, final: int, results: Any) -> None:
    """Follow the store with wait() until *final*; report (pid, versions seen, final seen)."""
    st = Store.open(name, int)
    try:
        seen = 0
        version = 0
        while version < final:
            version = st.wait(version, timeout=30)
            seen += 1
        results.put((os.getpid(), seen, st.get_with_version()[1]))
    finally:
        st.close()


def sleep_in_wait(name: str, seconds: float, results: Any) -> None:
    """Block in wait() with nothing committed; report CPU seconds used per wall second."""
    st = Store.open(name, int)
    with contextlib.suppress(TimeoutError):
        st.wait(0, timeout=0)
    cpu0, wall0 = time.process_time(), time.monotonic()
    with contextlib.suppress(TimeoutError):
        st.wait(st.version, timeout=seconds)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    st.close()
    results.put((cpu, wall))


def ping_pong_echo(ping_name: str, pong_name: str, rounds: int, spin: bool) -> None:
    """For each version of *ping*, commit the same number to *pong*."""
    ping = Store.open(ping_name, int)
    pong = Store.open(pong_name, int)
    try:
        version = 0
        for _ in range(rounds):
            version = ping.wait(version, timeout=10, spin=spin)
            pong.set(version)
        # Sleeps are capped (1 s), so a lost wake-up would only be late: count those.
        assert ping.statistics().late_wakeups == 0, "a wake-up was lost"
    finally:
        ping.close()
        pong.close()


def block_forever_in_wait(name: str) -> None:
    st = Store.open(name, int)
    while True:
        st.wait(st.version, timeout=None)


def subscribe_all(name: str, count: int, results: Any) -> None:
    """Subscribe from the start and report every (version, value) seen."""
    st = Store.open(name, int)
    got = []
    try:
        with st.subscribe(after_version=0, timeout=30) as sub:
            for version, value in sub:
                got.append((version, value))
                if len(got) == count:
                    break
    finally:
        st.close()
    results.put(got)


def commit_sequence(name: str, count: int, start: Barrier) -> None:
    st = Store.open(name, int)
    start.wait(BARRIER_WAIT)
    try:
        for i in range(count):
            st.set(i)
    finally:
        st.close()


# ------------------------------------------------------------------ FSM


def fsm_initialize(name: str, start: Barrier, results: Any) -> None:
    async def main() -> None:
        store = AsyncStateStore(name=name)
        try:
            start.wait(BARRIER_WAIT)
            snap = await store.initialize_if_empty()
            results.put(snap.snapshot_id)
        finally:
            await store.close()

    asyncio.run(main())


def fsm_follow(name: str, count: int, ready: Event, results: Any) -> None:
    """Subscribe in this process and report the versions of the first *count* snapshots."""

    async def main() -> None:
        store = AsyncStateStore(name=name)
        try:
            queue = await store.subscribe("follower")
            ready.set()
            seen = []
            while len(seen) < count:
                snap = await asyncio.wait_for(queue.get(), 30)
                seen.append((snap.version, snap.reason))
            results.put(seen)
        finally:
            await store.close()

    asyncio.run(main())


def fsm_subscribe_forever(name: str, ready: Event) -> None:
    async def main() -> None:
        store = AsyncStateStore(name=name)
        queue = await store.subscribe("doomed")
        ready.set()
        while True:
            await queue.get()

    asyncio.run(main())


# ------------------------------------------------------------------ checkpoints


def checkpoint_forever(name: str, path: str, ready: Event) -> None:
    """Commit large values and checkpoint each one, until killed."""
    st = Store.open(name, bytes)
    i = 0
    while True:
        i += 1
        st.set(bytes([i % 256]) * 500_000)
        st.checkpoint(path)
        if i == 3:
            ready.set()


def create_and_checkpoint(name: str, path: str) -> None:
    with Store.create(name, dict[str, int]) as st:
        for i in range(7):
            st.set({"step": i})
        st.checkpoint(path)
        st.unlink()


def checkpoint_stopped_at(name: str, path: str, marker: str, reached: Event) -> None:
    """Write a checkpoint, but freeze inside write_checkpoint at *marker*."""
    st = Store.open(name, bytes)
    freeze_at(write_checkpoint, marker, reached)
    st.checkpoint(path)


class Point(msgspec.Struct, frozen=True):
    """A type the CLI tests import by name (``--type workers:Point``)."""

    x: int
    y: int


def create_and_leave(name: str) -> None:
    """Create a store and exit without removing it: an orphan for ``gc``."""
    st = Store.create(name, int)
    st.set(1)
    st.close()


def fsm_checkpointing_writer(path: str, ready: Event) -> None:
    """A private FSM store that checkpoints every 5 commits, killed by the test."""

    async def main() -> None:
        store = AsyncStateStore(checkpoint_path=path, checkpoint_every=5)
        current = await store.initialize_if_empty()
        for i in range(1, 23):
            current = await store.set(
                msgspec.structs.replace(current, version=current.version + 1, reason=f"r{i}")
            )
        await store.checkpoint()
        ready.set()
        while True:
            await asyncio.sleep(3600)

    asyncio.run(main())


# ------------------------------------------------------------------ chaos


def quiet_conflicts() -> None:
    """Workers that contend on purpose: one WARNING per lost CAS would be millions of lines."""
    logging.getLogger("shmstore").setLevel(logging.ERROR)


class Violations:
    """Where chaos workers report broken invariants: one append-only file per process.

    Nothing here takes a lock that a SIGKILLed process could leave held -- unlike
    ``multiprocessing.Queue`` or ``Event``, whose internal semaphores stay taken forever when
    their holder is killed mid-call, which deadlocks every other process that touches them.
    """

    def __init__(self, directory: str) -> None:
        self._path = f"{directory}/{os.getpid()}.txt"

    def put(self, message: str) -> None:
        with open(self._path, "a") as f:
            f.write(message + "\n")


def chaos_writer(name: str, slot: int, *, heartbeats: Any, violations: str, stop: Any) -> None:
    """CAS-increment the counter forever. The invariant: value == version - 1."""
    quiet_conflicts()
    report = Violations(violations)
    st = Store.open(name, int)
    while not stop.value:
        heartbeats[slot] = time.monotonic()
        value, version = st.get_with_version()
        if value != version - 1:
            report.put(f"writer {slot}: value {value} at version {version}")
        with contextlib.suppress(StateVersionError):
            st.set(value + 1, expected_version=version)


def chaos_reader(
    name: str, slot: int, *, waits: bool, heartbeats: Any, violations: str, stop: Any
) -> None:
    """Follow the store by waiting or polling; report regressions and inconsistent pairs."""
    report = Violations(violations)
    st = Store.open(name, int)
    last = 0
    while not stop.value:
        heartbeats[slot] = time.monotonic()
        if waits:
            try:
                st.wait(last, timeout=0.2, spin=False)
            except TimeoutError:
                continue
            except StateStoreError as exc:  # RegistryFullError: dead entries not reclaimed
                report.put(f"reader {slot}: {exc}")
                time.sleep(0.2)
                continue
        else:
            time.sleep(0.0005)
        value, version = st.get_with_version()
        if version < last:
            report.put(f"reader {slot}: version went from {last} back to {version}")
        if value != version - 1:
            report.put(f"reader {slot}: value {value} at version {version} (torn?)")
        last = version


# ------------------------------------------------------------------ other users (hardening round 2)

OTHER_UID = 65534  # nobody: the "other user" of the tests that run as root


def become_other_user() -> None:
    """Drop root for *OTHER_UID*. The interpreter lives under /root, which the other user may
    not read, so everything the worker needs is imported before this (this module's imports)."""
    os.setgroups([])
    os.setgid(OTHER_UID)
    os.setuid(OTHER_UID)


def other_user_commits(name: str, results: Any) -> None:
    """As the other user: open the root-owned store and commit once; report the version or the
    error."""
    become_other_user()
    try:
        with Store.open(name, int, allow_other_owner=True) as st:
            results.put(("committed", st.set(st.version + 1)))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__module__}.{type(exc).__name__}: {exc}"))


def other_user_waits(name: str, registered: Event, results: Any) -> None:
    """As the other user: register with a short wait (which must time out, not fail), tell the
    test, then wait for the test's commit; report each outcome."""
    become_other_user()
    try:
        with Store.open(name, int, allow_other_owner=True) as st:
            after = st.version
            try:
                st.wait(after, timeout=0.2)
                results.put(("first wait", "returned"))
            except TimeoutError:
                results.put(("first wait", "TimeoutError"))
            registered.set()
            results.put(("second wait", st.wait(after, timeout=60)))
    except BaseException as exc:
        registered.set()
        results.put(("error", f"{type(exc).__module__}.{type(exc).__name__}: {exc}"))


def other_user_removes(name: str, results: Any) -> None:
    """As the other user: ``shmstore.remove()`` a root-owned store; report what it raised."""
    become_other_user()
    try:
        results.put(("removed", remove(name)))
    except BaseException as exc:
        results.put(("error", type(exc).__name__))


def register_and_die(name: str) -> None:
    """Register as a reader of *name* and exit without closing: a dead reader's entry and its
    semaphore stay behind for someone else to reclaim."""
    st = Store.open(name, int, allow_other_owner=True)
    with contextlib.suppress(TimeoutError):
        st.wait(st.version, timeout=0.01)
    os._exit(0)


def sleep_in_huge_timeout(name: str, waiting: Event, results: Any) -> None:
    """Wait with ``timeout=sys.float_info.max`` (a common "forever") until the test commits;
    report (CPU seconds, wall seconds) spent in that wait."""
    st = Store.open(name, int)
    try:
        after = st.version
        waiting.set()
        cpu0, wall0 = time.process_time(), time.monotonic()
        got = st.wait(after, timeout=sys.float_info.max, spin=False)
        results.put((got, time.process_time() - cpu0, time.monotonic() - wall0))
    finally:
        st.close()


def reclaimer_stopped_in_sweep(name: str, reached: Event) -> None:
    """Reclaim dead readers (as a tool does), but freeze inside the sweep: this process then
    holds the registry lock until it is killed."""
    st = Store.open(name, int)
    freeze_at(Registry._sweep_locked, "removed = 0", reached)
    st.reclaim_dead_readers()
