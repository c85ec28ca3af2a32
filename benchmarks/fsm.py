"""The FSM snapshot types: today's dataclass-like DTOs against the plain Structs they replaced.

``shmstore.fsm``'s DTOs behave as frozen dataclasses (issue 12) but stay msgspec Structs on the
wire, normalising only when Python code constructs them. This program checks that the read and
write paths did not pay for it: it measures, in one process and one run, with both type
definitions side by side and their rounds interleaved,

* ``encode``/``decode``  -- msgspec alone on one snapshot,
* ``get() changed``      -- another handle committed since the last read: copy + decode,
* ``set()``              -- encode, validate (decode), commit,
* ``construct``          -- ``FsmSnapshotDTO(...)`` with its history, from Python (informational:
                            this is where the normalisation is paid, once per snapshot the worker
                            makes), also against the worker's original frozen ``@dataclass``es,

for the FSM snapshot with 8 and with 100 history entries. "before" is the Struct definition of
the previous release, copied below verbatim. The issue asks for every read/write path within
1.2x of before. Each figure is the median of all timed calls, timer overhead subtracted.

Run:  python benchmarks/fsm.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
import uuid
from typing import Any

import msgspec

import shmstore
from shmstore import Store
from shmstore.fsm import FsmSnapshotDTO, FsmState, TransitionDTO, TransitionStatus

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core import per_call, timer_overhead  # the same timing as the core benchmark
from values import fsm

LIMIT = 1.2  # issue 12: within 1.2x of today's
GATED = ("encode", "decode", "get() changed", "set()")


# ----------------------------------------------------------------------------- before


def _uuid() -> str:
    return str(uuid.uuid4())


class OldTransitionDTO(msgspec.Struct, frozen=True):
    """One state change of the FSM."""

    from_state: FsmState
    to_state: FsmState
    trigger_event: str
    status: TransitionStatus = TransitionStatus.SUCCESS
    error_message: str = ""
    ts_mono: float = msgspec.field(default_factory=time.monotonic)
    ts_wall: float = msgspec.field(default_factory=time.time)


class OldFsmSnapshotDTO(msgspec.Struct, frozen=True):
    """A versioned, immutable snapshot of the FSM."""

    version: int
    state: FsmState
    reason: str = ""
    ts_mono: float = msgspec.field(default_factory=time.monotonic)
    ts_wall: float = msgspec.field(default_factory=time.time)
    snapshot_id: str = msgspec.field(default_factory=_uuid)
    prev_state: FsmState | None = None
    fsm_instance_id: str = msgspec.field(default_factory=_uuid)
    source_module: str = "fsm_handler"
    attempt_count: int = 0
    history: tuple[OldTransitionDTO, ...] = ()
    context_data: dict[str, Any] = msgspec.field(default_factory=dict)
    state_metadata: dict[str, Any] = msgspec.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataclassTransitionDTO:
    """What the worker's original DTOs were: a frozen dataclass normalising in __post_init__
    (only constructed here, as a reference for the "construct" row)."""

    from_state: FsmState
    to_state: FsmState
    trigger_event: str
    status: TransitionStatus = TransitionStatus.SUCCESS
    error_message: str = ""
    ts_mono: float = 0.0
    ts_wall: float = 0.0

    def __post_init__(self) -> None:
        if not self.ts_mono:
            object.__setattr__(self, "ts_mono", time.monotonic())
        if not self.ts_wall:
            object.__setattr__(self, "ts_wall", time.time())


@dataclasses.dataclass(frozen=True)
class DataclassSnapshotDTO:
    version: int
    state: FsmState
    reason: str = ""
    ts_mono: float = 0.0
    ts_wall: float = 0.0
    snapshot_id: str = ""
    prev_state: FsmState | None = None
    fsm_instance_id: str = ""
    source_module: str = "fsm_handler"
    attempt_count: int = 0
    history: Any = None
    context_data: Any = None
    state_metadata: Any = None

    def __post_init__(self) -> None:
        history = () if self.history is None else tuple(self.history)
        object.__setattr__(self, "history", history)
        if self.context_data is None:
            object.__setattr__(self, "context_data", {})
        if self.state_metadata is None:
            object.__setattr__(self, "state_metadata", {})
        if not self.ts_mono:
            object.__setattr__(self, "ts_mono", time.monotonic())
        if not self.ts_wall:
            object.__setattr__(self, "ts_wall", time.time())
        if not self.snapshot_id:
            object.__setattr__(self, "snapshot_id", _uuid())
        if not self.fsm_instance_id:
            object.__setattr__(self, "fsm_instance_id", _uuid())


# ----------------------------------------------------------------------------- values

KINDS: dict[str, tuple[Any, Any]] = {
    "before": (OldFsmSnapshotDTO, OldTransitionDTO),
    "after": (FsmSnapshotDTO, TransitionDTO),
    "dataclass": (DataclassSnapshotDTO, DataclassTransitionDTO),  # construct only
}


def snapshot(kind: str, i: int, entries: int) -> Any:
    """The same deterministic snapshot (the one every benchmark uses), as either type."""
    snap_t, trans_t = KINDS[kind]
    return fsm(i, entries, snap_t, trans_t)


# ----------------------------------------------------------------------------- timing


class Case:
    """One (kind, history length): its values, a writer and a reader handle on one store."""

    def __init__(self, kind: str, entries: int) -> None:
        self.kind = kind
        snap_t, _ = KINDS[kind]
        self.values = [snapshot(kind, i, entries) for i in range(16)]
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(snap_t)
        self.payload = self.encoder.encode(self.values[0])
        self.name = f"bench-fsm-{os.getpid()}-{kind}-{entries}"
        self.writer = Store.create(self.name, snap_t, slots=8, slot_size=65536)
        self.reader = Store.open(self.name, snap_t)
        self.count = 0
        self.commit_next()
        self.reader.get()
        self.make = lambda: snapshot(kind, 1, entries)
        self.samples: dict[str, list[int]] = {
            op: [] for op in ("encode", "decode", "get() changed", "set()", "construct")
        }

    def commit_next(self) -> None:
        self.count += 1
        self.writer.set(self.values[self.count % 16])

    def measure(self, op: str, calls: int, overhead: int) -> float:
        """Time *op* for *calls* calls; keep the samples, return this batch's median."""
        value, payload = self.values[0], self.payload
        if op == "encode":
            got = per_call(lambda: self.encoder.encode(value), calls, overhead)
        elif op == "decode":
            got = per_call(lambda: self.decoder.decode(payload), calls, overhead)
        elif op == "get() changed":
            got = per_call(self.reader.get, calls, overhead, self.commit_next)
        elif op == "set()":
            got = per_call(self.commit_next, calls, overhead)
        else:
            got = per_call(self.make, max(calls // 10, 1), overhead)
        self.samples[op] += got
        return statistics.median(got)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
        shmstore.remove(self.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2_000, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)

    overhead = timer_overhead()
    print(
        f"shmstore.fsm snapshot benchmark -- Python {sys.version.split()[0]}, "
        f"msgspec {msgspec.__version__}; timer overhead {overhead} ns (subtracted); "
        f"medians of {args.rounds}x{args.calls} calls ({args.calls // 10} for construct); "
        "ratio = median of paired batch ratios"
    )
    cases = {(k, n): Case(k, n) for n in (8, 100) for k in ("before", "after")}
    dataclass_construct: dict[int, list[float]] = {8: [], 100: []}
    ops = list(cases[("before", 8)].samples)
    # Paired batches: each batch of "after" runs right next to a batch of "before" of the same
    # operation (in alternating order), and the ratio reported is the median of the batch ratios,
    # so that load from other processes on a shared machine hits both sides alike.
    paired: dict[tuple[int, str], list[float]] = {(n, op): [] for n in (8, 100) for op in ops}
    try:
        for r in range(args.rounds):
            for n in (8, 100):
                for op in ops:
                    order = ("before", "after") if r % 2 == 0 else ("after", "before")
                    med = {k: cases[(k, n)].measure(op, args.calls, overhead) for k in order}
                    paired[(n, op)].append(med["after"] / med["before"])
                    if op == "construct":
                        got = per_call(
                            functools.partial(snapshot, "dataclass", 1, n),
                            max(args.calls // 10, 1),
                            overhead,
                        )
                        dataclass_construct[n].append(statistics.median(got))
    finally:
        for case in cases.values():
            case.close()

    header = f"{'history':>7} {'bytes':>6}  {'op':<14}{'before':>10}{'after':>10}{'ratio':>8}"
    print()
    print(header)
    print("-" * len(header))
    worst = 0.0
    for n in (8, 100):
        before, after = cases[("before", n)], cases[("after", n)]
        for op in before.samples:
            b = statistics.median(before.samples[op])
            a = statistics.median(after.samples[op])
            ratio = statistics.median(paired[(n, op)])
            note = ""
            if op in GATED:
                worst = max(worst, ratio)
                note = "  ok" if ratio <= LIMIT else f"  OVER {LIMIT}x"
            else:
                note = "  (informational)"
            print(
                f"{n:>7} {len(after.payload):>6}  {op:<14}{_fmt(b):>10}{_fmt(a):>10}"
                f"{ratio:>7.2f}x{note}"
            )
        d = statistics.median(dataclass_construct[n])
        print(
            f"{n:>7} {'':>6}  {'construct, the original frozen @dataclass':<44}{_fmt(d):>10}"
            f"  (after/dataclass {a / d:.2f}x)"
        )
        print()
    verdict = "within" if worst <= LIMIT else "OVER"
    print(f"worst gated ratio {worst:.2f}x: {verdict} the {LIMIT}x limit")
    return 0


def _fmt(ns: float) -> str:
    return f"{ns / 1000:.2f} us" if ns >= 1000 else f"{ns:.0f} ns"


if __name__ == "__main__":
    sys.exit(main())
