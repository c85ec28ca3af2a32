"""``python -m shmstore demo``: an FSM worker and reader processes sharing one store, live.

One worker process drives FSM transitions through ``shmstore.fsm.AsyncStateStore`` at a fixed
rate. Each reader process subscribes to the same store (an ``asyncio.Queue`` fed across
processes) and polls its state with a projection (``Store.projection(FsmStateView)``: the
snapshot's head, decoded without its history), timing every read. Once per refresh the readers
report to the parent, which prints one screen: commits per second, per-reader read latency, how
far each subscription lags the writer, and the store's counters.

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
import statistics
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

REPORT_EVERY = 0.5
MAX_RATE = 1_000_000.0  # far beyond what one worker can commit; a bound that catches typos
MAX_READERS = 256  # processes: a bound that keeps a typo from being a fork bomb
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
STOP_GRACE = 5.0  # seconds the children get to finish after the stop event
_CYCLE = (FsmState.IDLE, FsmState.ACTIVE)
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@dataclass(frozen=True)
class ReaderReport:
    reader: int
    reads: int
    p50_ns: float
    p99_ns: float
    lag: int  # versions the subscription was behind the store when reporting
    received: int
    notices: int  # log records of the FSM layer in this interval (drops, lag)
    last_notice: str


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


def _reader(name: str, index: int, reports: Any, stop: Event, parent: int) -> None:
    notices = _child_setup()

    async def main() -> None:
        async with AsyncStateStore(name=name) as st:
            sub = await st.subscribe(f"reader-{index}")
            poller = Store.open(name, FsmSnapshotDTO)
            # Readers that only need the state decode only its head (a projection).
            state = poller.projection(FsmStateView)
            clock = time.perf_counter_ns
            latencies: list[int] = []
            received = 0
            subscribed = 0
            reported = time.monotonic()
            seen_notices = 0
            try:
                while not stop.is_set() and not _orphaned(parent):
                    t0 = clock()
                    state.get()
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
                                notices=notices.count - seen_notices,
                                last_notice=notices.last,
                            )
                        )
                        seen_notices = notices.count
                        latencies.clear()
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
        f"  {'reader':<8}{'reads/s':>10}{'get p50':>10}{'get p99':>10}{'lag':>6}{'recv/s':>9}"
        f"{'notices':>9}",
    ]
    newest_notice = ""
    for i in range(readers):
        r = latest.get(i)
        if r is None:
            lines.append(f"  {i:<8}{'(starting)':>10}")
            continue
        lines.append(
            f"  {i:<8}{r.reads / REPORT_EVERY:>10.0f}{r.p50_ns / 1000:>8.2f}us"
            f"{r.p99_ns / 1000:>8.2f}us{r.lag:>6}{r.received / REPORT_EVERY:>9.0f}{r.notices:>9}"
        )
        if r.notices:
            newest_notice = r.last_notice
    if newest_notice:
        lines += ["", f"  newest notice: {newest_notice[:100]}"]
    text = "\n".join(lines)
    if clear:
        out.write("\x1b[H\x1b[2J" + text + "\n")
    else:
        out.write(text + "\n\n")
    out.flush()


def check_options(readers: int, seconds: float, rate: float) -> None:
    """Raise ``ValueError`` (one line) for options the demo cannot run with."""
    if not 1 <= readers <= MAX_READERS:
        raise ValueError(f"readers must be between 1 and {MAX_READERS}, got {readers}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds must be a positive number, got {seconds}")
    if not (math.isfinite(rate) and 0 < rate <= MAX_RATE):
        raise ValueError(f"rate must be a number in (0, {MAX_RATE:.0f}], got {rate}")


class _Demo:
    def __init__(self, readers: int, seconds: float, rate: float, out: TextIO) -> None:
        self.readers = readers
        self.seconds = seconds
        self.rate = rate
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
                    name=f"reader-{i}",
                )
                for i in range(self.readers)
            ]
            for p in children:
                p.start()
                self.procs.append(p)
        print(
            f"demo: created store {self.name!r}; started a worker and {self.readers} reader(s); "
            "Ctrl-C stops them and removes the store",
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
        while (now := time.monotonic()) - started < self.seconds:
            deadline = min(now + REPORT_EVERY, started + self.seconds)
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
                rate=commit_rate,
                st=owner,
                latest=latest,
                readers=self.readers,
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
    readers: int = 3, seconds: float = 5.0, rate: float = 1000.0, out: TextIO | None = None
) -> int:
    """Run the demo; returns the exit status: 0 done, 1 a child failed, 130 Ctrl-C, 143
    ``SIGTERM``/``SIGHUP``. The store is removed however it ends (see the module docstring).

    Call it from the main thread (it handles signals). Raises ``ValueError`` for bad options and
    :class:`StateStoreError` if the store cannot be created.
    """
    check_options(readers, seconds, rate)
    demo = _Demo(readers, seconds, rate, out or sys.stdout)
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
