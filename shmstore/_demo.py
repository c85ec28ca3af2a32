"""``python -m shmstore demo``: an FSM worker and reader processes sharing one store, live.

One worker process drives FSM transitions through ``shmstore.fsm.AsyncStateStore`` at a fixed
rate. Each reader process subscribes to the same store (an ``asyncio.Queue`` fed across
processes) and polls it, timing every read: a full ``Store.get()`` -- split into *changed* reads
(a new version since the reader's last read: copy out of shared memory and decode) and
*unchanged* ones (the cached object comes back) -- and, for each changed version, a projection
(``Store.projection(FsmStateView)``: the snapshot's head, decoded without its history). Once per
refresh the readers report to the parent, which prints one screen: commits per second, those
read latencies per reader, how far each subscription lags the writer, the store's counters, and
a legend that says what each number means (it is part of every screen, so a terminal's screen
clear never wipes it). ``--slow-reader`` makes reader 0 drain its subscription slowly, so the
FSM layer drops stale snapshots for it and the notices column counts its warnings.

Cleanup cannot be skipped
-------------------------
The demo creates a store in ``/dev/shm``; leaving it there would be the demo teaching the wrong
lesson. However it ends -- its time is up, Ctrl-C, a second Ctrl-C during the shutdown,
``SIGTERM`` or ``SIGHUP``, a child that dies -- the parent stops every child and removes the
store. How each way out is closed:

* Only the parent handles signals. Children are *born* ignoring ``SIGINT``, ``SIGTERM`` and
  ``SIGHUP``: an ignored disposition survives ``exec``, so the parent sets them to ``SIG_IGN``
  around ``Process.start()``. A child setting them itself would be too late: a Ctrl-C in the
  first second reaches children still importing, which printed ``KeyboardInterrupt`` tracebacks.
  While the dispositions are ``SIG_IGN`` the parent *blocks* the signals, so one that arrives
  then stays pending (Linux never discards a blocked signal) and is handled as soon as the
  handlers are back. The children stop when the parent sets an event, or are killed.
* In the parent, the first ``SIGINT``/``SIGTERM``/``SIGHUP`` raises :class:`_Stop`, which unwinds
  to the one cleanup path. From then on every further signal only *hurries* the cleanup
  (children get ``SIGKILL`` at once instead of a few seconds to finish): it can no longer abort
  it halfway, which is how a second Ctrl-C used to leak the store.
* A child whose parent has vanished (``SIGKILL``, which no handler sees) notices within one loop
  turn (its parent pid changes), removes the store itself and exits.
* Children never print tracebacks: an unexpected error becomes one line on stderr and a non-zero
  exit status, which the parent reports as "exited unexpectedly" before it cleans up.

What the FSM layer logs in the children (a slow subscriber dropping stale snapshots, falling
behind the ring) is counted and shown on the screen, with the newest message, instead of flooding
the terminal at high rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.synchronize import Event
from types import FrameType
from typing import Any, TextIO

import msgspec

from ._store import Store, remove
from .fsm import (
    AsyncStateStore,
    FsmSnapshotDTO,
    FsmState,
    FsmStateView,
    create_transition,
    next_snapshot,
)

__all__ = ["EXIT_TERMINATED", "MAX_RATE", "MAX_READERS", "check_options", "run_demo"]

DEFAULT_SECONDS = 30.0
REPORT_EVERY = 0.5
MAX_RATE = 1_000_000.0  # far beyond what one worker can commit; a bound that catches typos
MAX_READERS = 256  # processes: a bound that keeps a typo from being a fork bomb
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
STOP_GRACE = 5.0  # seconds the children get to finish after the stop event
SLOW_READER_PERIOD = 0.05  # s: --slow-reader takes one snapshot per period from its queue
_CYCLE = (FsmState.IDLE, FsmState.ACTIVE)
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@dataclass(frozen=True)
class ReaderReport:
    reader: int
    reads: int  # full get() calls in this interval
    changed_p50_ns: float  # get() of a version this reader had not read yet: copy + decode
    changed_p99_ns: float
    unchanged_p50_ns: float  # get() of the version it read last: the cached object
    projection_p50_ns: float  # projection get() of a changed version: the head only
    lag: int  # versions the subscription was behind the store when reporting
    received: int
    notices: int  # log records of the FSM layer since the reader started (drops, lag)
    last_notice: str


def _timer_overhead(clock: Any) -> int:
    """What one timed call adds by itself (the median of empty timings), subtracted from
    every sample as ``benchmarks/core.py`` does."""
    empty = []
    for _ in range(1001):
        t0 = clock()
        empty.append(clock() - t0)
    empty.sort()
    return int(empty[len(empty) // 2])


def _p(sorted_ns: list[int], q: float) -> float:
    """The *q* quantile of sorted samples (nan when there are none)."""
    if not sorted_ns:
        return math.nan
    return float(sorted_ns[int(q * (len(sorted_ns) - 1))])


# ---------------------------------------------------------------------------- children


class _CountingHandler(logging.Handler):
    """Counts the library's log records in a child instead of printing each one."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.last = record.getMessage()


def _child_setup() -> _CountingHandler:
    # The dispositions were SIG_IGN from birth (see the module docstring); saying it again here
    # documents it and covers a start method that does not exec.
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    handler = _CountingHandler()
    logger = logging.getLogger("shmstore")
    logger.addHandler(handler)
    logger.propagate = False
    return handler


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


def _run_child(label: str, name: str, parent: int, body: Any) -> None:
    """Run a child's coroutine; a failure is one line on stderr and exit status 1, never a
    traceback (the parent then reports the child as exited unexpectedly)."""
    try:
        asyncio.run(body)
    except Exception as exc:
        if not _orphaned(parent):
            print(f"demo: {label} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            sys.exit(1)
        # Orphaned, the store may be gone already under us: nothing worth saying.
    if _orphaned(parent):
        remove(name)  # the parent was killed before it could: the last one out cleans up


def _worker(name: str, rate: float, stop: Event, parent: int) -> None:
    _child_setup()

    async def main() -> None:
        async with AsyncStateStore(name=name) as st:
            current = await st.initialize_if_empty()
            period = 1.0 / rate
            next_at = time.monotonic()
            i = 0
            while not stop.is_set() and not _orphaned(parent):
                new_state = _CYCLE[i % 2]
                transition = create_transition(current.state, new_state, f"TICK_{i}")
                candidate = next_snapshot(current, new_state, f"tick {i}", transition)
                context = {**candidate.context_data, "tick": i, "worker_pid": os.getpid()}
                current = await st.set(msgspec.structs.replace(candidate, context_data=context))
                i += 1
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(min(delay, REPORT_EVERY))
                else:
                    next_at = time.monotonic()  # fell behind: do not try to catch up in a burst

    _run_child("fsm-worker", name, parent, main())


def _reader(name: str, index: int, reports: Any, stop: Event, parent: int, *, slow: bool) -> None:
    notices = _child_setup()

    async def main() -> None:
        async with AsyncStateStore(name=name) as st:
            sub = await st.subscribe(f"reader-{index}")
            poller = Store.open(name, FsmSnapshotDTO)
            # Readers that only need the state decode only its head (a projection).
            state = poller.projection(FsmStateView)
            clock = time.perf_counter_ns
            overhead = _timer_overhead(clock)
            changed: list[int] = []
            unchanged: list[int] = []
            projected: list[int] = []
            last: object = None
            received = 0
            subscribed = 0
            reported = time.monotonic()
            next_take = reported
            try:
                while not stop.is_set() and not _orphaned(parent):
                    t0 = clock()
                    value = poller.get()
                    t1 = clock() - overhead
                    # get() returns the very object it returned before while the version is
                    # unchanged: identity tells a cached read from a decoded one.
                    if value is last:
                        unchanged.append(t1 - t0)
                    else:
                        changed.append(t1 - t0)
                        last = value
                        t2 = clock()
                        state.get()
                        projected.append(clock() - overhead - t2)
                    now = time.monotonic()
                    if slow:  # one snapshot per period: the queue fills, the FSM layer drops
                        if now >= next_take and not sub.empty():
                            subscribed = sub.get_nowait().version
                            received += 1
                            next_take = now + SLOW_READER_PERIOD
                    else:
                        while not sub.empty():
                            subscribed = sub.get_nowait().version
                            received += 1
                    if now - reported >= REPORT_EVERY and (changed or unchanged):
                        for samples in (changed, unchanged, projected):
                            samples.sort()
                        reports.put(
                            ReaderReport(
                                reader=index,
                                reads=len(changed) + len(unchanged),
                                changed_p50_ns=_p(changed, 0.5),
                                changed_p99_ns=_p(changed, 0.99),
                                unchanged_p50_ns=_p(unchanged, 0.5),
                                projection_p50_ns=_p(projected, 0.5),
                                # both are FSM versions (the snapshot's own field)
                                lag=max(0, (value.version if value else 0) - subscribed),
                                received=received,
                                notices=notices.count,
                                last_notice=notices.last,
                            )
                        )
                        for samples in (changed, unchanged, projected):
                            samples.clear()
                        received = 0
                        reported = now
                    await asyncio.sleep(0.0002)  # a reader that also does other work
            finally:
                poller.close()

    _run_child(f"reader-{index}", name, parent, main())


# ---------------------------------------------------------------------------- parent


class _Stop(BaseException):
    """The first stop signal in the parent: unwinds to the cleanup path."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED


class _Signals:
    """The parent's signal handling: raise once, then only hurry the cleanup."""

    def __init__(self) -> None:
        self.stopping = False
        self.hurry = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in _SIGNALS:
            # A signal ignored from the start stays ignored: that is how a shell runs a
            # background job (`shmstore demo &` must not stop on the terminal's Ctrl-C).
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            self.hurry = True  # a second Ctrl-C: finish the cleanup faster, never skip it
            return
        self.stopping = True
        raise _Stop(signum)

    @contextlib.contextmanager
    def children_born_deaf(self, *, hup_only: bool = False) -> Iterator[None]:
        """Start processes in here: they begin life ignoring the stop signals, and a signal
        that arrives meanwhile is held for the parent (see the module docstring)."""
        signals = [signal.SIGHUP] if hup_only else _SIGNALS
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            for sig in signals:
                signal.signal(sig, signal.SIG_IGN)
            try:
                yield
            finally:
                for sig in signals:
                    signal.signal(sig, self._handle if sig in self._previous else signal.SIG_IGN)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # pending ones fire now


LEGEND = """\
  What the columns mean (Ctrl-C stops the demo and removes the store):
    reads/s    full Store.get() calls per second by this reader, which polls in a loop
    changed    get() of a version it had not read yet: copy the snapshot out of shared memory
               and decode it. The worker's snapshot carries 100 transitions of history (about
               10 KB), so this is a full msgspec decode of ~100 objects: 10-30 us
    unchanged  get() of the version it read last: the same object comes back, no copy and no
               decode. ~70 ns in a tight loop (benchmarks/core.py); here the reader sleeps
               between reads, so it runs on cold caches: under a microsecond
    projection a changed read of only the snapshot's head (Store.projection(FsmStateView)): the
               history is skipped without being decoded, a fraction of the changed get()
    lag        versions this reader's subscription queue is behind the newest snapshot
    recv/s     snapshots per second its subscription delivered (the commits/s if it keeps up)
    notices    warnings of the FSM layer for this reader since it started: a slow subscriber's
               full queue (64 deep) dropping stale snapshots; --slow-reader makes reader 0 slow
               (20 snapshots a second) to show them"""


def _us(ns: float) -> str:
    if math.isnan(ns):
        return "-"
    return f"{ns / 1000:.2f}us" if ns < 100_000 else f"{ns / 1000:.0f}us"


def _render(
    out: TextIO,
    *,
    name: str,
    elapsed: float,
    seconds: float,
    rate: float,
    st: Store[FsmSnapshotDTO],
    latest: dict[int, ReaderReport],
    readers: int,
    slow_reader: bool,
    clear: bool,
) -> None:
    snap = st.get()
    size = len(msgspec.msgpack.encode(snap)) if snap is not None else 0
    total = f"of {seconds:g} s" if seconds else "(until Ctrl-C)"
    lines = [
        f"shmstore demo -- store {name!r}: 1 FSM worker, {readers} reader process(es) -- "
        f"{elapsed:5.1f} s {total}",
        f"  commits/s {rate:9.0f}   version {st.version:8d}   commits {st.commits:8d}   "
        f"version conflicts {st.app_counters[0]}",
        f"  FSM state {snap.state.name if snap else '-':<12} fsm version "
        f"{snap.version if snap else 0}   snapshot {size / 1000:.1f} KB "
        f"({len(snap.history) if snap else 0} transitions of history)",
        "",
        f"  {'':<10}{'':>9}{'-------- get() p50 (p99) --------':>34}",
        f"  {'reader':<10}{'reads/s':>9}{'changed':>20}{'unchanged':>11}{'projection':>12}"
        f"{'lag':>6}{'recv/s':>8}{'notices':>9}",
    ]
    newest_notice = ""
    for i in range(readers):
        label = f"{i} (slow)" if slow_reader and i == 0 else str(i)
        r = latest.get(i)
        if r is None:
            lines.append(f"  {label:<10}{'(starting)':>9}")
            continue
        changed = f"{_us(r.changed_p50_ns)} ({_us(r.changed_p99_ns)})"
        lines.append(
            f"  {label:<10}{r.reads / REPORT_EVERY:>9.0f}{changed:>20}"
            f"{_us(r.unchanged_p50_ns):>11}{_us(r.projection_p50_ns):>12}{r.lag:>6}"
            f"{r.received / REPORT_EVERY:>8.0f}{r.notices:>9}"
        )
        if r.notices:
            newest_notice = r.last_notice
    lines.append("")
    if newest_notice:
        lines += [f"  newest notice: {newest_notice[:100]}", ""]
    lines.append(LEGEND)
    text = "\n".join(lines)
    if clear:
        out.write("\x1b[H\x1b[2J" + text + "\n")
    else:
        out.write(text + "\n\n")
    out.flush()


def check_options(readers: int, seconds: float, rate: float) -> None:
    """Raise ``ValueError`` (one line) for options the demo cannot run with. ``seconds=0``
    runs until Ctrl-C."""
    if not 1 <= readers <= MAX_READERS:
        raise ValueError(f"readers must be between 1 and {MAX_READERS}, got {readers}")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"seconds must be a positive number or 0 (until Ctrl-C), got {seconds}")
    if not (math.isfinite(rate) and 0 < rate <= MAX_RATE):
        raise ValueError(f"rate must be a number in (0, {MAX_RATE:.0f}], got {rate}")


class _Demo:
    def __init__(
        self, readers: int, seconds: float, rate: float, slow_reader: bool, out: TextIO
    ) -> None:
        self.readers = readers
        self.seconds = seconds
        self.rate = rate
        self.slow_reader = slow_reader
        self.out = out
        self.ctx = mp.get_context("spawn")
        self.name = f"demo-{os.getpid()}"
        self.signals = _Signals()
        self.procs: list[Any] = []
        self.owner: Store[FsmSnapshotDTO] | None = None
        self.stop: Event | None = None
        self.reports: Any = None

    def start(self) -> None:
        # multiprocessing's resource tracker is a process of ours too. It ignores SIGINT and
        # SIGTERM itself, but SIGHUP would kill it, and its successor prints KeyError tracebacks
        # for the names the first one knew: it too must be born ignoring SIGHUP. And it must be
        # running before children_born_deaf(), because starting it unblocks SIGINT and SIGTERM.
        with self.signals.children_born_deaf(hup_only=True):
            resource_tracker.ensure_running()
            self.stop = self.ctx.Event()
            self.reports = self.ctx.Queue()
        parent = os.getpid()
        with self.signals.children_born_deaf():
            self.owner = Store.create(
                self.name,
                FsmSnapshotDTO,
                slots=64,  # the FSM layer's depth; the slots start small and grow as needed
                # Each reader process waits through one registry entry: room for all of them
                # (and for a watching operator), however many were asked for.
                max_readers=max(64, 2 * self.readers + 8),
            )
            children = [
                self.ctx.Process(
                    target=_worker,
                    args=(self.name, self.rate, self.stop, parent),
                    name="fsm-worker",
                )
            ]
            children += [
                self.ctx.Process(
                    target=_reader,
                    args=(self.name, i, self.reports, self.stop, parent),
                    kwargs={"slow": self.slow_reader and i == 0},
                    name=f"reader-{i}",
                )
                for i in range(self.readers)
            ]
            for p in children:
                p.start()
                self.procs.append(p)
        print(
            f"demo: created store {self.name!r}; started a worker and {self.readers} reader(s); "
            "Ctrl-C stops them and removes the store"
            + ("" if self.seconds else " (it runs until then)"),
            file=sys.stderr,
            flush=True,
        )

    def show(self) -> int:
        """Refresh the screen until the time is up; 1 if a child died."""
        owner = self.owner
        assert owner is not None
        latest: dict[int, ReaderReport] = {}
        started = time.monotonic()
        last_tick, last_version = started, owner.version
        end = started + self.seconds if self.seconds else math.inf  # 0: until Ctrl-C
        while (now := time.monotonic()) < end:
            deadline = min(now + REPORT_EVERY, end)
            while (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(queue.Empty):
                    report: ReaderReport = self.reports.get(timeout=left)
                    latest[report.reader] = report
            now = time.monotonic()
            version = owner.version
            commit_rate = (version - last_version) / max(now - last_tick, 1e-9)
            last_tick, last_version = now, version
            _render(
                self.out,
                name=self.name,
                elapsed=now - started,
                seconds=self.seconds,
                rate=commit_rate,
                st=owner,
                latest=latest,
                readers=self.readers,
                slow_reader=self.slow_reader,
                clear=self.out.isatty(),
            )
            dead = [p.name for p in self.procs if p.exitcode not in (None, 0)]
            if dead:
                print(f"demo: {', '.join(dead)} exited unexpectedly", file=sys.stderr)
                return 1
        return 0

    def cleanup(self) -> None:
        """Stop every child, then remove the store. Idempotent; signals only hurry it."""
        self.signals.stopping = True
        if self.stop is not None:
            self.stop.set()
        deadline = time.monotonic() + STOP_GRACE
        for p in self.procs:
            while p.is_alive() and not self.signals.hurry and time.monotonic() < deadline:
                p.join(0.05)
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join()
        if self.owner is not None:  # only a store this run created is removed
            self.owner.close()
            remove(self.name)
        if self.reports is not None:
            self.reports.close()
            self.reports.cancel_join_thread()  # the parent never puts; nothing to flush


def run_demo(
    readers: int = 3,
    seconds: float = DEFAULT_SECONDS,
    rate: float = 1000.0,
    out: TextIO | None = None,
    *,
    slow_reader: bool = False,
) -> int:
    """Run the demo for *seconds* (0: until Ctrl-C); returns the exit status: 0 done, 1 a child
    failed, 130 Ctrl-C, 143 ``SIGTERM``/``SIGHUP``. The store is removed however it ends (see
    the module docstring). *slow_reader* makes reader 0 drain its subscription slowly, so that
    the FSM layer's notices (stale snapshots dropped) appear.

    Call it from the main thread (it handles signals). Raises ``ValueError`` for bad options and
    :class:`StateStoreError` if the store cannot be created.
    """
    check_options(readers, seconds, rate)
    demo = _Demo(readers, seconds, rate, slow_reader, out or sys.stdout)
    demo.signals.install()
    code = EXIT_INTERRUPTED
    try:
        try:
            demo.start()
            code = demo.show()
        except _Stop as stop:
            code = stop.code
        finally:
            # The handler raises at most once, so this loop runs at most twice: a first signal
            # landing exactly as the cleanup begins cannot skip it.
            while True:
                try:
                    demo.cleanup()
                    break
                except _Stop as stop:
                    code = stop.code
    finally:
        demo.signals.restore()
    if demo.owner is not None:
        how = {0: "done", 1: "failed", EXIT_INTERRUPTED: "interrupted"}.get(code, "terminated")
        print(f"demo: {how}; stopped all processes and removed the store", file=sys.stderr)
    return code
