"""``AsyncStateStore``: the FSM worker's asyncio state store, backed by shared memory.

A drop-in for the worker's old in-process store (same methods, arguments, return shapes,
exceptions and metric types), whose readers may live in other processes:

* ``name=None`` gives a private store on an anonymous segment (``Store.private``): nothing is ever
  left in ``/dev/shm``, not even after a crash. A name attaches to that shared store, creating it
  if absent (``Store.open_or_create``: processes starting at once get one store).
* ``set()`` is a compare-and-set loop on the store version: it reads the newest snapshot, decides
  the version to store (auto-increment, or ``StateVersionError`` with ``enforce_version``), and
  commits only if nobody committed in between (``Store.try_set``) -- else it decides again. So
  auto-increment is correct across processes, and ``initialize_if_empty()`` commits exactly once
  across processes.
* Subscribers get an ``asyncio.Queue`` (maxsize 64) that holds the current snapshot at once and
  then every commit from any process, in version order; see ``_fanout`` for how.
* Counters shared by every process live in the store header: ``total_sets`` is the store's commit
  count less the commits of ``initial_state`` (app counter 1), ``version_conflicts`` is app
  counter 0. ``total_gets`` counts this handle's reads.
* With ``checkpoint_path``, the store starts from that checkpoint when it is created (not when it
  is merely opened: then it already holds the newest state), and the process that commits writes
  a new checkpoint every ``checkpoint_every`` commits and/or ``checkpoint_interval`` seconds, in a
  worker thread so that ``set()`` never waits for the disk, and once more at ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from types import TracebackType
from typing import Any, Final

import msgspec

from .._errors import StateStoreError
from .._projection import Projection
from .._store import Store
from ._errors import StateVersionError
from ._fanout import MAX_QUEUE_SIZE, FanOut
from ._types import FsmSnapshotDTO, FsmStateView, initial_snapshot, trimmed_history

__all__ = [
    "MAX_QUEUE_SIZE",
    "TEST_SUBSCRIBER_TIMEOUT",
    "AsyncStateStore",
    "create_initialized_store",
    "create_store",
]

log = logging.getLogger("shmstore.fsm")

TEST_SUBSCRIBER_TIMEOUT: Final = 5.0  # the original module's constant (seconds)
DEFAULT_MAX_HISTORY: Final = 100
DEFAULT_SLOTS: Final = 64  # versions a subscriber in another process may fall behind
CONFLICT_RATE_LIMIT: Final = 0.10
SUBSCRIBER_WARNING: Final = 100
CONFLICTS: Final = 0  # app counter: enforce_version conflicts, shared by every process
UNCOUNTED: Final = 1  # app counter: commits that are not sets (the constructor's initial_state)


class AsyncStateStore:
    """Versioned FSM snapshots: one writer at a time, readers and subscribers in any process.

    ``initial_state`` becomes the current snapshot if the store is empty (it does not count in
    ``total_sets``). ``name`` shares the store with other processes (default: private to this
    one). ``max_history`` trims each stored snapshot's history to the newest that many
    transitions (``None`` or ``<= 0``: never). ``slots`` is how many versions the store keeps,
    i.e. how far a subscriber in another process may fall behind. ``slot_size`` (the initial
    capacity: the store grows to fit each snapshot), ``max_value_size`` (the largest snapshot,
    64 MiB by default) and ``max_readers`` are passed to the store when this call creates it.
    """

    def __init__(
        self,
        initial_state: FsmSnapshotDTO | None = None,
        *,
        name: str | None = None,
        max_history: int | None = DEFAULT_MAX_HISTORY,
        slots: int = DEFAULT_SLOTS,
        slot_size: int | None = None,
        max_value_size: int | None = None,
        max_readers: int | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = 100,
        checkpoint_interval: float | None = None,
    ) -> None:
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {checkpoint_every}")
        if checkpoint_interval is not None and checkpoint_interval <= 0:
            raise ValueError(f"checkpoint_interval must be > 0 or None, got {checkpoint_interval}")
        self._max_history = max_history
        self._checkpoint_path = checkpoint_path
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval = checkpoint_interval
        self._commits_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._checkpointing: asyncio.Task[None] | None = None
        options: dict[str, Any] = {"slots": slots}
        if slot_size is not None:
            options["slot_size"] = slot_size
        if max_value_size is not None:
            options["max_value_size"] = max_value_size
        if checkpoint_path is not None and os.path.exists(checkpoint_path):
            options["restore_from"] = checkpoint_path
        self._name = name
        if name is None:
            store = Store.private(FsmSnapshotDTO, **options)
        else:
            if max_readers is not None:
                options["max_readers"] = max_readers
            store = Store.open_or_create(name, FsmSnapshotDTO, **options)
        self._store: Store[FsmSnapshotDTO] = store
        self._fanout = FanOut(store, shared=name is not None)
        self._total_gets = 0
        self._state_view: Projection[FsmStateView] | None = None
        self._closed = False
        if initial_state is not None:
            try:
                self._commit_initial(initial_state)
            except BaseException:
                self._closed = True
                store.close()
                raise

    # ---------------------------------------------------------------- reading

    @property
    def name(self) -> str | None:
        """The shared store's name; ``None`` for a private store."""
        return self._name

    async def get(self) -> FsmSnapshotDTO | None:
        """The newest snapshot, or ``None`` while empty. Unchanged snapshots come from cache."""
        self._fanout.bind_loop()
        self._total_gets += 1
        return self._store.get()

    async def get_state(self) -> FsmStateView | None:
        """The newest snapshot's head -- version, state, reason, ``ts_wall``, ``prev_state`` --
        decoded without the history or the context (a projection): for readers that only need
        the state. ``None`` while empty."""
        self._total_gets += 1
        if self._state_view is None:
            self._state_view = self._store.projection(FsmStateView)
        return self._state_view.get()

    async def get_with_meta(self) -> tuple[FsmSnapshotDTO | None, dict[str, Any]]:
        """``(snapshot, meta)``: meta holds ``store_metrics`` (the six counters of
        :meth:`get_metrics`' first keys), ``subscriber_count``, ``has_state`` and
        ``current_version`` (``-1`` while empty)."""
        self._fanout.bind_loop()
        self._total_gets += 1
        snapshot = self._store.get()
        return snapshot, {
            "store_metrics": self._counters(),
            "subscriber_count": len(self._fanout.subscribers),
            "has_state": snapshot is not None,
            "current_version": snapshot.version if snapshot is not None else -1,
        }

    # ---------------------------------------------------------------- writing

    async def set(self, new_snap: FsmSnapshotDTO, enforce_version: bool = False) -> FsmSnapshotDTO:
        """Commit *new_snap* and return the snapshot as stored.

        If ``new_snap.version`` is not newer than the stored snapshot's, the stored copy gets
        ``current.version + 1`` (the caller's object is not changed) -- or, with
        *enforce_version*, :class:`StateVersionError` is raised, counted in
        ``version_conflicts`` and logged. The history is trimmed to ``max_history``. Subscribers
        of this process have the snapshot in their queues when this returns.

        Raises :class:`StateStoreError` for ``None`` or a value that is not an
        ``FsmSnapshotDTO``, :class:`InvalidSnapshotError` for a snapshot readers could not decode
        (a ``state`` outside ``FsmState``), :class:`SnapshotTooLargeError` past the store's size
        limit; in each case the previous snapshot stays.
        """
        if new_snap is None:
            raise StateStoreError("cannot set None: a snapshot is required")
        if not isinstance(new_snap, FsmSnapshotDTO):
            raise StateStoreError(f"expected an FsmSnapshotDTO, got {type(new_snap).__name__}")
        self._check_open()
        self._fanout.bind_loop()
        snap = self._trimmed(new_snap)
        store = self._store
        while True:
            current, store_version = store.get_with_version()
            stored = snap
            if current is not None and snap.version <= current.version:
                if enforce_version:
                    store.app_counters.increment(CONFLICTS)
                    error = StateVersionError(
                        f"version conflict: snapshot version {snap.version} is not newer than "
                        f"the stored version {current.version}",
                        expected=current.version + 1,
                        actual=snap.version,
                    )
                    log.warning("%s", error)
                    raise error
                stored = msgspec.structs.replace(snap, version=current.version + 1)
            if store.try_set(stored, store_version) is not None:
                break
            # another process committed in between: decide again on its snapshot
        self._after_local_commit()
        return stored

    async def initialize_if_empty(self) -> FsmSnapshotDTO:
        """Commit the COLD_START snapshot unless there is a snapshot already -- exactly once
        across processes; it counts as one set and reaches subscribers. Returns the snapshot
        that is current afterwards."""
        self._check_open()
        self._fanout.bind_loop()
        snapshot = initial_snapshot()
        if self._store.try_set(snapshot, 0) is None:
            current = self._store.get()
            if current is not None:
                return current
            raise StateStoreError("the store holds no snapshot but is past version 0")
        self._after_local_commit()
        return snapshot

    def _commit_initial(self, snapshot: FsmSnapshotDTO) -> None:
        if self._store.try_set(self._trimmed(snapshot), 0) is not None:
            self._store.app_counters.increment(UNCOUNTED)

    def _trimmed(self, snap: FsmSnapshotDTO) -> FsmSnapshotDTO:
        history = trimmed_history(snap.history, self._max_history)
        if history is snap.history:
            return snap
        return msgspec.structs.replace(snap, history=history)

    def _after_local_commit(self) -> None:
        self._fanout.drain()
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
        loop = asyncio.get_running_loop()
        running = self._checkpointing
        if running is not None and not running.done() and running.get_loop() is loop:
            return  # one at a time; the next commit asks again
        self._commits_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
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
        """Write a checkpoint now (to ``checkpoint_path``); returns the version saved.
        :class:`StateStoreError` if the store has no ``checkpoint_path``."""
        if self._checkpoint_path is None:
            raise StateStoreError("this store has no checkpoint_path")
        return await asyncio.to_thread(self._store.checkpoint, self._checkpoint_path)

    # ---------------------------------------------------------------- subscriptions

    async def subscribe(self, subscriber_id: str = "unknown") -> asyncio.Queue[FsmSnapshotDTO]:
        """A queue (maxsize 64) that holds the current snapshot, if any, and then gets every
        later commit of any process, in order. A full queue drops its stale snapshots for the
        newest. Raises :class:`StateStoreError` if the store is closed, and
        :class:`RegistryFullError` if this process cannot be woken by other processes' commits
        (the store's ``max_readers`` processes are registered already)."""
        self._check_open()
        self._fanout.bind_loop()
        return self._fanout.add(subscriber_id)

    async def unsubscribe(self, queue: asyncio.Queue[FsmSnapshotDTO]) -> None:
        """Stop delivering to *queue* (unknown queues are ignored)."""
        self._fanout.remove(queue)

    # ---------------------------------------------------------------- metrics and health

    async def get_metrics(self) -> dict[str, Any]:
        """``total_sets``, ``total_gets``, ``version_conflicts``, ``subscriber_count`` (ints),
        ``last_update_ts`` (``0.0`` before the first set), ``creation_ts``, ``uptime_seconds``,
        ``current_version`` (``-1`` while empty), ``current_state`` (a name, or
        ``"UNINITIALIZED"``), ``active_subscribers`` (an int), and ``subscriber_ids``."""
        self._fanout.bind_loop()
        return self._metrics(self._store.get())

    def _counters(self) -> dict[str, Any]:
        st = self._store
        counters = st.app_counters
        total_sets = max(0, st.commits - counters[UNCOUNTED])
        last = st.last_update_ns
        return {
            "total_sets": total_sets,
            "total_gets": self._total_gets,
            "version_conflicts": counters[CONFLICTS],
            "subscriber_count": len(self._fanout.subscribers),
            "last_update_ts": last / 1e9 if total_sets and last else 0.0,
            "creation_ts": st.created_ns / 1e9,
        }

    def _metrics(self, snapshot: FsmSnapshotDTO | None) -> dict[str, Any]:
        metrics = self._counters()
        subscribers = self._fanout.subscribers.values()
        metrics.update(
            uptime_seconds=max(0.0, time.time() - metrics["creation_ts"]),
            current_version=snapshot.version if snapshot is not None else -1,
            current_state=snapshot.state.name if snapshot is not None else "UNINITIALIZED",
            active_subscribers=len(subscribers),
            subscriber_ids=[s.subscriber_id for s in subscribers],
        )
        return metrics

    async def health_check(self) -> dict[str, Any]:
        """``{"healthy", "issues", "metrics"}``: unhealthy when empty, when version conflicts
        exceed 10% of sets, or when subscribers cannot receive other processes' commits; more
        than 100 subscribers is listed as an issue but leaves the store healthy."""
        self._fanout.bind_loop()
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
        issues.extend(self._fanout.problems())
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
        """Stop delivering to subscribers and detach. A shared store stays for other processes
        (see :meth:`unlink`); a private one is gone."""
        if self._closed:
            return
        self._closed = True
        self._fanout.close()
        running = self._checkpointing
        if running is not None and running.get_loop() is asyncio.get_running_loop():
            await asyncio.wait({running})
        if self._checkpoint_path is not None and self._commits_since_checkpoint:
            await asyncio.to_thread(self._write_checkpoint)  # the final state
        self._store.close()

    def unlink(self) -> None:
        """Remove the shared store's name for everyone: nothing is left in ``/dev/shm`` once
        every handle is closed. Handles already open (this one too) keep working on the orphaned
        store until closed, but no process can open it any more. Nothing to do for a private
        store."""
        if self._name is not None:
            self._store.unlink()

    def __del__(self) -> None:
        # The original in-process store had no close(), and its callers never call one. A
        # private store shares nothing (no name, no other process, no registry entry), so when
        # the last reference goes it is released quietly -- memory only, no IPC. A named store
        # is shared state the caller opted into: its handle still warns if never closed.
        if not getattr(self, "_closed", True) and self._name is None:
            self._closed = True
            with contextlib.suppress(Exception):
                self._store.close()

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
        where = "private" if self._name is None else repr(self._name)
        state = "closed" if self._closed else f"version={self._store.version}"
        return f"<shmstore.fsm.AsyncStateStore {where} {state}>"


def create_store(initial_state: FsmSnapshotDTO | None = None) -> AsyncStateStore:
    """A private store, optionally holding *initial_state*."""
    return AsyncStateStore(initial_state)


def create_initialized_store() -> AsyncStateStore:
    """A private store holding the COLD_START snapshot (not counted as a set)."""
    return AsyncStateStore(initial_snapshot())
