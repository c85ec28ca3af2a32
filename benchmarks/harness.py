"""The benchmark harness: shmstore against the systems users would pick instead, in one run.

Every case -- one scenario, one system, one value size -- runs in a fresh subprocess (no warm
caches or leftovers from another case), with a warm-up and several rounds; the figure reported is
the median of the round medians, with the spread of the round medians beside it. Peers that
cannot run here (a package or binary missing) are skipped with the reason printed.

Scenarios:
  read_unchanged  newest value, nothing changed since the last read (per call)
  read_changed    newest value, a writer replaced it just before (per call)
  write           replace the value (per call)
  wake            one-way latency (ping-pong / 2) between two processes carrying the value
  rmw             read-modify-write by 1/2/4 writer processes under contention (per increment,
                  with retries and lost updates)
  fanout          commit until the last of 1/2/4/8 waiting reader processes has it
  throughput      a writer flat out while 2 processes poll and check every value (per commit,
                  with reads/s and torn reads)

Run:  python benchmarks/harness.py [--quick] [--json PATH] [--plots DIR]
      [--scenarios a,b] [--systems x,y] [--sizes 100B,fsm,64KB,1MB]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import placement  # noqa: E402
from core import machine  # noqa: E402
from peers import PEERS, Peer  # noqa: E402
from values import SIZES  # noqa: E402

READ_WRITE = ("read_unchanged", "read_changed", "write")
WAKE_SYSTEMS = ("shmstore", "multiprocessing.Queue", "ZeroMQ ipc", "iceoryx2 event (no payload)")
SCENARIOS = (*READ_WRITE, "wake", "rmw", "fanout", "throughput")
VARIANTS = {"rmw": ("writers", (1, 2, 4)), "fanout": ("readers", (1, 2, 4, 8))}
KEYS = ("writers", "readers")
CASE_TIMEOUT = 300  # seconds; the slowest case takes well under a minute here


# ------------------------------------------------------------ one case (child)


def _timer_overhead() -> int:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(20_000):
        t0 = clock()
        samples.append(clock() - t0)
    return int(statistics.median(samples))


def _rounds(
    op: Callable[[], Any], before: Callable[[], Any] | None, calls: int, rounds: int
) -> list[float]:
    clock = time.perf_counter_ns
    overhead = _timer_overhead()
    for _ in range(max(10, calls // 10)):  # warm-up
        if before:
            before()
        op()
    medians = []
    for _ in range(rounds):
        samples = []
        for _ in range(calls):
            if before:
                before()
            t0 = clock()
            op()
            samples.append(clock() - t0 - overhead)
        medians.append(statistics.median(samples))
    return medians


def run_read_write(case: dict[str, Any]) -> list[float]:
    value_type, make, capacity = SIZES[case["size"]]
    values = [make(i) for i in range(4)]
    peer: Peer = PEERS[case["system"]](value_type, capacity)
    try:
        writer, reader = peer.open_writer(), peer.open_reader()
        try:
            writer.write(values[0])
            reader.read()
            counter = iter(range(10**12))

            def next_value() -> None:
                writer.write(values[next(counter) % 4])

            if case["scenario"] == "read_unchanged":
                return _rounds(reader.read, None, case["calls"], case["rounds"])
            if case["scenario"] == "read_changed":
                return _rounds(reader.read, next_value, case["calls"], case["rounds"])
            return _rounds(next_value, None, case["calls"], case["rounds"])
        finally:
            writer.close()
            reader.close()
    finally:
        peer.close()


def run_wake(case: dict[str, Any]) -> tuple[list[float], dict[str, float]]:
    import wake_peers  # noqa: PLC0415

    medians = wake_peers.run(case["system"], case["size"], case["calls"], case["rounds"])
    return medians, wake_peers.percentiles()


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    if case["scenario"] in ("rmw", "fanout", "throughput"):
        import contention  # noqa: PLC0415

        result: dict[str, Any] = getattr(contention, case["scenario"])(case)
        return result
    extra: dict[str, float] = {}
    if case["scenario"] == "wake":
        medians, extra = run_wake(case)
    else:
        medians = run_read_write(case)
    return {
        **case,
        **extra,
        "median_ns": statistics.median(medians),
        "round_medians_ns": medians,
        "spread_ns": [min(medians), max(medians)],
    }


# ------------------------------------------------------------ the run (parent)


def unavailable(system: str) -> str | None:
    if system in PEERS:
        return PEERS[system].unavailable()
    import wake_peers  # noqa: PLC0415

    return wake_peers.unavailable(system)


def _systems(scenario: str) -> tuple[str, ...]:
    import contention  # noqa: PLC0415

    return {
        "wake": WAKE_SYSTEMS,
        "rmw": contention.RMW_PEERS,
        "fanout": contention.FANOUT_PEERS,
        "throughput": contention.THROUGHPUT_PEERS,
    }.get(scenario, tuple(PEERS))


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cases in the order they run: per scenario and size, every system in turn, and the
    per-call scenarios in ``args.passes`` such passes. This VM's CPU speed drifts by up to 2-3x
    within a run; systems measured minutes apart would compare the drift, not the systems, so
    each figure is the median of its passes, taken seconds from the other systems' passes."""
    calls, rounds = (300, 3) if args.quick else (3000, 5)
    cases = []
    for scenario in args.scenarios:
        key, variants = VARIANTS.get(scenario, ("", (None,)))
        passes = args.passes if scenario in (*READ_WRITE, "wake") else 1
        systems = [s for s in _systems(scenario) if not args.systems or s in args.systems]
        for size in args.sizes:
            n = calls if size in ("100B", "fsm") else max(30, calls // 10)
            if scenario == "wake":
                n = max(50, n // 3)
            if scenario == "fanout":
                n = max(20, n // 10)  # paced 2 ms apart
            for turn in range(passes):
                for system in systems:
                    if system.endswith("(no payload)") and size != args.sizes[0]:
                        continue  # carries nothing: one size says it all
                    for variant in variants:
                        case: dict[str, Any] = {
                            "scenario": scenario,
                            "system": system,
                            "size": size,
                            "calls": n,
                            "rounds": rounds,
                            "pass": turn,
                        }
                        if key:
                            case[key] = variant
                        if scenario == "throughput":
                            case.update(readers=2, seconds=0.5 if args.quick else 2.0)
                        cases.append(case)
    return cases


def merge_passes(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per case over its passes: the median of the pass medians, the percentiles
    of the middle pass, every round median kept."""
    merged: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        if "error" in r:
            continue
        key = tuple((k, v) for k, v in r.items() if k in ("scenario", "system", "size", *KEYS))
        merged.setdefault(key, []).append(r)
    out = []
    for passes in merged.values():
        if len(passes) == 1:
            out.append(passes[0])
            continue
        runs = sorted(passes, key=lambda r: r["median_ns"])
        middle = dict(runs[len(runs) // 2])
        middle["pass_medians_ns"] = [r["median_ns"] for r in runs]
        middle["round_medians_ns"] = [m for r in runs for m in r["round_medians_ns"]]
        middle["spread_ns"] = [runs[0]["median_ns"], runs[-1]["median_ns"]]
        out.append(middle)
    return out


def _row(r: dict[str, Any]) -> str:
    if "writers" in r:
        return f"{r['system']} W={r['writers']}"
    if r["scenario"] == "fanout":
        return f"{r['system']} N={r['readers']}"
    return str(r["system"])


def _cell(r: dict[str, Any], base: float | None) -> str:
    text = _fmt(r["median_ns"])
    if base:
        text += f" ({r['median_ns'] / base:.1f}x)"
    if r["scenario"] == "rmw":
        text += f" r{r['retries']}" + (f" LOST {r['lost_updates']}" if r["lost_updates"] else "")
    if r["scenario"] == "throughput" and r["torn_reads"]:
        text += f" TORN {r['torn_reads']}"
    return text


def _fmt(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e3:.2f} us" if ns >= 1e3 else f"{ns:.0f} ns"


def report(results: list[dict[str, Any]], skipped: dict[str, str], sizes: list[str]) -> None:
    notes = {
        "rmw": " -- rN: CAS retries; LOST: increments lost (must never appear)",
        "throughput": " -- per commit; TORN: reads that returned a torn value",
    }
    for scenario in SCENARIOS:
        rows = [r for r in results if r["scenario"] == scenario]
        if not rows:
            continue
        print(
            f"\n{scenario}: median per operation (x = ratio to shmstore; lower is better)"
            + notes.get(scenario, "")
        )
        print(f"{'system':<30}" + "".join(f"{s:>28}" for s in sizes))
        for label in dict.fromkeys(_row(r) for r in rows):
            variant = (
                label.rsplit(" ", 1)[-1] if label.rsplit(" ", 1)[-1][:2] in ("W=", "N=") else ""
            )
            cells = []
            for size in sizes:
                match = [r for r in rows if _row(r) == label and r["size"] == size]
                base = [
                    r["median_ns"]
                    for r in rows
                    if r["system"] == "shmstore"
                    and r["size"] == size
                    and (not variant or _row(r).endswith(" " + variant))
                ]
                cell = _cell(match[0], base[0] if base else None) if match else "-"
                cells.append(f"{cell:>28}")
            print(f"{label:<30}" + "".join(cells))
        if scenario == "wake":
            for r in rows:
                print(
                    f"  {r['system']:<28} {r['size']:>5}: one-way p50 {_fmt(r['p50_ns'])}, "
                    f"p99 {_fmt(r['p99_ns'])}, p99.9 {_fmt(r['p999_ns'])}"
                )
        if scenario == "throughput":
            for r in rows:
                print(
                    f"  {r['system']:<28} {r['size']:>5}: {r['commits_per_s']:>9.0f} commits/s, "
                    f"{r['reads_per_s']:>9.0f} reads/s by {r['readers']} readers, "
                    f"{r['torn_reads']} torn"
                )
    for system, reason in skipped.items():
        print(f"skipped {system}: {reason}")


def plots(results: list[dict[str, Any]], sizes: list[str], directory: str) -> list[str]:
    """One PNG per scenario: latency vs value size; fan-out vs readers; RMW vs writers;
    throughput as commits per second vs value size."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    os.makedirs(directory, exist_ok=True)
    written = []
    for scenario in SCENARIOS:
        rows = [r for r in results if r["scenario"] == scenario and "error" not in r]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if scenario in VARIANTS:  # x: writers or readers; one line per system and size
            key = VARIANTS[scenario][0]
            for system, size in dict.fromkeys((r["system"], r["size"]) for r in rows):
                pts = sorted(
                    (r[key], r["median_ns"] / 1e3)
                    for r in rows
                    if r["system"] == system and r["size"] == size
                )
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{system}, {size}"
                )
            ax.set_xlabel(f"{key} (processes)")
            ax.set_xticks(VARIANTS[scenario][1])
            ax.set_ylabel("microseconds (median, log scale)")
        else:
            for system in dict.fromkeys(r["system"] for r in rows):
                mine = [r for r in rows if r["system"] == system]
                if scenario == "throughput":
                    pts = sorted((sizes.index(r["size"]), r["commits_per_s"]) for r in mine)
                else:
                    pts = sorted((sizes.index(r["size"]), r["median_ns"] / 1e3) for r in mine)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
            ax.set_xticks(range(len(sizes)), sizes)
            ax.set_ylabel(
                "commits per second while 2 readers poll (log scale)"
                if scenario == "throughput"
                else "microseconds per operation (median, log scale)"
            )
        ax.set_yscale("log")
        ax.set_title(scenario)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        path = os.path.join(directory, f"{scenario}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few calls: a smoke run")
    parser.add_argument("--scenarios", type=lambda s: s.split(","), default=list(SCENARIOS))
    parser.add_argument("--systems", type=lambda s: s.split(","), default=None)
    parser.add_argument(
        "--sizes",
        type=lambda s: s.split(","),
        default=None,
        help="value sizes (default: all; with --quick, 100B and fsm)",
    )
    parser.add_argument(
        "--passes",
        type=int,
        default=None,
        help="passes over the systems of the read, write and wake scenarios (default 3; 1 with "
        "--quick)",
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plots", metavar="DIR")
    parser.add_argument(
        "--replot", metavar="JSON", nargs="+", help="only draw --plots from saved results"
    )
    parser.add_argument("--run-case", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = ["100B", "fsm"] if args.quick and not args.replot else list(SIZES)
    if args.passes is None:
        args.passes = 1 if args.quick else 3

    if args.replot:
        saved = []
        for path in args.replot:
            with open(path) as f:
                saved += json.load(f)["results"]
        for path in plots(saved, args.sizes, args.plots or "."):
            print(f"wrote {path}")
        return 0

    if args.run_case:  # child mode: one case, one JSON line
        print(json.dumps(run_case(json.loads(args.run_case))))
        return 0

    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    unknown += [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown scenario or size: {', '.join(unknown)}")
    info = machine()
    info["wake placement"] = placement.describe()
    print(
        f"shmstore benchmark harness -- {info['cpu']}, {info['cores']} cores, "
        f"Linux {info['kernel']}, Python {info['python']}\n"
        f"wake and fan-out: {info['wake placement']}"
    )
    cases = plan(args)
    skipped: dict[str, str] = {}
    results = []
    started = time.monotonic()
    for i, case in enumerate(cases, 1):
        system = case["system"]
        if system not in skipped and (reason := unavailable(system)):
            skipped[system] = reason
        if system in skipped:
            continue
        label = f"{case['scenario']} / {system} / {case['size']}"
        print(f"  [{i}/{len(cases)}] {label} ...", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--run-case", json.dumps(case)],
                capture_output=True,
                text=True,
                timeout=CASE_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(
                [], 1, "", f"no result within {CASE_TIMEOUT} s (a hang)"
            )
        if proc.returncode != 0:
            # A peer that fails a case (a crash, a hang) is reported as such; the run goes on.
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            print(f"  case failed: {label}: {tail[0]}", file=sys.stderr)
            results.append({**case, "error": tail[0]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ok = merge_passes(results)
    report(ok, skipped, args.sizes)
    print(f"\n{len(ok)} case(s) in {time.monotonic() - started:.0f} s")
    if args.plots:
        for path in plots(ok, args.sizes, args.plots):
            print(f"wrote {path}")
    if args.json:
        with open(args.json, "w") as f:
            failed = [r for r in results if "error" in r]
            json.dump(
                {"machine": info, "results": ok + failed, "skipped": skipped, "passes": results},
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
