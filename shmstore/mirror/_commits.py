"""Hearing a local store's commits, and timing the durable put: a thread blocked in
``Store.wait()`` sends each live copy and tells the event loop when a put is due.

The publisher's live copy leaves from this thread, right after the commit wakes it (see
``_publisher`` and ``_live``). The event loop makes the durable put, and is woken from here only
when one is due:

* at once, when a commit's live copy could not go out (no live connection, a standby, a
  version the live path refused): the put is that version's only way out;
* when the writer **pauses** -- ``quiet`` seconds without a commit -- so that the put lands
  between commits, not on the CPUs that the live copy of the next commit needs;
* at the latest ``most`` seconds after the first commit the bucket does not have, for a writer
  that never pauses (the loop's own timer). Commits heard while a put was under way count
  from the end of that put, which the thread cannot tell apart from the commits in it: the
  bound is ``most`` plus one put's time.

Why the thread decides, and not a timer in the loop: a put costs the publisher's loop, the
server's JetStream and every follower's watch a few hundred microseconds of CPU, and so does,
in the publisher, every wake-up of its loop (an event loop iteration with a timer and a task).
A loop that woke every 10 ms to look whether the writer had paused raised the p95 of
``benchmarks/mirror.py`` by 10-20% (FSM size, three runs): its wake-ups met live copies. The
thread is awake for every commit anyway, and its wait for the next one simply times out after
``quiet``.
A writer that never pauses thus costs the loop one wake-up and one put per ``most`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from .. import StateStoreError, Store

__all__ = ["DURABLE_MOST", "DURABLE_QUIET", "LOCAL_WAIT", "Commits"]

log = logging.getLogger("shmstore.mirror")

LOCAL_WAIT: Final = 0.5  # bounds each wait for a local commit, so that stop is prompt
# The publisher's defaults (``--durable-quiet``, ``--durable-most``): see the module, and
# ``_publisher`` for what they were chosen by.
DURABLE_QUIET: Final = 0.02
DURABLE_MOST: Final = 0.25


class Commits:
    """Hears the local store's commits for the event loop: a thread blocks in ``Store.wait()``
    (the store's semaphore, its registration kept for the thread's life), calls *on_commit*
    after each commit (it sends the live copy, and returns whether the newest version is out
    on the live path), and wakes the loop when a durable put is due (see the module).

    Measured on loopback (2 vCPUs): ``Store.wait_async`` from commit to the publisher's loop
    took 300-1200 us, because its server thread exists only while a coroutine waits and is
    started, registered and ended around every commit of a paced writer; this thread lives as
    long as the publisher, woken ~30 us after a commit.

    What the thread learns it records as versions, under a lock shared with the loop: the
    newest version whose live copy could not go out (``_unsent_at``), the version the writer
    paused at (``_paused_at``), and when the first commit the bucket lacks was heard
    (``_since``). A version outlives the put that was running when it was recorded: a pause
    heard while a slow put of an older version was under way is still a pause after it (a
    flag, cleared when the put returned, made the bucket wait for ``most``). The loop says
    under the same lock that it waits (``_waiting``), so the thread wakes it exactly when it
    waits for news, and no wake-up is lost.
    """

    def __init__(
        self, store: Store[Any], on_commit: Callable[[], bool], quiet: float, most: float
    ) -> None:
        self._store = store
        self._on_commit = on_commit
        self.quiet = quiet
        self.most = most
        self._loop = asyncio.get_running_loop()
        self._due = asyncio.Event()
        self._lock = threading.Lock()  # the news below, between the thread and the loop
        self._waiting = False  # the loop is in wait_due: news must wake it
        self._unsent_at = 0  # the newest version whose live copy did not go out
        self._paused_at = 0  # the writer's newest version when it paused
        self._since: float | None = None  # when the first commit not yet put was heard
        self._put = -1  # the bucket's version at the loop's last wait_due
        self._deaf = False  # this thread stopped hearing commits
        self._seen = store.version  # read here, not in the thread: a commit after it is heard
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
        seen = self._seen
        heard: float | None = None  # when the last commit was heard, unless a pause was said
        while not self._stop.is_set():
            timeout = LOCAL_WAIT  # bounded: stop is prompt
            if heard is not None:
                timeout = min(timeout, max(0.0, heard + self.quiet - time.monotonic()))
            try:
                seen = store.wait(seen, timeout, spin=False)
            except TimeoutError:
                if heard is not None and time.monotonic() - heard >= self.quiet:
                    heard = None  # the writer paused
                    with self._lock:
                        self._paused_at = seen
                        wake = self._waiting
                    if wake:
                        self._wake()
                continue
            except StateStoreError as exc:  # closed under us, or no reader entry left
                if not self._stop.is_set() and not store.closed:
                    log.warning(
                        "cannot wait for commits of %r (%s): looking for new versions every "
                        "%.1f s instead",
                        store.name,
                        exc,
                        LOCAL_WAIT,
                    )
                with self._lock:
                    self._deaf = True  # the loop puts whenever it finds a newer version
                    wake = self._waiting
                if wake:
                    self._wake()
                return
            out = self._on_commit()
            now = heard = time.monotonic()
            with self._lock:
                if not out:
                    self._unsent_at = seen
                if self._since is None:
                    self._since = now
                wake = self._waiting and (not out or now - self._since >= self.most)
            if wake:
                self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: we are stopping
            self._loop.call_soon_threadsafe(self._due.set)

    def _is_due(self, version: int) -> bool:
        """Whether a put past *version* is due (under the lock)."""
        newest = self._store.version
        if newest <= version:
            return False
        if self._deaf or self._unsent_at > version:
            return True
        if version < self._paused_at >= newest:  # paused, and no commit since
            return True
        since = self._since
        if since is None:  # a commit the thread has not heard yet: it will say
            return False
        return time.monotonic() - since >= self.most

    async def wait_due(self, version: int, timeout: float) -> bool:
        """Until a put of a version past *version* (the bucket's) is due -- ``True`` -- or
        *timeout* seconds -- ``False``. See the module for when a put is due."""
        if version != self._put:  # a put since the last call: `most` counts afresh
            self._put = version
            with self._lock:
                self._since = time.monotonic() if self._store.version > version else None
        deadline = time.monotonic() + timeout
        while True:
            self._due.clear()
            with self._lock:
                if self._is_due(version):
                    return True
                until = deadline
                if self._since is not None:
                    until = min(until, self._since + self.most)
                self._waiting = True
            try:
                now = time.monotonic()
                if now >= until:
                    with self._lock:
                        return self._is_due(version)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(until - now):  # see _connect.raise_if_cancelled
                        await self._due.wait()
            finally:
                with self._lock:
                    self._waiting = False
