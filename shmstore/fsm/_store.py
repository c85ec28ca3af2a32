"""``AsyncStateStore``: the FSM worker's asyncio state store, backed by shared memory.

A drop-in for the worker's old in-process store (same methods, same snapshot types), whose
readers may live in other processes:

* ``name=None`` gives a private store on an anonymous segment (``memfd``): nothing is ever left in
  ``/dev/shm``, not even after a crash. A name attaches to that shared store, creating it if absent;
  several processes starting at once race safely (create with ``O_EXCL``; the losers open it).
* ``set()`` is a compare-and-set loop on the store version: it reads the newest snapshot, decides
  the version to store (auto-increment, or ``StateVersionError`` with ``enforce_version``), and
  commits only if nobody committed in between -- else it decides again. So auto-increment is
  correct across processes, and ``initialize_if_empty()`` commits exactly once across processes.
* Subscribers get an ``asyncio.Queue`` (maxsize 64) that receives the current snapshot at once and
  then every commit from any process, in version order. One pump task per store follows the ring
  (``Subscription``) and fans out to the local queues; it exists only while there are subscribers.
  Commits of this process wake it directly; one watcher task per store waits for everyone else's.
  A full queue drops its stale snapshots and takes the newest, so a slow consumer always ends on the
  latest state.
* Commit counters (``total_sets``, ``version_conflicts``, ``last_update_ts``) live in the segment
  header and are shared by every process; ``total_gets`` counts this handle's reads.
* With ``checkpoint_path``, the store starts from that checkpoint when it is created (not when it
  is merely opened: then it already holds the newest state), and the process that commits writes
  a new checkpoint every ``checkpoint_every`` commits and/or ``checkpoint_interval`` seconds, in a
  worker thread so that ``set()`` never waits for the disk, and once more at ``close()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from types import TracebackType
from typing import Any, Final

import msgspec

from .._aio import AsyncStore
from .._errors import (
    CorruptStoreError,
    StateStoreError,
    StateVersionError,
    StoreExistsError,
    StoreNotFoundError,
    SubscriberLaggedError,
)
from .._store import Store
from ._types import FsmSnapshotDTO, initial_snapshot

__all__ = ["AsyncStateStore", "create_initialized_store", "create_store"]

log = logging.getLogger("shmstore.fsm")

SUBSCRIBER_QUEUE_SIZE: Final = 64
DEFAULT_MAX_HISTORY: Final = 100
DEFAULT_SLOTS: Final = 64
DEFAULT_SLOT_SIZE: Final = 256 * 1024
CONFLICT_RATE_LIMIT: Final = 0.10
SUBSCRIBER_WARNING: Final = 100
_CONFLICTS: Final = 0  # index of the header counter that holds version_conflicts
_ATTACH_TRIES: Final = 5


class _Subscriber:
    __slots__ = ("last_version", "queue", "subscriber_id")

    def __init__(
        self, queue: asyncio.Queue[FsmSnapshotDTO], subscriber_id: str, last_version: int
    ) -> None:
        self.queue = queue
        self.subscriber_id = subscriber_id
        self.last_version = last_version


class AsyncStateStore:
    """Versioned FSM snapshots: one writer at a time, readers and subscribers in any process."""

    def __init__(
        self,
        initial_state: FsmSnapshotDTO | None = None,
        *,
        name: str | None = None,
        max_history: int = DEFAULT_MAX_HISTORY,
        slots: int = DEFAULT_SLOTS,
        slot_size: int = DEFAULT_SLOT_SIZE,
        max_readers: int = 64,
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = 100,
        checkpoint_interval: float | None = None,
    ) -> None:
        if max_history < 0:
            raise ValueError(f"max_history must be >= 0, got {max_history}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {checkpoint_every}")
        if checkpoint_interval is not None and checkpoint_interval <= 0:
            raise ValueError(f"checkpoint_interval must be > 0 or None, got {checkpoint_interval}")
        self._max_history = max_history
        self._private = name is None
        self._checkpoint_path = checkpoint_path
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval = checkpoint_interval
        self._commits_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._checkpointing: asyncio.Task[None] | None = None
        restore = (
            checkpoint_path
            if checkpoint_path is not None and os.path.exists(checkpoint_path)
            else None
        )
        if name is None:
            store = Store.private(
                FsmSnapshotDTO, slots=slots, slot_size=slot_size, restore_from=restore
            )
        else:
            store = _create_or_open(
                name,
                slots=slots,
                slot_size=slot_size,
                max_readers=max_readers,
                restore_from=restore,
            )
        self._store: Store[FsmSnapshotDTO] = store
        self._astore = AsyncStore(store)
        self._subscribers: dict[asyncio.Queue[FsmSnapshotDTO], _Subscriber] = {}
        self._pump: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._local_commit: asyncio.Event | None = None
        self._total_gets = 0
        self._closed = False
        if initial_state is not None:
            self._commit_if_empty(initial_state)

    # ---------------------------------------------------------------- reading

    @property
    def name(self) -> str | None:
        """The shared store's name; ``None`` for a private store."""
        return None if self._private else self._store.name

    async def get(self) -> FsmSnapshotDTO | None:
        """The newest snapshot, or ``None`` while empty. Unchanged snapshots come from cache."""
        self._total_gets += 1
        return self._store.get()

    async def get_with_meta(self) -> tuple[FsmSnapshotDTO | None, dict[str, Any]]:
        self._total_gets += 1
        snapshot = self._store.get()
        metrics = self._metrics(snapshot)
        return snapshot, {
            "store_metrics": metrics,
            "subscriber_count": len(self._subscribers),
            "has_state": snapshot is not None,
            "current_version": snapshot.version if snapshot is not None else 0,
        }

    # ---------------------------------------------------------------- writing

    async def set(self, new_snap: FsmSnapshotDTO, enforce_version: bool = False) -> FsmSnapshotDTO:
        """Commit *new_snap* and return the snapshot as stored.

        If ``new_snap.version`` is not newer than the stored snapshot's, the stored copy gets
        ``current.version + 1`` (the caller's object is not changed) -- or, with
        *enforce_version*, :class:`StateVersionError` is raised, counted and logged. The history
        is trimmed to the store's ``max_history``. A snapshot readers could not decode is refused
        with :class:`StateStoreError` and the previous snapshot stays.
        """
        if new_snap is None:
            raise StateStoreError("cannot set None: a snapshot is required")
        if not isinstance(new_snap, FsmSnapshotDTO):
            raise StateStoreError(f"expected an FsmSnapshotDTO, got {type(new_snap).__name__}")
        snap = self._trimmed(new_snap)
        while True:
            current, store_version = self._store.get_with_version()
            stored = snap
            if current is not None and snap.version <= current.version:
                if enforce_version:
                    self._store.app_counters.increment(_CONFLICTS)
                    error = StateVersionError(
                        current.version + 1,
                        snap.version,
                        f"version conflict: snapshot version {snap.version} is not newer than "
                        f"the stored version {current.version}",
                    )
                    log.warning("%s", error)
                    raise error
                stored = msgspec.structs.replace(snap, version=current.version + 1)
            if self._store.try_set(stored, store_version) is None:
                continue  # another process committed in between: decide again on its snapshot
            break
        self._after_local_commit()
        return stored

    async def initialize_if_empty(self) -> FsmSnapshotDTO:
        """Commit the COLD_START snapshot unless there is a snapshot already; exactly once
        across processes. Returns the snapshot that is current afterwards."""
        return self._commit_if_empty(initial_snapshot())

    def _commit_if_empty(self, snapshot: FsmSnapshotDTO) -> FsmSnapshotDTO:
        if self._store.try_set(self._trimmed(snapshot), 0) is None:
            current = self._store.get()
            assert current is not None
            return current
        self._after_local_commit()
        return snapshot

    def _trimmed(self, snap: FsmSnapshotDTO) -> FsmSnapshotDTO:
        if len(snap.history) <= self._max_history:
            return snap
        keep = snap.history[-self._max_history :] if self._max_history else ()
        return msgspec.structs.replace(snap, history=keep)

    def _after_local_commit(self) -> None:
        if self._local_commit is not None:
            self._local_commit.set()
        if self._checkpoint_path is not None:
            self._commits_since_checkpoint += 1
            if self._checkpoint_due():
                self._start_checkpoint()

    # ---------------------------------------------------------------- checkpoints

    def _checkpoint_due(self) -> bool:
        every, interval = self._checkpoint_every, self._checkpoint_interval
        return (every is not None and self._commits_since_checkpoint >= every) or (
            interval is not None and time.monotonic() - self._last_checkpoint >= interval
        )

    def _start_checkpoint(self) -> None:
        if self._checkpointing is not None and not self._checkpointing.done():
            return  # one at a time; the next commit asks again
        self._commits_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_checkpoint()  # no loop (the constructor's initial state): inline
            return
        self._checkpointing = loop.create_task(
            asyncio.to_thread(self._write_checkpoint), name="shmstore-fsm-checkpoint"
        )

    def _write_checkpoint(self) -> None:
        assert self._checkpoint_path is not None
        try:
            self._store.checkpoint(self._checkpoint_path)
        except (OSError, StateStoreError) as exc:
            log.error("checkpoint to %s failed: %s", self._checkpoint_path, exc)

    async def checkpoint(self) -> int:
        """Write a checkpoint now (to ``checkpoint_path``); returns the version saved."""
        if self._checkpoint_path is None:
            raise StateStoreError("this store has no checkpoint_path")
        return await asyncio.to_thread(self._store.checkpoint, self._checkpoint_path)

    # ---------------------------------------------------------------- subscriptions

    async def subscribe(self, subscriber_id: str = "unknown") -> asyncio.Queue[FsmSnapshotDTO]:
        """A queue that gets the current snapshot now and every later commit, in order."""
        self._check_open()
        queue: asyncio.Queue[FsmSnapshotDTO] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE_SIZE)
        snapshot, version = self._store.get_with_version()
        if snapshot is not None:
            queue.put_nowait(snapshot)
        self._subscribers[queue] = _Subscriber(queue, subscriber_id, version)
        if self._pump is None or self._pump.done():
            if self._local_commit is None:
                self._local_commit = asyncio.Event()
            self._pump = asyncio.create_task(self._follow(version), name="shmstore-fsm-pump")
            if not self._private:
                self._watcher = asyncio.create_task(
                    self._watch_other_processes(version), name="shmstore-fsm-watch"
                )
        return queue

    async def unsubscribe(self, queue: asyncio.Queue[FsmSnapshotDTO]) -> None:
        self._subscribers.pop(queue, None)
        if not self._subscribers:
            await self._stop_pump()

    async def _follow(self, after_version: int) -> None:
        """Deliver every version after *after_version* to every local subscriber, in order."""
        sub = self._store.subscribe(after_version)
        while self._subscribers:
            try:
                item = sub.poll()
            except SubscriberLaggedError as lag:
                log.warning("subscribers fell behind the ring: %s", lag)
                continue
            if item is None:
                await self._wait_for_commit(sub.next_version - 1)
                continue
            version, snapshot = item
            self._fan_out(version, snapshot)

    async def _wait_for_commit(self, after_version: int) -> None:
        # Commits of this process set the event directly (no cross-thread hop, so a local
        # writer in a tight loop never laps the pump); the watcher sets it for other processes'.
        assert self._local_commit is not None
        if self._store.version <= after_version:
            await self._local_commit.wait()
        self._local_commit.clear()

    async def _watch_other_processes(self, after_version: int) -> None:
        """Turn commits of any process into the pump's event. One long-lived wait keeps the
        store's wake-up thread and registry entry steady while there are subscribers."""
        assert self._local_commit is not None
        seen = after_version
        while True:
            seen = await self._astore.wait(seen)
            self._local_commit.set()

    def _fan_out(self, version: int, snapshot: FsmSnapshotDTO) -> None:
        dead = []
        for sub in list(self._subscribers.values()):
            if version <= sub.last_version:
                continue  # it got this one (or a newer one) when it subscribed
            try:
                self._offer(sub, snapshot)
            except Exception:
                dead.append(sub)
                continue
            sub.last_version = version
        if dead:
            for sub in dead:
                self._subscribers.pop(sub.queue, None)
            log.warning(
                "removed %d dead subscriber(s): %s",
                len(dead),
                ", ".join(repr(s.subscriber_id) for s in dead),
            )

    @staticmethod
    def _offer(sub: _Subscriber, snapshot: FsmSnapshotDTO) -> None:
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
        log.warning(
            "subscriber %r is not keeping up: dropped %d stale snapshot(s), queued the newest",
            sub.subscriber_id,
            dropped,
        )

    async def _stop_pump(self) -> None:
        tasks = {t for t in (self._pump, self._watcher) if t is not None and not t.done()}
        self._pump = self._watcher = None
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait does not re-raise the tasks' cancellation, but does raise our own.
            await asyncio.wait(tasks)

    # ---------------------------------------------------------------- metrics and health

    async def get_metrics(self) -> dict[str, Any]:
        return self._metrics(self._store.get())

    def _metrics(self, snapshot: FsmSnapshotDTO | None) -> dict[str, Any]:
        st = self._store
        created = st.created_ns / 1e9
        last = st.last_update_ns
        return {
            "total_sets": st.commits,
            "total_gets": self._total_gets,
            "version_conflicts": st.app_counters[_CONFLICTS],
            "subscriber_count": len(self._subscribers),
            "last_update_ts": last / 1e9 if last else None,
            "creation_ts": created,
            "uptime_seconds": max(0.0, time.time() - created),
            "current_version": snapshot.version if snapshot is not None else 0,
            "current_state": snapshot.state.name if snapshot is not None else "UNINITIALIZED",
            "active_subscribers": [s.subscriber_id for s in self._subscribers.values()],
        }

    async def health_check(self) -> dict[str, Any]:
        """``{"healthy", "issues", "metrics"}``: unhealthy when empty or when version conflicts
        exceed 10% of sets; more than 100 subscribers is reported as a warning."""
        snapshot = self._store.get()
        metrics = self._metrics(snapshot)
        issues: list[str] = []
        if snapshot is None:
            issues.append("store is empty: no snapshot has been set")
        sets, conflicts = metrics["total_sets"], metrics["version_conflicts"]
        if sets and conflicts / sets > CONFLICT_RATE_LIMIT:
            issues.append(
                f"high version conflict rate: {conflicts} conflicts for {sets} sets "
                f"({conflicts / sets:.0%} > {CONFLICT_RATE_LIMIT:.0%})"
            )
        healthy = not issues
        if metrics["subscriber_count"] > SUBSCRIBER_WARNING:
            issues.append(
                f"warning: {metrics['subscriber_count']} subscribers "
                f"(more than {SUBSCRIBER_WARNING})"
            )
        return {"healthy": healthy, "issues": issues, "metrics": metrics}

    # ---------------------------------------------------------------- lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise StateStoreError("the state store is closed")

    async def close(self) -> None:
        """Stop delivering to subscribers and detach. A shared store stays for other processes;
        a private one is gone."""
        if self._closed:
            return
        self._closed = True
        self._subscribers.clear()
        await self._stop_pump()
        if self._checkpointing is not None:
            await asyncio.wait({self._checkpointing})
        if self._checkpoint_path is not None and self._commits_since_checkpoint:
            await asyncio.to_thread(self._write_checkpoint)  # the final state
        self._astore.close()

    async def __aenter__(self) -> AsyncStateStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        where = "private" if self._private else repr(self._store.name)
        return f"<shmstore.fsm.AsyncStateStore {where} version={self._store.version}>"


def _create_or_open(
    name: str,
    *,
    slots: int,
    slot_size: int,
    max_readers: int,
    restore_from: str | os.PathLike[str] | None,
) -> Store[FsmSnapshotDTO]:
    """Create the store (from the checkpoint, if any), or open it if another process got there
    first."""
    last: Exception | None = None
    for _ in range(_ATTACH_TRIES):
        try:
            return Store.create(
                name,
                FsmSnapshotDTO,
                slots=slots,
                slot_size=slot_size,
                max_readers=max_readers,
                restore_from=restore_from,
            )
        except StoreExistsError as exc:
            last = exc
        try:
            return Store.open(name, FsmSnapshotDTO)
        except StoreNotFoundError as exc:
            last = exc  # removed between our create and open: try again
    raise CorruptStoreError(f"could not create or open store {name!r}: {last}") from last


def create_store(initial_state: FsmSnapshotDTO | None = None) -> AsyncStateStore:
    """A private store, optionally holding *initial_state*."""
    return AsyncStateStore(initial_state)


def create_initialized_store() -> AsyncStateStore:
    """A private store holding the COLD_START snapshot."""
    return AsyncStateStore(initial_snapshot())
