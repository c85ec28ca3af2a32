"""Blocking until the store changes, for any number of threads of one handle, and subscriptions.

A handle owns at most one registry entry (one semaphore), however many of its threads wait. The
first thread to wait becomes the *sleeper* and blocks on the semaphore; the others wait on a
condition variable. When the sleeper wakes (a commit, or its own timeout) it hands the role back
and wakes everyone; each thread re-checks HEAD against its own ``after`` and deadline, and one of
those still waiting becomes the next sleeper. No thread can miss a commit: whoever sleeps on the
semaphore is registered, and everyone else re-checks HEAD whenever the sleeper wakes.

Adaptive spinning. On the reference VM a semaphore wake-up costs ~24 us one way (an idle vCPU
has to be woken by the host), while a commit is a few microseconds. So, like an adaptive mutex, a
waiting thread first re-reads HEAD in a loop for up to ``SPIN_NS`` -- but only while recent waits
were that short (an exponential moving average of how long ``wait()`` took, seeded pessimistic).
A reader of a busy store then sees a commit within a microsecond; a reader of a quiet store never
spins, and a sleeping reader costs no CPU. The spin is bounded per call, so the worst case --
commits arriving just after every spin ends -- costs at most ``SPIN_NS`` of CPU per wait.
Spinning holds the GIL, so the asyncio thread does not spin (``spin=False``).

Where timed semaphore waits do not exist (macOS: ``posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED`` is
false), waiting polls HEAD with exponential back-off from 50 us to 5 ms instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

import posix_ipc

from ._errors import StateStoreError
from ._registry import Registry, Waiter

__all__ = ["WaitGate"]

TIMED_WAIT = posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED  # tests force the polling path
_POLL_MIN: Final = 50e-6
_POLL_MAX: Final = 5e-3
SPIN_NS: Final = 100_000
_EWMA_SEED: Final = 10 * SPIN_NS  # start out assuming waits are long: no spinning


class WaitGate:
    """Sleep until ``head() > after``, sharing one registry entry among this handle's threads."""

    def __init__(self, head: Callable[[], int], registry: Registry) -> None:
        self._head = head
        self._registry = registry
        self._cond = threading.Condition(threading.Lock())
        self._sleeper = False
        self._closing = False
        self._typical_ns = _EWMA_SEED
        self.waiter: Waiter | None = None

    def wait(self, after: int, timeout: float | None, *, spin: bool = True) -> int:
        head = self._head()
        if head > after:
            return head
        if timeout is not None and timeout <= 0:
            raise TimeoutError(f"no version after {after} (timeout=0)")
        clock = time.perf_counter_ns
        started = clock()
        try:
            if spin and self._typical_ns < SPIN_NS:
                stop = started + min(
                    SPIN_NS, int(timeout * 1e9) if timeout is not None else SPIN_NS
                )
                head_of = self._head
                while clock() < stop:
                    head = head_of()
                    if head > after:
                        return head
            return self._block(after, timeout, started)
        finally:
            took = clock() - started
            self._typical_ns += (took - self._typical_ns) >> 2

    def _block(self, after: int, timeout: float | None, started_ns: int) -> int:
        deadline = None if timeout is None else started_ns / 1e9 + timeout
        if not TIMED_WAIT:
            return self._poll(after, deadline, timeout)
        with self._cond:
            if self.waiter is None:
                self.waiter = self._registry.register()
            while True:
                if self._closing:
                    raise StateStoreError("the store was closed while waiting")
                head = self._head()
                if head > after:
                    return head
                remaining = None if deadline is None else deadline - time.perf_counter()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no version after {after} within {timeout} s")
                if self._sleeper:
                    self._cond.wait(remaining)
                    continue
                self._sleeper = True
                waiter = self.waiter
                self._cond.release()
                try:
                    waiter.sleep(remaining)
                finally:
                    self._cond.acquire()
                    self._sleeper = False
                    self._cond.notify_all()

    def _poll(self, after: int, deadline: float | None, timeout: float | None) -> int:
        pause = _POLL_MIN
        while True:
            head = self._head()
            if head > after:
                return head
            if deadline is not None:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError(f"no version after {after} within {timeout} s")
                pause = min(pause, remaining)
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX)

    def close(self) -> None:
        """Give the registry entry back. Threads still waiting wake and raise StateStoreError;
        the semaphore is closed only once nobody sleeps on it."""
        with self._cond:
            self._closing = True
            waiter = self.waiter
            while self._sleeper and waiter is not None:
                waiter.kick()
                self._cond.wait(0.1)
            self.waiter = None
            self._cond.notify_all()
        if waiter is not None:
            waiter.close()

    def after_fork_in_child(self) -> None:
        # The parent's entry and semaphore stay the parent's; the child registers anew.
        self._cond = threading.Condition(threading.Lock())
        self._sleeper = False
        self._closing = False
        self.waiter = None
