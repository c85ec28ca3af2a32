"""Core costs of a Store against msgspec's own encode/decode, measured in one process and one run.

What it measures, per value (small, 80 B; the FSM worker's ``FsmSnapshotDTO`` with 8 transitions
and 8 context keys, ~1.2 KB as MessagePack, and with 100 transitions, ~10.7 KB; 64 KB):

* ``get() unchanged``  -- the version has not moved: one shared-memory load, cached object back.
* ``get() changed``    -- another handle committed since the last read: copy + re-check + decode.
* ``set()``            -- encode, validate (decode), lock, write slot, publish, unlock.
* ``set() exclusive``  -- the same by a handle that keeps the writer lock (``keep_writer_lock``).
* ``projection changed`` -- a changed read of only the snapshot's head fields (``projection``).
* ``encode``/``decode``-- msgspec alone on the same values: the floor every store has to pay. Like
  the store's ops, they cycle through 64 different values: one value decoded over and over lets
  the CPU's branch predictor learn its bytes, which a reader of a changing store never gets.

Every operation is timed per call with ``perf_counter_ns``; the timer's own median cost is measured
first and subtracted. Each time is the median over all calls of all rounds. Each round measures
the floors and then the ops, and a ratio is the median over rounds of op / floor in one round:
this VM's CPU speed drifts within a run, so a floor measured a while before an op does not price
it. The targets of the core issue are printed beside the ratios.

Run:  python benchmarks/core.py [--calls N] [--rounds R] [--cases small,fsm,...] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

import shmstore
from shmstore import Store
from shmstore.fsm import FsmSnapshotDTO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from values import Blob, FsmHead, Small, blob, fsm, fsm100, small

# ----------------------------------------------------------------------------- values

CASES: list[tuple[str, Any, Callable[[int], Any]]] = [
    ("small", Small, small),
    ("fsm", FsmSnapshotDTO, fsm),  # 8 history entries, 8 context keys
    ("fsm100", FsmSnapshotDTO, fsm100),  # 100 history entries, ~10.5 KB
    ("64k", Blob, blob(65_000)),
]
PROJECTIONS = {"fsm": FsmHead, "fsm100": FsmHead}  # cases whose readers may read only the head

# What each op is compared against, and the core issue's targets: (case, op) -> ratio.
BASES = {
    "get() unchanged": "decode",
    "get() changed": "decode",
    "projection changed": "decode",
    "set()": "encode+decode",
    "set() exclusive": "encode+decode",
}
TARGETS = {
    ("small", "get() changed"): 2.5,
    ("fsm", "get() changed"): 1.3,
    ("fsm", "set() exclusive"): 1.5,
    ("fsm100", "projection changed"): 0.3,
}
OPS = (
    "encode",
    "decode",
    "get() unchanged",
    "get() changed",
    "projection changed",
    "set()",
    "set() exclusive",
)


# ----------------------------------------------------------------------------- timing


def timer_overhead(n: int = 200_000) -> int:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        samples.append(clock() - t0)
    return int(statistics.median(samples))


def per_call(
    op: Callable[[], Any], calls: int, overhead: int, before: Callable[[], Any] | None = None
) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        if before is not None:
            before()
        t0 = clock()
        op()
        samples.append(clock() - t0 - overhead)
    return samples


def bench_case(
    label: str, tp: Any, make: Callable[[int], Any], *, calls: int, rounds: int, overhead: int
) -> dict[str, Any]:
    name = f"bench-{os.getpid()}-{label}"
    values = [make(i) for i in range(64)]
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(tp)
    payloads = [encoder.encode(v) for v in values]
    payload = payloads[0]
    samples: dict[str, list[int]] = {k: [] for k in OPS}
    slot_size = max(4096, len(payload) * 2)
    writer = Store.create(name, tp, slots=8, slot_size=slot_size)
    try:
        reader = Store.open(name, tp)
        try:
            counter = iter(range(10**12))
            floor_turn = iter(range(10**12))

            def commit_next() -> None:
                writer.set(values[next(counter) % 64])

            commit_next()
            reader.get()
            head = PROJECTIONS.get(label)
            view = reader.projection(head) if head is not None else None
            # Each round measures the floors and then the ops, and each ratio is the median over
            # rounds of op / floor within one round: this VM's CPU speed drifts by up to 2x
            # within a run, so a floor measured seconds before an op does not price it.
            round_ratios: dict[str, list[float]] = {op: [] for op in BASES}

            def floors() -> dict[str, float]:
                # The floors cycle through the same 64 values the store does: one value encoded
                # or decoded over and over lets the CPU's branch predictor learn its bytes.
                enc = per_call(
                    lambda: encoder.encode(values[next(floor_turn) % 64]), calls, overhead
                )
                dec = per_call(
                    lambda: decoder.decode(payloads[next(floor_turn) % 64]), calls, overhead
                )
                samples["encode"] += enc
                samples["decode"] += dec
                d = statistics.median(dec)
                return {"decode": d, "encode+decode": statistics.median(enc) + d}

            def measure(op: str, fn: Callable[[], Any], floor: dict[str, float], **kw: Any) -> None:
                got = per_call(fn, calls, overhead, **kw)
                samples[op] += got
                round_ratios[op].append(statistics.median(got) / floor[BASES[op]])

            for _ in range(rounds):
                floor = floors()
                measure("get() unchanged", reader.get, floor)
                measure("get() changed", reader.get, floor, before=commit_next)
                if view is not None:
                    measure("projection changed", view.get, floor, before=commit_next)
                measure("set()", lambda: writer.set(values[next(counter) % 64]), floor)
            # The FSM worker's case: one writer that keeps the writer lock.
            exclusive = Store.open(name, tp).keep_writer_lock()
            try:
                for _ in range(rounds):
                    floor = floors()
                    measure(
                        "set() exclusive",
                        lambda: exclusive.set(values[next(counter) % 64]),
                        floor,
                    )
            finally:
                exclusive.close()
        finally:
            reader.close()
    finally:
        writer.close()
        shmstore.remove(name)
    samples = {k: v for k, v in samples.items() if v}
    medians = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {op: statistics.median(r) for op, r in round_ratios.items() if r}
    return {
        "case": label,
        "value_bytes": len(payload),
        "median_ns": medians,
        "p90_ns": {k: statistics.quantiles(v, n=10)[-1] for k, v in samples.items()},
        "ratio": ratios,
        "target": {op: t for (case, op), t in TARGETS.items() if case == label},
    }


def bench_growth(repeats: int) -> dict[str, float]:
    """The cost of one growth: a set() of a 1 MB value into a fresh store created with 4 KiB
    slots (it moves to a ring that holds it), against the same set() into a store already that
    large. Medians over *repeats* fresh stores, in microseconds."""
    value = Blob(1, bytes(1_000_000))
    grow, plain = [], []
    for i in range(repeats):
        for slot_size, out in ((4096, grow), (1 << 20, plain)):
            name = f"bench-{os.getpid()}-grow-{i}-{slot_size}"
            st = Store.create(name, Blob, slots=8, slot_size=slot_size)
            try:
                t0 = time.perf_counter_ns()
                st.set(value)
                out.append((time.perf_counter_ns() - t0) / 1000)
            finally:
                st.close()
                shmstore.remove(name)
    return {"growing set() us": statistics.median(grow), "plain set() us": statistics.median(plain)}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    packages = {}
    for dist in (
        "msgspec",
        "posix_ipc",
        "redis",
        "hiredis",
        "lmdb",
        "UltraDict",
        "pyzmq",
        "iceoryx2",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[dist] = importlib.metadata.version(dist)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "msgspec": msgspec.__version__,
        "shmstore": shmstore.__version__,
        "packages": packages,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5_000, help="timed calls per op and round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--cases", default=",".join(c[0] for c in CASES), help="comma-separated subset of cases"
    )
    args = parser.parse_args(argv)
    wanted = args.cases.split(",")

    info = machine()
    overhead = timer_overhead()
    print(
        f"shmstore core benchmark -- {info['cpu']}, {info['cores']} cores, "
        f"Linux {info['kernel']}, Python {info['python']}, msgspec {info['msgspec']}"
    )
    print(f"timer overhead {overhead} ns (subtracted); medians of {args.rounds}x{args.calls} calls")
    results = []
    for label, tp, make in [c for c in CASES if c[0] in wanted]:
        print(f"  measuring {label} ...", file=sys.stderr, flush=True)
        results.append(
            bench_case(label, tp, make, calls=args.calls, rounds=args.rounds, overhead=overhead)
        )

    header = f"{'case':<7}{'bytes':>7}  {'op':<19}{'median':>10}{'p90':>10}  {'ratio':>6}"
    header += "  of             target"
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        for op in OPS:
            if op not in r["median_ns"]:
                continue
            med, p90 = r["median_ns"][op], r["p90_ns"][op]
            line = f"{r['case']:<7}{r['value_bytes']:>7}  {op:<19}{_fmt(med):>10}{_fmt(p90):>10}"
            if op in r["ratio"]:
                ratio = r["ratio"][op]
                line += f"  {ratio:>5.2f}x  {BASES[op]:<13}"
                if op in r["target"]:
                    target = r["target"][op]
                    verdict = "ok" if ratio <= target else "MISSED"
                    line += f"  target <= {target}x ({verdict})"
            print(line.rstrip())
        print()
    growth = bench_growth(max(3, args.rounds * 4))
    print(
        f"one growth (4 KiB -> 1 MiB slots, 8 slots) with a 1 MB value: set() "
        f"{growth['growing set() us']:.0f} us against {growth['plain set() us']:.0f} us into a "
        f"store already that large (medians over fresh stores; the first set() of a fresh store "
        f"also touches its pages)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": info,
                    "timer_overhead_ns": overhead,
                    "results": results,
                    "growth": growth,
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


def _fmt(ns: float) -> str:
    return f"{ns / 1000:.2f} us" if ns >= 1000 else f"{ns:.0f} ns"


if __name__ == "__main__":
    sys.exit(main())
