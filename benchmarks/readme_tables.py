"""Print the "Against the alternatives" tables of docs/performance.md from one harness run's JSON.

Those figures (the tables moved from README.md to docs/performance.md; the script keeps its
name) are regenerated from one full run, not edited by hand:

    python benchmarks/harness.py --json benchmarks/results/harness.json --plots benchmarks/results
    python benchmarks/readme_tables.py benchmarks/results/harness.json

Each cell is the median per operation, with the ratio to shmstore in the same column.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SIZES = ("100B", "fsm", "64KB", "1MB")
NAMES = {
    "Redis": "Redis (redis-py + hiredis, loopback)",
    "Manager().dict": "`multiprocessing.Manager().dict`",
    "shared_memory+pickle": "`shared_memory` + pickle (no locking: can tear)",
    "LMDB (tmpfs)": "LMDB on tmpfs",
    "UltraDict": "UltraDict (shared lock)",
    "multiprocessing.Queue": "`multiprocessing.Queue`",
    "ZeroMQ ipc": "ZeroMQ ipc PUB/SUB",
    "iceoryx2 event (no payload)": "iceoryx2 event, no payload (its bindings carry only ctypes)",
}
TITLES = {
    "read_changed": "read newest, **changed** since last read",
    "read_unchanged": "read newest, **unchanged**",
    "write": "**write** (replace the value)",
    "wake": "**wake**: one-way latency carrying the value",
}


def fmt(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.3g} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.3g} us"
    return f"{ns:.0f} ns"


def ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 100 else f"{x:.2g}x"


def simple_table(results: list[dict[str, Any]], scenario: str) -> list[str]:
    rows = [r for r in results if r["scenario"] == scenario and "error" not in r]
    if not rows:
        return []
    base = {r["size"]: r["median_ns"] for r in rows if r["system"] == "shmstore"}
    out = [f"| {TITLES[scenario]} | " + " | ".join(SIZES) + " |", "|---|" + "---:|" * len(SIZES)]
    for system in dict.fromkeys(r["system"] for r in rows):
        cells = []
        for size in SIZES:
            got = [r for r in rows if r["system"] == system and r["size"] == size]
            if not got:
                cells.append("")
                continue
            ns = got[0]["median_ns"]
            cell = fmt(ns)
            if system != "shmstore" and base.get(size):
                cell += f" ({ratio(ns / base[size])})"
            cells.append(cell)
        out.append(f"| {NAMES.get(system, system)} | " + " | ".join(cells) + " |")
    return out


def rmw_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["scenario"] == "rmw" and "error" not in r]
    if not rows:
        return []
    writers = sorted({r["writers"] for r in rows})
    label = " / ".join(str(w) for w in writers)
    out = ["| RMW, per increment | " + " | ".join(SIZES) + " |", "|---|" + "---:|" * len(SIZES)]
    for system in dict.fromkeys(r["system"] for r in rows):
        cells = []
        for size in SIZES:
            got = {r["writers"]: r for r in rows if r["system"] == system and r["size"] == size}
            cells.append(" / ".join(fmt(got[w]["median_ns"]) for w in writers if w in got))
        out.append(f"| {NAMES.get(system, system)} W={label} | " + " | ".join(cells) + " |")
    lost: dict[str, int] = {}
    for r in rows:
        lost[r["system"]] = lost.get(r["system"], 0) + r["lost_updates"]
    retries = {
        (r["system"], r["size"], r["writers"]): r["retries"]
        for r in rows
        if r["system"] == "shmstore"
    }
    out.append("")
    out.append(
        "Lost updates: "
        + ", ".join(f"{system} {n}" for system, n in lost.items())
        + ". shmstore's CAS retries at W=4: "
        + ", ".join(f"{s} {retries.get(('shmstore', s, 4), '-')}" for s in SIZES)
        + "."
    )
    return out


def fanout_line(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["scenario"] == "fanout" and "error" not in r]
    out = []
    for size in SIZES:
        parts = []
        for system in dict.fromkeys(r["system"] for r in rows):
            got = sorted(
                (r["readers"], r["median_ns"])
                for r in rows
                if r["system"] == system and r["size"] == size
            )
            if got:
                n = " / ".join(str(g[0]) for g in got)
                parts.append(f"{system} " + " / ".join(fmt(g[1]) for g in got) + f" (N = {n})")
        if parts:
            out.append(f"- {size}: " + "; ".join(parts))
    return out


def throughput_line(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["scenario"] == "throughput" and "error" not in r]
    out = []
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = {r["size"]: r for r in rows if r["system"] == system}
        commits = " / ".join(
            f"{mine[s]['commits_per_s'] / 1e3:.0f}k" if s in mine else "-" for s in SIZES
        )
        torn = " / ".join(str(mine[s]["torn_reads"]) if s in mine else "-" for s in SIZES)
        reads = mine["100B"]["reads_per_s"] / 1e6 if "100B" in mine else 0
        out.append(
            f"- {system}: {commits} commits/s; torn reads {torn}; {reads:.1f} M reads/s at 100 B"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", help="the harness's --json output")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        run = json.load(f)
    results = run["results"]
    m = run["machine"]
    print(
        f"<!-- from {args.json}: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
        f"Python {m['python']}; wake and fan-out: {m.get('wake placement', 'not recorded')} -->"
    )
    for scenario in ("read_changed", "read_unchanged", "write", "wake"):
        lines = simple_table(results, scenario)
        if lines:
            print("\n".join(lines) + "\n")
    print("\n".join(rmw_table(results)) + "\n")
    print("Fan-out, p50 until the last reader has the value:")
    print("\n".join(fanout_line(results)) + "\n")
    print("Throughput (size columns 100B / fsm / 64KB / 1MB):")
    print("\n".join(throughput_line(results)))
    for system, reason in run.get("skipped", {}).items():
        print(f"skipped {system}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
