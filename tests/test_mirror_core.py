"""The core hooks of shmstore.mirror, without NATS: the header's mirror block, replicas that refuse
local writes in every process, commits at the origin's versions, and the mirror status."""

from __future__ import annotations

import multiprocessing
import os
import struct
import tracemalloc
from typing import Any

import msgspec
import pytest

from shmstore import (
    CorruptStoreError,
    InvalidSnapshotError,
    SchemaMismatchError,
    SnapshotTooLargeError,
    StateStoreError,
    StateVersionError,
    Store,
    StoreNotFoundError,
    SubscriberLaggedError,
)
from shmstore import _layout as L
from shmstore._codec import fingerprint_of, type_name_of
from shmstore.metrics import prometheus_text
from shmstore.mirror import ConnectOptions, MirrorError
from shmstore.replication import create_replica


class Point(msgspec.Struct):
    x: int
    y: int


def _replica(
    name: str,
    tp: Any = Point,
    slots: int = 4,
    max_value_size: int | None = 1024,
    schema_record: bytes = b"",
) -> Store[Any]:
    return create_replica(
        name,
        fingerprint=fingerprint_of(tp),
        type_name=type_name_of(tp),
        origin="robot",
        bucket="shmstore_robot",
        slots=slots,
        slot_size=256,
        max_value_size=max_value_size,
        schema_record=schema_record,
    )


def _encode(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


# ---------------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    "schema_record",
    [b"{not json", b"[1]", b'{"a": 1}', b"null", b'"x"', b"[" * 100_000 + b"]" * 100_000],
)
def test_a_schema_record_that_does_not_decode_creates_nothing(
    store_name: str, schema_record: bytes
) -> None:
    """A follower creates its replica from a bucket record: a bad schema record in it is a
    StateStoreError before any segment exists (it was KeyError or TypeError, and left a
    zero-filled segment that failed every later follower as a corrupt store)."""
    with pytest.raises(SchemaMismatchError, match="schema record does not decode"):
        _replica(store_name, schema_record=schema_record)
    with pytest.raises(StoreNotFoundError):
        Store.open(store_name)
    with _replica(store_name) as replica:  # the name is free for a good record
        assert replica.version == 0


def test_mirror_block_fits_the_free_header_space() -> None:
    assert L.OFF_MUTEX + 64 <= L.OFF_MIRROR_STATE
    for off in (L.OFF_MIRROR_STATE, L.OFF_MIRROR_PID, L.OFF_MIRROR_SYNC, L.OFF_MIRROR_BEHIND):
        assert off % 8 == 0
        assert 384 <= off < L.OFF_MIRROR_BUCKET
    assert L.OFF_MIRROR_BEHIND + 8 <= L.OFF_MIRROR_BUCKET
    assert L.OFF_MIRROR_BUCKET + L.MIRROR_BUCKET_FIELD <= L.OFF_MIRROR_ORIGIN
    assert L.OFF_MIRROR_ORIGIN + L.MIRROR_ORIGIN_FIELD == L.HEADER_SIZE
    assert L.FLAG_REPLICA not in (L.FLAG_CRC, L.FLAG_ROBUST_MUTEX)
    assert L.FLAG_REPLICA & (L.FLAG_REPLICA - 1) == 0  # one bit


def test_header_with_the_replica_flag_is_valid_and_unknown_flags_are_not() -> None:
    g = L.Geometry(4, 64, 8)
    buf = bytearray(g.total_size)
    buf[: L.HEADER.size] = L.pack_header(g, L.FLAG_REPLICA, 1, b"f" * 16, magic=L.MAGIC)
    assert L.read_header(buf, g.total_size).flags == L.FLAG_REPLICA
    buf[: L.HEADER.size] = L.pack_header(g, 8, 1, b"f" * 16, magic=L.MAGIC)
    with pytest.raises(Exception, match="unknown header flags"):
        L.read_header(buf, g.total_size)


def test_text_field_is_cut_at_a_character_boundary() -> None:
    raw = L.text_field("é" * 40, 32)
    assert len(raw) == 32
    assert L.read_text_field(raw, 0, 32) == "é" * 16


# ---------------------------------------------------------------------------- replicas


def test_replica_checks_the_origin_schema_and_reads_like_a_store(store_name: str) -> None:
    with _replica(store_name) as rep:
        assert rep.mirror_status.role == "replica"
        assert not rep.writable
        assert rep.replication.commit_at(_encode(Point(1, 2)), 7, 123) == 7
        with Store.open(store_name, Point) as reader:
            assert reader.get() == Point(1, 2)
            assert reader.version == 7
            assert reader.last_update_ns == 123  # the origin's commit time
        with pytest.raises(SchemaMismatchError):
            Store.open(store_name, dict[str, int]).close()


def _try_set(name: str, queue: Any) -> None:
    with Store.open(name, Point) as st:
        try:
            st.set(Point(0, 0))
        except StateStoreError as exc:
            queue.put(str(exc))
        else:
            queue.put("written")


def test_every_process_refuses_local_writes_to_a_replica(store_name: str) -> None:
    with _replica(store_name) as rep, Store.open(store_name, Point) as typed:
        with pytest.raises(StateStoreError, match="replica of store 'robot'") as err:
            typed.set(Point(3, 4))
        assert "shmstore mirror set robot" in str(err.value)
        assert "shmstore_robot" in str(err.value)
        with pytest.raises(StateStoreError, match="replica of store 'robot'"):
            typed.try_set(Point(3, 4), 0)
        with pytest.raises(StateStoreError, match="replica of store 'robot'"):
            typed.update(lambda _old: Point(3, 4))
        assert not typed.writable
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_try_set, args=(store_name, queue))
        child.start()
        message = queue.get(timeout=60)
        child.join(60)
        assert "replica of store 'robot'" in message
        assert rep.version == 0


def test_commit_replicated_never_goes_back(store_name: str) -> None:
    with _replica(store_name) as rep:
        rep.replication.commit_at(_encode(Point(1, 1)), 5, 1)
        for stale in (5, 4):
            with pytest.raises(StateVersionError, match="not newer"):
                rep.replication.commit_at(_encode(Point(9, 9)), stale, 1)
        assert rep.get() == {"x": 1, "y": 1}
        with pytest.raises(SnapshotTooLargeError):
            rep.replication.commit_at(b"\x00" * 1025, 6, 1)
        with pytest.raises(InvalidSnapshotError):
            rep.replication.commit_at(b"\xc1", 6, 1)  # not MessagePack
        assert rep.version == 5


def test_an_impossible_commit_time_is_refused_before_anything_is_written(
    store_name: str,
) -> None:
    """A record's commit time that is no u64 (a hostile or broken publisher) is refused up
    front: written half-way, it would leave the slot's seq odd and its readers retrying."""
    with _replica(store_name) as rep, Store.open(store_name, Point) as reader:
        rep.replication.commit_at(_encode(Point(1, 1)), 5, 1)
        for when in (-1, 1 << 64, 1.5):
            for validated in (False, True):
                with pytest.raises(ValueError, match="commit time"):
                    rep.replication.commit_at(_encode(Point(9, 9)), 6, when, validated=validated)
                with pytest.raises(ValueError, match="version"):
                    rep.replication.commit_at(_encode(Point(9, 9)), 6.0, 1, validated=validated)
        assert reader.get_with_version() == (Point(1, 1), 5)
        for version in (6, 7):  # the slots of the refused version and the next are sound
            rep.replication.commit_at(_encode(Point(version, 0)), version, (1 << 64) - 1)
            assert reader.get_with_version() == (Point(version, 0), version)


def test_a_validated_commit_skips_only_the_decode(store_name: str) -> None:
    """``validated=True``: the caller vouches for the bytes, and the decode is skipped; the
    default still refuses what does not decode, and the other checks hold either way. A false
    vouch shows to readers as CorruptStoreError on that version -- never a torn or wrong
    value -- until the next commit replaces it."""
    with _replica(store_name) as rep, Store.open(store_name, Point) as reader:
        rep.replication.commit_at(_encode(Point(1, 1)), 1, 1, validated=True)
        assert reader.get() == Point(1, 1)
        with pytest.raises(InvalidSnapshotError):
            rep.replication.commit_at(b"\xc1", 2, 1, validated=False)
        with pytest.raises(InvalidSnapshotError):
            rep.replication.commit_at(_encode(Point(2, 2))[:-1], 2, 1)  # the default checks
        assert rep.version == 1
        with pytest.raises(StateVersionError):
            rep.replication.commit_at(_encode(Point(0, 0)), 1, 1, validated=True)
        with pytest.raises(SnapshotTooLargeError):
            rep.replication.commit_at(b"\x00" * 1025, 2, 1, validated=True)
        assert rep.replication.commit_at(b"\xc1", 2, 1, validated=True) == 2  # a false vouch
        with pytest.raises(CorruptStoreError, match="version 2 does not decode"):
            reader.get()
        rep.replication.commit_at(_encode(Point(3, 3)), 3, 1, validated=True)
        assert reader.get_with_version() == (Point(3, 3), 3)
        # A view (the follower's live path): written from its own memory, as bytes would be;
        # unvalidated, it is copied and checked like any payload.
        message = bytearray(b"--" + _encode(Point(4, 4)) + b"--")
        rep.replication.commit_at(memoryview(message)[2:-2], 4, 1, validated=True)
        assert reader.get_with_version() == (Point(4, 4), 4)
        with pytest.raises(InvalidSnapshotError):
            rep.replication.commit_at(memoryview(message)[1:-2], 5, 1)
        rep.replication.commit_at(memoryview(message)[2:-2], 5, 1)
        assert reader.get_with_version() == (Point(4, 4), 5)


class Blob(msgspec.Struct):
    data: bytes


def test_a_replica_grows_with_the_origins_values(store_name: str) -> None:
    """The origin's values may grow past the first slot size: the replica's slots follow, and
    readers in other handles follow the move."""
    with (
        _replica(store_name, Blob, max_value_size=1 << 16) as rep,
        Store.open(store_name, Blob) as reader,
    ):
        rep.replication.commit_at(_encode(Blob(b"a" * 10)), 1, 1)
        assert reader.get() == Blob(b"a" * 10)
        big = Blob(b"b" * 5000)
        rep.replication.commit_at(_encode(big), 9, 2)
        assert reader.get_with_version() == (big, 9)
        assert rep.statistics().growths >= 1


def test_an_ordinary_store_is_not_a_replica(store_name: str) -> None:
    with Store.create(store_name, Point) as st:
        assert st.mirror_status.role == ""
        with pytest.raises(StateStoreError, match="not a replica"):
            st.replication.commit_at(_encode(Point(1, 1)), 1, 1)


@pytest.mark.parametrize("jump", [1, 2, 3, 4, 9])
def test_skipped_versions_show_as_the_exact_lag(store_name: str, jump: int) -> None:
    """A replica that jumps over missed versions: subscribers see exactly how many, because the
    slots of the skipped versions never held them."""
    with _replica(store_name, slots=4) as rep, Store.open(store_name, Point) as reader:
        rep.replication.commit_at(_encode(Point(1, 0)), 1, 1)
        sub = reader.subscribe()
        assert sub.poll() == (1, Point(1, 0))
        target = 1 + jump
        rep.replication.commit_at(_encode(Point(target, 0)), target, 2)
        if jump == 1:
            assert sub.poll() == (2, Point(2, 0))
        else:
            with pytest.raises(SubscriberLaggedError) as lag:
                sub.poll()
            assert lag.value.missed == jump - 1
            assert lag.value.resume_version == target
            assert sub.poll() == (target, Point(target, 0))
        assert sub.poll() is None
        assert reader.wait(0, timeout=0) == target


# ---------------------------------------------------------------------------- status


def test_mirror_status_in_statistics_and_prometheus(store_name: str) -> None:
    with Store.create(store_name, Point) as origin:
        assert origin.statistics().mirror_role == ""
        assert "shmstore_mirror" not in prometheus_text([origin.statistics()])
        origin.replication.claim("bkt")
        origin.replication.set_status(connected=True, last_sync_ns=5_000_000_000, behind=3)
        s = origin.statistics()
        assert (s.mirror_role, s.mirror_connected, s.mirror_behind) == ("origin", True, 3)
        assert (s.mirror_bucket, s.mirror_origin, s.mirror_last_sync_ns) == (
            "bkt",
            store_name,
            5_000_000_000,
        )
        assert origin.mirror_status.pid == os.getpid()
        text = prometheus_text([s])
        assert (
            f'shmstore_mirror_connected{{store="{store_name}",role="origin",bucket="bkt"}} 1'
            in (text)
        )
        assert "shmstore_mirror_behind_versions" in text
        assert "shmstore_mirror_last_sync_seconds" in text
        origin.replication.set_status(connected=False)
        assert not origin.statistics().mirror_connected
        assert origin.statistics().mirror_behind == 3  # left as it was


def _claim_and_exit(name: str) -> None:
    with Store.open(name, Point) as st:
        st.replication.claim("bkt")
        st.replication.set_status(connected=True)


def test_a_dead_mirroring_process_reads_as_disconnected(store_name: str) -> None:
    with Store.create(store_name, Point) as origin:
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_claim_and_exit, args=(store_name,))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        status = origin.mirror_status
        assert status.role == "origin"
        assert not status.connected  # the bit is set, but its pid is gone


# ---------------------------------------------------------------------------- wire and options


def test_default_buckets_are_valid_distinct_and_fit_the_header() -> None:
    from shmstore.mirror import default_bucket  # noqa: PLC0415
    from shmstore.mirror._wire import validate_bucket  # noqa: PLC0415

    assert default_bucket("robot") == "shmstore_robot"
    names = ["a.b", "a_b", "a:b", "é", "x" * 64, "x" * 63 + "y"]
    buckets = [default_bucket(n) for n in names]
    assert len(set(buckets)) == len(names)
    for bucket in buckets:
        assert validate_bucket(bucket) == bucket
        assert len(bucket) <= L.MIRROR_BUCKET_FIELD
    for bad in ("a.b", "", "x" * 33):
        with pytest.raises(ValueError, match="bucket name"):
            validate_bucket(bad)


def _record(version: int, value: bytes) -> Any:
    """A mirror record of *value* at *version*, as a publisher of store ``robot`` makes it."""
    from shmstore.mirror._wire import Record  # noqa: PLC0415

    return Record(
        shmstore="0.1.0",
        origin="host/robot/1",
        store="robot",
        version=version,
        commit_ns=123,
        fingerprint=b"f" * 16,
        type_name="m:T",
        slots=8,
        slot_size=64,
        value=value,
    )


def test_records_round_trip_and_foreign_bytes_are_refused() -> None:
    from shmstore.mirror._wire import decode_record, encode_record  # noqa: PLC0415

    record = _record(7, b"\x93\x01\x02\x03")
    assert decode_record(encode_record(record)) == record
    with pytest.raises(StateStoreError, match="not a shmstore mirror record"):
        decode_record(b"hello")
    # The live thread's view: the same record, its value in the message's own memory.
    data = bytearray(encode_record(record))
    view = decode_record(data, view=True)
    assert isinstance(view.value, memoryview)
    assert view.value.obj is data
    assert bytes(view.value) == record.value
    assert view.version == 7
    # A field no record has, nested deeper than the decoder goes (a hostile publisher).
    deep = b"\x81\xa1z" + b"\x91" * 100_000 + b"\xc0"
    for data in (b"hello", deep):
        for as_view in (False, True):
            with pytest.raises(StateStoreError, match="not a shmstore mirror record"):
                decode_record(data, view=as_view)


def test_secrets_never_show() -> None:
    from shmstore.mirror import ConnectOptions  # noqa: PLC0415
    from shmstore.mirror._connect import describe_error, redact  # noqa: PLC0415

    assert redact("nats://u:pw@host:4222") == "nats://***@host:4222"
    assert redact("nats://host:4222") == "nats://host:4222"
    options = ConnectOptions(
        servers=("nats://u:urlsecret@host:4222",), user="u", password="pw-secret", token="tk"
    )
    shown = repr(options)
    for secret in ("urlsecret", "pw-secret", "'tk'"):
        assert secret not in shown
    error = describe_error(
        OSError("cannot reach nats://u:urlsecret@host:4222 with pw-secret"), options
    )
    assert "urlsecret" not in error
    assert "pw-secret" not in error
    assert error.startswith("OSError: ")


@pytest.mark.parametrize(
    "servers", [(), [], ("",), (" ",), "nats://127.0.0.1:4222", ("nats://h:99999",), ("nats://:1",)]
)
def test_connect_options_refuse_servers_no_client_can_try(servers: Any) -> None:
    """No server (or a string, read as one server per character) made nats-py's connect retry
    in a loop that never awaits: 100% CPU, deaf to SIGTERM, Ctrl-C and cancellation."""
    with pytest.raises(MirrorError, match="server"):
        ConnectOptions(servers=servers)


def test_mirror_set_without_a_server_is_one_clear_line() -> None:
    import socket  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = f"nats://u:hush@127.0.0.1:{port}"
    result = subprocess.run(
        [sys.executable, "-m", "shmstore", "mirror", "set", "x", "1", "--server", server],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("shmstore: cannot connect to NATS at nats://***@127.0.0.1:")
    assert "hush" not in result.stderr


def test_a_replica_cannot_be_published(store_name: str) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    with _replica(store_name):
        command = ["mirror", "publish", store_name, "--server", "nats://127.0.0.1:9"]
        result = subprocess.run(
            [sys.executable, "-m", "shmstore", *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"shmstore: store {store_name!r} is a replica of 'robot': publish the origin on its own "
        "host instead"
    )


def test_remote_set_of_a_recursive_or_deep_value_is_a_mirror_error() -> None:
    import asyncio  # noqa: PLC0415

    from shmstore.mirror import (  # noqa: PLC0415
        AsyncRemoteStore,
        ConnectOptions,
        MirrorError,
        RemoteStore,
    )

    recursive: list[Any] = []
    recursive.append(recursive)
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    options = ConnectOptions(servers=("nats://127.0.0.1:9",))  # never reached: refused first
    with RemoteStore("x", options=options) as remote:
        for value in (recursive, deep):
            with pytest.raises(MirrorError, match="recursive or nested too deeply"):
                remote.set(value)

    async def remote_async() -> None:
        async with AsyncRemoteStore("x", options=options) as remote:
            with pytest.raises(MirrorError, match="recursive or nested too deeply"):
                await remote.set(recursive)

    asyncio.run(remote_async())


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "shmstore: value is nested too deeply"),
        (b'"\xff\xfe"', "shmstore: value is not valid JSON: Invalid UTF-8 encoded string"),
    ],
    ids=["deep", "not-utf8"],
)
def test_mirror_set_of_bad_standard_input_is_one_clear_line(stdin: bytes, message: str) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    result = subprocess.run(
        [sys.executable, "-m", "shmstore", "mirror", "set", "x", "-", "--server", "nats://h:9"],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines() == [message]


def _parts(data: bytes, version: int) -> list[bytes]:
    from shmstore.mirror._wire import live_parts  # noqa: PLC0415

    return [header + bytes(piece) for header, piece in live_parts(data, version, 16_384)]


LIMIT = 1 << 20  # the largest record a follower takes parts of, in these tests


def test_a_manifest_must_be_one_the_replica_can_take() -> None:
    """Checked before any chunk is read: a 200-byte manifest that claimed a million chunks
    made a follower start a million reads (2.9 GB, then MemoryError)."""
    from shmstore.mirror._wire import (  # noqa: PLC0415
        MIN_PART,
        check_manifest,
        decode_record,
        encode_record,
        manifest,
        split,
    )

    record = _record(3, os.urandom(100_000))
    data = encode_record(record)
    parts = split(data, 16_384)
    good = manifest(decode_record(data), data, len(parts), 1)
    check_manifest(good, len(data))  # what a publisher makes passes
    check_manifest(msgspec.structs.replace(good, chunks=-(-len(data) // MIN_PART)), len(data))
    for claims, message in [
        ({"chunks": 1_000_000}, "chunks for"),
        ({"chunks": 0}, "chunks for"),
        ({"chunks": -1}, "chunks for"),
        ({"size": 0}, "bytes"),
        ({"size": len(data) + 1}, "bytes"),
    ]:
        with pytest.raises(StateStoreError, match=message):
            check_manifest(msgspec.structs.replace(good, **claims), len(data))


def test_live_parts_reassemble_only_whole_and_matching() -> None:
    from shmstore.mirror._wire import Reassembly  # noqa: PLC0415

    data = os.urandom(50_000)
    parts = _parts(data, 7)
    assert len(parts) == 4
    whole = Reassembly()
    assert [whole.add(p, limit=LIMIT) for p in reversed(parts)] == [None, None, None, data]
    # The versions the replica has are dropped unread.
    known = Reassembly()
    assert [known.add(p, newer_than=7, limit=LIMIT) for p in parts] == [None] * 4
    assert [known.add(p, newer_than=6, limit=LIMIT) for p in parts] == [None, None, None, data]
    # A damaged part: the digest refuses the whole, nothing torn comes out.
    damaged = [*parts[:3], _parts(bytes(50_000), 7)[3]]
    torn = Reassembly()
    assert [torn.add(p, limit=LIMIT) for p in damaged] == [None, None, None, None]
    with pytest.raises(StateStoreError):
        Reassembly().add(b"\x01short", limit=LIMIT)


def test_live_parts_in_order_are_joined_as_they_arrive() -> None:
    from shmstore.mirror._wire import Reassembly  # noqa: PLC0415

    data = os.urandom(50_000)
    parts = _parts(data, 9)
    assert len(parts) == 4
    # Only the last part carries the CRC of the whole: the sender computes it as it sends.
    assert [int.from_bytes(p[24:28], "big") for p in parts[:3]] == [0, 0, 0]
    joined = Reassembly()
    assert [joined.add(p, limit=LIMIT) for p in parts] == [None, None, None, data]
    # A second send of the same version adds nothing; a part ahead of its turn waits.
    assert all(joined.add(p, limit=LIMIT) is None for p in parts)
    shuffled = Reassembly()
    order = [2, 0, 3, 1]
    assert [shuffled.add(parts[i], limit=LIMIT) for i in order] == [None, None, None, data]
    # Parts of one version whose sends disagree about the record's size: never joined.
    other = _parts(os.urandom(40_000), 9)
    disagreeing = Reassembly()
    mixed = [parts[0], other[1], parts[1], parts[2], parts[3]]
    assert [disagreeing.add(p, limit=LIMIT) for p in mixed] == [None] * 5
    # Another version starts afresh, whatever was left of this one, newer or older.
    for version in (10, 8):
        fresh = _parts(data[::-1], version)
        assert disagreeing.add(fresh[0], limit=LIMIT) is None
        assert [disagreeing.add(p, limit=LIMIT) for p in fresh[1:]] == [None, None, data[::-1]]


def test_live_parts_hold_at_most_one_record() -> None:
    """Parts never make a follower hold more than one record of at most *limit* bytes, and a
    stale or bogus part of a huge version never blocks the versions after it."""
    from shmstore.mirror._wire import Reassembly  # noqa: PLC0415

    data = os.urandom(50_000)
    parts = _parts(data, 9)
    small = Reassembly()
    assert [small.add(p, limit=49_999) for p in parts] == [None] * 4  # above the limit
    assert [small.add(p, limit=50_000) for p in parts] == [None, None, None, data]
    # Parts ahead of their turn that claim a 50 KB record in 40 parts, 16 KB each: what the
    # follower holds stays within the 50 KB they claim.
    flood = Reassembly()
    tracemalloc.start()
    try:
        for index in range(1, 40):
            head = struct.pack(">QIIQI", 11, index, 40, 50_000, 0)
            assert flood.add(head + os.urandom(16_000), limit=LIMIT) is None
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 200_000
    # Tiny and empty parts ahead of their turn, of a record of 2**32-1 parts or of one of
    # 48 parts (as many as 50 KB may have): each costs far more than its piece, and the
    # count a record may claim bounds what they hold.
    tiny = Reassembly()
    tracemalloc.start()
    try:
        for count, index in [(2**32 - 1, i) for i in range(1, 50_000)] + [
            (48, i) for i in range(1, 47)
        ]:
            for piece in (b"x", b""):
                head = struct.pack(">QIIQI", 12, index, count, 50_000, 0)
                assert tiny.add(head + piece, limit=LIMIT) is None
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 200_000
    # One part of a version far ahead (stale, or bogus) is followed by a real record.
    bogus = Reassembly()
    head = struct.pack(">QIIQI", 1 << 62, 0, 3, 30_000, 0)
    assert bogus.add(head + b"x" * 100, limit=LIMIT) is None
    assert [bogus.add(p, limit=LIMIT) for p in parts] == [None, None, None, data]
