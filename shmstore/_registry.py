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

Semaphore names carry a tag that hashes the store's creation time, the entry index and the
entry's claim generation (``_names``): each claim creates a fresh name, so a claim never has to
remove a previous claimant's semaphore (sticky ``/dev/shm`` forbids that for another user's), and
a handle of a removed store can never touch the semaphores of a new store of the same name. A
semaphore gets the segment's mode and group (``sem_open`` would apply the umask), so that every
user who may write the store may also post its readers.

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

Shared semaphores (``shmstore.wait_any``). A thread that waits on several stores at once claims
an entry in each store's registry, but all of those entries name *one* semaphore: the first
entry's semaphore is created as usual, and every other entry's name is a hard link to the same
file in ``/dev/shm`` (``register(share=first_entry)``; glibc's named semaphores are files there,
and a writer that opens the link maps the same page; in the waiting process the other entries
borrow the first entry's semaphore object, one mapping). Nothing else changes: writers post,
reclaim and remove the entry by its own name exactly as for any reader, and removing one link
leaves the semaphore of the others. The lost-wake-up argument above holds per store; why it
holds for the shared semaphore is in ``_wait_any``. A link is made only where the semaphore
already has the mode and group this store's semaphores get (:class:`NotShareable` otherwise,
and on systems whose semaphores are not files).

An entry's owner may be another part of the process than the handle's wait gate (``wait_any``
holds entries of handles it does not own), so :meth:`Registry.close` gives back every entry
still held through this handle and kicks its semaphore; the owner then finds the store closed,
and :meth:`Waiter.close` closes its semaphore.

A handle that maps the segment read-only never registers (that writes the entry; it polls, see
``_waiting``) and never sweeps. :meth:`Registry.entries` only *queries* the liveness locks
(``F_OFD_GETLK``, which takes nothing and needs no write access), so any handle may call it.

Registrations and sweeps are serialized by the *registry lock*, never by the writer lock: a
reader must not wait for a writer (a writer stopped with SIGSTOP while holding the writer lock
would otherwise hold every reader's first ``wait()``, whatever its timeout). With OFD locks the
registry lock is another byte lock of the same kind, taken with a deadline; the critical section
is a scan of the entries and one ``sem_open``. An entry's owner gives it back without the lock:
it holds the entry's liveness byte, so nobody else touches the entry until it lets go. Without
OFD locks (macOS) the writer lock serializes registrations, as a fallback.

A full ``/dev/shm`` (``sem_open`` fails with ENOSPC) refuses the registration with a
:class:`StateStoreError` that says what is full (issue 20), rather than falling back to polling:
the condition is machine-wide and needs an operator, a poll-based ``wait()`` would hide it behind
slower wake-ups and CPU spent by every waiter, and the store itself (HEAD, the value) is intact,
so the caller may retry or read with ``get()``. The claim is undone: the entry stays free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

import posix_ipc

from ._errors import RegistryFullError, StateStoreError
from ._layout import REG_CLAIMED, REG_GEN, REG_PID, REG_STATE, W_REG_HIGH, Geometry, entry_word
from ._names import reader_semaphore_name
from ._ofd import LIVENESS_BASE, OFD_SUPPORTED, REGISTRY_LOCK_BYTE, byte_lock, byte_locked
from ._writelock import WriteLock

__all__ = [
    "LIVENESS_BASE",
    "NotShareable",
    "SWEEP_INTERVAL",
    "Registry",
    "Waiter",
    "pid_alive",
    "registered_semaphore_names",
    "unlink_semaphore",
]

log = logging.getLogger("shmstore")

SWEEP_INTERVAL: Final = 1.0
_FREE: Final = 0
_IN_USE: Final = 1
_CLAIM_TRIES: Final = 8  # fresh semaphore names to try when one is taken (a stale one)
_LOCK_POLL_MIN: Final = 20e-6
_LOCK_POLL_MAX: Final = 2e-3

_OFD = OFD_SUPPORTED
_VALUE = posix_ipc.SEMAPHORE_VALUE_SUPPORTED
_SEM_DIR = "/dev/shm"  # where Linux keeps named semaphores, as files "sem.<name>"


def pid_alive(pid: int) -> bool:
    """Whether process *pid* exists (``kill(pid, 0)``; another user's counts as alive). A reused
    pid looks alive: the fallback where no kernel-held lock tells liveness."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unlink_semaphore(name: str) -> bool:
    """Remove a named semaphore; ``False`` if it did not exist or is not ours to remove
    (another user's, in sticky ``/dev/shm``: ``shmstore.remove`` as its owner or root can)."""
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.PermissionsError:
        log.debug("cannot remove semaphore %s of another user", name)
        return False
    return True


def _semaphore_error(store: str, exc: OSError) -> StateStoreError:
    """The one-line error for a reader semaphore that ``sem_open`` could not create. A full
    ``/dev/shm`` (ENOSPC) is named as such: a waiter is refused at once, visibly, rather than
    degraded to polling behind the caller's back (issue 20)."""
    if exc.errno == errno.ENOSPC:
        where = _SEM_DIR if os.path.isdir(_SEM_DIR) else "the shared-memory file system"
        return StateStoreError(
            f"store {store!r}: cannot wait: {where} is full, no room for the reader's "
            "semaphore (the store and its value are intact); free space there, or make it "
            "larger"
        )
    return StateStoreError(
        f"store {store!r}: cannot create the reader's semaphore: {exc.strerror or exc}"
    )


def registered_semaphore_names(
    words: memoryview, capacity: int, name: str, created_ns: int
) -> list[str]:
    """The semaphore names of every entry in use in a registry (for removing the store)."""
    return [
        reader_semaphore_name(name, created_ns, index, words[entry_word(index, REG_GEN)])
        for index in range(min(words[W_REG_HIGH], capacity))
        if words[entry_word(index, REG_STATE)] == _IN_USE
    ]


class NotShareable(Exception):
    """``register(share=...)`` cannot link this store's entry to that semaphore: it has another
    mode or group than this store's semaphores get, its name is gone, or semaphores are not
    files on this system. Never leaves the package (the caller polls that store instead)."""


def _sem_path(name: str) -> str:
    return os.path.join(_SEM_DIR, "sem." + name.lstrip("/"))


class Waiter:
    """One registry entry owned by this handle, and its semaphore."""

    __slots__ = ("_closed", "_registry", "index", "sem", "sem_name")

    def __init__(
        self, registry: Registry, index: int, sem: Any, sem_name: str, *, owns_sem: bool = True
    ) -> None:
        self._registry = registry
        self.index = index
        self.sem = sem
        """The semaphore object; a shared entry's is the one of the entry it shares with."""
        self.sem_name = sem_name
        self._closed = not owns_sem  # a borrowed semaphore is its owner's to close

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
        """Give the entry back (unless the handle's close did already) and close the
        semaphore, unless borrowed. Only the owner calls this, once nobody sleeps on
        :attr:`sem`, and closes the entries that share a semaphore before the one they
        borrow it from."""
        self._registry.unregister(self)
        if not self._closed:
            self._closed = True
            self.sem.close()


class Registry:
    """The registry of one store handle: the writer's fan-out and the readers' entries."""

    def __init__(
        self,
        words: memoryview,
        geometry: Geometry,
        name: str,
        lock: WriteLock,
        *,
        created_ns: int,
        fd: int,
        mode: int,
        gid: int,
    ) -> None:
        self._q = words
        self._capacity = geometry.registry_capacity
        # The writer's scan after every commit: (index, state word, generation word) per entry.
        self._scan = [
            (index, entry_word(index, REG_STATE), entry_word(index, REG_GEN))
            for index in range(self._capacity)
        ]
        self._name = name
        self._created_ns = created_ns
        self._writer_lock = lock
        self.fd = fd
        self._mode = mode
        self._gid = gid
        self._thread_lock = threading.Lock()  # OFD locks do not exclude the threads of one fd
        # Per entry, the writer's open semaphore of its current claim: (generation, semaphore).
        self._sems: list[tuple[int, Any] | None] = [None] * self._capacity
        # Entries held through this handle, by index. Guarded by _own_lock where an entry is
        # given back: its owner and close() may race (see the module essay).
        self._own: dict[int, Waiter] = {}
        self._own_lock = threading.Lock()
        self._last_sweep = 0.0

    def _word(self, index: int, field: int) -> int:
        return entry_word(index, field)

    def _sem_name(self, index: int, generation: int) -> str:
        return reader_semaphore_name(self._name, self._created_ns, index, generation)

    # ------------------------------------------------------------------ the registry lock

    @contextlib.contextmanager
    def _serialized(self, deadline: float | None) -> Iterator[None]:
        """Hold the registry lock; ``TimeoutError`` at *deadline* (``time.monotonic()``).
        ``deadline=0.0`` tries once."""
        if not _OFD:
            with self._writer_lock:
                yield
            return
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if wait > threading.TIMEOUT_MAX:  # a huge "forever" (sys.float_info.max) is forever
            wait = -1.0
        if not self._thread_lock.acquire(timeout=wait):
            raise TimeoutError("the reader registry is busy")
        try:
            pause = _LOCK_POLL_MIN
            while not byte_lock(self.fd, REGISTRY_LOCK_BYTE, fcntl.F_WRLCK):
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("the reader registry is busy")
                time.sleep(pause)
                pause = min(pause * 2, _LOCK_POLL_MAX)
            try:
                yield
            finally:
                byte_lock(self.fd, REGISTRY_LOCK_BYTE, fcntl.F_UNLCK)
        finally:
            self._thread_lock.release()

    # ------------------------------------------------------------------ writer side

    def notify(self) -> None:
        """Wake every registered reader. Call after the writer lock is released (the barrier).

        This runs after every commit, so it is one pass with as little Python per entry as
        possible: two loads (state, generation), the cached semaphore of that claim, its value,
        and the post."""
        q = self._q
        sems = self._sems
        stale = False
        # A slice past the end stops at the capacity: a damaged high-water mark reads no further.
        for index, state_at, gen_at in self._scan[: q[W_REG_HIGH]]:
            if q[state_at] != _IN_USE:
                continue
            cached = sems[index]
            if cached is not None and cached[0] == q[gen_at]:
                sem = cached[1]
            else:
                sem = self._open_sem(index, q[gen_at])
                if sem is None:
                    continue
            if _VALUE and sem.value:
                stale = True  # a reader that has not consumed its last wake-up: slow, or dead
            else:
                sem.release()
        if stale and time.monotonic() - self._last_sweep > SWEEP_INTERVAL:
            self.sweep(blocking=False)

    def _open_sem(self, index: int, gen: int) -> Any:
        self._forget_sem(index)
        try:
            sem = posix_ipc.Semaphore(self._sem_name(index, gen))
        except (posix_ipc.Error, OSError):
            return None  # being registered or reclaimed right now; the next commit retries
        self._sems[index] = (gen, sem)
        return sem

    def sweep(self, *, blocking: bool = True) -> int:
        """Reclaim the entries of dead readers; returns how many. With ``blocking=False`` (the
        writer's opportunistic sweep) it does nothing while someone holds the registry lock."""
        self._last_sweep = time.monotonic()
        try:
            with self._serialized(None if blocking else 0.0):
                removed = self._sweep_locked()
        except TimeoutError:
            return 0
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
        for index in range(min(q[W_REG_HIGH], self._capacity)):
            if q[entry_word(index, REG_STATE)] != _IN_USE or index in self._own:
                continue
            if self._owner_alive(index):
                continue
            self._forget_sem(index)
            unlink_semaphore(self._sem_name(index, q[entry_word(index, REG_GEN)]))
            q[entry_word(index, REG_STATE)] = _FREE
            if _OFD:
                byte_lock(self.fd, LIVENESS_BASE + index, fcntl.F_UNLCK)
            removed += 1
        return removed

    def _owner_alive(self, index: int) -> bool:
        """Whether the entry's owner lives. With OFD locks, a successful probe takes the lock."""
        if _OFD:
            return not byte_lock(self.fd, LIVENESS_BASE + index, fcntl.F_WRLCK)
        return pid_alive(self._q[entry_word(index, REG_PID)])

    def _forget_sem(self, index: int) -> None:
        cached = self._sems[index]
        if cached is not None:
            self._sems[index] = None
            cached[1].close()

    # ------------------------------------------------------------------ reader side

    def register(self, deadline: float | None = None, *, share: Waiter | None = None) -> Waiter:
        """Claim an entry and its semaphore.

        With *share* (an entry of this process, usually of another store), the new entry's
        semaphore is *share*'s, hard-linked under the entry's own name: a post to either wakes
        whoever sleeps on it (see the module essay). The new entry borrows *share*'s semaphore
        object (no second mapping): close it before *share*.

        Raises :class:`RegistryFullError` when no entry is free, ``TimeoutError`` if the
        registry lock is not had by *deadline* (``time.monotonic()``; ``None``: no limit), and
        :class:`NotShareable` when *share* cannot serve this store.
        """
        if share is not None:
            self._check_shareable(share.sem_name)
        removed = 0
        with self._serialized(deadline):
            q = self._q
            index = -1
            for candidate in range(self._capacity):
                if candidate in self._own:
                    continue
                state = q[entry_word(candidate, REG_STATE)]
                if _OFD:
                    if not byte_lock(self.fd, LIVENESS_BASE + candidate, fcntl.F_WRLCK):
                        continue  # a live owner holds it
                elif state == _IN_USE and pid_alive(q[entry_word(candidate, REG_PID)]):
                    continue
                if state == _IN_USE:
                    removed += 1  # its owner died: reclaim it for ourselves
                    unlink_semaphore(self._sem_name(candidate, q[entry_word(candidate, REG_GEN)]))
                index = candidate
                break
            if index < 0:
                removed += self._sweep_locked()
                raise RegistryFullError(
                    f"store {self._name!r}: all {self._capacity} reader entries are in use by "
                    "live processes (raise max_readers when creating the store)"
                )
            try:
                previous = q[entry_word(index, REG_GEN)]
                if share is None:
                    gen, sem, sem_name = self._create_sem(index, previous)
                else:
                    gen, sem_name = self._link_sem(index, previous, share.sem_name)
                    sem = share.sem
            except BaseException:
                if _OFD:
                    byte_lock(self.fd, LIVENESS_BASE + index, fcntl.F_UNLCK)
                raise
            q[entry_word(index, REG_PID)] = os.getpid()
            q[entry_word(index, REG_CLAIMED)] = time.time_ns()
            q[entry_word(index, REG_GEN)] = gen
            q[entry_word(index, REG_STATE)] = _IN_USE
            if q[W_REG_HIGH] <= index:
                q[W_REG_HIGH] = index + 1
            waiter = Waiter(self, index, sem, sem_name, owns_sem=share is None)
            with self._own_lock:
                self._own[index] = waiter
            removed += self._sweep_locked()
        # A full barrier between publishing the entry and the caller's next load of HEAD. (On a
        # shared semaphore it leaves the value as it was: a pending post stays pending.)
        sem.release()
        sem.acquire(0)
        self._log_reclaimed(removed)
        return waiter

    def _check_shareable(self, share: str) -> None:
        """Raise :class:`NotShareable` unless semaphore *share* is a file with the mode and
        group this store gives its readers' semaphores (so linking changes nobody's access)."""
        try:
            st = os.stat(_sem_path(share))
        except OSError as exc:
            raise NotShareable(f"semaphore {share} is not a file here: {exc}") from exc
        if (st.st_mode & 0o777) != self._mode or st.st_gid != self._gid:
            raise NotShareable(
                f"semaphore {share} has mode {st.st_mode & 0o777:#o} and group {st.st_gid}; "
                f"store {self._name!r} gives {self._mode:#o} and group {self._gid}"
            )

    def _link_sem(self, index: int, previous_gen: int, share: str) -> tuple[int, str]:
        """:meth:`_create_sem`, but the new name is a hard link to semaphore *share*:
        ``(generation, name)``."""
        source = _sem_path(share)
        gen = previous_gen
        for _ in range(_CLAIM_TRIES):
            gen += 1
            name = self._sem_name(index, gen)
            try:
                os.link(source, _sem_path(name))
            except FileExistsError:
                unlink_semaphore(name)  # a stale semaphore of a dead claimant
                continue
            except FileNotFoundError as exc:
                raise NotShareable(f"semaphore {share} was removed") from exc
            except OSError as exc:
                raise StateStoreError(
                    f"store {self._name!r}: cannot link semaphore {share} as {name}: {exc}"
                ) from exc
            return gen, name
        raise StateStoreError(f"store {self._name!r}: cannot find a free semaphore name")

    def _create_sem(self, index: int, previous_gen: int) -> tuple[int, Any, str]:
        """A fresh semaphore for the next claim of entry *index*: ``(generation, sem, name)``.
        A name that exists already (a stale semaphore of a dead claimant that could not be
        removed) is skipped by moving on to the next generation."""
        gen = previous_gen
        for _ in range(_CLAIM_TRIES):
            gen += 1
            name = self._sem_name(index, gen)
            try:
                sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=self._mode, initial_value=0)
            except posix_ipc.ExistentialError:
                unlink_semaphore(name)
                continue
            except posix_ipc.Error as exc:
                raise StateStoreError(
                    f"store {self._name!r}: cannot create semaphore: {exc}"
                ) from exc
            except OSError as exc:  # posix_ipc passes sem_open's other errors on as OSError
                raise _semaphore_error(self._name, exc) from exc
            try:
                self._share_like_the_segment(name)
            except BaseException:
                sem.close()
                unlink_semaphore(name)
                raise
            return gen, sem, name
        raise StateStoreError(f"store {self._name!r}: cannot find a free semaphore name")

    def _share_like_the_segment(self, name: str) -> None:
        """Give the semaphore the segment's mode and group: ``sem_open`` applies the umask, and
        a writer of another user that cannot open a reader's semaphore cannot wake it."""
        path = _sem_path(name)
        if not os.path.exists(path):
            return  # not Linux: semaphores are not files here
        try:
            if os.stat(path).st_gid != self._gid:
                # Only root and members of a group may give a file to it: a reader of another
                # user who reaches the store through its "other" bits keeps its own group, and
                # the mode below still lets every writer those bits allow post it.
                with contextlib.suppress(PermissionError):
                    os.chown(path, -1, self._gid)
            os.chmod(path, self._mode)
        except OSError as exc:
            raise StateStoreError(
                f"store {self._name!r}: cannot give semaphore {name} the store's mode "
                f"{self._mode:#o}: {exc}"
            ) from exc

    def unregister(self, waiter: Waiter) -> None:
        """Give the entry back (its semaphore stays open: :meth:`Waiter.close` closes it).
        No registry lock: while we hold its liveness byte nobody else touches it, and we let
        go of that byte last. ``_own_lock`` only orders this against :meth:`close`."""
        with self._own_lock:
            if self._own.get(waiter.index) is waiter:
                del self._own[waiter.index]
                self._release(waiter)

    def _release(self, waiter: Waiter) -> None:
        index = waiter.index
        unlink_semaphore(waiter.sem_name)
        self._q[entry_word(index, REG_STATE)] = _FREE
        if _OFD:
            byte_lock(self.fd, LIVENESS_BASE + index, fcntl.F_UNLCK)

    # ------------------------------------------------------------------ tools and lifecycle

    def entries(self) -> list[tuple[int, int, bool]]:
        """``(index, pid, alive)`` of every entry in use (a snapshot, for tools and tests). Only
        reads the segment and queries locks, so a read-only handle may call it."""
        out = []
        q = self._q
        for index in range(min(q[W_REG_HIGH], self._capacity)):
            if q[entry_word(index, REG_STATE)] != _IN_USE:
                continue
            pid = q[entry_word(index, REG_PID)]
            if index in self._own:
                alive = True
            elif _OFD:
                alive = byte_locked(self.fd, LIVENESS_BASE + index)
            else:
                alive = pid_alive(pid)
            out.append((index, pid, alive))
        return out

    def close(self) -> None:
        """Give back the entries still held through this handle (``wait_any``'s: the wait
        gate gives its own back first), waking their owners, and forget the writer's
        semaphore cache (this process only). Call before the mapping goes."""
        with self._own_lock:
            held, self._own = list(self._own.values()), {}
            for waiter in held:
                self._release(waiter)
                waiter.kick()  # its owner wakes and finds the store closed
        for index in range(self._capacity):
            self._forget_sem(index)

    def after_fork_in_child(self, fd: int) -> None:
        """The parent's entries stay the parent's: forget them without touching them."""
        self.fd = fd
        self._own = {}
        self._own_lock = threading.Lock()
        self._sems = [None] * self._capacity
        self._thread_lock = threading.Lock()
