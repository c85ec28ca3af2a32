"""Wake-up latency peers for the harness: a ping-pong between two processes carrying the value.

One-way latency = round trip / 2, where a round trip is: publish the value, the echo process wakes,
reads it and publishes it back, we wake and read it. The two processes are pinned to different
CPUs (``placement``). The ping-pong itself (echo start, timing, percentiles) is ``pingpong``'s,
shared with ``wake.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import statistics
import time
import uuid
from typing import Any

import msgspec
from pingpong import ctx, quantiles, start_echo, time_round_trips
from placement import MEASURER_CPU, PEER_CPU, pin
from values import SIZES

import shmstore


def unavailable(system: str) -> str | None:
    if system == "ZeroMQ ipc" and importlib.util.find_spec("zmq") is None:
        return "python package 'pyzmq' is not installed (pip install -e '.[bench]')"
    if system == ICEORYX and importlib.util.find_spec("iceoryx2") is None:
        return "python package 'iceoryx2' is not installed (pip install iceoryx2)"
    return None


LAST_SAMPLES: list[float] = []  # every one-way sample of the last _measure, for percentiles


def _measure(round_trip: Any, calls: int, rounds: int) -> list[float]:
    """A warm-up, then *rounds* rounds of *calls* round trips: each round's median one-way."""
    time_round_trips(round_trip, range(max(10, calls // 10)))  # warm-up
    medians = []
    LAST_SAMPLES.clear()
    for _ in range(rounds):
        samples = time_round_trips(round_trip, range(calls))
        medians.append(statistics.median(samples))
        LAST_SAMPLES.extend(samples)
    return medians


def percentiles() -> dict[str, float]:
    q = quantiles(LAST_SAMPLES)
    return {"p50_ns": q["p50"], "p99_ns": q["p99"], "p999_ns": q["p99.9"]}


# ------------------------------------------------------------ shmstore


def _shm_echo(ping: str, pong: str, value_type: Any, total: int) -> None:
    a, b = shmstore.Store.open(ping, value_type), shmstore.Store.open(pong, value_type)
    version = 0
    for _ in range(total):
        version = a.wait(version, timeout=60)
        b.set(a.get())
    a.close()
    b.close()


def _shmstore(size: str, calls: int, rounds: int) -> list[float]:
    value_type, make, capacity = SIZES[size]
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ping, pong = f"bench-wake-a-{tag}", f"bench-wake-b-{tag}"
    a = shmstore.Store.create(ping, value_type, slot_size=capacity)
    b = shmstore.Store.create(pong, value_type, slot_size=capacity)
    total = max(10, calls // 10) + calls * rounds
    value = make(1)
    try:
        echo = start_echo(_shm_echo, (ping, pong, value_type, total), PEER_CPU)

        def round_trip(i: int) -> None:
            version = a.set(value)
            b.wait(version - 1, timeout=60)
            b.get()

        result = _measure(round_trip, calls, rounds)
        echo.join(60)
        return result
    finally:
        for st in (a, b):
            st.close()
        shmstore.remove(ping)
        shmstore.remove(pong)


# ------------------------------------------------------------ multiprocessing.Queue


def _queue_echo(q_in: Any, q_out: Any, total: int) -> None:
    for _ in range(total):
        q_out.put(q_in.get())


def _queue(size: str, calls: int, rounds: int) -> list[float]:
    _type, make, _capacity = SIZES[size]
    value = make(1)
    q_in, q_out = ctx.Queue(), ctx.Queue()
    total = max(10, calls // 10) + calls * rounds
    echo = start_echo(_queue_echo, (q_in, q_out, total), PEER_CPU)

    def round_trip(i: int) -> None:
        q_in.put(value)
        q_out.get()

    result = _measure(round_trip, calls, rounds)
    echo.join(60)
    return result


# ------------------------------------------------------------ ZeroMQ


def _zmq_echo(down: str, up: str, value_type: Any) -> None:
    import zmq  # noqa: PLC0415

    context = zmq.Context()
    sub, pub = context.socket(zmq.SUB), context.socket(zmq.PUB)
    sub.connect(down)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    pub.bind(up)
    decoder = msgspec.msgpack.Decoder(value_type)
    while True:
        data = sub.recv()
        if data == b"stop":
            break
        if data != b"hello":
            decoder.decode(data)
        pub.send(data)
    context.destroy(linger=0)


def _zeromq(size: str, calls: int, rounds: int) -> list[float]:
    import zmq  # noqa: PLC0415

    value_type, make, _capacity = SIZES[size]
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    down, up = f"ipc:///tmp/bench-zmq-down-{tag}", f"ipc:///tmp/bench-zmq-up-{tag}"
    context = zmq.Context()
    pub, sub = context.socket(zmq.PUB), context.socket(zmq.SUB)
    pub.bind(down)
    echo = start_echo(_zmq_echo, (down, up, value_type), PEER_CPU)
    sub.connect(up)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    # PUB/SUB drops messages until both subscriptions are live: say hello until one comes back.
    deadline = time.monotonic() + 30
    while not sub.poll(10):
        if time.monotonic() > deadline:
            raise TimeoutError("ZeroMQ echo never answered")
        pub.send(b"hello")
    while sub.poll(50):
        sub.recv()
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(value_type)
    value = make(1)

    def round_trip(i: int) -> None:
        pub.send(encoder.encode(value))
        decoder.decode(sub.recv())

    try:
        return _measure(round_trip, calls, rounds)
    finally:
        pub.send(b"stop")
        echo.join(10)
        context.destroy(linger=0)
        for path in (down, up):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path[len("ipc://") :])


# ----------------------------------------------------------------------------- iceoryx2

ICEORYX = "iceoryx2 event (no payload)"


def _iox_echo(ping: str, pong: str, ready: Any, total: int) -> None:
    import iceoryx2 as iox2  # noqa: PLC0415

    iox2.set_log_level(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    listen = node.service_builder(iox2.ServiceName.new(ping)).event().open_or_create()
    answer = node.service_builder(iox2.ServiceName.new(pong)).event().open_or_create()
    listener, notifier = listen.listener_builder().create(), answer.notifier_builder().create()
    ready.set()
    for _ in range(total):
        listener.blocking_wait()
        notifier.notify()


def _iceoryx(size: str, calls: int, rounds: int) -> list[float]:
    """Its Python bindings move only ctypes payloads, so this is the wake-up mechanism alone:
    an event ping-pong with nothing attached. Compare it with the other rows' 100B column."""
    import iceoryx2 as iox2  # noqa: PLC0415

    iox2.set_log_level(iox2.LogLevel.Error)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ping, pong = f"bench/ping/{tag}", f"bench/pong/{tag}"
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    send = node.service_builder(iox2.ServiceName.new(ping)).event().open_or_create()
    back = node.service_builder(iox2.ServiceName.new(pong)).event().open_or_create()
    notifier, listener = send.notifier_builder().create(), back.listener_builder().create()
    ready = ctx.Event()
    total = max(10, calls // 10) + calls * rounds
    echo = start_echo(_iox_echo, (ping, pong, ready, total), PEER_CPU)
    if not ready.wait(60):
        raise TimeoutError("iceoryx2 echo did not start")

    def round_trip(i: int) -> None:
        notifier.notify()
        listener.blocking_wait()

    result = _measure(round_trip, calls, rounds)
    echo.join(60)
    return result


_RUNNERS = {
    "shmstore": _shmstore,
    "multiprocessing.Queue": _queue,
    "ZeroMQ ipc": _zeromq,
    ICEORYX: _iceoryx,
}


def run(system: str, size: str, calls: int, rounds: int) -> list[float]:
    """One-way latencies, this process on the measuring CPU and the echo on the peer CPU (see
    ``placement``). The harness runs each case in a process of its own."""
    pin(MEASURER_CPU)
    return _RUNNERS[system](size, calls, rounds)
