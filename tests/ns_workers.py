"""Store users run as the first process of a PID namespace of their own, standing in for the
processes of a container: ``test_containers.py`` starts them with
``unshare --pid --fork --mount-proc ... python -m ns_workers VERB ARGS``.

Each verb talks on stdout, one line at a time: ``ready`` lines the test waits for, then one JSON
line with the result. Verbs that must stay alive (to hold something) block reading stdin until
the test closes it or kills the namespace.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from workers import freeze_at

from shmstore import StateStoreError, StateVersionError, Store, SubscriberLaggedError
from shmstore._ring import Ring

WAIT = 120.0  # seconds: bounds a hang, never a duration


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def report(**fields: Any) -> None:
    say(json.dumps(fields))


def hold_until_stdin_closes() -> None:
    sys.stdin.read()


class _Said:
    """``freeze_at`` wants an Event-like *reached*: here, a line on stdout."""

    def set(self) -> None:
        say("frozen")


def idle(name: str) -> None:
    """A writer that has the store open and does nothing (an FSM worker between events)."""
    with Store.open(name, int):
        say(f"ready pid {os.getpid()}")
        hold_until_stdin_closes()


def wait(name: str, after: str) -> None:
    """Sleep in ``wait()`` until the store moves past *after*; report what woke us."""
    with Store.open(name, int) as st:
        say("ready")
        version = st.wait(int(after), WAIT)
        value, at = st.get_with_version()
        stats = st.statistics()
        report(
            version=version,
            value=value,
            at=at,
            wait_mode=stats.wait_mode,
            late_wakeups=stats.late_wakeups,
        )
        hold_until_stdin_closes()


def commit(name: str, value: str, expected: str = "") -> None:
    """``set(value)``, or compare-and-set against *expected*; report the version or the
    conflict."""
    with Store.open(name, int) as st:
        try:
            version = st.set(int(value), int(expected) if expected else None)
        except StateVersionError as exc:
            report(conflict=True, expected=exc.expected, actual=exc.actual)
            return
        report(version=version)


def subscribe(name: str, first: str, second: str) -> None:
    """Subscribe from version 0, say ``ready``, wait for a line on stdin (the test commits
    meanwhile), then read every version up to *first* and report what came (lags exactly); then
    up to *second* (the test commits it once told), and report again."""
    with Store.open(name, int) as st, st.subscribe(after_version=0, timeout=WAIT) as sub:
        say("ready")
        sys.stdin.readline()
        for target in (int(first), int(second)):
            seen: list[list[int]] = []
            lags: list[list[int]] = []
            while not seen or seen[-1][0] < target:
                try:
                    for version, value in sub:
                        seen.append([version, value])
                        if version >= target:
                            break
                except SubscriberLaggedError as lag:
                    lags.append([lag.missed, lag.resume_version])
            report(seen=seen, lags=lags)


def die_inside_commit(name: str, value: str) -> None:
    """Commit, but freeze inside the slot write (writer lock held, slot half written) and say
    ``frozen``: the test then kills the namespace."""
    with Store.open(name, int) as st:
        freeze_at(Ring.write_slot, "self._i[word + SLOT_LEN_I]", _Said())
        st.set(int(value))


def hold_lock(name: str) -> None:
    """Take the writer lock (what ``set()`` does first) from this process's first thread, and
    keep it."""
    with Store.open(name, int) as st:
        rc = st._lock.try_acquire()
        say(f"held rc {rc} tid {os.getpid()}")
        hold_until_stdin_closes()


def wait_for_lock(name: str) -> None:
    """Block for the writer lock from this process's first thread (a writer whose ``set()``
    waits behind another's)."""
    with Store.open(name, int) as st:
        say(f"waiting tid {os.getpid()}")
        rc = st._lock.acquire()
        say(f"got rc {rc}")
        hold_until_stdin_closes()


def keep(name: str) -> None:
    """Become the store's exclusive writer (a keeper thread holds the writer lock); say the
    keeper thread's id."""
    with Store.open(name, int) as st:
        st.keep_writer_lock()
        (keeper,) = [t for t in threading.enumerate() if t.name.startswith("shmstore-writer")]
        say(f"keeper tid {keeper.native_id}")
        hold_until_stdin_closes()


def claim_mirror(name: str) -> None:
    """Claim the store's mirror block as a mirroring process does, say it is connected, and
    stay until told to go (or killed)."""
    with Store.open(name, int) as st:
        st.replication.claim("bucket")
        st.replication.set_status(connected=True)
        say("claimed")
        hold_until_stdin_closes()


def try_writes(name: str) -> None:
    """Every way to write to a store, from this namespace; report what each said, and what a
    read and a look at the writer lock saw."""
    with Store.open(name, int) as st:
        outcome: dict[str, Any] = {"writable": st.writable}
        attempts = {
            "set": lambda: st.set(5),
            "keep_writer_lock": st.keep_writer_lock,
            "app_counter": lambda: st.app_counters.increment(0),
        }
        for way, attempt in attempts.items():
            try:
                attempt()
                outcome[way] = "done"
            except StateStoreError as exc:
                outcome[way] = str(exc)
        outcome["read"] = list(st.get_with_version())
        outcome["lock_held_seen"] = st.statistics().writer_lock_held
        report(**outcome)


def set_from_tid(name: str, tid: str) -> None:
    """Call ``set()`` from a thread whose id is *tid* (thread ids of a fresh PID namespace count
    up from 1: start threads until one has it); report what ``set()`` said."""
    with Store.open(name, int) as st:
        outcome: list[str] = []

        def attempt() -> None:
            if threading.get_native_id() != int(tid):
                return
            try:
                st.set(5)
                outcome.append("committed")
            except StateStoreError as exc:
                outcome.append(f"refused: {exc}")

        while not outcome:
            t = threading.Thread(target=attempt)
            t.start()
            t.join()
            if t.native_id is not None and t.native_id > int(tid):
                outcome.append("missed the thread id")
        report(outcome=outcome[0])


VERBS = {
    "keep": keep,
    "set_from_tid": set_from_tid,
    "try_writes": try_writes,
    "claim_mirror": claim_mirror,
    "idle": idle,
    "wait": wait,
    "commit": commit,
    "subscribe": subscribe,
    "die_inside_commit": die_inside_commit,
    "hold_lock": hold_lock,
    "wait_for_lock": wait_for_lock,
}

if __name__ == "__main__":
    VERBS[sys.argv[1]](*sys.argv[2:])
