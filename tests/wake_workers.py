"""Process entry points for the wake-up tests (importable by spawned children)."""

from __future__ import annotations

import contextlib
import signal
from typing import Any

from shmstore import Store


def register(st: Store[int]) -> None:
    """Give *st* its registry entry, so that its next wait sleeps as the lone waiter: a first
    wait registers even when it times out (again until it did, on a loaded machine)."""
    while st._gate.waiter is None:
        with contextlib.suppress(TimeoutError):
            st.wait(st.version, timeout=0.05)


def interrupted_in_a_lone_wait(name: str, results: Any) -> None:
    """Sleep as the lone waiter until SIGINT; report whether the gate was left usable."""
    # A runner started as a background job hands its children SIGINT ignored: Ctrl-C's default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Store.open(name, int) as st:
        register(st)
        results.put("registered")
        try:
            st.wait(st.version, timeout=None, spin=False)
        except KeyboardInterrupt:
            left_sleeping = st._gate._sleeper
            with contextlib.suppress(TimeoutError):
                st.wait(st.version, timeout=0.01, spin=False)  # the gate still works
            results.put(("interrupted", left_sleeping, st.statistics().late_wakeups))
            return
        results.put(("returned", None, None))
