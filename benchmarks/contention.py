"""Multi-process scenarios for the harness: contention, fan-out and sustained throughput.

* ``rmw``: W writer processes each increment a counter held in the value K times, read-modify-
  write, under contention. shmstore uses ``Store.update`` (compare-and-set, retried); Redis
  WATCH/MULTI/EXEC and retries; LMDB a write transaction; Manager a manager Lock; UltraDict its
  own lock. Reported: time per successful increment (wall time / W x K), retries, and lost
  updates (must be 0).
* ``fanout``: one writer, N reader processes blocked waiting; time from just before the commit
  until the last reader has it (CLOCK_MONOTONIC is system-wide). The writer runs on CPU 0, its
  readers share CPU 1 (``placement``).
* ``throughput``: a writer commits as fast as it can for a while N readers poll the newest value
  and check it (every value carries its own checksum). Reported: commits/s, reads/s, torn reads.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import statistics
import time
from typing import Any

import msgspec
from peers import PEERS, Peer
from placement import MEASURER_CPU, pin, start_on_peer_cpu
from values import SIZES

import shmstore

ctx = mp.get_context("spawn")

COUNTER_FIELD = {"100B": "id", "fsm": "version", "64KB": "seq", "1MB": "seq"}
RMW_PEERS = ("shmstore", "Redis", "LMDB (tmpfs)", "Manager().dict", "UltraDict")
FANOUT_PEERS = ("shmstore", "ZeroMQ ipc")
THROUGHPUT_PEERS = ("shmstore", "shared_memory+pickle", "LMDB (tmpfs)", "UltraDict")


def _bump(value: Any, size: str) -> Any:
    field = COUNTER_FIELD[size]
    return msgspec.structs.replace(value, **{field: getattr(value, field) + 1})


def _count(value: Any, size: str) -> int:
    return int(getattr(value, COUNTER_FIELD[size]))


# ----------------------------------------------------------------------------- rmw


def _rmw_once(system: str, peer: Peer, handle: Any, size: str) -> int:
    """One successful increment; returns the retries it took."""
    if system == "shmstore":
        calls = 0

        def bump(value: Any) -> Any:
            nonlocal calls
            calls += 1  # update() calls fn once per attempt: retries = calls - 1
            return _bump(value, size)

        handle.store.update(bump)
        return calls - 1
    if system == "Redis":
        import redis  # noqa: PLC0415

        retries = 0
        while True:
            with handle.client.pipeline() as pipe:
                try:
                    pipe.watch("state")
                    value = handle.decoder.decode(pipe.get("state"))
                    pipe.multi()
                    pipe.set("state", msgspec.msgpack.encode(_bump(value, size)))
                    pipe.execute()
                    return retries
                except redis.WatchError:
                    retries += 1
    if system == "LMDB (tmpfs)":
        with handle.env.begin(write=True) as txn:  # LMDB serializes write transactions
            value = handle.decoder.decode(txn.get(b"state"))
            txn.put(b"state", msgspec.msgpack.encode(_bump(value, size)))
        return 0
    lock = handle.lock
    with lock:
        handle.write(_bump(handle.read(), size))
    return 0


def collect(results: Any, procs: list[Any], timeout: float) -> list[Any]:
    """One result from each worker process; raise at once if one of them died without
    giving it (a peer that crashes under contention), or after *timeout* seconds."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < len(procs):
        try:
            got.append(results.get(timeout=0.2))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a worker process died (exit code {dead[0]})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result from every worker within {timeout} s") from None
    return got


def _rmw_worker(case: dict[str, Any], spec: Any, count: int, start: Any, results: Any) -> None:
    system, size = case["system"], case["size"]
    peer = spec.attach()
    handle = peer.open_writer()
    start.wait(60)
    retries = 0
    for _ in range(count):
        retries += _rmw_once(system, peer, handle, size)
    handle.close()
    results.put(retries)


def rmw(case: dict[str, Any]) -> dict[str, Any]:
    value_type, make, capacity = SIZES[case["size"]]
    writers, count = case["writers"], case["calls"]
    peer: Peer = PEERS[case["system"]](value_type, capacity)
    try:
        seed = peer.open_writer()
        seed.write(make(0))
        start = ctx.Barrier(writers + 1)
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_rmw_worker,
                args=(case, peer.attach_spec(), count, start, results),
                daemon=True,
            )
            for _ in range(writers)
        ]
        for p in procs:
            p.start()
        start.wait(60)
        t0 = time.perf_counter_ns()
        retries = sum(collect(results, procs, 240))
        elapsed = time.perf_counter_ns() - t0
        for p in procs:
            p.join(60)
        final = _count(peer.open_reader().read(), case["size"])
        seed.close()
    finally:
        peer.close()
    total = writers * count
    per_op = elapsed / total
    return {
        **case,
        "median_ns": per_op,
        "round_medians_ns": [per_op],
        "spread_ns": [per_op, per_op],
        "retries": retries,
        "lost_updates": total - final,
    }


# ----------------------------------------------------------------------------- fan-out


def _fan_reader_shm(
    name: str, value_type: Any, size: str, total: int, *, ready: Any, results: Any
) -> None:
    st = shmstore.Store.open(name, value_type)
    with contextlib.suppress(TimeoutError):
        st.wait(0, timeout=0.001)  # register before the writer starts
    ready.release()
    woke = {}
    version = 0
    while version < total:
        version = st.wait(version, timeout=60, spin=False)
        st.get()
        woke[version] = time.perf_counter_ns()
    st.close()
    results.put(woke)


def _fan_reader_zmq(
    address: str, value_type: Any, size: str, total: int, *, ready: Any, results: Any
) -> None:
    import zmq  # noqa: PLC0415

    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.connect(address)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    decoder = msgspec.msgpack.Decoder(value_type)
    while sub.recv() != b"hello":  # subscribed: the writer's hellos get through
        pass
    ready.release()
    woke = {}
    while len(woke) < total:
        data = sub.recv()
        if data == b"hello":
            continue
        woke[_count(decoder.decode(data), size)] = time.perf_counter_ns()
    context.destroy(linger=0)
    results.put(woke)


def fanout(case: dict[str, Any]) -> dict[str, Any]:
    value_type, make, capacity = SIZES[case["size"]]
    readers, total = case["readers"], case["calls"]
    results = ctx.Queue()
    ready = ctx.Semaphore(0)
    sent: dict[int, int] = {}
    if case["system"] == "shmstore":
        name = f"bench-fan-{time.monotonic_ns()}"
        st = shmstore.Store.create(name, value_type, slot_size=capacity, max_readers=readers + 1)
        args: tuple[Any, ...] = (name,)
        target: Any = _fan_reader_shm
    else:
        import zmq  # noqa: PLC0415

        address = f"ipc:///tmp/bench-fan-{time.monotonic_ns()}"
        context = zmq.Context()
        pub = context.socket(zmq.PUB)
        pub.bind(address)
        args, target = (address,), _fan_reader_zmq
    procs = [
        ctx.Process(
            target=target,
            args=(*args, value_type, case["size"], total),
            kwargs={"ready": ready, "results": results},
            daemon=True,
        )
        for _ in range(readers)
    ]
    try:
        pin(MEASURER_CPU)  # the writer; its readers share the other CPU (see placement)
        for p in procs:
            start_on_peer_cpu(p)
        for _ in procs:
            while not ready.acquire(timeout=0.01):
                if case["system"] != "shmstore":
                    pub.send(b"hello")
        for i in range(1, total + 1):
            time.sleep(0.002)  # every reader back asleep: this measures wake-ups
            value = make(i)
            sent[i] = time.perf_counter_ns()
            if case["system"] == "shmstore":
                st.set(value)
            else:
                pub.send(msgspec.msgpack.encode(value))
        woke = collect(results, procs, 120)
        for p in procs:
            p.join(60)
    finally:
        if case["system"] == "shmstore":
            st.close()
            shmstore.remove(name)
        else:
            context.destroy(linger=0)
    lat = [max(w[v] for w in woke) - t for v, t in sent.items() if all(v in w for w in woke)]
    med = statistics.median(lat)
    return {**case, "median_ns": med, "round_medians_ns": [med], "spread_ns": [min(lat), max(lat)]}


# ----------------------------------------------------------------------------- throughput


def _valid(value: Any, size: str) -> bool:
    # Every value the writer commits is make(i); a torn read mixes two of them.
    i = _count(value, size)
    return bool(value == SIZES[size][1](i))


def _poll_reader(case: dict[str, Any], spec: Any, stop: Any, results: Any) -> None:
    size = case["size"]
    peer = spec.attach()
    handle = peer.open_reader()
    reads = torn = 0
    while not stop.value:
        try:
            value = handle.read()
            ok = _valid(value, size)
        except Exception:  # a torn buffer can fail to decode, too
            ok = False
        reads += 1
        torn += not ok
    handle.close()
    results.put((reads, torn))


def throughput(case: dict[str, Any]) -> dict[str, Any]:
    value_type, make, capacity = SIZES[case["size"]]
    readers, seconds = case["readers"], case["seconds"]
    peer: Peer = PEERS[case["system"]](value_type, capacity)
    values = [make(i) for i in range(16)]
    try:
        writer = peer.open_writer()
        writer.write(values[0])
        stop = ctx.RawValue("b", 0)
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_poll_reader, args=(case, peer.attach_spec(), stop, results), daemon=True
            )
            for _ in range(readers)
        ]
        for p in procs:
            p.start()
        time.sleep(0.5)  # let the readers start polling before the clock starts
        commits = 0
        deadline = time.monotonic() + seconds
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            writer.write(values[commits % 16])
            commits += 1
        elapsed = time.monotonic() - t0
        stop.value = 1
        counts = collect(results, procs, 60)
        for p in procs:
            p.join(60)
        writer.close()
    finally:
        peer.close()
    per_commit = elapsed * 1e9 / max(commits, 1)
    return {
        **case,
        "median_ns": per_commit,
        "round_medians_ns": [per_commit],
        "spread_ns": [per_commit, per_commit],
        "commits_per_s": commits / elapsed,
        "reads_per_s": sum(r for r, _t in counts) / elapsed,
        "torn_reads": sum(t for _r, t in counts),
    }
