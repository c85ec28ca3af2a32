"""Exclusive-writer mode: one handle keeps the writer lock for its life (issue 15)."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
from exclusive_workers import exclusive_writer, waiter_for
from test_waiting import wait_for_registrations

from shmstore import StateStoreError, Store

ctx = mp.get_context("spawn")
JOIN = 60


def test_the_exclusive_writer_commits_and_everyone_else_is_told(
    store_name: str, writer_lock: str
) -> None:
    with Store.create(store_name, int, writer_lock=writer_lock) as owner:
        owner.keep_writer_lock()
        assert owner.keeps_writer_lock
        assert owner.set(1) == 1
        assert owner.set(2, expected_version=1) == 2
        assert owner.app_counters.increment(0) == 1  # counters need the lock too
        assert owner.statistics().writer_lock_held
        with Store.open(store_name, int) as other:
            with pytest.raises(StateStoreError, match=f"exclusive writer \\(pid {os.getpid()}\\)"):
                other.set(3)
            with pytest.raises(StateStoreError, match="exclusive writer"):
                other.keep_writer_lock()
            with pytest.raises(StateStoreError, match="exclusive writer"):
                other.app_counters.increment(0)
            assert other.get_with_version() == (2, 2)  # reading is never affected
            owner.close()  # lets go of the lock
            assert other.set(3) == 3
            assert not other.keeps_writer_lock


def test_a_killed_exclusive_writer_frees_the_store(store_name: str, writer_lock: str) -> None:
    with Store.create(store_name, int, writer_lock=writer_lock) as st:
        ready = ctx.Event()
        p = ctx.Process(target=exclusive_writer, args=(store_name, ready, 5))
        p.start()
        assert ready.wait(JOIN)
        with pytest.raises(StateStoreError, match="exclusive writer"):
            st.set(100)
        p.kill()
        p.join(JOIN)
        assert st.get_with_version() == (5, 5)
        assert st.set(6) == 6  # the kernel released the lock; the stale claim is cleared
        assert not st.statistics().writer_lock_held


def test_readers_wake_for_the_exclusive_writers_commits(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.keep_writer_lock()
        results = ctx.Queue()
        p = ctx.Process(target=waiter_for, args=(store_name, 0, results))
        p.start()
        wait_for_registrations(st, 1)
        st.set(1)
        assert results.get(timeout=JOIN) == 1
        p.join(JOIN)
        assert p.exitcode == 0
