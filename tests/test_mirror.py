"""shmstore.mirror against real NATS servers on loopback: replication, late followers, remote
compare-and-set, refused local writes, server and process crashes, two publishers, a 3-node
JetStream cluster losing the publisher's node, typed stores and the schema check.

Servers, publishers and followers are real processes (``nats-server``, ``shmstore mirror ...``),
each killed with its process group at the end of its test. Timeouts only bound a hang.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from mirror_helpers import (
    HANG,
    NATS_SERVER,
    Reading,
    Recorder,
    bucket_record,
    cli,
    make_tls_files,
    mirror_processes,
    nats_servers,
    open_replica,
    wait_bucket_version,
    wait_until,
    wait_version,
)

import shmstore
from shmstore import (
    AsyncStore,
    SchemaMismatchError,
    StateStoreError,
    StateVersionError,
    Store,
    SubscriberLaggedError,
)
from shmstore.fsm import AsyncStateStore, FsmSnapshotDTO, FsmState, initial_snapshot, next_snapshot
from shmstore.mirror import (
    AsyncRemoteStore,
    ConnectOptions,
    MirrorError,
    NoPublisherError,
    RemoteStore,
    default_bucket,
)

pytestmark = [
    pytest.mark.skipif(NATS_SERVER is None, reason="nats-server not installed (shmstore[mirror])"),
    pytest.mark.timeout(240),
]

TYPE = "mirror_helpers:Reading"


def assert_monotonic_and_true(seen: list[tuple[int, Any]], origin: str = "a") -> None:
    versions = [v for v, _ in seen]
    assert versions == sorted(set(versions)), "versions went back or repeated"
    for version, value in seen:
        assert value == Reading.make(version, origin), f"version {version} has a foreign value"


# ---------------------------------------------------------------------------- replication


def test_replication_of_hundreds_of_commits(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, Reading, slots=16) as origin,
    ):
        origin.set(Reading.make(1))
        start("publish", origin_name, "--server", server.url, "--type", TYPE)
        start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name) as replica:
            recorder = Recorder(replica_name)
            for seq in range(2, 301):
                origin.set(Reading.make(seq))
            wait_version(replica, 300)
            assert replica.get_with_version() == (Reading.make(300), 300)
            assert replica.last_update_ns == origin.last_update_ns  # the origin's commit time
            seen = recorder.close()
            assert seen, "the subscriber saw nothing"
            assert seen[-1][0] == 300
            assert_monotonic_and_true(seen)
            stats = replica.statistics()
            assert stats.mirror_role == "replica"
            assert stats.mirror_origin == origin_name
            assert stats.mirror_bucket == default_bucket(origin_name)
            assert stats.mirror_connected
            assert stats.mirror_behind == 0
            # A replica refuses local writes, naming the origin and the way to write remotely.
            with pytest.raises(StateStoreError, match=f"replica of store '{origin_name}'"):
                replica.set(Reading.make(301))
            assert replica.version == 300
        stat = json.loads(cli("stat", replica_name, "--json").stdout)
        assert stat["mirror_role"] == "replica"
        assert stat["version"] == 300
        prom = cli("stat", replica_name, "--prometheus").stdout
        assert "shmstore_mirror_connected{" in prom


def test_a_late_follower_gets_the_current_value_at_once(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, Reading) as origin,
    ):
        start("publish", origin_name, "--server", server.url)
        for seq in range(1, 21):
            origin.set(Reading.make(seq))
        bucket = default_bucket(origin_name)
        wait_bucket_version([server.url], bucket, 20)
        start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name) as replica:
            # The first version the replica ever held is the newest: no replay of history.
            assert replica.commits == 20  # versions are the origin's
            assert replica.wait(0, timeout=0) == 20
            with replica.subscribe(after_version=0) as sub:
                with pytest.raises(SubscriberLaggedError) as lag:
                    sub.poll()
                assert lag.value.missed == 19  # versions 1..19 were never here: the exact lag
                assert sub.poll() == (20, Reading.make(20))

            async def asyncio_reader() -> tuple[int, Reading | None, str]:
                async with AsyncStore.open(replica_name, Reading) as st:
                    waiting = asyncio.ensure_future(st.wait(20, timeout=HANG))
                    await asyncio.sleep(0)
                    origin.set(Reading.make(21))
                    version = await waiting
                    return version, st.get(), st.mirror_status.role

            assert asyncio.run(asyncio_reader()) == (21, Reading.make(21), "replica")


# ---------------------------------------------------------------------------- remote writes


def test_remote_compare_and_set(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, Reading) as origin,
    ):
        origin.set(Reading.make(1))
        start("publish", origin_name, "--server", server.url, "--type", TYPE)
        start("follow", origin_name, "--server", server.url, "--as", replica_name)
        replica = open_replica(replica_name)
        wait_until(lambda: origin.mirror_status.connected, "the publisher answering")
        with replica:
            value = json.dumps({"seq": 2, "origin": "a", "payload": "a-2-xx"})
            ok = cli("mirror", "set", origin_name, value, "--server", server.url, "--expect", "1")
            assert ok.returncode == 0, ok.stderr
            assert json.loads(ok.stdout) == {"version": 2}
            assert origin.get() == Reading(2, "a", "a-2-xx")
            wait_version(replica, 2)
            assert replica.get() == Reading(2, "a", "a-2-xx")

            lost = cli("mirror", "set", origin_name, value, "--server", server.url, "--expect", "1")
            assert lost.returncode == 3
            assert "expected version 1, store is at version 2" in lost.stderr
            assert origin.version == 2

            bad = cli("mirror", "set", origin_name, '{"seq": "x"}', "--server", server.url)
            assert bad.returncode == 1
            assert "not valid for" in bad.stderr
            assert "Traceback" not in bad.stderr

            options = ConnectOptions(servers=(server.url,))
            with RemoteStore(origin_name, options=options) as remote:
                assert remote.set(Reading.make(3), expected_version=2) == 3
                with pytest.raises(StateVersionError) as conflict:
                    remote.set(Reading.make(4), expected_version=2)
                assert (conflict.value.expected, conflict.value.actual) == (2, 3)
                assert remote.set(Reading.make(4)) == 4

            async def remote_async() -> int:
                async with AsyncRemoteStore(origin_name, options=options) as remote:
                    with pytest.raises(StateVersionError):
                        await remote.set(Reading.make(9), expected_version=1)
                    return await remote.set(Reading.make(5), expected_version=4)

            assert asyncio.run(remote_async()) == 5
            wait_version(replica, 5)
            assert replica.get() == Reading.make(5)

        # Nobody publishes this bucket: a clear error, exit 1, one line.
        orphan = cli("mirror", "set", "nobody", "1", "--server", server.url, "--timeout", "2")
        assert orphan.returncode == 1
        assert orphan.stderr.strip().splitlines() == [
            "shmstore: no publisher of 'nobody' answers on bucket 'shmstore_nobody' "
            "(is `shmstore mirror publish` running on the origin's host?)"
        ]
        with (
            RemoteStore("nobody", options=ConnectOptions(servers=(server.url,)), timeout=2) as r,
            pytest.raises(NoPublisherError),
        ):
            r.set(1)


def test_credentials_pass_through_and_never_show(names: tuple[str, str]) -> None:
    origin_name, _replica_name = names
    secret = "s3cret-Pa55word"
    with (
        nats_servers(auth=("robot", secret)) as (server,),
        mirror_processes() as start,
        Store.create(origin_name) as origin,
    ):
        origin.set({"n": 1})
        env = {"SHMSTORE_NATS_PASSWORD": secret}
        start("publish", origin_name, "--server", server.url, "--user", "robot", env=env)
        wait_until(lambda: origin.mirror_status.connected, "the publisher")
        good = cli("mirror", "set", origin_name, '{"n": 2}', "--server", server.url,
                   "--user", "robot", env=env)  # fmt: skip
        assert good.returncode == 0, good.stderr
        assert origin.get() == {"n": 2}
        wrong = cli(
            "mirror", "set", origin_name, "{}", "--server", f"nats://robot:{secret}x@127.0.0.1:"
            f"{server.port}", "--timeout", "2",
        )  # fmt: skip
        assert wrong.returncode == 1
        assert secret not in wrong.stderr + wrong.stdout
        assert "Traceback" not in wrong.stderr
        assert len(wrong.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
def test_tls_options_pass_through(names: tuple[str, str], tmp_path: Path) -> None:
    origin_name, _replica_name = names
    ca, cert, key = make_tls_files(tmp_path)
    with (
        nats_servers(tls=(cert, key)) as (server,),
        mirror_processes() as start,
        Store.create(origin_name) as origin,
    ):
        assert server.url.startswith("tls://")
        start("publish", origin_name, "--server", server.url, "--tls-ca", str(ca))
        wait_until(lambda: origin.mirror_status.connected, "the publisher over TLS")
        good = cli("mirror", "set", origin_name, "[1]", "--server", server.url, "--tls-ca", str(ca))
        assert good.returncode == 0, good.stderr
        assert good.stderr == ""
        assert origin.get() == [1]
        # Without the CA the server's certificate cannot be verified: one clear line.
        bad = cli("mirror", "set", origin_name, "[2]", "--server", server.url, "--timeout", "2")
        assert bad.returncode == 1
        assert bad.stderr.startswith("shmstore: cannot connect to NATS")
        assert len(bad.stderr.strip().splitlines()) == 1
        assert origin.get() == [1]


# ---------------------------------------------------------------------------- faults


def test_server_sigkill_and_restart_converge(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, Reading) as origin,
    ):
        for seq in range(1, 11):
            origin.set(Reading.make(seq))
        start("publish", origin_name, "--server", server.url)
        start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name) as replica:
            wait_version(replica, 10)
            recorder = Recorder(replica_name)
            server.kill()
            # Local readers are not disturbed: the last value, at local cost, with the truth
            # about the mirror in the statistics.
            assert replica.get() == Reading.make(10)
            wait_until(lambda: not replica.statistics().mirror_connected, "replica disconnected")
            for seq in range(11, 31):
                origin.set(Reading.make(seq))
            wait_until(lambda: origin.mirror_status.behind > 0, "origin reports versions behind")
            assert not origin.mirror_status.connected
            assert replica.get_with_version() == (Reading.make(10), 10)
            server.start()
            wait_version(replica, 30)
            assert replica.get() == Reading.make(30)
            wait_until(lambda: replica.statistics().mirror_connected, "replica reconnected")
            wait_until(lambda: origin.mirror_status.behind == 0, "origin caught up")
            assert_monotonic_and_true(recorder.close())


def test_publisher_and_follower_restarts_never_regress(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    bucket = default_bucket(origin_name)
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, Reading) as origin,
    ):
        origin.set(Reading.make(1))
        publisher = start("publish", origin_name, "--server", server.url)
        follower = start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name) as replica:
            recorder = Recorder(replica_name)
            for seq in range(2, 51):
                origin.set(Reading.make(seq))
            wait_version(replica, 50)
            # (The live copy may reach the replica before the durable put lands.)
            wait_until(
                lambda: getattr(bucket_record([server.url], bucket), "version", 0) == 50,
                "version 50 in the bucket",
            )
            # Crash both; commits go on meanwhile.
            assert publisher.signal(signal.SIGKILL) == -signal.SIGKILL
            assert follower.signal(signal.SIGKILL) == -signal.SIGKILL
            for seq in range(51, 81):
                origin.set(Reading.make(seq))
            # A follower restarted alone re-reads version 50 and must not apply it again.
            synced = replica.statistics().mirror_last_sync_ns
            follower.start()
            wait_until(
                lambda: replica.statistics().mirror_last_sync_ns > synced, "follower resynced"
            )
            assert replica.get_with_version() == (Reading.make(50), 50)
            publisher.start()
            wait_version(replica, 80)
            assert replica.get() == Reading.make(80)
            # The live copy may reach the replica before the durable put lands in the bucket.
            wait_until(
                lambda: getattr(bucket_record([server.url], bucket), "version", 0) == 80,
                "version 80 in the bucket",
            )
            # A clean stop (SIGTERM) exits 0 and says "disconnected" in the header.
            assert follower.signal(signal.SIGTERM) == 0
            assert not replica.mirror_status.connected
            assert_monotonic_and_true(recorder.close())


def test_a_recreated_origin_carries_on_and_never_regresses(
    names: tuple[str, str], tmp_path: Path
) -> None:
    origin_name, replica_name = names
    saved = tmp_path / "origin.ckpt"
    with nats_servers() as (server,), mirror_processes() as start:
        with Store.create(origin_name, Reading) as origin:
            for seq in range(1, 11):
                origin.set(Reading.make(seq))
            publisher = start("publish", origin_name, "--server", server.url)
            start("follow", origin_name, "--server", server.url, "--as", replica_name)
            replica = open_replica(replica_name)
            wait_version(replica, 10)
            origin.checkpoint(saved)
            publisher.signal(signal.SIGKILL)
        # The host "reboots": the store comes back from its checkpoint, same name, same host.
        shmstore.remove(origin_name)
        with replica, Store.create(origin_name, Reading, restore_from=saved) as origin:
            origin.set(Reading.make(11))
            publisher = start("publish", origin_name, "--server", server.url)
            wait_version(replica, 11)
            assert replica.get() == Reading.make(11)
            publisher.signal(signal.SIGKILL)
            origin.close()
            # Re-created from nothing: below the bucket, so nothing is put until it passes 11.
            shmstore.remove(origin_name)
            with Store.create(origin_name, Reading) as fresh:
                for seq in range(1, 4):
                    fresh.set(Reading.make(seq))
                publisher = start("publish", origin_name, "--server", server.url)
                wait_until(lambda: "behind bucket" in publisher.log(), "the publisher's warning")
                assert replica.get_with_version() == (Reading.make(11), 11)
                for seq in range(4, 13):
                    fresh.set(Reading.make(seq))
                wait_version(replica, 12)
                assert replica.get_with_version() == (Reading.make(12), 12)


def test_two_publishers_for_one_bucket_never_interleave(
    names: tuple[str, str], store_name: str
) -> None:
    origin_name, replica_name = names
    other_name = f"{store_name}-b"
    bucket = "shared_bucket"
    try:
        with (
            nats_servers() as (server,),
            mirror_processes() as start,
            Store.create(origin_name, Reading) as a,
            Store.create(other_name, Reading) as b,
        ):
            a.set(Reading.make(1, "a"))
            start(
                "publish", origin_name, "--server", server.url, "--bucket", bucket, "--type", TYPE
            )
            wait_until(lambda: bucket_record([server.url], bucket), "the first record")
            b.set(Reading.make(1, "b"))
            start("publish", other_name, "--server", server.url, "--bucket", bucket, "--type", TYPE)
            start("follow", origin_name, "--server", server.url, "--bucket", bucket,
                  "--as", replica_name)  # fmt: skip
            with open_replica(replica_name) as replica:
                recorder = Recorder(replica_name)
                # The second publisher is a standby: its store says so, and it answers nothing.
                wait_until(lambda: b.mirror_status.role == "origin", "standby started")
                for seq in range(2, 101):
                    b.set(Reading.make(seq, "b"))  # b runs ahead of a
                    a.set(Reading.make(seq, "a"))
                wait_version(replica, 100)
                assert a.mirror_status.connected
                assert not b.mirror_status.connected
                for seq in range(101, 121):
                    b.set(Reading.make(seq, "b"))
                wait_until(lambda: a.mirror_status.last_sync_ns > 0, "a synced")
                assert bucket_record([server.url], bucket).origin.split("/")[1] == origin_name
                assert replica.get_with_version() == (Reading.make(100, "a"), 100)
                # Remote writes reach the active publisher only, never the standby.
                wait_until(lambda: a.mirror_status.connected, "a answering")
                options = ConnectOptions(servers=(server.url,))
                with RemoteStore(origin_name, options=options, bucket=bucket) as remote:
                    for seq in range(101, 111):
                        assert remote.set(Reading.make(seq, "a"), expected_version=seq - 1) == seq
                assert a.version == 110
                assert b.version == 120
                wait_version(replica, 110)
                seen = recorder.close()
                assert_monotonic_and_true(seen, "a")
    finally:
        shmstore.remove(other_name)


def test_cluster_loses_the_publishers_node(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    with (
        nats_servers(3) as (n1, n2, n3),
        mirror_processes() as start,
        Store.create(origin_name, Reading) as origin,
    ):
        origin.set(Reading.make(1))
        urls = f"{n1.url},{n2.url},{n3.url}"
        start("publish", origin_name, "--server", urls, "--replicas", "3")
        start("follow", origin_name, "--server", f"{n3.url},{n2.url}", "--as", replica_name)
        with open_replica(replica_name) as replica:
            for seq in range(2, 21):
                origin.set(Reading.make(seq))
            wait_version(replica, 20)
            recorder = Recorder(replica_name)
            n1.kill()  # the node the publisher is connected to
            for seq in range(21, 41):
                origin.set(Reading.make(seq))
            wait_version(replica, 40)
            assert replica.get() == Reading.make(40)
            assert bucket_record([n2.url, n3.url], default_bucket(origin_name)).version == 40
            assert_monotonic_and_true(recorder.close())


def test_growing_values_and_values_above_max_payload(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, slot_size=256) as origin,
    ):
        origin.set("small")
        publisher = start("publish", origin_name, "--server", server.url)
        start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name, None) as replica:
            grown = "g" * 20_000  # the origin's ring grows; the replica's follows
            origin.set(grown)
            wait_version(replica, 2)
            assert replica.get() == grown
            assert replica.statistics().growths >= 1
            # Over NATS's max_payload (1 MiB by default): it travels in chunks.
            huge = "h" * (1 << 20)
            origin.set(huge)
            wait_version(replica, 3)
            assert replica.get() == huge
            origin.set("after")
            wait_version(replica, 4)
            with replica.subscribe(2) as sub:
                assert sub.poll() == (3, huge)  # no version was left behind
                assert sub.poll() == (4, "after")
            assert "max_payload" not in publisher.log()


# ---------------------------------------------------------------------------- typed stores


def test_fsm_snapshots_and_the_schema_check_on_the_replica(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(origin_name, FsmSnapshotDTO, slot_size=256 * 1024) as origin,
    ):
        snap = initial_snapshot()
        origin.set(snap)
        for state in (FsmState.IDLE, FsmState.ACTIVE):
            snap = next_snapshot(snap, state, f"to {state.name}")
            origin.set(snap)
        start("publish", origin_name, "--server", server.url)
        start("follow", origin_name, "--server", server.url, "--as", replica_name)
        with open_replica(replica_name, FsmSnapshotDTO) as replica:
            wait_version(replica, 3)
            assert replica.get() == snap
            assert replica.statistics().type_name == origin.statistics().type_name
            with pytest.raises(SchemaMismatchError):
                Store.open(replica_name, Reading).close()

        async def through_the_fsm_layer() -> FsmSnapshotDTO | None:
            async with AsyncStateStore(name=replica_name) as fsm:
                current = await fsm.get()
                with pytest.raises(StateStoreError, match="replica"):
                    await fsm.set(next_snapshot(snap, FsmState.SHUTDOWN, "local"))
                return current

        assert asyncio.run(through_the_fsm_layer()) == snap


def test_a_replica_name_taken_by_an_ordinary_store_is_refused(names: tuple[str, str]) -> None:
    origin_name, replica_name = names
    with (
        nats_servers() as (server,),
        Store.create(replica_name, Reading),
    ):
        result = cli("mirror", "follow", origin_name, "--server", server.url, "--as", replica_name)
        assert result.returncode == 1
        assert f"store {replica_name!r} exists and is not a replica" in result.stderr
        assert issubclass(MirrorError, StateStoreError)
