"""Child-process bodies for the exclusive-writer tests (spawned: importable by name)."""

from __future__ import annotations

import signal
from multiprocessing.synchronize import Event
from typing import Any

from shmstore import Store

JOIN = 60


def exclusive_writer(name: str, ready: Event, commits: int) -> None:
    """Keep the writer lock, commit *commits* values, say so, then wait to be killed."""
    st = Store.open(name, int).keep_writer_lock()
    for _ in range(commits):
        st.set(st.version + 1)
    ready.set()
    signal.pause()


def waiter_for(name: str, after: int, results: Any) -> None:
    st = Store.open(name, int)
    try:
        results.put(st.wait(after, timeout=JOIN, spin=False))
    finally:
        st.close()
