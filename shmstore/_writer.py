"""The writer lock as one handle uses it: waiting for it when contended, holding it for the slow
paths, and keeping it for good as the store's exclusive writer.

The lock itself (a robust process-shared mutex, or ``flock``) is ``_writelock``'s; the commit
that runs under it stays in ``Store`` (one frame on the hot path). What lives here is every
other way a handle takes the lock:

- **Contended acquire.** ``set()`` first tries the lock without blocking; only when that fails
  does it call :meth:`WriterSide.acquire_contended`, which waits in short slices so that it can
  notice an *exclusive writer* (the header word EXCLUSIVE holds its pid) and refuse at once with
  a message naming it, instead of blocking behind a lock that is never released.
- **Slow paths** (shared counters, the keeper itself) use :meth:`WriterSide.locked`.
- **The exclusive writer** (``Store.keep_writer_lock``): a keeper thread takes the lock once and
  holds it until the handle closes, so the handle's commits skip the lock round trip (the
  largest fixed cost of ``set()``). A thread, because a robust mutex belongs to the thread that
  locked it; any thread of the handle may commit (the handle's ``in_use`` lock serializes them).
  If the process dies, even by SIGKILL, the kernel releases the lock (robust mutex: EOWNERDEAD;
  flock: dropped with the descriptor) and the next writer clears EXCLUSIVE, holding the lock.

The exclusive writer's commits still need the full barrier between publishing HEAD and reading
the reader registry that releasing the writer lock gives everyone else (see ``_registry``):
:meth:`WriterSide.fence` is an uncontended lock round trip, which is a locked read-modify-write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from typing import Any, Final

from ._errors import StateStoreError
from ._layout import W_EXCLUSIVE
from ._writelock import WriteLock

__all__ = ["WriterSide"]

_CONTENDED_SLICE: Final = 0.05  # a contended writer looks for an exclusive writer this often
# What a timed or try lock may answer short of having the lock. EINTR: POSIX says a mutex lock
# never returns it (glibc restarts the wait; checked), so it is here only to mean "try again"
# should a C library ever pass it through.
_LOCK_NOT_YET: Final = frozenset({errno.EBUSY, errno.ETIMEDOUT, errno.EINTR})


class WriterSide:
    """How one handle takes the store's writer lock beyond the commit's own try (see module)."""

    __slots__ = ("_keeper", "exclusive", "fence", "lock", "name", "words")

    def __init__(self, lock: WriteLock, words: Any, name: str) -> None:
        self.lock = lock
        self.words = words  # the header's u64 words (memoryview cast "Q")
        self.name = name
        #: Whether this handle keeps the writer lock (read by every commit: a plain attribute).
        self.exclusive = False
        #: The exclusive writer's barrier between publishing HEAD and reading the registry.
        self.fence = threading.Lock()
        self._keeper: tuple[threading.Thread, threading.Event] | None = None

    def acquire_contended(self, rc: int) -> None:
        """The writer lock was not free at once (``rc`` from ``try_acquire``): wait for it, or
        raise :class:`StateStoreError` if an exclusive writer keeps it. Returns holding it."""
        lock = self.lock
        words = self.words
        while rc in _LOCK_NOT_YET:
            holder = int(words[W_EXCLUSIVE])
            if holder:
                rc = lock.try_acquire()  # free now only if that writer is gone
                if rc == errno.EBUSY:
                    raise StateStoreError(
                        f"store {self.name!r} has an exclusive writer (pid {holder}), which "
                        "keeps the writer lock for as long as it has the store open"
                    )
            else:
                rc = lock.acquire_for(_CONTENDED_SLICE)
        if rc:
            lock.recover(rc)
        if words[W_EXCLUSIVE]:
            words[W_EXCLUSIVE] = 0  # we hold the lock: the exclusive writer is gone

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The writer lock for the slow paths (counters); the exclusive writer has it."""
        if self.exclusive:
            yield
            return
        try:
            # Inside the try: an interrupt right after the lock call returns must still release
            # it (release() is a no-op for a lock this thread does not hold).
            rc = self.lock.try_acquire()
            if rc:
                self.acquire_contended(rc)
            yield
        finally:
            self.lock.release()

    def keep(self) -> None:
        """Become the exclusive writer (see module); nothing if this handle is one already.
        Raises :class:`StateStoreError` if another handle keeps the lock."""
        if self._keeper is not None:
            return
        taken = threading.Event()
        failure: list[BaseException] = []
        done = threading.Event()

        def keep() -> None:
            try:
                with self.locked():
                    self.words[W_EXCLUSIVE] = os.getpid()
                    taken.set()
                    done.wait()
                    self.words[W_EXCLUSIVE] = 0
            except BaseException as exc:
                failure.append(exc)
                taken.set()

        keeper = threading.Thread(target=keep, name=f"shmstore-writer-{self.name}", daemon=True)
        keeper.start()
        taken.wait()
        if failure:
            keeper.join()
            raise failure[0]
        self.exclusive = True
        self._keeper = (keeper, done)

    def let_go(self) -> None:
        """Stop being the exclusive writer: the keeper releases the lock and ends."""
        if self._keeper is not None:
            keeper, done = self._keeper
            self._keeper = None
            self.exclusive = False
            done.set()
            keeper.join()

    def after_fork_in_child(self) -> None:
        """The keeper thread did not come along: the parent is still the exclusive writer."""
        self.exclusive = False
        self._keeper = None
        self.fence = threading.Lock()
