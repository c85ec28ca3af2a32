"""CPU placement for the benchmarks that wake another process.

Placement dominates every wake-up figure: on the reference VM a raw semaphore ping-pong costs
~7 us one way between two CPUs and ~1.7 us within one (the woken process then runs as soon as
the waker blocks, with no idle CPU to wake). An unpinned run lands wherever the scheduler puts
it, run by run, so the harness pins: the measuring process on CPU 0, the processes it wakes on
CPU 1 ("split"). Without ``os.sched_setaffinity`` (not Linux) or with one CPU nothing is pinned,
and :func:`describe` says so.
"""

from __future__ import annotations

import os
from typing import Any

MEASURER_CPU = 0
PEER_CPU = 1


# The CPUs this process may use when the module is imported: before it pins itself.
_ALLOWED = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def can_pin() -> bool:
    return {MEASURER_CPU, PEER_CPU} <= _ALLOWED


def pin(cpu: int, pid: int = 0) -> None:
    """Pin process *pid* (0: this one) to *cpu*, where pinning is possible."""
    if can_pin():
        os.sched_setaffinity(pid, {cpu})


def start_on_peer_cpu(process: Any) -> None:
    """Start a ``multiprocessing`` process and pin it to the peer CPU."""
    process.start()
    pin(PEER_CPU, process.pid)


def describe() -> str:
    if not can_pin():
        return "not pinned (no sched_setaffinity, or one CPU)"
    return f"measuring process on CPU {MEASURER_CPU}, the processes it wakes on CPU {PEER_CPU}"
