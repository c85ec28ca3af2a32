"""``python -m shmstore demo``: an FSM worker and reader processes sharing one store, live.

One worker process drives FSM transitions through ``shmstore.fsm.AsyncStateStore`` at a fixed
rate. Each reader process subscribes to the same store (an ``asyncio.Queue`` fed across
processes) and polls it with ``Store.get()``, timing every read. Once per refresh the readers
report to the parent, which prints one screen: commits per second, per-reader read latency, how
far each subscription lags the writer, and the store's counters. At the end -- or on Ctrl-C --
the parent stops everyone and removes the store: nothing is left in ``/dev/shm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import queue
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any, TextIO

import msgspec

from ._store import Store, remove
from .fsm import (
    AsyncStateStore,
    FsmSnapshotDTO,
    FsmState,
    create_transition,
    next_snapshot,
)

__all__ = ["run_demo"]

REPORT_EVERY = 0.5
_CYCLE = (FsmState.IDLE, FsmState.ACTIVE)


@dataclass(frozen=True)
class ReaderReport:
    reader: int
    reads: int
    p50_ns: float
    p99_ns: float
    lag: int  # versions the subscription was behind the store when reporting
    received: int


def _quiet_child() -> None:
    # Ctrl-C goes to the whole process group; only the parent decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker(name: str, rate: float, stop: Event) -> None:
    _quiet_child()

    async def main() -> None:
        async with AsyncStateStore(name=name) as st:
            current = await st.initialize_if_empty()
            period = 1.0 / rate
            next_at = time.monotonic()
            i = 0
            while not stop.is_set():
                new_state = _CYCLE[i % 2]
                transition = create_transition(current.state, new_state, f"TICK_{i}")
                candidate = next_snapshot(current, new_state, f"tick {i}", transition)
                context = {**candidate.context_data, "tick": i, "worker_pid": os.getpid()}
                current = await st.set(msgspec.structs.replace(candidate, context_data=context))
                i += 1
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    next_at = time.monotonic()  # fell behind: do not try to catch up in a burst

    asyncio.run(main())


def _reader(name: str, index: int, reports: Any, stop: Event) -> None:
    _quiet_child()

    async def main() -> None:
        async with AsyncStateStore(name=name) as st:
            sub = await st.subscribe(f"reader-{index}")
            poller = Store.open(name, FsmSnapshotDTO)
            clock = time.perf_counter_ns
            latencies: list[int] = []
            received = 0
            subscribed = 0
            reported = time.monotonic()
            try:
                while not stop.is_set():
                    t0 = clock()
                    poller.get()
                    latencies.append(clock() - t0)
                    while not sub.empty():
                        subscribed = sub.get_nowait().version
                        received += 1
                    now = time.monotonic()
                    if now - reported >= REPORT_EVERY and latencies:
                        latencies.sort()
                        reports.put(
                            ReaderReport(
                                reader=index,
                                reads=len(latencies),
                                p50_ns=statistics.median(latencies),
                                p99_ns=latencies[int(0.99 * (len(latencies) - 1))],
                                lag=max(0, poller.version - subscribed),
                                received=received,
                            )
                        )
                        latencies.clear()
                        received = 0
                        reported = now
                    await asyncio.sleep(0.0002)  # a reader that also does other work
            finally:
                poller.close()

    asyncio.run(main())


def _render(
    out: TextIO,
    *,
    name: str,
    elapsed: float,
    rate: float,
    st: Store[FsmSnapshotDTO],
    latest: dict[int, ReaderReport],
    readers: int,
    clear: bool,
) -> None:
    snap = st.get()
    lines = [
        f"shmstore demo -- store {name!r}, {readers} reader process(es), {elapsed:5.1f} s",
        f"  commits/s {rate:9.0f}   version {st.version:8d}   commits {st.commits:8d}   "
        f"version conflicts {st.app_counters[0]}",
        f"  FSM state {snap.state.name if snap else '-':<12} fsm version "
        f"{snap.version if snap else 0}",
        "",
        f"  {'reader':<8}{'reads/s':>10}{'get p50':>10}{'get p99':>10}{'lag':>6}{'recv/s':>9}",
    ]
    for i in range(readers):
        r = latest.get(i)
        if r is None:
            lines.append(f"  {i:<8}{'(starting)':>10}")
            continue
        lines.append(
            f"  {i:<8}{r.reads / REPORT_EVERY:>10.0f}{r.p50_ns / 1000:>8.2f}us"
            f"{r.p99_ns / 1000:>8.2f}us{r.lag:>6}{r.received / REPORT_EVERY:>9.0f}"
        )
    text = "\n".join(lines)
    if clear:
        out.write("\x1b[H\x1b[2J" + text + "\n")
    else:
        out.write(text + "\n\n")
    out.flush()


def run_demo(readers: int = 3, seconds: float = 5.0, rate: float = 1000.0) -> int:
    """Run the demo; returns the exit status. Removes the store however it ends."""
    ctx = mp.get_context("spawn")
    name = f"demo-{os.getpid()}"
    stop = ctx.Event()
    reports = ctx.Queue()
    procs: list[Any] = []
    out = sys.stdout
    clear = out.isatty()
    interrupted = False
    owner = Store.create(name, FsmSnapshotDTO, slots=64, slot_size=256 * 1024)
    try:
        procs.append(ctx.Process(target=_worker, args=(name, rate, stop), name="fsm-worker"))
        procs += [
            ctx.Process(target=_reader, args=(name, i, reports, stop), name=f"reader-{i}")
            for i in range(readers)
        ]
        for p in procs:
            p.start()
        latest: dict[int, ReaderReport] = {}
        started = time.monotonic()
        last_tick, last_version = started, owner.version
        commit_rate = 0.0
        try:
            while (now := time.monotonic()) - started < seconds:
                deadline = now + REPORT_EVERY
                while (left := deadline - time.monotonic()) > 0:
                    with contextlib.suppress(queue.Empty):
                        report: ReaderReport = reports.get(timeout=left)
                        latest[report.reader] = report
                now = time.monotonic()
                version = owner.version
                commit_rate = (version - last_version) / (now - last_tick)
                last_tick, last_version = now, version
                _render(
                    out,
                    name=name,
                    elapsed=now - started,
                    rate=commit_rate,
                    st=owner,
                    latest=latest,
                    readers=readers,
                    clear=clear,
                )
                dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    print(f"demo: {', '.join(dead)} exited unexpectedly", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            interrupted = True
        return 130 if interrupted else 0
    finally:
        stop.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        owner.close()
        remove(name)
        reports.close()
        reports.join_thread()
        print(
            "demo: interrupted; stopped all processes and removed the store"
            if interrupted
            else "demo: done; stopped all processes and removed the store",
            file=sys.stderr,
        )
