"""Serializing writers: a ``threading.Lock`` for the threads of one handle, ``flock`` for processes.

``flock`` is the lock the brief asks for because the kernel drops it when its holder dies: a writer
SIGKILLed inside ``set()`` never blocks the next one, whereas a semaphore used as a mutex would stay
held for good. It is taken on the handle's own open file description of the segment, so every
handle -- in this process or another -- contends with every other.

Two details follow from that choice:

* A ``flock`` belongs to the open file description, and ``fork()`` shares descriptions. The store
  therefore reopens its descriptor in the child (see ``_store._after_fork_in_child``), or parent
  and child would silently hold one lock between them.
* ``flock`` is per description, not per thread: two threads of one handle would both "hold" it.
  The ``threading.Lock`` in front of it serializes them.

Releasing the ``flock`` is also the full memory barrier that the wake-up protocol needs between
publishing HEAD and reading the readers' semaphores (the kernel takes a spinlock with a locked
instruction); see ``_registry``.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Callable
from types import TracebackType

__all__ = ["WriteLock"]


class WriteLock:
    """Exclusive writer lock across the threads of this handle and every other handle."""

    __slots__ = ("_fd", "_thread_lock")

    def __init__(self, fd: Callable[[], int]) -> None:
        self._fd = fd
        self._thread_lock = threading.Lock()

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._fd(), fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            fcntl.flock(self._fd(), fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def held_elsewhere(self) -> bool:
        """Whether some other handle holds the lock right now (a snapshot, for tools)."""
        with self._thread_lock:
            try:
                fcntl.flock(self._fd(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(self._fd(), fcntl.LOCK_UN)
            return False

    def after_fork_in_child(self) -> None:
        # The parent's threads are gone; a lock one of them held would never be released.
        self._thread_lock = threading.Lock()
