"""Mirroring across hosts, on loopback: shmstore.mirror (NATS JetStream KV) against Redis.

What it measures:

* **commit -> visible on the other side**, p50/p99/p99.9, one commit at a time (each waits for
  the previous one to arrive, so this is latency, not throughput):
  - ``shmstore.mirror``: ``origin.set(v)`` -> publisher process (``shmstore mirror publish``)
    -> ``nats-server`` (KV put, compare-and-set on the revision) -> follower process
    (``shmstore mirror follow``, KV watch) -> replica store -> this process's
    ``replica.wait()`` + ``replica.get()`` returns ``v``;
  - ``redis``: ``SET key v`` + ``PUBLISH chan version`` -> a subscriber process gets the
    message and does ``GET key`` (the obvious alternative: readers on the other host ask Redis).
  Both sides stamp CLOCK_MONOTONIC, which is system-wide, so the times compare.
* **local read cost** on the reading host: ``get()`` of the replica against ``get()`` of an
  ordinary store holding the same value (the cached read: the version did not change), and
  ``GET`` from Redis on loopback, for scale.

Everything runs on one machine: the network is loopback, so this measures the software path,
not a real link. Needs ``shmstore[mirror]``; the Redis rows need ``redis-server`` and the
``redis`` package (skipped with a printed reason otherwise).

Run:  python benchmarks/mirror.py [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import shmstore
from shmstore import Store, StoreNotFoundError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core import machine

ctx = mp.get_context("spawn")
HANG = 60.0
VALUE_PAD = "x" * 200  # a small state record: a few hundred bytes encoded


def _value(i: int) -> dict[str, Any]:
    return {"seq": i, "state": "running", "pad": VALUE_PAD}


def _quantiles(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)

    def q(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(p * len(ordered)))])

    return {"p50": statistics.median(ordered), "p99": q(0.99), "p99.9": q(0.999)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


@contextlib.contextmanager
def _process(args: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **kwargs,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(HANG)


# ----------------------------------------------------------------------------- shmstore.mirror


def _nats_server() -> str | None:
    here = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    return here or shutil.which("nats-server")


def bench_mirror(rounds: int) -> dict[str, Any]:
    server_bin = _nats_server()
    if server_bin is None:
        return {"skipped": "nats-server not installed (pip install 'shmstore[mirror]')"}
    name = f"bench-mirror-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    replica_name = f"{name}-r"
    port = _free_port()
    url = f"nats://127.0.0.1:{port}"
    storage = tempfile.mkdtemp(prefix="shmstore-bench-nats-")
    cli = [sys.executable, "-m", "shmstore", "mirror"]
    try:
        with (
            _process(
                [server_bin, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", storage]
            ) as server,
            Store.create(name, slots=64) as origin,
        ):
            _wait_port(port, server)
            origin.set(_value(0))
            with (
                _process([*cli, "publish", name, "--server", url]),
                _process([*cli, "follow", name, "--server", url, "--as", replica_name]),
            ):
                replica = _open_when_ready(replica_name)
                with replica:
                    samples = []
                    for i in range(1, rounds + 1):
                        t0 = time.monotonic_ns()
                        version = origin.set(_value(i))
                        seen = replica.version
                        while seen < version:
                            seen = replica.wait(seen, timeout=HANG)
                        value = replica.get()
                        samples.append(time.monotonic_ns() - t0)
                        assert value == _value(i), "the replica skipped a paced commit"
                    local = _local_reads(replica, origin)
                    stats = replica.statistics()
            return {
                "visible": _quantiles(samples),
                "local_get_ns": local,
                "mirror_behind": stats.mirror_behind,
            }
    finally:
        shmstore.remove(replica_name)
        shmstore.remove(name)
        shutil.rmtree(storage, ignore_errors=True)


def _open_when_ready(name: str) -> Store[Any]:
    deadline = time.monotonic() + HANG
    while True:
        try:
            st = Store.open(name)
        except StoreNotFoundError:
            st = None
        if st is not None and st.version:
            return st
        if st is not None:
            st.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {name!r} did not appear")
        time.sleep(0.02)


def _local_reads(replica: Store[Any], origin: Store[Any]) -> dict[str, float]:
    """ns per cached get(): the replica against an ordinary store with the same value."""
    with Store.create(f"{origin.name}-plain") as plain:
        try:
            plain.set(replica.get())
            with Store.open(plain.name) as reader:
                reader.get()
                replica.get()
                # Interleaved repeats, best of each: the machine's load hits both alike.
                n = 200_000
                best = {"replica": float("inf"), "ordinary": float("inf")}
                for _ in range(7):
                    for label, get in (("replica", replica.get), ("ordinary", reader.get)):
                        best[label] = min(best[label], timeit.timeit(get, number=n) / n * 1e9)
                out = best
        finally:
            plain.unlink()
    return out


# ----------------------------------------------------------------------------- redis


def _redis_subscriber(port: int, rounds: int, conn: Any) -> None:
    import redis  # noqa: PLC0415

    client = redis.Redis(port=port)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("chan")
    conn.send("ready")
    for _ in range(rounds):
        while True:
            message = pubsub.get_message(timeout=HANG)
            if message is not None:
                break
        data = client.get("key")
        conn.send((int(message["data"]), time.monotonic_ns(), data is not None))
    pubsub.close()
    client.close()


def bench_redis(rounds: int) -> dict[str, Any]:
    server_bin = shutil.which("redis-server")
    if server_bin is None:
        return {"skipped": "redis-server not installed (apt-get install redis-server)"}
    try:
        import redis  # noqa: PLC0415
    except ImportError:
        return {"skipped": "the redis package is not installed (pip install redis)"}
    port = _free_port()
    args = [server_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no"]  # fmt: skip
    with _process(args) as server:
        _wait_port(port, server)
        client = redis.Redis(port=port)
        ours, theirs = ctx.Pipe()
        sub = ctx.Process(target=_redis_subscriber, args=(port, rounds, theirs))
        sub.start()
        try:
            if not ours.poll(HANG):
                raise RuntimeError("the redis subscriber did not start")
            ours.recv()
            encode = json.dumps
            samples = []
            for i in range(1, rounds + 1):
                t0 = time.monotonic_ns()
                pipe = client.pipeline(transaction=False)
                pipe.set("key", encode(_value(i)))
                pipe.publish("chan", i)
                pipe.execute()
                if not ours.poll(HANG):
                    raise RuntimeError("the redis subscriber stopped answering")
                version, t1, ok = ours.recv()
                assert version == i, "the subscriber skipped a paced commit"
                assert ok
                samples.append(t1 - t0)
            client.get("key")
            n = 20_000
            get_ns = min(timeit.repeat(lambda: client.get("key"), number=n, repeat=3)) / n * 1e9
        finally:
            sub.join(HANG)
            if sub.is_alive():
                sub.kill()
            client.close()
    return {"visible": _quantiles(samples), "local_get_ns": {"redis GET": get_ns}}


# ----------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="paced commits per system (300)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = {
        "machine": machine(),
        "rounds": args.rounds,
        "shmstore.mirror": bench_mirror(args.rounds),
        "redis": bench_redis(args.rounds),
    }
    print(f"commit -> visible on the reading side, {args.rounds} paced commits (us)")
    print(f"{'system':<18}{'p50':>10}{'p99':>10}{'p99.9':>10}")
    for system in ("shmstore.mirror", "redis"):
        row = results[system]
        if "skipped" in row:
            print(f"{system:<18}  skipped: {row['skipped']}")
            continue
        q = row["visible"]
        print(
            f"{system:<18}{q['p50'] / 1e3:>10.1f}{q['p99'] / 1e3:>10.1f}{q['p99.9'] / 1e3:>10.1f}"
        )
    print()
    print("read on the reading host (ns per call)")
    for system in ("shmstore.mirror", "redis"):
        row = results[system]
        for label, ns in row.get("local_get_ns", {}).items():
            print(f"  {system} {label:<12}{ns:>12.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
