"""Blocking until the store changes, for any number of threads of one handle, and subscriptions.

A handle owns at most one registry entry (one semaphore), however many of its threads wait. The
first thread to wait becomes the *sleeper* and blocks on the semaphore; the others wait on a
condition variable. When the sleeper wakes (a commit, or its own timeout) it hands the role back
and wakes everyone; each thread re-checks HEAD against its own ``after`` and deadline, and one of
those still waiting becomes the next sleeper. No thread can miss a commit: whoever sleeps on the
semaphore is registered, and everyone else re-checks HEAD whenever the sleeper wakes.

The lone waiter. Usually one thread of a handle waits, again and again (a reader following a
writer), and what it does between the semaphore and its caller is on the critical path of every
wake-up: measured with two processes on two CPUs, each microsecond of Python there adds a
microsecond to a ~7 us semaphore wake-up, and Python just woken on an idle vCPU runs from cold
caches, ~3x slower than in a loop. So a registered handle's thread that finds nobody else in the
sleeper role takes it with one uncontended lock round trip, sleeps on the semaphore directly,
reads HEAD and hands the role back (notifying parked threads only if there are any) -- no
condition variable, no general loop. Everything else (registering, another thread already
asleep, closing, and a sleep that ends without the version: a timeout, a kick, a spurious post)
goes through the general loop, so the fast path adds no case to the argument above: it is the
loop's first turn, without the loop. HEAD is read before the role is handed back, because
close() waits for the sleeper to leave before it gives the entry back and the store unmaps.

Adaptive spinning. On the reference VM a sleeping wake-up costs ~16 us one way between two CPUs
(~6 us of it the semaphore: an idle vCPU has to be woken by the host), while a commit is a few
microseconds. So, like an adaptive mutex, a waiting thread first re-reads HEAD in a loop for up
to ``SPIN`` -- but only while recent waits were that short (an exponential moving average of how
long ``wait()`` took, seeded pessimistic; ``spin=False`` waits do not count, they never spin).
A reader of a busy store then sees a commit within a microsecond; a reader of a quiet store never
spins, and a sleeping reader costs no CPU. The spin is bounded per call, so the worst case --
commits arriving just after every spin ends -- costs at most ``SPIN`` of CPU per wait.
Spinning holds the GIL, so the asyncio thread does not spin (``spin=False``). Each turn of the
spin yields the CPU (``sched_yield``): a writer that shares our CPU would otherwise wait for our
spin to end -- measured with both processes pinned to one CPU: 66 us one way without the yield,
18 us with it (a raw semaphore ping-pong there: 2-3 us); across CPUs it costs about a microsecond.

Coroutines use the same gate (there is one wait engine): ``wait_async`` parks a future in the
gate, and one background thread per handle, alive only while some coroutine waits, waits in the
gate like any other thread -- for the smallest ``after`` of the pending coroutines -- and resolves
each satisfied future through its loop. A coroutine that arrives, is cancelled or times out
interrupts that thread (posting the semaphore if it is the sleeper) so that it re-plans. The
handle still owns at most one registry entry. An event loop that closes while one of its
coroutines waits is skipped; the other loops' coroutines are still served.

Timeouts: ``None`` and ``inf`` wait forever, ``nan`` is a ``ValueError``; a single semaphore
sleep is capped at a second so that a huge "forever" timeout cannot overflow ``sem_timedwait``'s
absolute deadline, and a Ctrl-C that lands just before a sleep is seen within a second.

Where timed semaphore waits do not exist (macOS: ``posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED`` is
false), waiting polls HEAD with exponential back-off from 50 us to 5 ms instead. So does a handle
that maps the store read-only (``poll=True``): registering writes the segment, which such a
handle cannot, so it never takes a registry entry, and its coroutines' server thread polls the
same way, sleeping on the gate's condition so that close and cancellation still wake it.
:attr:`WaitGate.mode` says which of the two a handle uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import posix_ipc

from ._errors import StateStoreError
from ._registry import Registry, Waiter

__all__ = ["WaitGate", "check_timeout"]

TIMED_WAIT = posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED  # tests force the polling path
_POLL_MIN: Final = 50e-6
_POLL_MAX: Final = 5e-3
SPIN: Final = 100e-6  # seconds
_INF: Final = math.inf
_EWMA_SEED: Final = 10 * SPIN  # start out assuming waits are long: no spinning
# The longest single semaphore sleep. A "forever" such as sys.float_info.max must not overflow
# the absolute deadline sem_timedwait takes (it then fails at once, and the loop would spin);
# and a signal that lands just before the wait starts (Ctrl-C) is not seen until the wait ends,
# so a sleeping thread looks up once a second. That costs nothing measurable.
_MAX_SLEEP: Final = 1.0
# The longest a thread holds off the others while the registry lock is busy (see _register_locked).
_REGISTER_SLICE: Final = 0.05


def check_timeout(timeout: float | None) -> float | None:
    """Normalize a user's timeout: ``None`` or ``inf`` wait forever, ``nan`` is refused."""
    if timeout is None:
        return None
    if math.isnan(timeout):
        raise ValueError("timeout must be a number of seconds or None, got nan")
    if math.isinf(timeout) and timeout > 0:
        return None
    return float(timeout)


@dataclass(eq=False)
class _AsyncWaiter:
    after: int
    future: asyncio.Future[int]
    loop: asyncio.AbstractEventLoop = field(repr=False)

    def settle(self, version: int | None, error: BaseException | None = None) -> None:
        """Hand the outcome to the waiter's loop; a loop that has closed meanwhile is skipped
        (its coroutine is gone with it)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.future, version, error)


def _settle(future: asyncio.Future[int], version: int | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert version is not None
        future.set_result(version)


class WaitGate:
    """Sleep until ``head() > after``, sharing one registry entry among this handle's threads
    and coroutines."""

    def __init__(
        self, head: Callable[[], int], registry: Registry, name: str, *, poll: bool = False
    ) -> None:
        self._head = head
        self._registry = registry
        self._name = name
        self._poll_only = poll
        self._typical = _EWMA_SEED
        self.late_wakeups = 0
        """Sleeps that ran out although a commit had come (a lost or raced wake-up)."""
        self._reset()

    def _reset(self) -> None:
        self._mutex = threading.Lock()  # the condition's lock, entered directly on hot paths
        self._cond = threading.Condition(self._mutex)
        self._parked = 0  # threads waiting on the condition: notify only when there are any
        self._registering = False  # a thread is claiming the entry, without the condition
        self._sleeper = False
        self._closing = False
        # A thread's wait keeps the registration until close(); the coroutines' server gives it
        # back when they are all done, so an idle asyncio handle holds no entry.
        self._sticky = False
        self._pending: set[_AsyncWaiter] = set()
        self._server: threading.Thread | None = None
        self._changed = False  # the pending set changed: the server must re-evaluate
        self.waiter: Waiter | None = None

    @property
    def mode(self) -> str:
        """``"semaphore"`` (a registry entry, woken by the writer) or ``"poll"`` (re-reading the
        version with back-off: read-only handles, and platforms without timed semaphores)."""
        return "poll" if self._poll_only or not TIMED_WAIT else "semaphore"

    # ---------------------------------------------------------------- threads

    def wait(self, after: int, timeout: float | None, *, spin: bool = True) -> int:
        head = self._head()
        if head > after:
            return head
        if timeout is not None and not 0 < timeout < _INF:  # nan, inf and <= 0 are special
            timeout = check_timeout(timeout)
            if timeout is not None and timeout <= 0:
                raise TimeoutError(f"no version after {after} (timeout=0)")
        now = time.monotonic
        started = now()
        try:
            if spin and self._typical < SPIN:
                clock = time.perf_counter_ns
                stop = clock() + int(1e9 * (SPIN if timeout is None else min(SPIN, timeout)))
                head_of = self._head
                relax = os.sched_yield
                while clock() < stop:
                    head = head_of()
                    if head > after:
                        return head
                    relax()  # lets a writer that shares our CPU run (else it waits for us)
            if timeout is None:
                deadline = None
                sleep_for = _MAX_SLEEP
            else:
                deadline = started + timeout
                remaining = deadline - now()
                sleep_for = remaining if remaining < _MAX_SLEEP else _MAX_SLEEP  # min() costs more
            waiter = self.waiter
            if waiter is not None and TIMED_WAIT and sleep_for > 0:
                # The common case, straight to the semaphore and straight back: this thread
                # is the handle's only waiter, registered already -- so a commit since the look
                # at HEAD above posts the semaphore or left a post pending (see _registry).
                # Only when another thread holds or claims the sleeper role, the handle
                # closes, or this sleep ends without the version (a timeout, a kick, a
                # spurious post) does the general loop below take over.
                mutex = self._mutex
                mutex.acquire()
                if self._sleeper or self._registering or self._closing or self.waiter is not waiter:
                    mutex.release()
                else:
                    self._sleeper = True
                    self._sticky = True
                    mutex.release()
                    posted = True
                    try:
                        try:
                            waiter.sem.acquire(sleep_for)
                        except posix_ipc.BusyError:
                            posted = False
                        except posix_ipc.SignalError:
                            pass  # spurious; Python raises the signal's exception (Ctrl-C) next
                        # Read while still the sleeper: close() waits for the sleeper to leave
                        # before it gives the entry back and the store unmaps.
                        head = self._head()
                    finally:
                        mutex.acquire()
                        self._sleeper = False
                        if not posted and head > after:
                            self.late_wakeups += 1  # see _wait_locked (counted under the lock)
                        if self._parked:
                            self._cond.notify_all()
                        mutex.release()
                    if head > after:
                        return head
            if self._poll_only or not TIMED_WAIT:
                return self._poll(after, deadline)
            with self._mutex:
                self._sticky = True
                got = self._wait_locked(after, deadline, None)
            assert got is not None
            return got
        except TimeoutError:
            raise TimeoutError(f"no version after {after} within {timeout} s") from None
        finally:
            # Learn only from waits that may spin: a spin=False wait is the caller's choice
            # (the asyncio thread, a benchmark), and this line is on its wake-up's path.
            if spin:
                self._typical += (now() - started - self._typical) * 0.25

    def _wait_locked(
        self, after: int, deadline: float | None, interrupted: Callable[[], bool] | None
    ) -> int | None:
        """With the condition held: the version once it is past *after*, or ``None`` as soon as
        *interrupted()* says so. Raises ``TimeoutError`` at *deadline*, StateStoreError when
        the handle closes."""
        if self._closing:
            raise StateStoreError(f"store {self._name!r} was closed while waiting")
        if self._poll_only:
            return self._poll_locked(after, deadline, interrupted)
        while True:
            if self._closing:
                raise StateStoreError(f"store {self._name!r} was closed while waiting")
            if self.waiter is None and not self._register_locked(deadline, interrupted):
                return None
            head = self._head()
            if head > after:
                return head
            if interrupted is not None and interrupted():
                return None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            if self._sleeper:
                # Capped like the semaphore sleep: Condition.wait overflows past TIMEOUT_MAX.
                self._park(_MAX_SLEEP if remaining is None else min(remaining, _MAX_SLEEP))
                continue
            self._sleeper = True
            waiter = self.waiter
            assert waiter is not None  # registered above, with the condition held since
            self._mutex.release()
            posted = True
            try:
                posted = waiter.sleep(
                    _MAX_SLEEP if remaining is None else min(remaining, _MAX_SLEEP)
                )
            finally:
                self._mutex.acquire()
                self._sleeper = False
                if self._parked:
                    self._cond.notify_all()
            if not posted and self._head() > after:
                # The sleep ran out although a commit had come: its wake-up was lost (or the
                # post raced the time limit). Sleeps are capped, so this is late, not never;
                # the count is what tells (tests assert it stays 0; statistics() shows it).
                self.late_wakeups += 1

    def _register_locked(
        self, deadline: float | None, interrupted: Callable[[], bool] | None
    ) -> bool:
        """With the condition held: claim the handle's registry entry; ``False`` if
        *interrupted()* first. The registry lock may be held by a stopped process, so it is
        tried in slices of ``_REGISTER_SLICE`` with the condition released: other threads, the
        coroutines' loops (which take the condition when a wait ends) and close() never wait
        for it longer than a slice."""
        while self.waiter is None:
            if self._closing:
                raise StateStoreError(f"store {self._name!r} was closed while waiting")
            if interrupted is not None and interrupted():
                return False
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError
            attempt = now + _REGISTER_SLICE
            if deadline is not None:
                attempt = min(attempt, deadline)
            if self._registering:  # another thread of this handle is claiming it
                self._park(attempt - now)
                continue
            self._registering = True
            self._mutex.release()
            waiter = None
            try:
                waiter = self._registry.register(attempt)
            except TimeoutError:
                pass  # busy: look at closing, interruptions and the deadline, then again
            finally:
                self._mutex.acquire()
                self._registering = False
                if waiter is not None:
                    self.waiter = waiter  # close() waited for us: it gives it back
                if self._parked:
                    self._cond.notify_all()
        return True

    def _park(self, timeout: float | None) -> None:
        """With the condition held: wait on it (the other waiters of this handle wake us)."""
        self._parked += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._parked -= 1

    def _poll_locked(
        self, after: int, deadline: float | None, interrupted: Callable[[], bool] | None
    ) -> int | None:
        """:meth:`_wait_locked` without a registry entry: re-read HEAD with back-off, sleeping
        on the condition (released meanwhile), which close and new coroutines notify."""
        return self._poll_loop(after, deadline, interrupted, self._park)

    def _poll(self, after: int, deadline: float | None) -> int:
        """Polling for a thread, without the condition: re-read HEAD, sleeping meanwhile."""
        got = self._poll_loop(after, deadline, None, time.sleep)
        assert got is not None  # never interrupted
        return got

    def _poll_loop(
        self,
        after: int,
        deadline: float | None,
        interrupted: Callable[[], bool] | None,
        pause_for: Callable[[float], object],
    ) -> int | None:
        """Re-read HEAD with back-off from 50 us to 5 ms, pausing with *pause_for*; ``None`` as
        soon as *interrupted()* says so, ``TimeoutError`` at *deadline*."""
        pause = _POLL_MIN
        while True:
            if self._closing:
                raise StateStoreError(f"store {self._name!r} was closed while waiting")
            head = self._head()
            if head > after:
                return head
            if interrupted is not None and interrupted():
                return None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                pause = min(pause, remaining)
            pause_for(pause)
            pause = min(pause * 2, _POLL_MAX)

    # ---------------------------------------------------------------- coroutines

    async def wait_async(self, after: int, timeout: float | None) -> int:
        """``wait()`` for coroutines: one background thread sleeps in the gate on behalf of all
        the handle's coroutines (as one more waiter of the same entry) and hands each its
        version through its loop, only while some coroutine waits."""
        timeout = check_timeout(timeout)
        head = self._head()
        if head > after:
            return head
        if timeout is not None and timeout <= 0:
            raise TimeoutError(f"no version after {after} (timeout=0)")
        loop = asyncio.get_running_loop()
        entry = _AsyncWaiter(after, loop.create_future(), loop)
        with self._cond:
            if self._closing:
                raise StateStoreError(f"store {self._name!r} is closed")
            self._pending.add(entry)
            if self._server is None:
                self._server = threading.Thread(
                    target=self._serve, name=f"shmstore-wait-{self._name}", daemon=True
                )
                self._server.start()
            else:
                self._interrupt_server()
        try:
            async with asyncio.timeout(timeout):
                return await entry.future
        except TimeoutError:
            raise TimeoutError(f"no version after {after} within {timeout} s") from None
        finally:
            if not entry.future.done() or entry.future.cancelled():
                with self._cond:
                    if entry in self._pending:  # cancelled or timed out: let the server re-plan
                        self._pending.discard(entry)
                        self._interrupt_server()

    def _interrupt_server(self) -> None:
        """With the condition held: make the server re-evaluate the pending coroutines."""
        self._changed = True
        if self._sleeper and self.waiter is not None:
            self.waiter.kick()  # whoever sleeps on the semaphore wakes and notifies everyone
        self._cond.notify_all()

    def _serve(self) -> None:
        with self._cond:
            try:
                self._serve_locked()
            except BaseException as exc:  # registry full, semaphore trouble: fail them all
                failed, self._pending = self._pending, set()
                for entry in failed:
                    entry.settle(None, exc)
            finally:
                self._server = None
                if not self._sticky and not self._sleeper and self.waiter is not None:
                    waiter, self.waiter = self.waiter, None
                    waiter.close()
                self._cond.notify_all()

    def _serve_locked(self) -> None:
        while True:
            if self._closing:
                raise StateStoreError(f"store {self._name!r} was closed while waiting")
            head = self._head()
            ready = {entry for entry in self._pending if head > entry.after}
            self._pending -= ready
            for entry in ready:
                entry.settle(head)
            if not self._pending:
                return
            self._changed = False
            after = min(entry.after for entry in self._pending)
            self._wait_locked(after, None, lambda: self._changed)

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Give the registry entry back. Threads and coroutines still waiting get
        StateStoreError; the semaphore is closed only once nobody sleeps on it and the
        coroutines' server thread is gone (it touches the mapping)."""
        with self._cond:
            self._closing = True
            while self._sleeper or self._server is not None or self._registering:
                if self.waiter is not None:
                    self.waiter.kick()
                self._cond.notify_all()
                self._park(0.1)
            waiter, self.waiter = self.waiter, None
            self._cond.notify_all()
        if waiter is not None:
            waiter.close()

    def after_fork_in_child(self) -> None:
        # The parent's entry, semaphore and server thread stay the parent's; the child
        # registers anew when it first waits.
        self._reset()
