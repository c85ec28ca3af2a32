"""Wake-up latency between processes: shmstore against its peers, measured in one run.

What it measures:

* **one-way latency** = round trip / 2 of a ping-pong between two processes, p50/p99/p99.9:
  - ``shmstore``: ``ping.set(i)`` -> the echo process's ``ping.wait()`` -> ``pong.set(i)`` ->
    our ``pong.wait()``; a full commit and a wake-up each way. Back-to-back waits are short, so
    ``wait()`` spins briefly before sleeping (see ``shmstore/_waiting.py``);
  - ``shmstore spin=False``: the same, always sleeping on the semaphore;
  - ``shmstore spin=False, excl.``: the same with each store's one writer its exclusive writer
    (``keep_writer_lock()``: commits skip the writer lock);
  - ``multiprocessing.Queue``: ``put`` / ``get`` each way;
  - ``posix_ipc semaphore``: ``release`` / ``acquire`` each way, the floor under shmstore's wake-up;
  - ``posix_ipc semaphore + set()``: the same, each side committing to a store of its own (which
    nobody waits on) before it posts: the commit's cost without shmstore's wake-up machinery (the
    registry's post loop, the waiting side's bookkeeping). ``shmstore spin=False`` minus this row
    is what that machinery costs;
  - ``wait_any over N`` (N = 1, 8, 64): the echo process waits with ``shmstore.wait_any`` over
    N stores, of which we commit to one; both sides sleep, so compare it with
    ``shmstore spin=False`` (``Store.wait`` on that store alone). ``wait_any`` registers with
    every store on each call and gives the registrations back before it returns, so this row
    includes that per-call cost (fewer round trips: ``--any-rounds``);
  - ``WaitSet over N``: the same with one ``shmstore.WaitSet`` kept for every round (registered
    once), ``spin=False``; the target is ``shmstore spin=False``'s p50 within ~1.2x at N = 1 and
    8. ``WaitSet over 8, spinning``: both sides spin first; compare with ``shmstore``.
* **paced wake-up** (``wait_any``, ``WaitSet``): one commit every 20 ms, so that the waiter is
  asleep and registered each time; the time from just before ``set()`` until the waiting call
  has returned in the other process (CLOCK_MONOTONIC is system-wide), for
  ``Store.wait(spin=False)`` alone and ``wait_any`` and a kept ``WaitSet`` over 1, 8 and 64
  stores, the rows taken in blocks in turn like the ping-pong. Committer on CPU 0, waiter on
  CPU 1.
* **same run**: the ping-pong rounds are taken in blocks (``--blocks``), every peer in turn, so
  that the machine's drifting speed weighs on all peers alike;
* **placement**: each ping-pong runs twice, its two processes pinned to different CPUs
  ("split") and to the same CPU ("same"), because placement dominates wake-up latency.
* **fan-out**: one writer, N reader processes blocked in ``wait()``; the time from just before
  ``set()`` until the *last* reader has returned from ``wait()`` with the new version
  (CLOCK_MONOTONIC is system-wide, so the readers' timestamps compare with the writer's). Commits
  are paced so that every reader is asleep again before the next one. The writer runs on CPU 0,
  its readers share CPU 1 (``placement``).

Run:  python benchmarks/wake.py [--rounds N] [--any-rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import posix_ipc

import shmstore
from shmstore import Store

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core import machine
from pingpong import ping_pong, quantiles, start_echo
from placement import MEASURER_CPU, PEER_CPU, pin, start_on_peer_cpu

ctx = mp.get_context("spawn")

# Where the two processes of a ping-pong run: CPU placement dominates every wake-up figure (a
# semaphore ping-pong between two CPUs costs several times one within a CPU), so it is pinned
# and stated. "split": parent on CPU 0, echo on CPU 1; "same": both on CPU 0.
PLACEMENTS = {"split": (0, 1), "same": (0, 0)}
ANY_STORES = (1, 8, 64)  # wait_any rows: over this many stores, one of which commits
ANY_PACE = 0.02  # s between paced commits: time for the waiter to register with 64 stores
_placement: tuple[int, int] | None = None


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        pin(cpu)


def _echo_cpu() -> int | None:
    return None if _placement is None else _placement[1]


# ----------------------------------------------------------------------------- ping-pong peers


def _store_echo(ping: str, pong: str, rounds: int, spin: bool, exclusive: bool) -> None:
    a, b = Store.open(ping, int), Store.open(pong, int)
    if exclusive:
        b.keep_writer_lock()
    version = 0
    for _ in range(rounds):
        version = a.wait(version, timeout=30, spin=spin)
        b.set(version)
    a.close()
    b.close()


def pingpong_store(rounds: int, spin: bool = True, exclusive: bool = False) -> list[float]:
    ping, pong = f"bench-ping-{os.getpid()}", f"bench-pong-{os.getpid()}"
    a, b = Store.create(ping, int), Store.create(pong, int)
    if exclusive:
        a.keep_writer_lock()

    def round_trip(i: int) -> None:
        a.set(i)
        b.wait(i - 1, timeout=30, spin=spin)

    try:
        return ping_pong(
            _store_echo,
            (ping, pong, rounds, spin, exclusive),
            round_trip,
            range(1, rounds + 1),
            cpu=_echo_cpu(),
        )
    finally:
        a.close()
        b.close()
        shmstore.remove(ping)
        shmstore.remove(pong)


def _any_echo(pings: list[str], pong: str, rounds: int, reuse: bool, spin: bool) -> None:
    stores = [Store.open(name, int) for name in pings]
    b = Store.open(pong, int)
    seen = dict.fromkeys(stores, 0)
    with shmstore.WaitSet(stores) as waiting:
        for _ in range(rounds):
            if reuse:
                moved = waiting.wait(seen, timeout=30, spin=spin)
            else:
                moved = shmstore.wait_any(seen, timeout=30)
            seen.update(moved)
            b.set(max(moved.values()))
    for st in [*stores, b]:
        st.close()


def pingpong_wait_any(
    rounds: int, stores: int, reuse: bool = False, spin: bool = False
) -> list[float]:
    """The echo waits with ``wait_any`` (or, *reuse*, one ``WaitSet`` kept for all rounds) over
    *stores* stores, of which we commit to one (the last it registers with). Without *spin*
    both sides sleep (``wait_any`` never spins), so the row to compare with is
    ``shmstore spin=False``; with it (a WaitSet only) both spin first, like ``shmstore``."""
    pings = [f"bench-any-{os.getpid()}-{i}" for i in range(stores)]
    pong = f"bench-any-pong-{os.getpid()}"
    handles = [Store.create(name, int) for name in pings]
    a, b = handles[-1], Store.create(pong, int)

    def round_trip(i: int) -> None:
        a.set(i)
        b.wait(i - 1, timeout=30, spin=spin)

    try:
        return ping_pong(
            _any_echo,
            (pings, pong, rounds, reuse, spin),
            round_trip,
            range(1, rounds + 1),
            cpu=_echo_cpu(),
        )
    finally:
        for st in [*handles, b]:
            st.close()
            shmstore.remove(st.name)


def _queue_echo(q_in: Any, q_out: Any, rounds: int) -> None:
    for _ in range(rounds):
        q_out.put(q_in.get())


def pingpong_queue(rounds: int) -> list[float]:
    q_in, q_out = ctx.Queue(), ctx.Queue()

    def round_trip(i: int) -> None:
        q_in.put(i)
        q_out.get()

    return ping_pong(_queue_echo, (q_in, q_out, rounds), round_trip, range(rounds), cpu=_echo_cpu())


def _sem_echo(name_a: str, name_b: str, rounds: int, store: str | None) -> None:
    a, b = posix_ipc.Semaphore(name_a), posix_ipc.Semaphore(name_b)
    st = None if store is None else Store.open(store, int)
    for i in range(rounds):
        a.acquire()
        if st is not None:
            st.set(i)
        b.release()
    if st is not None:
        st.close()
    a.close()
    b.close()


def pingpong_semaphore(rounds: int, commit: bool = False) -> list[float]:
    """Raw semaphores; with *commit*, each side first commits to its own store, as shmstore's
    ping-pong does, but nobody waits on those stores (the writer posts no reader)."""
    name_a, name_b = f"/bench-sa-{os.getpid()}", f"/bench-sb-{os.getpid()}"
    ours_name, theirs_name = f"bench-sc-{os.getpid()}", f"bench-sd-{os.getpid()}"
    a = posix_ipc.Semaphore(name_a, posix_ipc.O_CREX)
    b = posix_ipc.Semaphore(name_b, posix_ipc.O_CREX)
    ours = Store.create(ours_name, int) if commit else None
    theirs = Store.create(theirs_name, int) if commit else None

    def round_trip(i: int) -> None:
        if ours is not None:
            ours.set(i)
        a.release()
        b.acquire()

    try:
        return ping_pong(
            _sem_echo,
            (name_a, name_b, rounds, theirs_name if commit else None),
            round_trip,
            range(rounds),
            cpu=_echo_cpu(),
        )
    finally:
        for sem in (a, b):
            sem.unlink()
            sem.close()
        for st in (ours, theirs):
            if st is not None:
                st.close()
                shmstore.remove(st.name)


# ----------------------------------------------------------------------------- paced wake-ups


def _paced_waiter(names: list[str], commits: int, results: Any, how: str) -> None:
    stores = [Store.open(name, int) for name in names]
    target = stores[-1]
    clock = time.perf_counter_ns
    woke: dict[int, int] = {}
    seen = dict.fromkeys(stores, 0)
    version = 0
    with shmstore.WaitSet(stores) as waiting:
        if how == "WaitSet":
            # Registered before the first commit, like Store.wait after its first wait.
            with contextlib.suppress(TimeoutError):
                waiting.wait(seen, timeout=0.001)
        while version < commits:
            if how == "Store.wait":
                version = target.wait(version, timeout=30, spin=False)
            else:
                wait = waiting.wait if how == "WaitSet" else shmstore.wait_any
                moved = wait(seen, timeout=30)
                seen.update(moved)
                version = moved.get(target, version)
            woke[version] = clock()
    for st in stores:
        st.close()
    results.put(woke)


def paced_wake(stores: int, commits: int, pace: float, how: str = "wait_any") -> list[float]:
    """Commit to one store every *pace* seconds, so that the waiter is asleep (registered)
    each time; the time from just before ``set()`` until the waiting process has returned.
    ``stores=0``: ``Store.wait(spin=False)`` on that store alone; else *how* (``"wait_any"``,
    whose return includes giving the registrations back, or ``"WaitSet"``, one kept for all
    commits) over *stores* stores."""
    count = max(stores, 1)
    names = [f"bench-paced-{os.getpid()}-{i}" for i in range(count)]
    handles = [Store.create(name, int) for name in names]
    target = handles[-1]
    try:
        results = ctx.Queue()
        pin(MEASURER_CPU)
        how = how if stores else "Store.wait"
        waiter = start_echo(_paced_waiter, (names, commits, results, how), PEER_CPU)
        deadline = time.monotonic() + 60
        while target.statistics().readers_registered < 1:  # the waiter is up and asleep
            if time.monotonic() > deadline:
                raise RuntimeError(f"paced waiter did not start (exit code {waiter.exitcode})")
            time.sleep(0.01)
        clock = time.perf_counter_ns
        sent: dict[int, int] = {}
        for i in range(1, commits + 1):
            time.sleep(pace)  # the waiter is back asleep, registered with every store
            sent[i] = clock()
            target.set(i)
        woke = results.get(timeout=60)
        waiter.join(60)
        return [float(woke[v] - t0) for v, t0 in sent.items() if v in woke]
    finally:
        for st in handles:
            st.close()
            shmstore.remove(st.name)


# ----------------------------------------------------------------------------- fan-out


def _fan_reader(name: str, commits: int, results: Any, ready: Any) -> None:
    st = Store.open(name, int)
    with __import__("contextlib").suppress(TimeoutError):
        st.wait(0, timeout=0.001)  # register before the writer starts
    ready.release()
    clock = time.perf_counter_ns
    woke: dict[int, int] = {}
    version = 0
    while version < commits:
        version = st.wait(version, timeout=30)
        woke[version] = clock()
    st.close()
    results.put(woke)


def fanout(readers: int, commits: int, pace: float) -> list[int]:
    name = f"bench-fan-{os.getpid()}-{readers}"
    st = Store.create(name, int, max_readers=max(readers, 1))
    try:
        results = ctx.Queue()
        ready = ctx.Semaphore(0)
        procs = [
            ctx.Process(target=_fan_reader, args=(name, commits, results, ready))
            for _ in range(readers)
        ]
        pin(MEASURER_CPU)  # the writer; the readers share the other CPU (see placement)
        for p in procs:
            start_on_peer_cpu(p)
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise RuntimeError(
                    f"fan-out readers did not start: exit codes {[p.exitcode for p in procs]}"
                )
        clock = time.perf_counter_ns
        sent: dict[int, int] = {}
        for i in range(1, commits + 1):
            time.sleep(pace)  # let every reader go back to sleep: we measure wake-ups
            sent[i] = clock()
            st.set(i)
        woke = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
        # A reader that was still busy may skip a version; count a version only if all saw it.
        return [max(w[v] for w in woke) - t0 for v, t0 in sent.items() if all(v in w for w in woke)]
    finally:
        st.close()
        shmstore.remove(name)


# ----------------------------------------------------------------------------- main


def _fmt(ns: float) -> str:
    return f"{ns / 1000:.1f} us"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20_000, help="ping-pong round trips")
    parser.add_argument(
        "--blocks", type=int, default=5, help="ping-pong rounds are taken in this many blocks"
    )
    parser.add_argument(
        "--any-rounds",
        type=int,
        default=5_000,
        help="ping-pong round trips of each wait_any row (it registers with every store on "
        "every call: the 64-store row is slow)",
    )
    parser.add_argument("--any-commits", type=int, default=400, help="paced commits per row")
    parser.add_argument("--fanout-commits", type=int, default=400)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    info = machine()
    print(
        f"shmstore wake-up benchmark -- {info['cpu']}, {info['cores']} cores, "
        f"Linux {info['kernel']}, Python {info['python']}"
    )
    # (label, run, round trips in all): the wait_any rows take fewer, see --any-rounds.
    peers: list[tuple[str, Callable[[int], list[float]], int]] = [
        ("shmstore", pingpong_store, args.rounds),
        ("shmstore spin=False", lambda rounds: pingpong_store(rounds, spin=False), args.rounds),
        (
            "shmstore spin=False, excl.",
            lambda rounds: pingpong_store(rounds, spin=False, exclusive=True),
            args.rounds,
        ),
        ("multiprocessing.Queue", pingpong_queue, args.rounds),
        ("posix_ipc semaphore", pingpong_semaphore, args.rounds),
        (
            "posix_ipc semaphore + set()",
            lambda rounds: pingpong_semaphore(rounds, commit=True),
            args.rounds,
        ),
        *[
            (f"wait_any over {n}", functools.partial(pingpong_wait_any, stores=n), args.any_rounds)
            for n in ANY_STORES
        ],
        *[
            (
                f"WaitSet over {n}",
                functools.partial(pingpong_wait_any, stores=n, reuse=True),
                args.rounds,
            )
            for n in ANY_STORES
        ],
        (
            "WaitSet over 8, spinning",
            functools.partial(pingpong_wait_any, stores=8, reuse=True, spin=True),
            args.rounds,
        ),
    ]
    global _placement
    placements = list(PLACEMENTS) if (os.cpu_count() or 1) > 1 else ["same"]
    pingpong: dict[str, dict[str, dict[str, float]]] = {}
    for where in placements:
        _placement = PLACEMENTS[where]
        _pin(_placement[0])
        for label, run, total in peers:
            print(f"  ping-pong {label} ({where}): warm-up ...", file=sys.stderr, flush=True)
            run(min(1000, total))  # in a separate pair of processes
        # The VM's speed drifts (other tenants, the host): peers measured one after the other
        # would compare different machines. So the rounds are taken in blocks, the peers in
        # turn, and each peer's quantiles come from all of its blocks.
        samples: dict[str, list[float]] = {label: [] for label, _run, _total in peers}
        for block in range(args.blocks):
            print(f"  ping-pong ({where}): block {block + 1}/{args.blocks}", file=sys.stderr)
            for label, run, total in peers:
                samples[label] += run(max(1, total // args.blocks))
        pingpong[where] = {label: quantiles(got) for label, got in samples.items()}
    _placement = None
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))

    for where, results in pingpong.items():
        cpus = PLACEMENTS[where]
        print(
            f"\none-way latency (round trip / 2), {args.rounds} round trips in {args.blocks} "
            "blocks, peers in turn, "
            f"processes on CPUs {cpus[0]} and {cpus[1]} ({where})"
        )
        print(f"{'system':<30}{'p50':>10}{'p99':>10}{'p99.9':>10}  p50 vs raw semaphore")
        base = results["posix_ipc semaphore"]["p50"]
        for label, q in results.items():
            print(
                f"{label:<30}{_fmt(q['p50']):>10}{_fmt(q['p99']):>10}{_fmt(q['p99.9']):>10}"
                f"  {q['p50'] / base:.2f}x"
            )
        sleeping = results["shmstore spin=False"]["p50"] / base
        machinery = (
            results["shmstore spin=False"]["p50"] - results["posix_ipc semaphore + set()"]["p50"]
        )
        queue_ratio = results["shmstore"]["p50"] / results["multiprocessing.Queue"]["p50"]
        print(
            f"targets: sleeping wake <= 1.5x raw semaphore -> {sleeping:.2f}x "
            f"({'ok' if sleeping <= 1.5 else 'MISSED'}); shmstore p50 <= 0.3x "
            f"multiprocessing.Queue -> {queue_ratio:.2f}x "
            f"({'ok' if queue_ratio <= 0.3 else 'MISSED'})"
        )
        print(
            f"of the sleeping wake's {_fmt(results['shmstore spin=False']['p50'] - base)} over the "
            f"raw semaphore, the commit (set()) is "
            f"{_fmt(results['posix_ipc semaphore + set()']['p50'] - base)} and the wake-up "
            f"machinery (post loop, waiting side) {_fmt(machinery)}"
        )
        alone = results["shmstore spin=False"]["p50"]
        print(
            "wait_any over N stores (one commits; the rows' round trips: "
            f"{args.any_rounds}) vs Store.wait(spin=False) on that store alone, p50: "
            + ", ".join(
                f"N={n} {results[f'wait_any over {n}']['p50'] / alone:.2f}x" for n in ANY_STORES
            )
        )
        print(
            f"WaitSet over N stores (one commits; {args.rounds} round trips) vs "
            "Store.wait(spin=False) on that store alone, p50: "
            + ", ".join(
                f"N={n} {results[f'WaitSet over {n}']['p50'] / alone:.2f}x" for n in ANY_STORES
            )
            + " (target: <= 1.2x at N=1 and N=8); spinning, over 8 vs shmstore (spinning): "
            f"{results['WaitSet over 8, spinning']['p50'] / results['shmstore']['p50']:.2f}x"
        )

    print(f"  paced wake-ups ({args.any_commits} commits per row) ...", file=sys.stderr, flush=True)
    # (label, stores, how), taken in blocks like the ping-pong: the rows' runs interleave.
    paced_rows = [
        ("Store.wait spin=False", 0, "Store.wait"),
        *[(f"wait_any over {n}", n, "wait_any") for n in ANY_STORES],
        *[(f"WaitSet over {n}", n, "WaitSet") for n in ANY_STORES],
    ]
    paced_samples: dict[str, list[float]] = {label: [] for label, _n, _how in paced_rows}
    for _block in range(args.blocks):
        for label, n, how in paced_rows:
            paced_samples[label] += paced_wake(
                n, max(1, args.any_commits // args.blocks), ANY_PACE, how=how
            )
    paced = {label: quantiles(got) for label, got in paced_samples.items()}
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    print(
        f"\npaced wake-up: one commit every {ANY_PACE * 1000:.0f} ms to one store (the waiter "
        f"asleep), until the waiting call has returned; committer on CPU {MEASURER_CPU}, "
        f"waiter on CPU {PEER_CPU}"
    )
    print(f"{'waiter':<30}{'p50':>10}{'p99':>10}{'p99.9':>10}  p50 vs Store.wait")
    alone = paced["Store.wait spin=False"]["p50"]
    for label, q in paced.items():
        print(
            f"{label:<30}{_fmt(q['p50']):>10}{_fmt(q['p99']):>10}{_fmt(q['p99.9']):>10}"
            f"  {q['p50'] / alone:.2f}x"
        )

    fan: dict[int, dict[str, float]] = {}
    for n in (1, 2, 4, 8):
        print(f"  fan-out to {n} readers ...", file=sys.stderr, flush=True)
        fan[n] = quantiles(fanout(n, args.fanout_commits, pace=0.002))
    print(
        f"\nfan-out: commit until the last of N waiting readers has it ({args.fanout_commits}), "
        "writer on CPU 0, the N readers sharing CPU 1"
    )
    print(f"{'readers':<10}{'p50':>10}{'p99':>10}{'p99.9':>10}")
    for n, q in fan.items():
        print(f"{n:<10}{_fmt(q['p50']):>10}{_fmt(q['p99']):>10}{_fmt(q['p99.9']):>10}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": info, "pingpong_ns": pingpong, "paced_ns": paced, "fanout_ns": fan},
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
