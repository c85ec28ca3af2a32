"""The asyncio veneer: reads stay synchronous, waiting becomes awaitable.

Reads never block (a shared-memory load, at most a copy and a decode), so ``get()`` and friends
are plain methods. ``set()`` holds the writer lock only for one memcpy and a dead holder's lock is
released by the kernel, so it runs inline too; it is ``async`` so callers need not care.

Waiting is served by one background thread per ``AsyncStore``, alive only while some coroutine
is awaiting. The thread registers its own reader entry, sleeps on that entry's semaphore and, on
every wake-up, hands the new version to each satisfied waiter through
``loop.call_soon_threadsafe``. A coroutine that starts or stops waiting (cancellation, timeout)
posts the thread's semaphore so that it re-evaluates; when nobody waits any more the thread
unregisters and exits. Idle handles therefore hold no thread, registry entry or semaphore.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

from ._errors import StateStoreError
from ._registry import Waiter
from ._store import Store
from ._subscription import Subscription

__all__ = ["AsyncStore", "AsyncSubscription"]

T = TypeVar("T")


@dataclass(eq=False)
class _Pending:
    after: int
    future: asyncio.Future[int]
    loop: asyncio.AbstractEventLoop = field(repr=False)


def _resolve(future: asyncio.Future[int], version: int) -> None:
    if not future.done():
        future.set_result(version)


def _fail(future: asyncio.Future[int], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class AsyncStore(Generic[T]):
    """A :class:`Store` for asyncio code. Wraps (and owns) one store handle."""

    def __init__(self, store: Store[T]) -> None:
        self._store = store
        self._mutex = threading.Lock()
        self._pending: set[_Pending] = set()
        self._thread: threading.Thread | None = None
        self._waiter: Waiter | None = None
        self._closing = False

    @overload
    @classmethod
    def create(cls, name: str, type: type[T], **options: Any) -> AsyncStore[T]: ...

    @overload
    @classmethod
    def create(cls, name: str, type: Any = ..., **options: Any) -> AsyncStore[Any]: ...

    @classmethod
    def create(cls, name: str, type: Any = Any, **options: Any) -> AsyncStore[Any]:
        """Like :meth:`Store.create` (same options); creating never blocks."""
        return cls(Store.create(name, type, **options))

    @overload
    @classmethod
    def open(cls, name: str, type: type[T]) -> AsyncStore[T]: ...

    @overload
    @classmethod
    def open(cls, name: str, type: Any = ...) -> AsyncStore[Any]: ...

    @classmethod
    def open(cls, name: str, type: Any = None) -> AsyncStore[Any]:
        """Like :meth:`Store.open`."""
        return cls(Store.open(name, type))

    # ---------------------------------------------------------------- sync surface

    @property
    def store(self) -> Store[T]:
        """The underlying synchronous handle."""
        return self._store

    @property
    def name(self) -> str:
        return self._store.name

    @property
    def version(self) -> int:
        return self._store.version

    def get(self) -> T | None:
        return self._store.get()

    def get_with_version(self) -> tuple[T | None, int]:
        return self._store.get_with_version()

    async def set(self, value: T, expected_version: int | None = None) -> int:
        """:meth:`Store.set`. Runs inline: the lock is held for one memcpy at a time."""
        return self._store.set(value, expected_version)

    # ---------------------------------------------------------------- waiting

    async def wait(self, after_version: int, timeout: float | None = None) -> int:
        """Wait until the version is greater than *after_version*, without blocking the loop.

        ``TimeoutError`` after *timeout* seconds; ``timeout=0`` is a non-blocking check.
        Cancelling the awaiting task leaves nothing behind.
        """
        head = self._store.version
        if head > after_version:
            return head
        if timeout is not None and timeout <= 0:
            raise TimeoutError(f"no version after {after_version} (timeout=0)")
        loop = asyncio.get_running_loop()
        entry = _Pending(after_version, loop.create_future(), loop)
        with self._mutex:
            if self._closing:
                raise StateStoreError(f"store {self.name!r} is closed")
            self._pending.add(entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name=f"shmstore-wait-{self.name}", daemon=True
                )
                self._thread.start()
            elif self._waiter is not None:
                self._waiter.kick()
        try:
            async with asyncio.timeout(timeout):
                return await entry.future
        except TimeoutError:
            raise TimeoutError(f"no version after {after_version} within {timeout} s") from None
        finally:
            with self._mutex:
                self._pending.discard(entry)
                if self._waiter is not None:
                    self._waiter.kick()  # let the thread re-evaluate, and exit if idle

    def _serve(self) -> None:
        """The background thread: sleep on our own semaphore, resolve satisfied waiters.

        It stays ``self._thread`` until it has given its registry entry back, so that close()
        joins it before the mapping goes away; and if a waiter arrived while it was leaving,
        it serves that one too instead of stranding it.
        """
        while True:
            try:
                waiter = self._store._registry.register()
            except BaseException as exc:
                with self._mutex:
                    failed, self._pending = self._pending, set()
                    self._thread = None
                for entry in failed:
                    entry.loop.call_soon_threadsafe(_fail, entry.future, exc)
                return
            with self._mutex:
                self._waiter = waiter
            try:
                self._serve_until_idle(waiter)
            finally:
                waiter.close()
            with self._mutex:
                if self._pending and not self._closing:
                    continue
                self._thread = None
                return

    def _serve_until_idle(self, waiter: Waiter) -> None:
        while True:
            with self._mutex:
                if self._closing or not self._pending:
                    self._waiter = None  # nobody may kick it once we start closing it
                    return
                head = self._store.version
                ready = [e for e in self._pending if head > e.after]
                self._pending.difference_update(ready)
            for entry in ready:
                entry.loop.call_soon_threadsafe(_resolve, entry.future, head)
            if not ready:
                waiter.sleep(None)

    def subscribe(
        self, after_version: int | None = None, *, timeout: float | None = None
    ) -> AsyncSubscription[T]:
        """``async for version, value in store.subscribe()``: every version in order; see
        :meth:`Store.subscribe` for where it starts and how lag is reported."""
        return AsyncSubscription(self, Subscription(self._store, after_version, timeout), timeout)

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop the background thread (waiters get StateStoreError), then close the handle."""
        with self._mutex:
            self._closing = True
            thread = self._thread
            if self._waiter is not None:
                self._waiter.kick()
            orphans, self._pending = self._pending, set()
        if thread is not None:
            thread.join()  # it was kicked; it must be gone before the mapping is
        for entry in orphans:
            exc = StateStoreError(f"store {self.name!r} was closed while waiting")
            if not entry.loop.is_closed():
                entry.loop.call_soon_threadsafe(_fail, entry.future, exc)
        self._store.close()

    def unlink(self) -> None:
        self._store.unlink()

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
        return f"<shmstore.AsyncStore wrapping {self._store!r}>"


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
