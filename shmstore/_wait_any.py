"""Waiting on several stores at once: ``wait_any`` and ``wait_any_async``.

What it does
------------
``wait_any({store_a: va, store_b: vb, ...}, timeout)`` returns ``{store: version}`` for every
store whose version moved past the one given (at least one), or raises ``TimeoutError``. One
thread sleeps on **one** semaphore however many stores it waits on: no thread per store, and no
polling of a store that can wake it.

Protocol
--------
1. Look at every store's HEAD; return at once if one moved (``timeout=0`` ends here too).
2. Register in the registry of every store that can wake us (``Store.register_waiter``). The
   first registration creates a semaphore as for any reader; each later one passes
   ``share=<the first entry>``, so its entry's semaphore name is a hard link to the same file
   (``_registry``: "Shared semaphores") and it borrows the first entry's semaphore object (one
   mapping in this process). Every writer of every store now posts the same semaphore, each
   through its own store's entry, by its own name.
3. Loop: load every store's HEAD; return those past their version; else sleep on the
   semaphore (at most a second at a time, like ``Store.wait``, and at most the polling pause
   while some stores can only be polled).
4. On the way out -- return, timeout, an exception, cancellation -- give back every entry
   (``Waiter.close``: the entry's name is unlinked, the entry freed, its liveness lock dropped),
   the first last: the others borrow its semaphore object.

Stores that cannot wake us are polled with back-off from 50 us to 5 ms (``Store.wait``'s
polling): handles that map the store read-only (``wait_mode == "poll"``), every store where
timed semaphore waits do not exist, and a store whose semaphores would get another mode or group
than the shared one (a hard link shares one inode, hence one mode; linking must not widen anyone's
access), which also covers systems where semaphores are not files.

No lost wake-up, for every store
--------------------------------
``_registry`` proves it for one store and one semaphore: the writer stores HEAD, passes a full
barrier (releasing the writer lock), then loads the registry and the semaphore's value and posts
if the value is 0; the reader stores its entry, passes a full barrier, then loads HEAD. Here
the same holds store by store, with two differences.

* *The reader loads every HEAD after every registration and after every wake-up*, never only
  the HEAD of the store it "expects". So for each store S: either our load of HEAD(S) after
  registering (step 3's first turn, after S's registration barrier) sees S's commit, or S's
  writer sees our entry and posts or finds a post pending.
* *A post may be skipped because another store's post is pending* (the value is 1, not 0). The
  writer of S read that 1 after its barrier; the 1 is consumed by our ``sem_wait``, a locked
  read-modify-write that comes after the writer's read in the semaphore word's modification
  order, and we load HEAD(S) after it. This is the store-buffering pattern with a full barrier
  on each side: our load of HEAD(S) sees S's commit. Since step 3 loads *every* HEAD after each
  wake-up, S's commit is returned by the wake-up that another store's post caused. A wake-up
  is never "used up" on one store.

A store that grows moves its slots to a new ring (``_growth``), but HEAD, the registry and its
semaphores stay in the store's own segment: registrations and wake-ups are untouched by a move,
and ``wait_any`` reads nothing else. Surplus posts (two writers racing, the registration barrier)
only cause spurious wake-ups, after which the loop sleeps again; the semaphore's value stays
bounded by the number of writers racing at once.

Release and reclaim
-------------------
Each registration is an ordinary registry entry: the process holds its liveness byte lock, so a
SIGKILLed waiter's entries are reclaimed by the next registration or sweep of each store like
any dead reader's, and each sweep unlinks that store's link name; the kernel frees the
semaphore with its last name and mapping. A handle closed while we wait gives our entry back
itself and kicks the semaphore (``Registry.close``): we wake, find the store closed and raise
:class:`StateStoreError`, giving the other stores' entries back on the way out.

Coroutines
----------
``wait_any_async`` runs the same loop in one thread per waiting coroutine (one sleeping thread
per waiter, as for threads; never one per store), which settles the coroutine's future through
its loop. Cancellation sets a flag and posts the semaphore; the thread gives its entries back
and ends, and the coroutine waits for that (without blocking the loop), so nothing is left
behind. A store handle's own wait gate and its server thread are not involved.

Open questions: registrations end with the call, so every call registers with each store (a
registry-lock round trip, a scan, a hard link: ~50 us per store on the loaded reference VM),
gives each back before it returns (~15 us per store), and each writer opens the new entry's
semaphore on its first post. The wake-up is ``Store.wait``'s, but over 64 stores a call costs
milliseconds (``benchmarks/wake.py``). A reusable set of registrations that lives across calls
(iceoryx2's WaitSet) would take that off the path of a loop that waits again and again. Stores
of different modes or groups in one call poll all but the first kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Mapping
from typing import Any, Final, TypeVar

import posix_ipc

from ._aio import AsyncStore
from ._errors import StateStoreError
from ._registry import NotShareable, Waiter
from ._store import Store
from ._waiting import TIMED_WAIT, check_timeout

__all__ = ["wait_any", "wait_any_async"]

K = TypeVar("K", bound="Store[Any] | AsyncStore[Any]")

_POLL_MIN: Final = 50e-6
_POLL_MAX: Final = 5e-3
_MAX_SLEEP: Final = 1.0  # as _waiting: a Ctrl-C landing just before a sleep is seen within 1 s
_REGISTER_SLICE: Final = 0.05  # a registry lock held by a stopped process: look up this often


class _Cancelled(Exception):
    """The coroutine that the waiting thread serves was cancelled."""


def _items(pending: object) -> list[tuple[Any, Store[Any], int]]:
    """``(key, store, after)`` for each entry of *pending*; clear errors for bad input."""
    if not isinstance(pending, Mapping):
        raise TypeError(f"pending must map Store handles to versions, got {type(pending).__name__}")
    if not pending:
        raise ValueError("pending is empty: there is no store to wait on")
    items = []
    for key, after in pending.items():
        store = key.store if isinstance(key, AsyncStore) else key
        if not isinstance(store, Store):
            raise TypeError(f"pending's keys must be Store or AsyncStore handles, got {key!r}")
        if not isinstance(after, int) or isinstance(after, bool):
            raise TypeError(f"the version for store {store.name!r} must be an int, got {after!r}")
        if store.closed:
            raise StateStoreError(f"store {store.name!r} is closed")
        items.append((key, store, after))
    return items


def _moved(items: list[tuple[Any, Store[Any], int]]) -> dict[Any, int]:
    """The stores past their version, by key. Loads every HEAD (see the essay: never stop at
    the first). Raises StateStoreError for a store closed meanwhile."""
    ready = {}
    for key, store, after in items:
        version = store.version
        if version > after:
            ready[key] = version
    return ready


class _Session:
    """One call's registrations and the semaphore its thread sleeps on."""

    def __init__(self, stores: list[Store[Any]]) -> None:
        self._stores = stores
        self.waiters: list[Waiter] = []
        self.polled: list[Store[Any]] = []
        self._sem: Any = None  # the first entry's semaphore: every entry names this one
        self._lock = threading.Lock()  # orders kick() against registering and closing
        self._cancelled = False
        self._idle = threading.Event()  # what a session without a semaphore sleeps on
        self._open = True

    def register(self, deadline: float | None) -> None:
        """Register with every store that can wake us; the rest are polled."""
        for store in self._stores:
            if store.wait_mode != "semaphore" or not TIMED_WAIT:
                self.polled.append(store)
                continue
            while True:
                self._check_cancelled()
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise TimeoutError
                attempt = now + _REGISTER_SLICE
                if deadline is not None:
                    attempt = min(attempt, deadline)
                share = self.waiters[0] if self.waiters else None
                try:
                    waiter = store.register_waiter(attempt, share=share)
                except TimeoutError:
                    continue  # the registry lock is busy: look at the deadline, then again
                except NotShareable:
                    self.polled.append(store)
                    break
                with self._lock:
                    self.waiters.append(waiter)
                    if self._sem is None:
                        self._sem = waiter.sem
                break

    def _check_cancelled(self) -> None:
        if self._cancelled:
            raise _Cancelled

    def sleep(self, seconds: float) -> None:
        self._check_cancelled()
        if self._sem is None:
            self._idle.wait(seconds)
            return
        with contextlib.suppress(posix_ipc.BusyError, posix_ipc.SignalError):
            # A signal (Ctrl-C) is a spurious wake-up; Python raises its exception right after.
            self._sem.acquire(seconds)

    def cancel(self) -> None:
        """From another thread: make the sleeping thread give up (``_Cancelled``)."""
        with self._lock:
            self._cancelled = True
            self._idle.set()
            if self._sem is not None and self._open:
                self._sem.release()

    def close(self) -> None:
        """Give every entry back (the owner's thread, once it no longer sleeps)."""
        with self._lock:
            self._open = False
            waiters, self.waiters = self.waiters, []
            self._sem = None
        for waiter in reversed(waiters):  # the first owns the semaphore the others borrow
            waiter.close()


def _wait(
    items: list[tuple[Any, Store[Any], int]], deadline: float | None, session: _Session
) -> dict[Any, int]:
    """Steps 2-4 of the essay: register, then sleep until a store moves. ``TimeoutError`` at
    *deadline* (``time.monotonic()``)."""
    try:
        session.register(deadline)
        pause = _POLL_MIN
        while True:
            # After the registrations' barriers, and after every wake-up: every HEAD.
            ready = _moved(items)
            if ready:
                return ready
            nap = _MAX_SLEEP
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                nap = min(nap, remaining)
            if session.polled:
                nap = min(nap, pause)
                pause = min(pause * 2, _POLL_MAX)
            session.sleep(nap)
    finally:
        session.close()


def _timeout_error(items: list[tuple[Any, Store[Any], int]], timeout: float | None) -> TimeoutError:
    names = ", ".join(f"{store.name!r} after {after}" for _key, store, after in items)
    return TimeoutError(f"no store moved within {timeout} s ({names})")


def wait_any(pending: Mapping[K, int], timeout: float | None = None) -> dict[K, int]:
    """Block until at least one of several stores moves past a version; return the new versions.

    *pending* maps :class:`Store` (or :class:`AsyncStore`) handles to the version each was last
    seen at. Returns a dict of the handles whose version is now greater than that, to their
    version (at least one; all that moved, not just the first). ``timeout`` as for
    :meth:`Store.wait`: seconds (``None`` or ``math.inf``: no limit; ``nan``: ``ValueError``),
    ``TimeoutError`` when it passes, ``timeout=0`` a non-blocking check.

    The calling thread sleeps on one semaphore registered in every store's registry, so asleep
    it costs no CPU whatever the number of stores; handles that wait by polling (read-only ones,
    see :attr:`Store.wait_mode`) are polled with back-off up to 5 ms. The registrations last
    for the call only (one entry of each store's ``max_readers``). Raises ``TypeError`` /
    ``ValueError`` for bad input, :class:`StateStoreError` for a closed handle (also one closed
    while waiting), :class:`RegistryFullError` like :meth:`Store.wait`.
    """
    items = _items(pending)
    timeout = check_timeout(timeout)
    ready = _moved(items)
    if ready:
        return ready
    if timeout is not None and timeout <= 0:
        raise _timeout_error(items, 0)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        return _wait(items, deadline, _Session([store for _key, store, _after in items]))
    except TimeoutError:
        raise _timeout_error(items, timeout) from None


async def wait_any_async(pending: Mapping[K, int], timeout: float | None = None) -> dict[K, int]:
    """:func:`wait_any` for asyncio: never blocks the loop. One thread sleeps for this coroutine
    (not one per store) and ends with it; cancelling the coroutine leaves no registration and
    no thread behind."""
    items = _items(pending)
    timeout = check_timeout(timeout)
    ready = _moved(items)
    if ready:
        return ready
    if timeout is not None and timeout <= 0:
        raise _timeout_error(items, 0)
    loop = asyncio.get_running_loop()
    result: asyncio.Future[dict[Any, int]] = loop.create_future()
    ended: asyncio.Future[None] = loop.create_future()
    session = _Session([store for _key, store, _after in items])
    deadline = None if timeout is None else time.monotonic() + timeout

    def serve() -> None:
        outcome: dict[Any, int] | None = None
        error: BaseException | None = None
        try:
            outcome = _wait(items, deadline, session)
        except _Cancelled:
            pass
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: its coroutine is gone
            loop.call_soon_threadsafe(_finish, result, ended, outcome, error)

    thread = threading.Thread(target=serve, name="shmstore-wait-any", daemon=True)
    thread.start()
    try:
        got = await result
    except TimeoutError:
        raise _timeout_error(items, timeout) from None
    finally:
        if not ended.done():
            session.cancel()
            # The thread gives the entries back and ends within a moment: wait for that, so
            # that nothing is left once we return (shielded: a second cancellation returns at
            # once, and the thread still ends on its own).
            await asyncio.shield(ended)
        if ended.done():
            # The thread has given everything back and settled us: all that is left of it is
            # its return, so this join does not hold the loop (and no thread outlives us).
            thread.join()
    return got


def _finish(
    result: asyncio.Future[dict[Any, int]],
    ended: asyncio.Future[None],
    outcome: dict[Any, int] | None,
    error: BaseException | None,
) -> None:
    ended.set_result(None)
    if result.done():
        return
    if error is not None:
        result.set_exception(error)
    elif outcome is not None:
        result.set_result(outcome)
    else:
        result.cancel()
