"""Instructions per store operation, counted by callgrind: the before/after guard rail.

Wall-clock figures on a VM drift by up to 3x within minutes; instruction counts do not (the same
binary, inputs and environment give the same count whatever else the machine does). So a change
that touches a hot path is judged by this script, run on the old tree and on the new one:

    python benchmarks/instructions.py            # every operation, a table and JSON
    python benchmarks/instructions.py --json out.json

Each operation runs in a fresh interpreter under ``valgrind --tool=callgrind`` twice, with N and
2N iterations; the difference divided by N is the cost of one iteration, start-up and set-up
excluded. ``PYTHONHASHSEED=0`` fixes dict and set layouts. Operations (an 80-byte Struct cycling
through 64 values, as ``core.py`` does; ``fsm`` rows use the FSM snapshot of ``benchmarks/fsm.py``):

- ``unchanged_get``: ``get()`` while the version stays the same (one load and a compare);
- ``set``: ``set()`` with the writer lock taken per commit, nobody waiting;
- ``exclusive_set``: ``set()`` of a handle that keeps the writer lock;
- ``changed_get``: a ``set()`` by one handle then ``get()`` by another, minus ``set``;
- ``wait_post``: two threads ping-pong over two stores (``wait(spin=False)`` then ``set()``);
  one hop minus one ``set``: the wake-up machinery on both sides (post, sleep, wake, re-check).

Needs valgrind (Debian: ``apt-get install valgrind``). Counts are for this interpreter and
msgspec build; compare only runs on the same machine image.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

from shmstore import Store, remove
from shmstore.fsm import FsmSnapshotDTO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from values import Small, fsm, small

OPERATIONS = (
    "unchanged_get",
    "set",
    "exclusive_set",
    "set_get",
    "set_fsm",
    "set_get_fsm",
    "ping_pong",
)


def _values(op: str) -> tuple[Any, list[Any]]:
    """The values ``core.py`` uses: 64 different ones, so no decode is learned by heart."""
    if op.endswith("_fsm"):
        return FsmSnapshotDTO, [fsm(i) for i in range(64)]
    return Small, [small(i) for i in range(64)]


def _run(op: str, n: int) -> None:
    """The body measured under callgrind: set-up, then *n* iterations of *op*."""
    name = f"instr-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    kind, values = _values(op)
    writer = Store.create(name, kind, slots=8, slot_size=64 * 1024)
    reader = Store.open(name, kind)
    try:
        writer.set(values[0])
        reader.get()
        if op == "unchanged_get":
            get = reader.get
            for _ in range(n):
                get()
        elif op in ("set", "set_fsm"):
            put = writer.set
            for i in range(n):
                put(values[i & 63])
        elif op == "exclusive_set":
            writer.keep_writer_lock()
            put = writer.set
            for i in range(n):
                put(values[i & 63])
        elif op in ("set_get", "set_get_fsm"):
            put, get = writer.set, reader.get
            for i in range(n):
                put(values[i & 63])
                get()
        elif op == "ping_pong":
            _ping_pong(name, kind, values, n)
        else:
            raise SystemExit(f"unknown operation {op!r}")
    finally:
        reader.close()
        writer.close()
        remove(name)


def _ping_pong(name: str, kind: Any, values: list[Any], n: int) -> None:
    """*n* hops: thread A commits to ``ping`` and waits on ``pong``; thread B the reverse."""
    pong_name = name + "-pong"
    ping_w = Store.open(name, kind)
    ping_r = Store.open(name, kind)
    pong_w = Store.create(pong_name, kind, slots=8, slot_size=64 * 1024)
    pong_r = Store.open(pong_name, kind)
    rounds = n // 2
    try:
        start_ping, start_pong = ping_r.version, pong_r.version

        def answer() -> None:
            seen = start_ping
            for i in range(rounds):
                seen = ping_r.wait(seen, spin=False)
                pong_w.set(values[i & 63])

        peer = threading.Thread(target=answer)
        peer.start()
        seen = start_pong
        for i in range(rounds):
            ping_w.set(values[i & 63])
            seen = pong_r.wait(seen, spin=False)
        peer.join()
    finally:
        for handle in (ping_w, ping_r, pong_w, pong_r):
            handle.close()
        remove(pong_name)


def _count(op: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out",
                sys.executable,
                __file__,
                "--run",
                op,
                str(n),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode or not found:
        raise SystemExit(f"{op} x{n} failed under callgrind:\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def measure(n: int) -> dict[str, float]:
    per: dict[str, float] = {}
    for op in OPERATIONS:
        once, twice = _count(op, n), _count(op, 2 * n)
        per[op] = (twice - once) / n
        print(f"  {op:14} {per[op]:10,.0f}", file=sys.stderr)
    return {
        "unchanged_get": per["unchanged_get"],
        "changed_get": per["set_get"] - per["set"],
        "set": per["set"],
        "exclusive_set": per["exclusive_set"],
        "changed_get_fsm": per["set_get_fsm"] - per["set_fsm"],
        "set_fsm": per["set_fsm"],
        # one hop = one set() with a waiter to post + one wait() that sleeps and wakes
        "wait_post": per["ping_pong"] - per["set"],
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--run":
        _run(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="iterations of the shorter run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures = measure(args.n)
    print(f"{'operation':16} {'instructions':>12}")
    for key, value in figures.items():
        print(f"{key:16} {value:12,.0f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
