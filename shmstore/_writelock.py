"""Serializing writers with a lock that the kernel releases when its holder dies.

Two implementations, chosen when the store is created and recorded in the header flags so that
every process attached to one store uses the same one:

``RobustMutexLock`` (Linux, the default there)
    A process-shared, *robust* ``pthread_mutex_t`` inside the segment header, called through
    ``ctypes``. Uncontended lock and unlock are a userspace compare-and-swap each: about 0.26 us
    for the pair on the reference machine, against about 0.7 us for the two ``flock`` system
    calls -- and on that VM every system call also costs the code after it cache and TLB misses,
    so ``set()`` as a whole measured about 1.2 us faster with the mutex. The kernel keeps a
    "robust list" of the mutexes each thread holds (glibc and musl register it for every thread)
    and, when a thread dies holding one, marks it ``OWNER_DIED`` and wakes a waiter: the next
    locker gets ``EOWNERDEAD``, declares the mutex consistent and carries on. The seqlock
    protocol needs no repair after a dead writer (see ``_ring``), so recovery is just that.
    A blocked ``pthread_mutex_lock`` releases the GIL (``ctypes.CDLL`` calls do), and each thread
    is its own owner, so threads of one process are serialized too.

``FlockLock`` (everywhere else: macOS has no robust mutexes)
    ``threading.Lock`` for the threads of one handle plus ``flock(LOCK_EX)`` on the handle's own
    open file description for processes. A ``flock`` belongs to the open file description, which
    ``fork()`` shares, so the store reopens its descriptor in a forked child
    (``Store._after_fork_in_child``); and it is per description, not per thread, which is why the
    ``threading.Lock`` is in front of it.

Both are full memory barriers on release (a locked instruction in userspace, or a spinlock in the
kernel), which the wake-up protocol relies on between publishing HEAD and reading the readers'
semaphores; see ``_registry``.

Interrupts. ``KeyboardInterrupt`` (any signal handler's exception) can be raised between any two
bytecodes, including right after the lock call returned and before the caller's ``try`` began:
the lock would then stay held for the life of the process. So callers put the acquire *inside*
``try``/``finally`` and always release, and ``release()`` is safe when this thread does not hold
the lock: glibc's unlock of a robust mutex checks the owner and returns ``EPERM`` (a no-op)
otherwise; ``FlockLock`` records its owning thread and ignores others. (Open question: the
``FlockLock`` fallback still has a window of two bytecodes between its thread lock and recording
the owner.)

``ReadOnlyLock`` (a handle whose mapping is read-only)
    Never taken: such a handle does not write, and taking either lock would write (the mutex
    lives in the mapping). ``held_elsewhere`` only looks: at the mutex's lock word, where glibc
    keeps the owner's thread id, or with a shared ``flock`` probe, which needs no write access
    and touches no byte of the segment.

``ForeignLock`` (a mutex store opened from another PID namespace than its creator's)
    Never taken either: it refuses with a message that says why, and only looks, as
    ``ReadOnlyLock`` does. Why: a robust mutex names its owner by *thread id* -- glibc stores
    the caller's tid in the lock word, and the kernel's robust-list cleanup of a dying thread
    marks "owner died" every mutex whose word holds that thread's tid -- and thread ids are
    numbers of the caller's PID namespace. Containers that share ``/dev/shm`` but not a PID
    namespace reuse the same small tids (each one's first process is pid 1), so a writer in a
    second container could (1) unlock the holder's mutex (glibc's unlock checks only the tid),
    and (2) when killed while *waiting* for it, make the kernel mark the live holder's lock
    "owner died", so that a third writer takes it while the holder still writes. Both were
    reproduced (``tests/test_containers.py``). So the creator records its PID namespace in the
    header (the inode of ``/proc/self/ns/pid``, unique system-wide), and a handle of another
    namespace gets this lock and no write access: reading, waiting and subscribing never take
    the writer lock and work from anywhere. Stores written from several containers are created
    with ``writer_lock="flock"``: a ``flock`` belongs to an open file description, not a tid.

Caveat of the mutex: its layout is the C library's. Processes sharing one store must use the same
C library (not a musl container against a glibc host on a shared ``/dev/shm``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Protocol

from ._errors import CorruptStoreError, StorePermissionError

__all__ = [
    "MUTEX_SIZE",
    "FlockLock",
    "ForeignLock",
    "ReadOnlyLock",
    "RobustMutexLock",
    "WriteLock",
    "foreign_namespace_message",
    "pid_namespace",
    "robust_mutex_supported",
]

log = logging.getLogger("shmstore")

MUTEX_SIZE: Final = 64  # bytes reserved in the header; glibc's pthread_mutex_t is 40 on x86-64
_PTHREAD_PROCESS_SHARED: Final = 1
_PTHREAD_MUTEX_ROBUST: Final = 1
# glibc's pthread_mutex_t starts with ``int __lock``: the owner's TID (plus the FUTEX_WAITERS and
# FUTEX_OWNER_DIED bits) while held, 0 when free.
_FUTEX_TID_MASK: Final = 0x3FFFFFFF


class WriteLock(Protocol):
    """Exclusive writer lock across threads and processes; released by the kernel on death.

    ``acquire()`` returns 0, or an error number to hand to ``recover()`` (which either makes
    the lock ours or raises); ``release()`` unlocks. They are plain callables rather than methods
    so that the mutex's are C calls with no Python frame: ``set()`` is that hot.
    """

    def acquire(self) -> int: ...

    def release(self) -> object: ...

    def recover(self, rc: int) -> None: ...

    def __enter__(self) -> None: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def try_acquire(self) -> int:
        """Take the lock if it is free: 0, ``EBUSY``, or an error number for ``recover()``."""
        ...

    def acquire_for(self, seconds: float) -> int:
        """Wait at most *seconds* for the lock: 0, ``ETIMEDOUT``, or an error number for
        ``recover()``."""
        ...

    def held_elsewhere(self) -> bool:
        """Whether some other thread or process holds the lock right now (for tools, tests)."""
        ...

    def after_fork_in_child(self, fd: int) -> None: ...

    def close(self) -> None: ...


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        for fn in ("pthread_mutexattr_setrobust", "pthread_mutex_consistent"):
            getattr(libc, fn)
    except (OSError, AttributeError):
        return None
    for fn in (
        "pthread_mutex_lock",
        "pthread_mutex_unlock",
        "pthread_mutex_trylock",
        "pthread_mutex_consistent",
    ):
        f = getattr(libc, fn)
        f.argtypes = [ctypes.c_void_p]
        f.restype = ctypes.c_int
    timed = libc.pthread_mutex_timedlock
    timed.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    timed.restype = ctypes.c_int
    return libc


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_libc = _load_libc()


def robust_mutex_supported() -> bool:
    return _libc is not None


def pid_namespace() -> int:
    """This process's PID namespace as a number unique on the machine (the inode of
    ``/proc/self/ns/pid``); 0 where it cannot be told (no ``/proc``, not Linux)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _check(rc: int) -> None:
    if rc != 0:
        raise OSError(rc, f"cannot initialize the writer mutex: {errno.errorcode.get(rc, rc)}")


class RobustMutexLock:
    """A robust, process-shared pthread mutex living in the segment at *offset*."""

    __slots__ = (
        "_anchor",
        "_lock",
        "_name",
        "_timedlock",
        "_trylock",
        "_unlock",
        "acquire",
        "addr",
        "release",
        "try_acquire",
    )

    def __init__(self, buf: mmap.mmap, offset: int, name: str) -> None:
        if _libc is None:
            raise CorruptStoreError(
                f"store {name!r} uses a robust mutex, which this platform's C library lacks"
            )
        # Holding the ctypes view keeps the address valid; close() drops it before unmapping.
        self._anchor: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * MUTEX_SIZE).from_buffer(
            buf, offset
        )
        self.addr = ctypes.addressof(self._anchor)
        self._name = name
        self._lock = _libc.pthread_mutex_lock
        self._unlock = _libc.pthread_mutex_unlock
        self._trylock = _libc.pthread_mutex_trylock
        self._timedlock = _libc.pthread_mutex_timedlock
        self.acquire: Callable[[], int] = functools.partial(self._lock, self.addr)
        self.release: Callable[[], object] = functools.partial(self._unlock, self.addr)
        self.try_acquire: Callable[[], int] = functools.partial(self._trylock, self.addr)

    @staticmethod
    def initialize(buf: mmap.mmap, offset: int) -> None:
        """Create the mutex in a fresh segment (before its magic is written)."""
        assert _libc is not None
        anchor = (ctypes.c_char * MUTEX_SIZE).from_buffer(buf, offset)
        attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4 bytes on glibc
        try:
            _check(_libc.pthread_mutexattr_init(attr))
            _check(_libc.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED))
            _check(_libc.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST))
            _check(_libc.pthread_mutex_init(ctypes.c_void_p(ctypes.addressof(anchor)), attr))
            _libc.pthread_mutexattr_destroy(attr)
        finally:
            del anchor

    def __enter__(self) -> None:
        try:
            rc = self._lock(self.addr)
            if rc != 0:
                self.recover(rc)
        except BaseException:
            self._unlock(self.addr)  # EPERM unless the interrupt came after we got it
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._unlock(self.addr)

    def recover(self, rc: int) -> None:
        if rc == errno.EOWNERDEAD:
            # We hold it now. The previous writer died inside set(); the ring needs no repair.
            assert _libc is not None
            _libc.pthread_mutex_consistent(self.addr)
            log.warning("store %r: a writer died holding the write lock; recovered", self._name)
            return
        raise CorruptStoreError(
            f"store {self._name!r}: cannot take the writer mutex ({errno.errorcode.get(rc, rc)})"
        )

    def acquire_for(self, seconds: float) -> int:
        until = time.time() + seconds  # pthread_mutex_timedlock's deadline is CLOCK_REALTIME
        deadline = _Timespec(int(until), int((until % 1) * 1e9))
        return int(self._timedlock(self.addr, ctypes.byref(deadline)))

    def held_elsewhere(self) -> bool:
        rc: int = -1
        try:
            rc = self._trylock(self.addr)
            if rc not in (0, errno.EBUSY):
                self.recover(rc)
            return rc == errno.EBUSY
        finally:
            if rc != errno.EBUSY:  # an interrupt right after trylock must not keep the lock
                self._unlock(self.addr)  # EPERM (a no-op) if this thread did not take it

    def after_fork_in_child(self, fd: int) -> None:
        # The mutex is in shared memory and owned by a thread, not a descriptor: a parent thread
        # holding it at fork() still releases it. Nothing to do.
        pass

    def close(self) -> None:
        self._anchor = None


class _Blocking:
    """``with lock:`` for the locks whose blocking acquire needs no recovery step: acquire,
    then release on the way out."""

    __slots__ = ()

    def acquire(self) -> int:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class FlockLock(_Blocking):
    """``threading.Lock`` for threads plus ``flock`` on this handle's descriptor for processes."""

    __slots__ = ("_owner", "_thread_lock", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._thread_lock = threading.Lock()
        self._owner: int | None = None

    def acquire(self) -> int:
        self._thread_lock.acquire()
        self._owner = threading.get_ident()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self._owner = None
            self._thread_lock.release()
            raise
        return 0

    def release(self) -> None:
        if self._owner != threading.get_ident():
            return  # not ours: an interrupt came before we had it
        self._owner = None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def recover(self, rc: int) -> None:
        raise AssertionError("flock reports errors by raising")  # pragma: no cover

    def try_acquire(self) -> int:
        if not self._thread_lock.acquire(blocking=False):
            return errno.EBUSY
        self._owner = threading.get_ident()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._owner = None
            self._thread_lock.release()
            return errno.EBUSY
        except BaseException:
            self._owner = None
            self._thread_lock.release()
            raise
        return 0

    def acquire_for(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while (rc := self.try_acquire()) == errno.EBUSY:  # flock has no timed form: poll
            if time.monotonic() >= deadline:
                return errno.ETIMEDOUT
            time.sleep(0.001)
        return rc

    def held_elsewhere(self) -> bool:
        if not self._thread_lock.acquire(blocking=False):
            return True  # another thread of this handle (an exclusive writer keeps it)
        try:
            busy = False
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                busy = True
                return True
            finally:
                if not busy:  # also after an interrupt right after flock() returned
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def after_fork_in_child(self, fd: int) -> None:
        """Use the child's own descriptor; the parent's threads are gone, and a thread lock one
        of them held would never be released."""
        self.fd = fd
        self._thread_lock = threading.Lock()
        self._owner = None

    def close(self) -> None:
        pass


class ReadOnlyLock(_Blocking):
    """The writer lock of a handle that maps the segment read-only: it cannot be taken (that
    would write), and :meth:`held_elsewhere` only looks. See the module essay."""

    __slots__ = ("_buf", "_name", "_offset", "fd")

    def __init__(self, buf: mmap.mmap, offset: int | None, fd: int, name: str) -> None:
        self._buf: mmap.mmap | None = buf
        self._offset = offset  # of the mutex; None for a flock store
        self.fd = fd
        self._name = name

    def acquire(self) -> int:
        raise StorePermissionError(
            errno.EACCES, f"store {self._name!r} is open read-only: this handle cannot write"
        )

    def try_acquire(self) -> int:
        return self.acquire()

    def acquire_for(self, seconds: float) -> int:
        return self.acquire()

    def release(self) -> None:
        pass

    def recover(self, rc: int) -> None:
        raise AssertionError("a read-only handle never holds the lock")  # pragma: no cover

    def held_elsewhere(self) -> bool:
        if self._offset is not None:
            if self._buf is None:
                return False
            word = int.from_bytes(self._buf[self._offset : self._offset + 4], sys.byteorder)
            return bool(word & _FUTEX_TID_MASK)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def after_fork_in_child(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        self._buf = None


class ForeignLock(ReadOnlyLock):
    """The writer lock, seen from a PID namespace other than the creator's of a robust-mutex
    store: never taken, only looked at. See the module essay."""

    __slots__ = ()

    def acquire(self) -> int:
        raise StorePermissionError(errno.EPERM, foreign_namespace_message(self._name))


def foreign_namespace_message(name: str) -> str:
    return (
        f"store {name!r} serializes its writers with a robust mutex and was created in another "
        "PID namespace (another container): a mutex names its owner by thread id, which repeats "
        "across namespaces, so this process may read and wait but not write; create the store "
        "with writer_lock='flock' to write to it from several containers"
    )
