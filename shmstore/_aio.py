"""The asyncio veneer: a table over the synchronous ``Store``, with awaitable waiting.

Reads never block (a shared-memory load, at most a copy and a decode), so ``get()`` and friends
are the store's own methods, passed through as they are. ``set()`` holds the writer lock only for
one memcpy and a dead holder's lock is released by the kernel, so it runs inline too; it is
``async`` so callers need not care. Waiting is the one call that blocks: it is the store's
``wait_async``, served by the store's one wait engine (``_waiting``), which shares the handle's
registry entry with its waiting threads.

What ``AsyncStore`` exposes is declared below as tables (:data:`SYNC_METHODS`,
:data:`SYNC_PROPERTIES`), py-lmdb ``aio`` style, so that it cannot drift from ``Store``: a test
checks that every public member of ``Store`` is either passed through or has an async twin here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, overload

from ._projection import Projection
from ._replication import Replication
from ._stats import MirrorStatus, ReaderEntry, StoreStatistics
from ._store import AppCounters, Store
from ._subscription import Subscription

if TYPE_CHECKING:
    from ._layout import Geometry

__all__ = ["SYNC_METHODS", "SYNC_PROPERTIES", "AsyncStore", "AsyncSubscription"]

T = TypeVar("T")
P = TypeVar("P")

# Store members that AsyncStore offers unchanged (they never block).
SYNC_METHODS: Final = (
    "get",
    "get_with_version",
    "try_set",
    "statistics",
    "checkpoint",
    "reclaim_dead_readers",
    "readers",
    "projection",
    "keep_writer_lock",
    "unlink",
)
SYNC_PROPERTIES: Final = (
    "name",
    "version",
    "value_type",
    "type_name",
    "schema",
    "schema_generation",
    "writable",
    "geometry",
    "capacity",
    "max_value_size",
    "commits",
    "conflicts",
    "last_update_ns",
    "created_ns",
    "closed",
    "app_counters",
    "keeps_writer_lock",
    "readonly",
    "wait_mode",
    "mirror_status",
    "replication",
)


def _forward(name: str) -> property:
    def get(self: AsyncStore[Any]) -> Any:
        return getattr(self.store, name)

    doc = getattr(getattr(Store, name, None), "__doc__", None)
    return property(get, doc=doc)


class AsyncStore(Generic[T]):
    """A :class:`Store` for asyncio code. Wraps (and owns) one store handle."""

    if TYPE_CHECKING:
        # The tables, as mypy sees them (assigned for real in __init__ and below the class).
        get: Callable[[], T | None]
        get_with_version: Callable[[], tuple[T | None, int]]
        try_set: Callable[[T, int], int | None]
        statistics: Callable[[], StoreStatistics]
        checkpoint: Callable[[str | os.PathLike[str]], int]
        reclaim_dead_readers: Callable[[], int]
        readers: Callable[[], list[ReaderEntry]]
        projection: Callable[[type[P]], Projection[P]]
        keep_writer_lock: Callable[[], Store[T]]
        unlink: Callable[[], None]

        @property
        def name(self) -> str: ...
        @property
        def version(self) -> int: ...
        @property
        def value_type(self) -> Any: ...
        @property
        def type_name(self) -> str: ...
        @property
        def schema(self) -> dict[str, Any] | None: ...
        @property
        def schema_generation(self) -> int: ...
        @property
        def writable(self) -> bool: ...
        @property
        def geometry(self) -> Geometry: ...
        @property
        def capacity(self) -> int: ...
        @property
        def max_value_size(self) -> int: ...
        @property
        def commits(self) -> int: ...
        @property
        def conflicts(self) -> int: ...
        @property
        def last_update_ns(self) -> int: ...
        @property
        def created_ns(self) -> int: ...
        @property
        def closed(self) -> bool: ...
        @property
        def app_counters(self) -> AppCounters: ...
        @property
        def keeps_writer_lock(self) -> bool: ...
        @property
        def readonly(self) -> bool: ...
        @property
        def wait_mode(self) -> str: ...
        @property
        def mirror_status(self) -> MirrorStatus: ...
        @property
        def replication(self) -> Replication: ...

    def __init__(self, store: Store[T]) -> None:
        self.store = store
        """The underlying synchronous handle."""
        for name in SYNC_METHODS:
            setattr(self, name, getattr(store, name))  # bound methods: no extra call layer

    @overload
    @classmethod
    def create(cls, name: str, type: type[T], **options: Any) -> AsyncStore[T]: ...

    @overload
    @classmethod
    def create(cls, name: str, type: Any = ..., **options: Any) -> AsyncStore[Any]: ...

    @classmethod
    def create(cls, name: str, type: Any = Any, **options: Any) -> AsyncStore[Any]:
        """:meth:`Store.create` (same options); creating never blocks."""
        return cls(Store.create(name, type, **options))

    @overload
    @classmethod
    def open(cls, name: str, type: type[T], **options: Any) -> AsyncStore[T]: ...

    @overload
    @classmethod
    def open(cls, name: str, type: Any = ..., **options: Any) -> AsyncStore[Any]: ...

    @classmethod
    def open(cls, name: str, type: Any = None, **options: Any) -> AsyncStore[Any]:
        """:meth:`Store.open` (same options, e.g. ``allow_other_owner``)."""
        return cls(Store.open(name, type, **options))

    @overload
    @classmethod
    def open_or_create(cls, name: str, type: type[T], **options: Any) -> AsyncStore[T]: ...

    @overload
    @classmethod
    def open_or_create(cls, name: str, type: Any = ..., **options: Any) -> AsyncStore[Any]: ...

    @classmethod
    def open_or_create(cls, name: str, type: Any = Any, **options: Any) -> AsyncStore[Any]:
        """:meth:`Store.open_or_create` (same options)."""
        return cls(Store.open_or_create(name, type, **options))

    @overload
    @classmethod
    def private(cls, type: type[T], **options: Any) -> AsyncStore[T]: ...

    @overload
    @classmethod
    def private(cls, type: Any = ..., **options: Any) -> AsyncStore[Any]: ...

    @classmethod
    def private(cls, type: Any = Any, **options: Any) -> AsyncStore[Any]:
        """:meth:`Store.private` (same options)."""
        return cls(Store.private(type, **options))

    # ---------------------------------------------------------------- the async twins

    async def set(self, value: T, expected_version: int | None = None) -> int:
        """:meth:`Store.set`. Runs inline: the lock is held for one memcpy at a time."""
        return self.store.set(value, expected_version)

    async def update(self, fn: Callable[[T | None], T], *, retries: int | None = None) -> int:
        """:meth:`Store.update`, inline like :meth:`set`."""
        return self.store.update(fn, retries=retries)

    async def wait(self, after_version: int, timeout: float | None = None) -> int:
        """Wait until the version is greater than *after_version*, without blocking the loop.

        ``TimeoutError`` after *timeout* seconds; ``timeout=0`` is a non-blocking check.
        Cancelling the awaiting task leaves nothing behind.
        """
        return await self.store.wait_async(after_version, timeout)

    def subscribe(
        self, after_version: int | None = None, *, timeout: float | None = None
    ) -> AsyncSubscription[T]:
        """``async for version, value in store.subscribe()``: every version in order; see
        :meth:`Store.subscribe` for where it starts and how lag is reported."""
        return AsyncSubscription(
            self, self.store.subscribe(after_version, timeout=timeout), timeout
        )

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the handle; coroutines still waiting on it get :class:`StateStoreError`."""
        self.store.close()

    async def __aenter__(self) -> AsyncStore[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmstore.AsyncStore wrapping {self.store!r}>"


for _name in SYNC_PROPERTIES:
    setattr(AsyncStore, _name, _forward(_name))
del _name


class AsyncSubscription(Generic[T]):
    """``async for (version, value)`` over every committed version, in order."""

    def __init__(
        self, store: AsyncStore[T], subscription: Subscription[T], timeout: float | None
    ) -> None:
        self._store = store
        self._sub = subscription
        self._timeout = timeout

    @property
    def missed(self) -> int:
        return self._sub.missed

    def __aiter__(self) -> AsyncSubscription[T]:
        return self

    async def __anext__(self) -> tuple[int, T]:
        while True:
            item = self._sub.poll()
            if item is not None:
                return item
            await self._store.wait(self._sub.next_version - 1, self._timeout)

    async def __aenter__(self) -> AsyncSubscription[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._sub.close()
