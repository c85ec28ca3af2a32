"""Subscriber fan-out of ``AsyncStateStore``: every committed snapshot, in order, into every
local subscriber's ``asyncio.Queue``.

How a snapshot reaches a queue
------------------------------
One :class:`FanOut` per ``AsyncStateStore`` follows the store's ring with a core
``Subscription`` (versions in order, lag counted exactly) and hands each version to every queue
whose subscriber has not seen it. The fan-out is *pulled*, synchronously, by :meth:`FanOut.drain`:

* **Commits of this process** are delivered inside ``set()``: it drains right after its own commit,
  so a subscriber of the same process has the new snapshot in its queue when ``set()`` returns (the
  worker's original store delivered inside ``set()``, and its callers read the queue right after).
  Draining also delivers, first and in order, any versions other processes committed before ours.
* **Commits of other processes** wake one :class:`_ProcessWatcher` thread per store per process,
  which asks each interested ``FanOut`` to drain on its event loop (``call_soon_threadsafe``,
  coalesced: at most one drain pending per fan-out).

Why a thread, and one per process
---------------------------------
Waking needs a registry entry (a semaphore) in the store, and the registry is bounded
(``max_readers``). A watcher per subscriber, or per ``AsyncStateStore``, would let one process
with many subscribers exhaust it, and a reader that cannot register never wakes -- silently, in
the old design ("Task exception was never retrieved"). So the watcher is per *process*: it opens
its own handle on the store, registers it once (``subscribe()`` does this eagerly and raises
``RegistryFullError`` there if the registry is full, rather than failing later in a background
task), and serves every subscriber of every ``AsyncStateStore`` of this process. Failures after
that are kept, and ``health_check()`` reports them (:meth:`FanOut.problems`).

The watcher is a thread rather than an asyncio task because a task belongs to one event loop: a
store made under one ``asyncio.run()`` and used under the next lost its pump with it. The thread
belongs to no loop; each ``FanOut`` remembers the loop it was last used from, and a change of
loop (every public coroutine of the store, and ``get()`` of a subscriber's queue, calls
:meth:`FanOut.bind_loop`) catches up at once. The store is meant to be used from one event loop
at a time.

Drop policy
-----------
A full queue (``maxsize`` 64) drops its stale snapshots and takes the newest, with a warning: a
slow consumer always ends on the latest state, and a stalled one never holds up the writer. A
queue whose ``put_nowait`` raises anything else is removed, all such in one log line. Recurring
warnings (drops per subscriber, versions missed by the ring) are written at most once a second,
each with the total since the last, so a writer far ahead of its readers cannot flood the log.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Final

from .. import RegistryFullError
from .._errors import StateStoreError, StoreNotFoundError, SubscriberLaggedError
from .._store import Store
from .._subscription import Subscription
from ._types import FsmSnapshotDTO

__all__ = ["MAX_QUEUE_SIZE", "FanOut"]

log = logging.getLogger("shmstore.fsm")

MAX_QUEUE_SIZE: Final = 64
_REGISTER_PROBE: Final = 0.001  # s: the shortest wait that registers this process as a reader
_JOIN: Final = 10.0  # s: bound on joining a watcher thread that has been told to stop
LOG_INTERVAL: Final = 1.0  # s: recurring warnings (lag, drops) are logged at most this often

Callback = Callable[[int], None]


class _Throttle:
    """At most one log line per ``LOG_INTERVAL`` for a recurring event: a writer far ahead of its
    readers must not flood the log. The line that is written carries the total since the last."""

    __slots__ = ("_last", "_pending")

    def __init__(self) -> None:
        self._last = -LOG_INTERVAL
        self._pending = 0

    def count(self, amount: int) -> int:
        """Add *amount*; the total to log now, or 0 while a line was written too recently."""
        self._pending += amount
        now = time.monotonic()
        if now - self._last < LOG_INTERVAL:
            return 0
        self._last = now
        total, self._pending = self._pending, 0
        return total


class Subscriber:
    __slots__ = ("drop_log", "last_version", "queue", "subscriber_id")

    def __init__(
        self, queue: asyncio.Queue[FsmSnapshotDTO], subscriber_id: str, last_version: int
    ) -> None:
        self.queue = queue
        self.subscriber_id = subscriber_id
        self.last_version = last_version
        """The newest store version this subscriber has (it starts with the current one)."""
        self.drop_log = _Throttle()


class SubscriberQueue(asyncio.Queue[FsmSnapshotDTO]):
    """What ``subscribe()`` returns: an ``asyncio.Queue`` whose ``get()`` also tells the store
    which event loop is current, so that a consumer that only awaits its queue under a new
    ``asyncio.run()`` still gets other processes' commits there."""

    def __init__(self, fanout: FanOut, maxsize: int) -> None:
        super().__init__(maxsize)
        self.shmstore_fanout = fanout

    async def get(self) -> FsmSnapshotDTO:
        self.shmstore_fanout.bind_loop()
        return await super().get()


class FanOut:
    """The local subscribers of one ``AsyncStateStore`` handle."""

    def __init__(self, store: Store[FsmSnapshotDTO], *, shared: bool) -> None:
        self._store = store
        self._shared = shared  # other processes may commit: wake-ups need the process watcher
        self.subscribers: dict[asyncio.Queue[FsmSnapshotDTO], Subscriber] = {}
        self._follow: Subscription[FsmSnapshotDTO] | None = None
        self._watcher: _ProcessWatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False  # a drain is scheduled on self._loop
        self._delivered = 0  # the newest version handed out (one word: the watcher reads it)
        self._watch_problem: str | None = None  # subscribers left without a watcher
        self._delivery_problem: str | None = None  # a version that could not be delivered
        self._lag_log = _Throttle()

    # ---------------------------------------------------------------- subscribers

    def add(self, subscriber_id: str) -> asyncio.Queue[FsmSnapshotDTO]:
        """A new subscriber's queue, holding the current snapshot if there is one.

        Raises :class:`RegistryFullError` if this process cannot register to be woken by other
        processes' commits (the store's ``max_readers`` live processes are registered already).
        """
        self.drain()  # deliver what is pending first: the new subscriber starts after it
        if self._shared and (self._watcher is None or self._watcher.failure is not None):
            self._release_watcher()
            try:
                self._watcher = _watch(self._store, self._wake)
            except StateStoreError as exc:
                if self.subscribers:  # those already here are left without a watcher
                    self._watch_problem = f"subscribers get no commits of other processes: {exc}"
                raise
            self._watch_problem = None
        queue = SubscriberQueue(self, MAX_QUEUE_SIZE)
        snapshot, version = self._store.get_with_version()
        if snapshot is not None:
            queue.put_nowait(snapshot)
        if self._follow is None:
            self._follow = self._store.subscribe(after_version=version)
            self._delivered = version
        self.subscribers[queue] = Subscriber(queue, subscriber_id, version)
        return queue

    def remove(self, queue: asyncio.Queue[FsmSnapshotDTO]) -> None:
        self.subscribers.pop(queue, None)
        if not self.subscribers:
            self.close()

    def close(self) -> None:
        """Forget every subscriber and stop following the store."""
        self.subscribers.clear()
        self._follow = None
        self._release_watcher()

    def _release_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.remove(self._wake)

    # ---------------------------------------------------------------- delivery

    def bind_loop(self) -> None:
        """Deliver other processes' commits on the running event loop from now on (and catch up
        at once if the store was last used from another loop)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._pending = False  # a drain scheduled on a dead loop never ran
            self.drain()

    def problems(self) -> list[str]:
        """What ``health_check()`` should report about delivery."""
        found = [p for p in (self._watch_problem, self._delivery_problem) if p is not None]
        watcher = self._watcher
        if watcher is not None and watcher.failure is not None:
            found.append(
                f"subscribers get no commits of other processes: waiting failed ({watcher.failure})"
            )
        return found

    def drain(self) -> None:
        """Hand every committed version not yet delivered to the subscribers, in order."""
        follow = self._follow
        while follow is not None:
            try:
                item = follow.poll()
            except SubscriberLaggedError as lag:
                missed = self._lag_log.count(lag.missed)
                if missed:
                    log.warning(
                        "store %r: FSM subscribers missed %d version(s) the ring no longer "
                        "held; resuming at version %d",
                        self._store.name,
                        missed,
                        lag.resume_version,
                    )
                continue
            except StateStoreError as exc:
                # A version that cannot be read (a damaged slot): skip past it, and say so.
                self._delivery_problem = f"a committed version could not be delivered: {exc}"
                log.error("store %r: %s", self._store.name, self._delivery_problem)
                follow = self._follow = self._store.subscribe(after_version=self._store.version)
                continue
            if item is None:
                return
            self._deliver(*item)
            self._delivered = item[0]

    def _wake(self, head: int) -> None:
        """Called by the watcher thread when the store reached version *head*."""
        loop = self._loop
        if self._pending or loop is None or self._follow is None or head <= self._delivered:
            return  # nothing to do, or delivered already (our own set() wakes us too)
        self._pending = True
        try:
            loop.call_soon_threadsafe(self._drain_later)
        except RuntimeError:  # that loop is closed; bind_loop() catches up on the next one
            self._pending = False

    def _drain_later(self) -> None:
        self._pending = False  # before draining: a commit after this point schedules again
        self.drain()

    def _deliver(self, version: int, snapshot: FsmSnapshotDTO) -> None:
        dead = []
        for sub in list(self.subscribers.values()):
            if version <= sub.last_version:
                continue  # it got this one (or a newer one) when it subscribed
            try:
                _offer(sub, snapshot)
            except Exception:
                dead.append(sub)
                continue
            sub.last_version = version
        if dead:
            for sub in dead:
                self.subscribers.pop(sub.queue, None)
            log.warning(
                "removed %d dead subscriber(s): %s",
                len(dead),
                ", ".join(repr(s.subscriber_id) for s in dead),
            )


def _offer(sub: Subscriber, snapshot: FsmSnapshotDTO) -> None:
    try:
        sub.queue.put_nowait(snapshot)
        return
    except asyncio.QueueFull:
        pass
    dropped = 0
    while True:
        try:
            sub.queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        dropped += 1
    sub.queue.put_nowait(snapshot)
    dropped = sub.drop_log.count(dropped)
    if dropped:
        log.warning(
            "subscriber %r is not keeping up: dropped %d stale snapshot(s), queued the newest",
            sub.subscriber_id,
            dropped,
        )


# -------------------------------------------------------------------- the process watcher

_watchers: dict[tuple[str, int], _ProcessWatcher] = {}
_watchers_lock = threading.Lock()


def _watch(store: Store[FsmSnapshotDTO], callback: Callback) -> _ProcessWatcher:
    """This process's watcher of *store*, started if needed, with *callback* added."""
    key = (store.name, store.created_ns)
    with _watchers_lock:
        watcher = _watchers.get(key)
        if watcher is None or watcher.failure is not None:
            watcher = _ProcessWatcher(store, key)
            _watchers[key] = watcher
        watcher.add(callback)
        return watcher


class _ProcessWatcher:
    """One thread and one store handle (so one registry entry) per store per process, calling
    back every interested fan-out after each commit."""

    def __init__(self, store: Store[FsmSnapshotDTO], key: tuple[str, int]) -> None:
        self._key = key
        self._callbacks: set[Callback] = set()
        self._stopping = False
        self.failure: str | None = None
        try:
            handle = Store.open(store.name, FsmSnapshotDTO)
        except StoreNotFoundError as exc:
            raise StoreNotFoundError(
                errno.ENOENT,
                f"cannot subscribe to store {store.name!r}: it was removed (unlink), so no "
                "process can open it to be woken by its commits any more",
            ) from exc
        try:
            if handle.created_ns != store.created_ns:
                raise StateStoreError(
                    f"store {store.name!r} was removed and created anew; this handle's store "
                    "has no name any more, so other processes cannot commit to it"
                )
            seen = handle.version
            # The first blocking wait registers this handle as a reader; do it here, so that a
            # full registry is subscribe()'s error and not a background thread's.
            with contextlib.suppress(TimeoutError):
                seen = handle.wait(seen, _REGISTER_PROBE, spin=False)
        except RegistryFullError as exc:
            handle.close()
            raise RegistryFullError(
                f"cannot subscribe to store {store.name!r}: {exc} (shmstore.fsm needs one entry "
                "per process, whatever its number of subscribers)"
            ) from exc
        except BaseException:
            handle.close()
            raise
        self._handle = handle
        self._thread = threading.Thread(
            target=self._run, args=(seen,), name=f"shmstore-fsm-watch:{store.name}", daemon=True
        )
        self._thread.start()

    def add(self, callback: Callback) -> None:
        self._callbacks.add(callback)

    def remove(self, callback: Callback) -> None:
        """Drop *callback*; the last one out stops the thread and closes the handle."""
        with _watchers_lock:
            self._callbacks.discard(callback)
            if self._callbacks:
                return
            if _watchers.get(self._key) is self:
                del _watchers[self._key]
        self.stop()

    def stop(self) -> None:
        self._stopping = True
        self._handle.close()  # wakes the thread's wait, which then raises StateStoreError
        if self._thread is not threading.current_thread():
            self._thread.join(_JOIN)

    def _run(self, seen: int) -> None:
        handle = self._handle
        while True:
            try:
                seen = handle.wait(seen, None, spin=False)
            except Exception as exc:
                if self._stopping:
                    return
                self.failure = f"{type(exc).__name__}: {exc}"
                log.error(
                    "store %r: FSM subscribers of this process stop receiving other processes' "
                    "commits: %s",
                    handle.name,
                    self.failure,
                )
                return
            try:
                for callback in list(self._callbacks):
                    callback(seen)
            except Exception as exc:  # a bug, but never a silent stall: health reports it
                self.failure = f"{type(exc).__name__}: {exc}"
                log.exception("store %r: the FSM watcher failed", handle.name)
                return


def _stop_all() -> None:
    """At exit: give the registry entries back (daemon threads would die holding them)."""
    with _watchers_lock:
        watchers = list(_watchers.values())
        _watchers.clear()
    for watcher in watchers:
        watcher.stop()


def _forget_after_fork() -> None:
    # The parent's watcher threads do not exist in a forked child, and their handles belong to
    # the parent's registration; the child starts its own watchers when it subscribes.
    global _watchers_lock
    _watchers_lock = threading.Lock()
    for watcher in _watchers.values():
        watcher.failure = "the process forked (subscribe again in the child)"
    _watchers.clear()


atexit.register(_stop_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
