"""The ping-pong that every wake-up benchmark times (``wake.py`` and the harness's ``wake_peers``).

A round trip: we publish, the echo process wakes and publishes back, we wake. One-way latency
is the round trip / 2. What "publish" and "wake" are differs by system (a store commit and
``wait()``, a queue, a semaphore, a socket); the rest -- starting the echo on its CPU, timing
the round trips, the percentiles -- is here, once.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from placement import pin

ctx = mp.get_context("spawn")


def start_echo(target: Callable[..., None], args: tuple[Any, ...], cpu: int | None) -> Any:
    """Start the echo process (spawned, a daemon) and pin it to *cpu* (``None``: unpinned)."""
    process = ctx.Process(target=target, args=args, daemon=True)
    process.start()
    if cpu is not None:
        pin(cpu, process.pid)
    return process


def time_round_trips(round_trip: Callable[[int], object], indices: Iterable[int]) -> list[float]:
    """One-way latencies in ns: ``round_trip(i)`` for each *i*, timed, halved."""
    clock = time.perf_counter_ns
    samples = []
    for i in indices:
        t0 = clock()
        round_trip(i)
        samples.append((clock() - t0) / 2)
    return samples


def ping_pong(
    echo: Callable[..., None],
    args: tuple[Any, ...],
    round_trip: Callable[[int], object],
    indices: Iterable[int],
    *,
    cpu: int | None,
) -> list[float]:
    """Start *echo* on *cpu*, time ``round_trip`` over *indices*, then wait for the echo to
    finish (it must answer exactly as many rounds as it is given)."""
    process = start_echo(echo, args, cpu)
    try:
        return time_round_trips(round_trip, indices)
    finally:
        process.join(60)


def quantiles(samples: list[float]) -> dict[str, float]:
    """p50 / p99 / p99.9 of *samples*."""
    ordered = sorted(samples)

    def at(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {"p50": statistics.median(ordered), "p99": at(0.99), "p99.9": at(0.999)}
