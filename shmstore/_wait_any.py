"""Waiting on several stores at once: ``WaitSet``, ``wait_any`` and ``wait_any_async``.

What it does
------------
``WaitSet(stores)`` keeps one thread's registrations in several stores' registries across
waits; ``ws.wait({store_a: va, store_b: vb, ...}, timeout)`` returns ``{store: version}`` for
every member whose version moved past the one given (at least one), or raises ``TimeoutError``.
One thread sleeps on **one** semaphore however many stores it waits on: no thread per store,
and no polling of a store that can wake it. ``wait_any(pending, timeout)`` is a WaitSet for one
call (made, waited on once, closed), so there is one engine.

Protocol
--------
1. Look at every pending store's HEAD; return at once if one moved (``timeout=0`` ends here
   too, having registered nothing).
2. On the set's first wait that has to sleep, register in the registry of every member that can
   wake us (``Store.register_waiter``). The first registration creates a semaphore as for any
   reader; each later one passes ``share=<the first entry>``, so its entry's semaphore name is a
   hard link to the same file (``_registry``: "Shared semaphores") and it borrows the first
   entry's semaphore object (one mapping in this process). Every writer of every member now
   posts the same semaphore, each through its own store's entry, by its own name. The entries
   stay until the set closes: later waits skip this step. (A registration cut short by the
   wait's deadline keeps what it did; the next wait goes on from there.)
3. While recent waits were short (a moving average under ``SPIN``, as ``Store.wait``), re-read
   the pending HEADs for up to ``SPIN``, yielding the CPU each turn (``_waiting`` explains the
   trade: a busy reader sees a commit within microseconds, a quiet one never spins).
4. Loop: load every pending store's HEAD; return those past their version; else sleep on the
   semaphore (at most a second at a time, like ``Store.wait``, and at most the polling pause
   while some members can only be polled).
5. ``close()`` -- or the end of the ``with`` block -- gives back every entry (``Waiter.close``:
   the entry's name is unlinked, the entry freed, its liveness lock dropped), the first last: the
   others borrow its semaphore object.

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

* *The reader loads every pending HEAD after every registration and after every wake-up*, never
  only the HEAD of the store it "expects". So for each store S: either our load of HEAD(S)
  after registering (step 4's first turn, after S's registration barrier) sees S's commit, or
  S's writer sees our entry and posts or finds a post pending.
* *A post may be skipped because another store's post is pending* (the value is 1, not 0). The
  writer of S read that 1 after its barrier; the 1 is consumed by our ``sem_wait``, a locked
  read-modify-write that comes after the writer's read in the semaphore word's modification
  order, and we load HEAD(S) after it. This is the store-buffering pattern with a full barrier
  on each side: our load of HEAD(S) sees S's commit. Since step 4 loads *every* pending HEAD
  after each wake-up, S's commit is returned by the wake-up that another store's post caused.
  A wake-up is never "used up" on one store.

Keeping the entries between waits changes nothing in this argument: a commit that lands
between two waits either posts the semaphore (the entry is there all along), which the next
sleep consumes at once, or is seen by the next wait's first load of HEAD. A post left pending
by a commit the caller already saw is one spurious wake-up; so is a kick (cancellation, a
member's close) that found nobody asleep. Waiting on some members only is fine too: the others'
posts are spurious wake-ups for that wait.

A store that grows moves its slots to a new ring (``_growth``), but HEAD, the registry and its
semaphores stay in the store's own segment: registrations and wake-ups are untouched by a move,
and the wait reads nothing else. Surplus posts (two writers racing, the registration barrier)
only cause spurious wake-ups, after which the loop sleeps again; the semaphore's value stays
bounded by the number of writers racing at once.

Release and reclaim
-------------------
Each registration is an ordinary registry entry: the process holds its liveness byte lock, so a
SIGKILLed waiter's entries are reclaimed by the next registration or sweep of each store like
any dead reader's, and each sweep unlinks that store's link name; the kernel frees the
semaphore with its last name and mapping. A member handle closed while the set lives gives our
entry back itself and kicks the semaphore (``Registry.close``): a wait in progress wakes, finds
the member closed and raises :class:`StateStoreError`, and so does every later wait (the set has
lost a member that could wake it; ``close()`` gives the other stores' entries back).

Threads and coroutines
----------------------
One wait at a time per set: a second thread (or coroutine) that tries gets a
:class:`StateStoreError` at once, rather than a second sleeper on a semaphore that one post
wakes only one of. ``close()`` may come from any thread: it kicks the semaphore and returns once
the waiting thread has left, which raises :class:`StateStoreError`.

``wait_async`` runs the same loop in one thread per call (never one per store), which settles
the coroutine's future through its loop. Cancellation sets a flag and posts the semaphore; the
thread stops (leaving the registrations to the set) and the coroutine waits for it to end
(without blocking the loop), so no thread is left behind. A store handle's own wait gate and
its server thread are not involved.

Cost
----
A kept set's wake-up is ``Store.wait``'s: a post, the semaphore, then a load of each pending
HEAD. ``benchmarks/wake.py`` measured p50 one-way latencies of 0.96x to 1.19x of
``Store.wait(spin=False)`` over 1 and 8 stores, across runs and placements, and paced wake-ups
(the waiter asleep on an idle CPU) of 1.08x to 1.24x with the rows interleaved
(``docs/wait-any.md``). The lone waiter's path straight to the semaphore in
:meth:`WaitSet.wait` brought the paced figure down from ~1.4x: after an idle sleep every line of
Python between the semaphore and the caller runs from cold caches. ``wait_any`` pays the
registrations on each call: a registry-lock round trip, a scan and a hard link per store (~50 us
each on the loaded reference VM), ~15 us per store to give them back, and each writer opens the
new entry's semaphore on its first post -- milliseconds over 64 stores.

Open questions: a wake-up loads every pending HEAD (~0.1 us each), so over hundreds of stores
a per-entry "who posted" word would be cheaper than the scan. Stores of different modes or
groups in one set poll all but the first kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final, Generic, TypeVar

import posix_ipc

from ._aio import AsyncStore
from ._errors import StateStoreError
from ._registry import NotShareable, Waiter
from ._store import Store
from ._waiting import SPIN, TIMED_WAIT, check_timeout

__all__ = ["WaitSet", "wait_any", "wait_any_async"]

K = TypeVar("K", bound="Store[Any] | AsyncStore[Any]")

_POLL_MIN: Final = 50e-6
_POLL_MAX: Final = 5e-3
_MAX_SLEEP: Final = 1.0  # as _waiting: a Ctrl-C landing just before a sleep is seen within 1 s
_REGISTER_SLICE: Final = 0.05  # a registry lock held by a stopped process: look up this often


class _Cancelled(Exception):
    """The coroutine that the waiting thread serves was cancelled."""


def _store_of(key: object) -> Store[Any]:
    store = key.store if isinstance(key, AsyncStore) else key
    if not isinstance(store, Store):
        raise TypeError(f"pending's keys must be Store or AsyncStore handles, got {key!r}")
    if store.closed:
        raise StateStoreError(f"store {store.name!r} is closed")
    return store


def _moved(items: list[tuple[Any, Store[Any], int]]) -> dict[Any, int]:
    """The stores past their version, by key. Loads every HEAD (see the essay: never stop at
    the first). Raises StateStoreError for a store closed meanwhile."""
    ready = {}
    for key, store, after in items:
        version = store.version
        if version > after:
            ready[key] = version
    return ready


def _spin(items: list[tuple[Any, Store[Any], int]], seconds: float) -> dict[Any, int]:
    """Re-read every version for up to *seconds*, yielding the CPU each turn (a writer that
    shares our CPU runs meanwhile); ``{}`` if none moved. ``_waiting`` explains the trade."""
    clock = time.perf_counter_ns
    stop = clock() + int(1e9 * seconds)
    relax = os.sched_yield
    while clock() < stop:
        ready = _moved(items)
        if ready:
            return ready
        relax()
    return {}


def _timeout_error(items: list[tuple[Any, Store[Any], int]], timeout: float | None) -> TimeoutError:
    names = ", ".join(f"{store.name!r} after {after}" for _key, store, after in items)
    return TimeoutError(f"no store moved within {timeout} s ({names})")


class WaitSet(Generic[K]):
    """Wait on several stores again and again, registered once.

    ``WaitSet(stores)`` takes :class:`Store` or :class:`AsyncStore` handles. Its first wait that
    has to sleep registers in every member's registry -- one entry each, all naming one
    semaphore -- and the registrations stay until :meth:`close` (or the end of the ``with``
    block), so later waits go straight to sleep: a wake-up costs what :meth:`Store.wait`'s does.

    :meth:`wait` / :meth:`wait_async` take *pending*, a mapping of members (all or some) to
    the version each was last seen at, and return the members whose version moved past it, as
    :func:`wait_any` does. One thread (or coroutine) waits on a WaitSet at a time; a second
    raises :class:`StateStoreError` (use one WaitSet per waiting thread). :meth:`close` may
    come from any thread: a wait in progress raises :class:`StateStoreError`. So does a wait
    once a member handle has been closed (the handle's close gives its registration back).
    Not carried across ``fork()``: the child makes its own.
    """

    def __init__(self, stores: Iterable[K]) -> None:
        if isinstance(stores, (Store, AsyncStore)):
            raise TypeError("WaitSet takes an iterable of Store or AsyncStore handles, not one")
        members: dict[Any, Store[Any]] = {}
        for key in stores:
            members[key] = _store_of(key)
        if not members:
            raise ValueError("a WaitSet needs at least one store")
        self._members = members
        # Registration order; a store given both as Store and as its AsyncStore counts once.
        self._stores = list(dict.fromkeys(members.values()))
        self._unregistered = list(self._stores)  # still to register, in order
        self._waiters: list[Waiter] = []
        self._polled: list[Store[Any]] = []
        self._sem: Any = None  # the first entry's semaphore: every entry names this one
        self._lock = threading.Lock()  # orders kicks against registering, waiting and closing
        self._left = threading.Condition(self._lock)  # notified when the waiting thread leaves
        self._busy = False  # a thread (or a coroutine's thread) is waiting
        self._cancelled = False  # the waiting coroutine was cancelled
        self._closed = False
        self._idle = threading.Event()  # what a set without a semaphore sleeps on
        self._typical = 10 * SPIN  # how long waits take (a moving average): spin only if short

    # ---------------------------------------------------------------- introspection

    @property
    def stores(self) -> list[K]:
        """The members, as given."""
        return list(self._members)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def polled(self) -> list[K]:
        """The members that are polled rather than woken (read-only handles and the like); only
        known once a wait has slept."""
        polled = set(self._polled)
        return [key for key, store in self._members.items() if store in polled]

    # ---------------------------------------------------------------- waiting

    def wait(
        self, pending: Mapping[K, int], timeout: float | None = None, *, spin: bool = True
    ) -> dict[K, int]:
        """Block until at least one member of *pending* moves past its version; return every
        one that did, to its new version. *timeout* as for :meth:`Store.wait` (``0``: a
        non-blocking check); *spin* as for :meth:`Store.wait`: while recent waits were short,
        re-read the versions for up to 100 us before sleeping. :class:`StateStoreError` if this
        set or a member is closed (also while waiting) or another thread is waiting on it."""
        items = self._items(pending)
        timeout = check_timeout(timeout)
        ready = _moved(items)
        if ready:
            return ready
        if timeout is not None and timeout <= 0:
            raise _timeout_error(items, 0)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        self._enter()
        try:
            if spin and self._typical < SPIN:
                ready = _spin(items, SPIN if timeout is None else min(SPIN, timeout))
                if ready:
                    return ready
            sem = self._sem
            if sem is not None and not self._unregistered and not self._polled:
                # The common case, straight to the semaphore and straight back (the first turn
                # of step 4 without the loop): on a wake-up from an idle CPU, every line of
                # Python here runs from cold caches.
                nap = _MAX_SLEEP
                if deadline is not None:
                    nap = min(nap, deadline - time.monotonic())
                if nap > 0:
                    try:
                        sem.acquire(nap)
                    except posix_ipc.BusyError:
                        nap = 0.0  # timed out: the loop below looks at the deadline
                    except posix_ipc.SignalError:
                        pass  # spurious; Python raises the signal's exception (Ctrl-C) next
                    if not (self._cancelled or self._closed):
                        ready = _moved(items)
                        if ready:
                            return ready
            return self._sleep_until_moved(items, deadline)
        except TimeoutError:
            raise _timeout_error(items, timeout) from None
        finally:
            self._leave()
            if spin:  # learn only from waits that may spin, as Store.wait
                self._typical += (time.monotonic() - started - self._typical) * 0.25

    async def wait_async(
        self, pending: Mapping[K, int], timeout: float | None = None
    ) -> dict[K, int]:
        """:meth:`wait` for asyncio: never blocks the loop. One thread sleeps for the call and
        ends with it; cancelling the coroutine leaves no thread behind (the registrations stay
        with the set until it closes)."""
        items = self._items(pending)
        timeout = check_timeout(timeout)
        ready = _moved(items)
        if ready:
            return ready
        if timeout is not None and timeout <= 0:
            raise _timeout_error(items, 0)
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        result: asyncio.Future[dict[Any, int]] = loop.create_future()
        ended: asyncio.Future[None] = loop.create_future()
        self._enter()

        def serve() -> None:
            outcome: dict[Any, int] | None = None
            error: BaseException | None = None
            try:
                outcome = self._sleep_until_moved(items, deadline)
            except _Cancelled:
                pass
            except BaseException as exc:
                error = exc
            finally:
                self._leave()
            with contextlib.suppress(RuntimeError):  # the loop closed: its coroutine is gone
                loop.call_soon_threadsafe(_finish, result, ended, outcome, error)

        thread = threading.Thread(target=serve, name="shmstore-wait-any", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._leave()
            raise
        try:
            got = await result
        except TimeoutError:
            raise _timeout_error(items, timeout) from None
        finally:
            if not ended.done():
                self._cancel()
                # The thread stops within a moment: wait for that, so that nothing is left once
                # we return (shielded: a second cancellation returns at once, and the thread
                # still ends on its own).
                await asyncio.shield(ended)
            if ended.done():
                # The thread has left and settled us: all that is left of it is its return, so
                # this join does not hold the loop (and no thread outlives us).
                thread.join()
        return got

    def _items(self, pending: object) -> list[tuple[Any, Store[Any], int]]:
        """``(key, store, after)`` for each entry of *pending*; clear errors for bad input."""
        if self._closed:
            raise StateStoreError("this WaitSet is closed")
        if not isinstance(pending, Mapping):
            raise TypeError(
                f"pending must map Store handles to versions, got {type(pending).__name__}"
            )
        if not pending:
            raise ValueError("pending is empty: there is no store to wait on")
        members = self._members
        items = []
        for key, after in pending.items():
            try:
                store = members.get(key)
            except TypeError:  # unhashable
                store = None
            if store is None:
                _store_of(key)  # a TypeError for what is no store handle at all
                raise ValueError(f"{key!r} is not a member of this WaitSet")
            if type(after) is not int and (not isinstance(after, int) or isinstance(after, bool)):
                raise TypeError(
                    f"the version for store {store.name!r} must be an int, got {after!r}"
                )
            items.append((key, store, after))
        return items

    def _enter(self) -> None:
        with self._lock:
            if self._closed:
                raise StateStoreError("this WaitSet is closed")
            if self._busy:
                raise StateStoreError(
                    "another thread or coroutine is waiting on this WaitSet: it serves one at a "
                    "time (make one WaitSet per waiting thread)"
                )
            self._check_members()  # one closed earlier: its kick may be consumed already
            self._busy = True
            self._cancelled = False
            self._idle.clear()

    def _leave(self) -> None:
        with self._lock:
            self._busy = False
            if self._closed:
                self._left.notify_all()

    def _sleep_until_moved(
        self, items: list[tuple[Any, Store[Any], int]], deadline: float | None
    ) -> dict[Any, int]:
        """Steps 2-3 of the essay: register (once), then sleep until a store moves.
        ``TimeoutError`` at *deadline* (``time.monotonic()``)."""
        if self._unregistered:
            self._register(deadline)
        pause = _POLL_MIN
        polled = bool(self._polled)
        while True:
            # After the registrations' barriers, and after every wake-up: every HEAD.
            ready = _moved(items)
            if ready:
                return ready
            self._check_members()  # off the wake-up's path: only when nothing moved
            nap = _MAX_SLEEP
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                nap = min(nap, remaining)
            if polled:
                nap = min(nap, pause)
                pause = min(pause * 2, _POLL_MAX)
            self._sleep(nap)

    def _register(self, deadline: float | None) -> None:
        """Register with every store not registered yet that can wake us; the rest are
        polled. A timeout keeps what is done: the next wait goes on from there."""
        while self._unregistered:
            store = self._unregistered[0]
            if store.wait_mode != "semaphore" or not TIMED_WAIT:
                self._polled.append(store)
                del self._unregistered[0]
                continue
            self._check_interrupted()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError
            attempt = now + _REGISTER_SLICE
            if deadline is not None:
                attempt = min(attempt, deadline)
            share = self._waiters[0] if self._waiters else None
            try:
                waiter = store.register_waiter(attempt, share=share)
            except TimeoutError:
                continue  # the registry lock is busy: look at the deadline, then again
            except NotShareable:
                self._polled.append(store)
                del self._unregistered[0]
                continue
            with self._lock:
                self._waiters.append(waiter)
                if self._sem is None:
                    self._sem = waiter.sem
            del self._unregistered[0]

    def _check_interrupted(self) -> None:
        if self._cancelled:
            raise _Cancelled
        if self._closed:
            raise StateStoreError("this WaitSet was closed while waiting")

    def _check_members(self) -> None:
        """A member's close kicked us (or will have: it gave our entry back): end the wait,
        also when that member is not among *pending* (it can no longer wake us)."""
        for store in self._stores:
            if store.closed:
                raise StateStoreError(f"store {store.name!r} was closed while waiting")

    def _sleep(self, seconds: float) -> None:
        """Sleep until a post, a kick or *seconds*; then raise if we were kicked to stop."""
        self._check_interrupted()  # a kick that an earlier sleep consumed
        sem = self._sem
        if sem is None:
            self._idle.wait(seconds)
        else:
            try:
                sem.acquire(seconds)
            except posix_ipc.BusyError:
                seconds = 0.0  # timed out: the caller looks at the deadline
            except posix_ipc.SignalError:
                pass  # spurious; Python raises the signal's exception (Ctrl-C) next
        self._check_interrupted()  # two loads on the wake-up's path

    def _kick_locked(self) -> None:
        self._idle.set()
        if self._sem is not None:
            self._sem.release()

    def _cancel(self) -> None:
        """From the loop's thread: make the waiting thread give up (``_Cancelled``)."""
        with self._lock:
            self._cancelled = True
            self._kick_locked()

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Give every registration back; a wait in progress (another thread's) raises
        :class:`StateStoreError`, and this returns once it has left. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._busy:
                self._kick_locked()
                self._left.wait(0.1)
            waiters, self._waiters = self._waiters, []
            self._sem = None
        for waiter in reversed(waiters):  # the first owns the semaphore the others borrow
            waiter.close()

    def __enter__(self) -> WaitSet[K]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._waiters)} registered"
        return f"<shmstore.WaitSet of {len(self._stores)} stores, {state}>"


def wait_any(pending: Mapping[K, int], timeout: float | None = None) -> dict[K, int]:
    """Block until at least one of several stores moves past a version; return the new versions.

    *pending* maps :class:`Store` (or :class:`AsyncStore`) handles to the version each was last
    seen at. Returns a dict of the handles whose version is now greater than that, to their
    version (at least one; all that moved, not just the first). ``timeout`` as for
    :meth:`Store.wait`: seconds (``None`` or ``math.inf``: no limit; ``nan``: ``ValueError``),
    ``TimeoutError`` when it passes, ``timeout=0`` a non-blocking check.

    A :class:`WaitSet` for one call: the registrations last for the call only, so a loop that
    waits again and again should keep a :class:`WaitSet` instead (each call here registers with
    every store and gives the registrations back). Raises ``TypeError`` / ``ValueError`` for
    bad input, :class:`StateStoreError` for a closed handle (also one closed while waiting),
    :class:`RegistryFullError` like :meth:`Store.wait`.
    """
    with _one_call(pending) as waiting:
        return waiting.wait(pending, timeout)


async def wait_any_async(pending: Mapping[K, int], timeout: float | None = None) -> dict[K, int]:
    """:func:`wait_any` for asyncio: never blocks the loop. One thread sleeps for this coroutine
    (not one per store) and ends with it; cancelling the coroutine leaves no registration and
    no thread behind."""
    with _one_call(pending) as waiting:
        return await waiting.wait_async(pending, timeout)


def _one_call(pending: object) -> WaitSet[Any]:
    if not isinstance(pending, Mapping):
        raise TypeError(f"pending must map Store handles to versions, got {type(pending).__name__}")
    if not pending:
        raise ValueError("pending is empty: there is no store to wait on")
    return WaitSet(pending)


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
