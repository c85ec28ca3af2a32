"""The reader registry: who waits, how the writer wakes them, how dead readers are reclaimed.

Protocol
--------
A process that wants to sleep until the store changes *registers*: it claims an entry of the
registry in the segment header and creates a named semaphore that belongs to that entry. After
each commit the writer posts the semaphore of every registered entry; a sleeping reader wakes,
re-reads HEAD and either returns or sleeps again. Spurious wake-ups are harmless by construction:
waiting is always "until HEAD > after", never "until one post".

No lost wake-up. The race to rule out is "reader sees an old HEAD and goes to sleep, writer sees
nobody to post". Both sides store and then load, so each needs a full barrier in between:

* writer: ``HEAD = m`` ... *unlock the writer lock* (a locked instruction, or a system call that
  takes a kernel spinlock: a full barrier) ... load the registry and each semaphore's value;
* reader, when registering: store the entry ... ``sem_post`` + ``sem_trywait`` on its own
  semaphore (locked read-modify-writes: a full barrier) ... load HEAD; when sleeping:
  ``sem_timedwait`` (a locked read-modify-write) ... load HEAD.

So either the reader sees ``m``, or the writer sees the entry and posts. The writer posts only
when the semaphore's value is 0: a value of 1 is a wake-up the reader has not consumed yet, and
since the writer read it *after* its barrier, the reader will consume it after the barrier too and
then see ``m``. This keeps every semaphore at 0 or 1 (two writers racing can make it 2), far from
``SEM_VALUE_MAX``, with no draining step.

Cost to the writer: one load per registry entry up to the high-water mark, plus ~25 ns to read a
semaphore's value and ~50 ns to post it, per registered reader.

Liveness
--------
Every registered handle holds an open-file-description (OFD) byte lock on byte
``LIVENESS_BASE + index`` of its own descriptor of the segment. The kernel drops it when the
process dies, whatever the cause, and a PID that gets reused cannot inherit it. Whoever takes
that byte lock successfully knows the owner is gone: registrations reuse such entries, and
``sweep()`` -- run by every registration and, at most every ``SWEEP_INTERVAL`` seconds, by a writer
that finds an unconsumed wake-up -- clears them and unlinks their semaphores, logging the count.
OFD locks and ``flock`` do not interact on Linux, so the writer lock's ``flock`` (fallback) and
these byte locks share one descriptor without interfering.

Where OFD locks do not exist (macOS), liveness falls back to the PID plus ``kill(pid, 0)``; a
reused PID can then keep a dead entry until that process exits.

All changes to entries and to the high-water mark happen under the writer lock, so registrations
and sweeps never race each other; only the writer's read-only scan runs outside it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
from typing import Any, Final

import posix_ipc

from ._errors import StateStoreError
from ._layout import OFF_REG_HIGH, REG_CLAIMED, REG_GEN, REG_PID, REG_STATE, Geometry
from ._names import reader_semaphore_name
from ._writelock import WriteLock

__all__ = ["LIVENESS_BASE", "SWEEP_INTERVAL", "RegistryFullError", "Registry", "Waiter"]

log = logging.getLogger("shmstore")

LIVENESS_BASE: Final = 1 << 40  # far past the data: the locks are advisory and touch no bytes
SWEEP_INTERVAL: Final = 1.0
_HIGH: Final = OFF_REG_HIGH // 8
_FREE: Final = 0
_IN_USE: Final = 1

_OFD = hasattr(fcntl, "F_OFD_SETLK")
_VALUE = posix_ipc.SEMAPHORE_VALUE_SUPPORTED
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = struct.Struct("hhqqi4x")


class RegistryFullError(StateStoreError):
    """Raised by ``wait()``/``subscribe()`` when every reader entry of the store is taken by a
    live process. The limit is the store's ``max_readers`` create option."""


def _byte_lock(fd: int, index: int, kind: int) -> bool:
    """Set (or clear, with F_UNLCK) this descriptor's OFD lock on the entry's byte.
    ``False`` if another description holds it."""
    arg = _FLOCK.pack(kind, os.SEEK_SET, LIVENESS_BASE + index, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Waiter:
    """One registry entry owned by this handle, and its semaphore."""

    __slots__ = ("_registry", "index", "sem")

    def __init__(self, registry: Registry, index: int, sem: Any) -> None:
        self._registry = registry
        self.index = index
        self.sem = sem

    def sleep(self, timeout: float | None) -> bool:
        """Block until a post (``True``) or until *timeout* seconds pass (``False``)."""
        try:
            self.sem.acquire(timeout)
        except posix_ipc.BusyError:
            return False
        except posix_ipc.SignalError:
            # A signal interrupted the wait: a spurious wake-up to the caller, whose loop
            # re-checks HEAD -- and Python raises the signal's exception (Ctrl-C) right after.
            return True
        return True

    def kick(self) -> None:
        """Wake this waiter from another thread of this process (close, cancellation)."""
        self.sem.release()

    def close(self) -> None:
        self._registry.unregister(self)


class Registry:
    """The registry of one store handle: the writer's fan-out and the readers' entries."""

    def __init__(
        self,
        words: memoryview,
        geometry: Geometry,
        name: str,
        lock: WriteLock,
        *,
        fd: int,
        mode: int,
    ) -> None:
        self._q = words
        self._geometry = geometry
        self._capacity = geometry.registry_capacity
        self._base = geometry.registry_at // 8
        self._name = name
        self._lock = lock
        self.fd = fd
        self._mode = mode
        self._sems: dict[int, tuple[int, Any]] = {}  # index -> (generation, open semaphore)
        self._own: set[int] = set()
        self._last_sweep = 0.0

    def _word(self, index: int, field: int) -> int:
        return self._base + index * 4 + field

    # ------------------------------------------------------------------ writer side

    def notify(self) -> None:
        """Wake every registered reader. Call after the writer lock is released (the barrier)."""
        q = self._q
        high = q[_HIGH]
        if high == 0:
            return
        stale = False
        base = self._base
        sems = self._sems
        for index in range(min(high, self._capacity)):
            w = base + index * 4
            if q[w + REG_STATE] != _IN_USE:
                continue
            gen = q[w + REG_GEN]
            cached = sems.get(index)
            if cached is None or cached[0] != gen:
                sem = self._open_sem(index, gen)
                if sem is None:
                    continue
            else:
                sem = cached[1]
            if not _VALUE or sem.value == 0:
                sem.release()
            else:
                stale = True  # a reader that has not consumed its last wake-up: slow, or dead
        if stale and time.monotonic() - self._last_sweep > SWEEP_INTERVAL:
            self.sweep()

    def _open_sem(self, index: int, gen: int) -> Any:
        old = self._sems.pop(index, None)
        if old is not None:
            old[1].close()
        try:
            sem = posix_ipc.Semaphore(reader_semaphore_name(self._name, index))
        except posix_ipc.Error:
            return None  # being registered or reclaimed right now; the next commit retries
        self._sems[index] = (gen, sem)
        return sem

    def sweep(self) -> int:
        """Reclaim the entries of dead readers; returns how many."""
        self._last_sweep = time.monotonic()
        with self._lock:
            removed = self._sweep_locked()
        self._log_reclaimed(removed)
        return removed

    def _log_reclaimed(self, removed: int) -> None:
        if removed:
            log.info(
                "store %r: reclaimed %d registry entr%s of dead readers",
                self._name,
                removed,
                "y" if removed == 1 else "ies",
            )

    def _sweep_locked(self) -> int:
        removed = 0
        q = self._q
        for index in range(min(q[_HIGH], self._capacity)):
            if q[self._word(index, REG_STATE)] != _IN_USE or index in self._own:
                continue
            if self._owner_alive(index):
                continue
            q[self._word(index, REG_STATE)] = _FREE
            self._unlink_sem(index)
            if _OFD:
                _byte_lock(self.fd, index, fcntl.F_UNLCK)
            removed += 1
        return removed

    def _owner_alive(self, index: int) -> bool:
        """Whether the entry's owner lives. With OFD locks, a successful probe takes the lock."""
        if _OFD:
            return not _byte_lock(self.fd, index, fcntl.F_WRLCK)
        return _pid_alive(self._q[self._word(index, REG_PID)])

    def _unlink_sem(self, index: int) -> None:
        cached = self._sems.pop(index, None)
        if cached is not None:
            cached[1].close()
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(reader_semaphore_name(self._name, index))

    # ------------------------------------------------------------------ reader side

    def register(self) -> Waiter:
        """Claim an entry and its semaphore. Raises :class:`RegistryFullError` when none is free."""
        removed = 0
        with self._lock:
            q = self._q
            index = -1
            for candidate in range(self._capacity):
                if candidate in self._own:
                    continue
                state = q[self._word(candidate, REG_STATE)]
                if _OFD:
                    if not _byte_lock(self.fd, candidate, fcntl.F_WRLCK):
                        continue  # a live owner holds it
                elif state == _IN_USE and _pid_alive(q[self._word(candidate, REG_PID)]):
                    continue
                if state == _IN_USE:
                    removed += 1  # its owner died: reclaim it for ourselves
                index = candidate
                break
            if index < 0:
                removed += self._sweep_locked()
                raise RegistryFullError(
                    f"store {self._name!r}: all {self._capacity} reader entries are in use by "
                    "live processes (raise max_readers when creating the store)"
                )
            try:
                sem = self._create_sem(index)
            except BaseException:
                if _OFD:
                    _byte_lock(self.fd, index, fcntl.F_UNLCK)
                raise
            q[self._word(index, REG_PID)] = os.getpid()
            q[self._word(index, REG_CLAIMED)] = time.time_ns()
            q[self._word(index, REG_GEN)] += 1
            q[self._word(index, REG_STATE)] = _IN_USE
            if q[_HIGH] <= index:
                q[_HIGH] = index + 1
            self._own.add(index)
            removed += self._sweep_locked()
        # A full barrier between publishing the entry and the caller's next load of HEAD.
        sem.release()
        sem.acquire(0)
        self._log_reclaimed(removed)
        return Waiter(self, index, sem)

    def _create_sem(self, index: int) -> Any:
        name = reader_semaphore_name(self._name, index)
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(name)  # a dead owner's, possibly with a stale post
        try:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=self._mode, initial_value=0)
        except posix_ipc.Error as exc:
            raise StateStoreError(f"store {self._name!r}: cannot create semaphore: {exc}") from exc
        return sem

    def unregister(self, waiter: Waiter) -> None:
        index = waiter.index
        if index not in self._own:
            return
        with self._lock:
            self._q[self._word(index, REG_STATE)] = _FREE
            self._own.discard(index)
            waiter.sem.close()
            self._unlink_sem(index)
            if _OFD:
                _byte_lock(self.fd, index, fcntl.F_UNLCK)

    # ------------------------------------------------------------------ tools and lifecycle

    def entries(self) -> list[tuple[int, int, bool]]:
        """``(index, pid, alive)`` of every entry in use (a snapshot, for tools and tests)."""
        out = []
        q = self._q
        for index in range(min(q[_HIGH], self._capacity)):
            if q[self._word(index, REG_STATE)] != _IN_USE:
                continue
            pid = q[self._word(index, REG_PID)]
            if index in self._own:
                alive = True
            elif _OFD:
                alive = not _byte_lock(self.fd, index, fcntl.F_WRLCK)
                if not alive:
                    _byte_lock(self.fd, index, fcntl.F_UNLCK)
            else:
                alive = _pid_alive(pid)
            out.append((index, pid, alive))
        return out

    def close(self) -> None:
        """Forget the writer's semaphore cache (this process only)."""
        for _gen, sem in self._sems.values():
            sem.close()
        self._sems.clear()

    def after_fork_in_child(self, fd: int) -> None:
        """The parent's entries stay the parent's: forget them without touching them."""
        self.fd = fd
        self._own.clear()
        self._sems.clear()


def unlink_all_semaphores(name: str, capacity: int) -> int:
    """Remove every semaphore store *name* could have; returns how many existed."""
    removed = 0
    for index in range(capacity):
        try:
            posix_ipc.unlink_semaphore(reader_semaphore_name(name, index))
            removed += 1
        except posix_ipc.ExistentialError:
            pass
    return removed
