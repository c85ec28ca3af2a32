"""Hearing a local store's commits from an event loop: a thread blocked in ``Store.wait()``.

The publisher's live copy leaves from this thread, right after the commit wakes it (see
``_publisher`` and ``_live``); the event loop, woken from here only while it waits for a commit,
makes the durable put.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from .. import StateStoreError, Store

__all__ = ["LOCAL_WAIT", "Commits"]

log = logging.getLogger("shmstore.mirror")

LOCAL_WAIT: Final = 0.5  # bounds each wait for a local commit, so that stop is prompt


class Commits:
    """Hears the local store's commits for the event loop: a thread blocks in ``Store.wait()``
    (the store's semaphore, its registration kept for the thread's life) and wakes the loop.

    Measured on loopback (2 vCPUs): ``Store.wait_async`` from commit to the publisher's loop
    took 300-1200 us, because its server thread exists only while a coroutine waits and is
    started, registered and ended around every commit of a paced writer; this thread lives as
    long as the publisher, woken ~30 us after a commit. It sends the live copy itself
    (*on_commit*, see ``_live``), then wakes the loop for the durable put -- only while the
    loop waits for a commit (:meth:`wait_after`). The loop spends most of a busy writer's time
    elsewhere (its put, then the publisher's ``DURABLE_DELAY``), and a wake-up there would only
    run an empty loop iteration on the CPU the commit's next hops need.

    No wake-up is lost: the thread loads ``_waiting`` after the commit it was woken by, and
    the loop stores ``_waiting`` before it loads the store's version; so either the thread sees
    the loop waiting and wakes it, or the loop's load comes after the commit and it does not
    wait. (Python's threads see each other's stores in one order, under the GIL or free-
    threaded with these plain attribute stores being sequentially consistent in CPython; each
    wait is bounded by ``LOCAL_WAIT`` in any case.)
    """

    def __init__(self, store: Store[Any], on_commit: Callable[[], None]) -> None:
        self._store = store
        self._on_commit = on_commit
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._waiting = False  # the loop is in wait_after: a commit must wake it
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"shmstore-publish-{store.name}", daemon=True
        )

    def __enter__(self) -> Commits:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()  # within LOCAL_WAIT: each wait is bounded

    def _run(self) -> None:
        store = self._store
        seen = store.version
        while not self._stop.is_set():
            try:
                seen = store.wait(seen, LOCAL_WAIT, spin=False)
            except TimeoutError:
                continue
            except StateStoreError as exc:  # closed under us, or no reader entry left
                if not self._stop.is_set() and not store.closed:
                    log.warning(
                        "cannot wait for commits of %r (%s): putting every %.1f s instead",
                        store.name,
                        exc,
                        LOCAL_WAIT,
                    )
                return
            self._on_commit()
            if not self._waiting:
                continue  # the loop looks at the store's version before it next waits
            try:
                self._loop.call_soon_threadsafe(self._changed.set)
            except RuntimeError:  # the loop closed
                return

    async def wait_after(self, version: int, timeout: float) -> None:
        """Until the store is past *version*, or *timeout* seconds."""
        self._changed.clear()
        self._waiting = True  # before the load of the version: see the class
        try:
            if self._store.version > version:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        finally:
            self._waiting = False
