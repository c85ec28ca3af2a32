"""The mirror's two paths and its chunks, against real ``nats-server`` processes on loopback: the
live subject beside the durable bucket, values above ``max_payload`` split into chunks (never
applied torn, caught up from the newest complete version), and the hardening of issue 20
(a publisher that always answers, a follower that refuses an impossible version and goes on).

Servers, publishers and followers are real processes, each killed with its process group at
the end of its test; the chunk tests run a server with a small ``max_payload``. Timeouts only
bound a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from mirror_helpers import (
    HANG,
    NATS_SERVER,
    Reading,
    Relay,
    bucket_record,
    mirror_processes,
    nats_call,
    nats_servers,
    open_replica,
    wait_bucket_version,
    wait_until,
    wait_version,
)

import shmstore
from shmstore import CorruptStoreError, Store, StoreNotFoundError, SubscriberLaggedError
from shmstore._names import segment_name
from shmstore.mirror import ConnectOptions, Follower, MirrorError, Publisher, default_bucket
from shmstore.mirror._wire import (
    KEY,
    Record,
    chunk_key,
    decode_record,
    encode_record,
    live_subject,
    manifest,
    set_subject,
    split,
)

pytestmark = [
    pytest.mark.skipif(NATS_SERVER is None, reason="nats-server not installed (shmstore[mirror])"),
    pytest.mark.timeout(300),
]

TYPE = "mirror_helpers:Reading"
SMALL_PAYLOAD = 64 * 1024  # the chunk tests' server: a 4 MiB value is 65 chunks


def big(seq: int, size: int) -> str:
    """A value of *size* characters whose every part depends on *seq* (a torn mix shows)."""
    block = os.urandom(512).hex()
    return (f"{seq}:" + block * (size // len(block) + 1))[:size]


def kv_put(urls: list[str], bucket: str, items: list[tuple[str, bytes]]) -> None:
    async def put(nc: Any) -> None:
        kv = await nc.jetstream(timeout=10).key_value(bucket)
        for key, data in items:
            await kv.put(key, data)

    nats_call(urls, put)


def stream_messages(urls: list[str], bucket: str) -> int:
    async def count(nc: Any) -> int:
        from nats import errors as nats_errors  # noqa: PLC0415

        try:
            info = await nc.jetstream(timeout=10).stream_info(f"KV_{bucket}")
        except nats_errors.TimeoutError:
            return -1  # a busy server: the caller's wait_until asks again
        return int(info.state.messages)

    result: int = nats_call(urls, count)
    return result


# ---------------------------------------------------------------------------- chunks


def test_values_above_max_payload_travel_in_chunks(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    bucket = default_bucket(origin_name)
    with (
        nats_servers(max_payload=SMALL_PAYLOAD) as (server,),
        mirror_processes() as start,
        Store.create(origin_name, slot_size=1024) as origin,
    ):
        origin.set("small")
        start("publish", origin_name, "--server", server.url)
        follower = start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name, None) as replica:
            four = big(2, 4 << 20)
            origin.set(four)
            wait_version(replica, 2)
            assert replica.get() == four
            # The bucket trails the live copy (a pause of the writer, then 65 puts): wait for it.
            record = wait_bucket_version([server.url], bucket, 2)
            assert record.chunks == 65
            # A follower stopped while a 20 MiB record goes out catches up from the bucket.
            assert follower.signal(signal.SIGKILL) == -signal.SIGKILL
            twenty = big(3, 20 << 20)
            origin.set(twenty)
            wait_bucket_version([server.url], bucket, 3)
            follower.start()
            wait_version(replica, 3)
            assert replica.get() == twenty
            # Back to a value that fits one message: every chunk is purged from the bucket.
            origin.set("small again")
            wait_version(replica, 4)
            assert replica.get() == "small again"
            wait_until(lambda: stream_messages([server.url], bucket) == 1, "old chunks purged")


def forged(base: Record, version: int, value: Any) -> bytes:
    """The record the publisher of *base*'s origin would put for *value* at *version*."""
    record = msgspec.structs.replace(
        base, version=version, commit_ns=time.time_ns(), value=msgspec.msgpack.encode(value)
    )
    return encode_record(record)


def forged_chunks(base: Record, version: int, value: Any) -> tuple[list[bytes], bytes]:
    """The chunks and the manifest of *value* at *version*, as the publisher would put them."""
    data = forged(base, version, value)
    parts = split(data, SMALL_PAYLOAD)
    assert len(parts) > 2
    return parts, encode_record(manifest(decode_record(data), data, len(parts), 0))


def test_a_chunked_record_is_never_applied_torn_and_a_restart_picks_it_up(
    names: tuple[str, str],
) -> None:
    origin_name, replica_name = names
    bucket = default_bucket(origin_name)
    urls: list[str]
    with (
        nats_servers(max_payload=SMALL_PAYLOAD) as (server,),
        mirror_processes() as start,
        Store.create(origin_name, slot_size=1024) as origin,
    ):
        urls = [server.url]
        origin.set("v1")
        publisher = start("publish", origin_name, "--server", server.url)
        follower = start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name, None) as replica:
            assert publisher.signal(signal.SIGTERM) == 0  # from here the test writes the bucket
            base = bucket_record(urls, bucket)
            two = big(2, 300_000)
            parts, head = forged_chunks(base, 2, two)
            # A manifest whose chunk 1 is missing: refused, said, the replica keeps version 1.
            kv_put(urls, bucket, [(chunk_key(2, i), c) for i, c in enumerate(parts) if i != 1])
            kv_put(urls, bucket, [(KEY, head)])
            wait_until(lambda: "refused version 2" in follower.log(), "the refusal")
            assert "not all in bucket" in follower.log()
            # Chunk 1 there but not the manifest's bytes: refused again, never applied torn.
            torn = bytes(b ^ 1 for b in parts[1])
            kv_put(urls, bucket, [(chunk_key(2, 1), torn)])
            wait_until(lambda: "do not match the manifest" in follower.log(), "the torn refusal")
            assert replica.version == 1
            assert replica.statistics().mirror_behind == 1
            # The follower dies in the middle of the record; the chunk is put right; a new
            # follower applies version 2 whole.
            assert follower.signal(signal.SIGKILL) == -signal.SIGKILL
            kv_put(urls, bucket, [(chunk_key(2, 1), parts[1])])
            follower.start()
            wait_version(replica, 2)
            assert replica.get() == two
            # Version 3 loses a chunk for good; the origin moves on to 4, and the replica
            # catches up from the newest complete version.
            parts, head = forged_chunks(base, 3, big(3, 300_000))
            kv_put(urls, bucket, [(chunk_key(3, i), c) for i, c in enumerate(parts) if i != 0])
            kv_put(urls, bucket, [(KEY, head)])
            wait_until(lambda: "refused version 3" in follower.log(), "the refusal of 3")
            for value in ("a", "b", "c"):  # versions 2, 3, 4 of the origin
                origin.set(value)
            publisher.start()
            wait_version(replica, 4)
            assert replica.get_with_version() == ("c", 4)
            with pytest.raises(SubscriberLaggedError) as lag, replica.subscribe(2) as sub:
                sub.poll()
            assert lag.value.missed == 1  # version 3 never arrived whole: skipped, not torn


# ---------------------------------------------------------------------------- the live path


def test_the_live_path_carries_each_record_before_the_bucket(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    bucket = default_bucket(origin_name)
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, Reading) as origin,
    ):
        urls = [server.url]
        origin.set(Reading.make(1))
        publisher = start("publish", origin_name, "--server", server.url)
        start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name, Reading) as replica:
            wait_until(lambda: origin.mirror_status.connected, "the publisher")

            async def listen(nc: Any) -> Record:
                """The live copy of a commit made while listening. The live connection may
                still be opening (on a busy machine): such a commit went out through the
                bucket only, so commit again until one comes on the live subject."""
                from nats import errors as nats_errors  # noqa: PLC0415

                sub = await nc.subscribe(live_subject(bucket))
                await nc.flush()
                deadline = time.monotonic() + HANG
                while True:
                    version = origin.set(Reading.make(origin.version + 1))
                    while True:
                        try:
                            msg = await sub.next_msg(timeout=2)
                        except nats_errors.TimeoutError:
                            assert time.monotonic() < deadline, "nothing on the live subject"
                            break  # commit again
                        record = decode_record(msg.data)
                        if record.version == version:
                            return record

            # The publisher sends every commit on the live subject.
            sent = nats_call(urls, listen)
            v = sent.version
            assert msgspec.msgpack.decode(sent.value, type=Reading) == Reading.make(v)
            wait_version(replica, v)
            assert publisher.signal(signal.SIGTERM) == 0
            wait_until(
                lambda: getattr(bucket_record(urls, bucket), "version", 0) == v, f"version {v} put"
            )
            # A record that comes only on the live subject reaches the replica; the bucket
            # still holds version v.
            three = forged(bucket_record(urls, bucket), v + 1, Reading.make(v + 1))

            async def publish(nc: Any) -> None:
                await nc.publish(live_subject(bucket), three)
                await nc.publish(live_subject(bucket), three)  # a second copy: not applied
                await nc.flush()

            commits = replica.commits
            nats_call(urls, publish)
            wait_version(replica, v + 1)
            assert replica.get() == Reading.make(v + 1)
            assert bucket_record(urls, bucket).version == v
            # The bucket's copy of version v + 1 (a publisher's put) is not applied again.
            kv_put(urls, bucket, [(KEY, three)])
            wait_until(lambda: replica.statistics().mirror_last_sync_ns > 0, "a sync")
            assert replica.commits == commits + 1


def test_a_follower_reopens_a_broken_live_path_while_its_watch_is_busy(
    names: tuple[str, str],
) -> None:
    """A writer that commits without pause keeps the follower's watch busy; a live connection
    that breaks then is opened again all the same (it used to be looked at only when the
    watch went quiet, and the live path stayed down while the writer wrote)."""
    origin_name, replica_name = names
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, Reading) as origin,
        contextlib.closing(Relay(server.port)) as relay,
    ):
        origin.set(Reading.make(1))
        start("publish", origin_name, "--server", server.url)
        start("follow", origin_name, "--server", relay.url, "--as", replica_name)
        live = b'-live"'  # the name of a live connection, in its CONNECT line
        stop = threading.Event()

        def write() -> None:  # a commit every 10 ms: the bucket gets a put every 250 ms
            while not stop.wait(0.01):
                origin.set(Reading.make(origin.version + 1))

        writer = threading.Thread(target=write)
        with open_replica(replica_name, Reading) as replica:
            wait_until(lambda: relay.opened(live) == 1, "the follower's live connection")
            writer.start()
            try:
                wait_version(replica, origin.version)
                assert relay.cut(live) == 1
                wait_until(lambda: relay.opened(live) == 2, "a new live connection")
                wait_version(replica, origin.version)
            finally:
                stop.set()
                writer.join()


def test_a_server_that_stalls_and_comes_back_costs_no_traceback(names: tuple[str, str]) -> None:
    """A server that stops answering for a few seconds: the publisher's heartbeat says
    "disconnected", and when the server answers again the publisher goes on, with no
    traceback on the operator's screen (a heartbeat that cancelled its flush made nats-py's
    read loop fail on the late PONG)."""
    origin_name, _ = names
    bucket = default_bucket(origin_name)
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name) as origin,
    ):
        origin.set({"n": 1})
        publisher = start("publish", origin_name, "--server", server.url)
        wait_until(lambda: origin.mirror_status.connected, "the publisher")
        with server.stalled():
            wait_until(lambda: not origin.mirror_status.connected, "the heartbeat's silence")
        newest = origin.set({"n": 2})
        wait_bucket_version([server.url], bucket, newest)
        assert publisher.signal(signal.SIGTERM) == 0
        assert "Traceback" not in publisher.log()


@pytest.mark.parametrize("side", ["publish", "follow"])
def test_a_live_connection_gone_quiet_is_given_up_and_reopened(
    names: tuple[str, str], side: str
) -> None:
    """A live connection whose far end went away without a reset (its host lost, a firewall's
    state dropped) raises no error for minutes, and its records would come by the bucket only:
    the publisher and the follower ask the server for a PONG every second, give up a
    connection that stays silent and open a new one, which carries the records again (the
    bucket, told to wait an hour, does not)."""
    origin_name, replica_name = names
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, Reading) as origin,
        contextlib.closing(Relay(server.port)) as relay,
    ):
        origin.set(Reading.make(1))
        through = {side: relay.url}
        # Version 1 is put at the start; the bucket gets no other: what follows comes live.
        start(
            "publish",
            origin_name,
            "--server",
            through.get("publish", server.url),
            "--durable-quiet",
            "3600",
            "--durable-most",
            "3600",
        )
        start(
            "follow",
            origin_name,
            "--server",
            through.get("follow", server.url),
            "--as",
            replica_name,
        )
        live = b'-live"'  # the name of a live connection, in its CONNECT line
        with open_replica(replica_name, Reading) as replica:
            wait_until(lambda: relay.opened(live) == 1, "a live connection through the relay")
            assert relay.freeze(live) == 1
            wait_until(lambda: relay.opened(live) == 2, "a new live connection")
            origin.set(Reading.make(2))
            wait_version(replica, 2)


def connections_to(port: int) -> list[tuple[str, int]]:
    """(TCP state, bytes unsent) of each loopback connection to *port* (``/proc/net/tcp``;
    states as there: ``01`` established, ``04`` FIN-WAIT-1: closed by us, data still unsent)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port:
            found.append((fields[3], int(fields[4].split(":")[0], 16)))
    return found


def stalled_live_copy(port: int) -> bool:
    """A connection to *port* holds more than 1 MB unsent (the server takes nothing)."""
    return any(state == "01" and unsent > 1 << 20 for state, unsent in connections_to(port))


def live_copy_given_up(port: int) -> bool:
    """The publisher gave up a connection to *port* with data unsent (its live connection:
    the NATS client's stays open, it does not know yet)."""
    return any(state == "04" and unsent > 0 for state, unsent in connections_to(port))


@pytest.mark.parametrize("when", ["while_sending", "after_giving_up"])
def test_a_publisher_stops_while_a_stalled_server_holds_its_live_copy(
    names: tuple[str, str], when: str
) -> None:
    """A server that takes nothing (stopped, or its host gone) fills the live connection's
    buffers, and the commit thread's send waits: the publisher stops on SIGTERM with exit 0,
    while the send waits (stop closes the live connection first) and after it gave up (a
    second without progress; the NATS client's close then fails inside nats-py). Nothing is
    lost: a publisher started once the server is back puts the newest version."""
    origin_name, _ = names
    bucket = default_bucket(origin_name)
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name) as origin,
    ):
        origin.set(b"small")
        publisher = start("publish", origin_name, "--server", server.url)
        wait_until(lambda: origin.mirror_status.connected, "the publisher")
        with server.stalled():
            for i in range(8):  # 32 MB: more than loopback's buffers take
                newest = origin.set(bytes([i]) * (4 << 20))
            wait_until(lambda: stalled_live_copy(server.port), "a stalled live copy")
            if when == "after_giving_up":
                wait_until(lambda: live_copy_given_up(server.port), "the live copy given up")
            assert publisher.signal(signal.SIGTERM) == 0
            assert "Traceback" not in publisher.log()
        start("publish", origin_name, "--server", server.url)
        wait_bucket_version([server.url], bucket, newest)


# ---------------------------------------------------------------------------- hardening


def test_the_publisher_answers_a_request_it_cannot_apply(names: tuple[str, str]) -> None:
    origin_name, _replica_name = names
    bucket = default_bucket(origin_name)
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, Reading) as origin,
    ):
        origin.set(Reading.make(1))
        start("publish", origin_name, "--server", server.url, "--type", TYPE)
        wait_until(lambda: origin.mirror_status.connected, "the publisher answering")
        depth = 100_000
        deep = b'{"value":' + b"[" * depth + b"]" * depth + b',"expect":null}'

        async def ask(nc: Any) -> Any:
            msg = await nc.request(set_subject(bucket), deep, timeout=HANG)
            return json.loads(msg.data)

        reply = nats_call([server.url], ask)
        assert reply["error"] == "value is nested too deeply"
        assert origin.version == 1


def test_a_follower_refuses_impossible_records_and_goes_on(
    names: tuple[str, str],
) -> None:
    """A version >= 2**62 is refused, visibly. A ~200-byte manifest claiming 100,000 chunks
    (on either path) is refused before any chunk is read (it cost 647 MB, a million chunks
    2.9 GB and a MemoryError). A first record whose schema record does not decode is refused,
    with no replica segment left behind (it failed the follower for good, and every later
    one, on a zero-filled segment)."""
    origin_name, replica_name = names
    second_name = f"{origin_name}-r2"
    bucket = default_bucket(origin_name)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shmstore.remove, second_name)  # after the followers are gone
        server = cleanup.enter_context(nats_servers())[0]
        start = cleanup.enter_context(mirror_processes())
        origin = cleanup.enter_context(Store.create(origin_name))
        urls = [server.url]
        origin.set("v1")
        publisher = start("publish", origin_name, "--server", server.url)
        follower = start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name, None) as replica:
            assert publisher.signal(signal.SIGTERM) == 0
            base = bucket_record(urls, bucket)
            kv_put(urls, bucket, [(KEY, forged(base, 1 << 62, "impossible"))])
            wait_until(lambda: f"refused version {1 << 62}" in follower.log(), "the refusal")
            assert replica.statistics().mirror_behind > 0
            data = forged(base, 2, "v2")
            huge = msgspec.structs.replace(
                manifest(decode_record(data), data, 100_000, 0), version=2
            )
            kv_put(urls, bucket, [(KEY, encode_record(huge))])
            wait_until(lambda: "refused version 2" in follower.log(), "the bucket's refusal")
            nats_call(
                urls,
                lambda nc: nc.publish(
                    live_subject(bucket),
                    encode_record(msgspec.structs.replace(huge, version=3, schema=b"")),
                ),
            )
            wait_until(lambda: "refused version 3" in follower.log(), "the live refusal")
            assert "100000 chunks for" in follower.log()
            assert replica.version == 1  # the last good state
            assert replica.get() == "v1"
            # A new follower whose first record's schema record does not decode.
            kv_put(urls, bucket, [(KEY, encode_record(_with(base, 4, "v4", b"[1]")))])
            second = start("follow", origin_name, "--server", server.url, "--as", second_name)
            wait_until(lambda: "refused version 4" in second.log(), "the schema's refusal")
            assert "schema record does not decode" in second.log()
            with pytest.raises(StoreNotFoundError):
                Store.open(second_name)
            # Both go on: the next good record reaches the one and creates the other.
            kv_put(urls, bucket, [(KEY, forged(base, 5, "v5"))])
            wait_version(replica, 5)
            assert replica.get() == "v5"
            with open_replica(second_name, None) as created:
                wait_version(created, 5)
                assert created.get() == "v5"
            assert [p.proc.poll() for p in (follower, second) if p.proc] == [None, None]
            assert "Traceback" not in follower.log() + second.log()
            assert "never retrieved" not in follower.log()


def _with(base: Record, version: int, value: Any, schema: bytes) -> Record:
    return msgspec.structs.replace(decode_record(forged(base, version, value)), schema=schema)


def test_a_publisher_without_a_reader_entry_says_so_and_still_mirrors(
    names: tuple[str, str],
) -> None:
    origin_name, replica_name = names
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, max_readers=1) as origin,
        Store.open(origin_name) as holder,
    ):
        origin.set("v1")
        with pytest.raises(TimeoutError):  # takes the store's only reader entry
            holder.wait(holder.version, timeout=0.01)
        publisher = start("publish", origin_name, "--server", server.url)
        start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name, None) as replica:
            wait_until(lambda: "cannot wait for commits" in publisher.log(), "the warning")
            origin.set("v2")
            wait_version(replica, 2)  # put by the publisher's periodic look
            assert replica.get() == "v2"


# ---------------------------------------------------------------------------- cancellation


def _worker(role: str, name: str, url: str) -> Publisher | Follower:
    options = ConnectOptions(servers=(url,))
    if role == "publish":
        return Publisher(name, options=options)
    return Follower(name, options=options)


def _others() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


@pytest.mark.parametrize("role", ["publish", "follow"])
def test_run_runs_once(store_name: str, role: str) -> None:
    """A second ``run()`` says it cannot (it returned at once, doing nothing: the first run's
    stop was still set)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{s.getsockname()[1]}"  # nobody listens there

    async def scenario() -> None:
        worker = _worker(role, store_name, url)
        worker.stop()
        await worker.run()  # stopped before it began: it returns
        with pytest.raises(MirrorError, match=r"run\(\) runs once"):
            await worker.run()

    with contextlib.ExitStack() as stack:
        if role == "publish":
            stack.enter_context(Store.create(store_name))
        asyncio.run(scenario())


@pytest.mark.parametrize("role", ["publish", "follow"])
def test_cancelled_while_connecting_leaves_no_client_behind(store_name: str, role: str) -> None:
    """An application that cancels ``run()`` while NATS is unreachable gets it back with
    nothing left trying to connect for it (the attempt went on, owned by nobody, and stayed
    connected once a server came)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{s.getsockname()[1]}"  # nobody listens there

    async def scenario() -> set[asyncio.Task[Any]]:
        task = asyncio.create_task(_worker(role, store_name, url).run())
        deadline = time.monotonic() + HANG
        while not any("connect" in t.get_coro().__qualname__ for t in _others() if t is not task):
            assert time.monotonic() < deadline, "no connection attempt"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        left = _others()
        if left:  # cancelled here, bounded: a failure must not hang asyncio.run's own cancel
            for other in left:
                other.cancel()
            await asyncio.wait(left, timeout=5)
        return left

    with contextlib.ExitStack() as stack:
        if role == "publish":
            stack.enter_context(Store.create(store_name))
        assert asyncio.run(scenario()) == set()


def test_the_follower_trusts_only_the_replicas_own_schema(names: tuple[str, str]) -> None:
    """A record under the replica's fingerprint is committed without a second decode (the
    origin's set() checked it): a publisher that lies costs its readers a CorruptStoreError on
    that version, never a torn value, and the next record replaces it. A record of any other
    fingerprint is never committed unchecked, and ``--validate`` checks every value."""
    origin_name, replica_name = names
    checked_name = f"{replica_name}-v"
    bucket = default_bucket(origin_name)
    try:
        with (
            nats_servers() as (server,),
            mirror_processes() as start,
            Store.create(origin_name) as origin,
        ):
            urls = [server.url]
            origin.set("v1")
            publisher = start("publish", origin_name, "--server", server.url)
            trusting = start("follow", origin_name, "--server", server.url, "--as", replica_name)
            checking = start(
                "follow", origin_name, "--server", server.url, "--as", checked_name, "--validate"
            )
            with (
                open_replica(replica_name, None) as replica,
                open_replica(checked_name, None) as checked,
            ):
                assert publisher.signal(signal.SIGTERM) == 0
                base = bucket_record(urls, bucket)
                undecodable = msgspec.structs.replace(base, version=2, value=b"\xc1")
                kv_put(urls, bucket, [(KEY, encode_record(undecodable))])
                wait_version(replica, 2)
                with pytest.raises(CorruptStoreError, match="version 2 does not decode"):
                    replica.get()
                wait_until(lambda: "refused version 2" in checking.log(), "the check's refusal")
                assert checked.version == 1
                assert checked.get() == "v1"

                kv_put(urls, bucket, [(KEY, forged(base, 3, "v3"))])
                wait_version(replica, 3)
                wait_version(checked, 3)
                assert replica.get() == checked.get() == "v3"

                foreign = msgspec.structs.replace(
                    base, version=4, value=b"\xc1", fingerprint=b"f" * 16, schema=b""
                )
                kv_put(urls, bucket, [(KEY, encode_record(foreign))])
                for follower in (trusting, checking):
                    wait_until(
                        lambda f=follower: "refused version 4" in f.log(), "the schema refusal"
                    )
                assert replica.version == checked.version == 3
                assert replica.get() == "v3"
    finally:
        shmstore.remove(checked_name)
        assert not Path("/dev/shm" + segment_name(checked_name)).exists()


def test_a_cancelled_publisher_and_follower_end_while_commits_pour_in(
    names: tuple[str, str],
) -> None:
    """``task.cancel()`` of a running publisher's and follower's ``run()`` ends them while a
    writer commits without pause, every time: on Python 3.11 a wait inside nats-py (its
    ``wait_for``) could drop the cancellation, and the publisher ran on (14 of 15 tries)."""
    origin_name, replica_name = names
    stop = threading.Event()

    with nats_servers() as (server,), Store.create(origin_name) as origin:

        def write() -> None:  # never pauses, as far as the publisher can tell
            while not stop.is_set():
                for _ in range(50):
                    origin.set({"n": origin.version})
                time.sleep(0.0005)  # leaves the event loop's thread the GIL now and then

        def replica_version() -> int:
            try:
                with Store.open(replica_name) as replica:
                    return replica.version
            except StoreNotFoundError:
                return 0

        async def trial() -> tuple[bool, bool]:
            options = ConnectOptions(servers=(server.url,))
            publisher = Publisher(origin_name, options=options, live=False)
            follower = Follower(origin_name, options=options, local_name=replica_name)
            tasks = [asyncio.create_task(w.run()) for w in (publisher, follower)]
            deadline = time.monotonic() + HANG
            while not origin.mirror_status.connected or replica_version() < 2:
                assert time.monotonic() < deadline, "the mirror did not start"
                await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            done, _ = await asyncio.wait(tasks, timeout=HANG)
            for worker in (publisher, follower):  # (ends a task that lost its cancellation)
                worker.stop()
            await asyncio.wait(tasks, timeout=HANG)
            return tuple(task in done and task.cancelled() for task in tasks)  # type: ignore[return-value]

        writer = threading.Thread(target=write)
        writer.start()
        try:
            for _ in range(5):
                assert asyncio.run(trial()) == (True, True)
                shmstore.remove(replica_name)
        finally:
            stop.set()
            writer.join()


def test_the_mirror_benchmark_runs(tmp_path: Path) -> None:
    """Keeps ``benchmarks/mirror.py`` from rotting: a tiny run, structure only, never timings
    (with Redis rows when this machine has ``redis-server`` and the ``redis`` package)."""
    out = tmp_path / "mirror.json"
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent.parent / "benchmarks" / "mirror.py"),
         "--blocks", "2", "--per-block", "3", "--sizes", "100B", "fsm", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    visible = json.loads(out.read_text())["visible"]
    assert set(visible) == {"100B", "fsm"}
    for rows in visible.values():
        assert rows["shmstore.mirror"]["n"] == 6
    assert "replica get()" in result.stdout
