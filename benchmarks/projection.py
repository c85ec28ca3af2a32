"""What a projection's decode costs against the full decode, in one process and one run.

For the FSM snapshot with 8 and with 100 history entries, each decoded from ``bytes`` and from a
``memoryview`` (what an in-place read hands the decoder):

* ``full``            -- msgspec's decode of the whole ``FsmSnapshotDTO``: the reference.
* ``plain <P>``       -- msgspec's decode of the same bytes as the projection ``P``: it builds
  only P's fields but still parses (and skips) the rest; an empty Struct shows that floor.
* ``walk <P>``        -- ``projection_decoder(P)``: the prefix walk, then msgspec on the head
  entries only (what ``Store.projection`` reads with).

Each figure is the median over rounds of the mean of a batch of calls; ratios are against
``full`` in the same run. The store-level figure (a changed read, seqlock included) is the
``projection changed`` row of ``benchmarks/core.py``.

Run:  python benchmarks/projection.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from shmstore._projection import projection_decoder
from shmstore.fsm import FsmSnapshotDTO, FsmStateView

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from values import FsmHead, fsm


class Nothing(msgspec.Struct):
    """The floor of skip-parsing: a type with no fields at all."""


def mean_ns(op: Callable[[Any], Any], arg: Any, calls: int, rounds: int) -> float:
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            op(arg)
        means.append((time.perf_counter_ns() - t0) / calls)
    return statistics.median(means)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=2_000, help="calls per timed batch")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"medians of {args.rounds} batches of {args.calls} calls; msgspec {msgspec.__version__}")
    print(f"{'case':8} {'bytes':>6}  {'decode':24} {'bytes in':>10} {'view in':>10}  ratio")
    for entries in (8, 100):
        payload = msgspec.msgpack.encode(fsm(7, entries))
        view = memoryview(bytearray(payload))
        ops: list[tuple[str, Callable[[Any], Any]]] = [
            ("full", msgspec.msgpack.Decoder(FsmSnapshotDTO).decode),
            ("plain Nothing", msgspec.msgpack.Decoder(Nothing).decode),
        ]
        for tp in (FsmHead, FsmStateView):
            plain, walk = msgspec.msgpack.Decoder(tp).decode, projection_decoder(tp)
            assert walk(payload) == walk(view) == plain(payload)
            ops += [(f"plain {tp.__name__}", plain), (f"walk {tp.__name__}", walk)]
        full = 0.0
        for name, op in ops:
            on_bytes = mean_ns(op, payload, args.calls, args.rounds)
            on_view = mean_ns(op, view, args.calls, args.rounds)
            full = full or on_view
            print(
                f"fsm{entries:<5} {len(payload):>6}  {name:24} {on_bytes / 1000:>7.2f} us"
                f" {on_view / 1000:>7.2f} us  {on_view / full:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
