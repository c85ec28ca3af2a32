"""When the publisher makes its durable put (``_commits``): at once when a commit's live copy
could not go out, when the writer pauses (``--durable-quiet``), at the latest
``--durable-most`` after the first commit the bucket lacks while the writer never pauses, and
on a clean stop.

Each case sets the other rules' times to an hour, so that only the rule under test can put the
version the test waits for: without that rule the wait times out. Servers and publishers are
real processes on loopback; timeouts only bound a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from mirror_helpers import (
    NATS_SERVER,
    MirrorProcess,
    bucket_record,
    cli,
    mirror_processes,
    nats_servers,
    wait_until,
)

from shmstore import Store
from shmstore.mirror import Publisher, default_bucket
from shmstore.mirror._commits import Commits

pytestmark = [
    pytest.mark.skipif(NATS_SERVER is None, reason="nats-server not installed (shmstore[mirror])"),
    pytest.mark.timeout(300),
]

HOUR = "3600"


def bucket_version(url: str, bucket: str) -> Callable[[], int]:
    def version() -> int:
        record = bucket_record([url], bucket)
        return 0 if record is None else int(record.version)

    return version


class Rig(NamedTuple):
    origin: Store[Any]
    publisher: MirrorProcess
    bucket_version: Callable[[], int]  # the version in the bucket now (0: none)


@contextlib.contextmanager
def publishing(name: str, *options: str) -> Iterator[Rig]:
    """Store *name* at version 1 and its publisher (with *options*), once the publisher's first
    put -- version 1 -- is in the bucket: from there on, only the rule under test puts."""
    with (
        nats_servers() as (server,),
        mirror_processes() as start,
        Store.create(name) as origin,
    ):
        origin.set({"n": 0})
        publisher = start("publish", name, "--server", server.url, *options)
        version = bucket_version(server.url, default_bucket(name))
        wait_until(lambda: version() == 1, "the first put")
        yield Rig(origin, publisher, version)


def test_a_pause_of_the_writer_puts_its_newest_version(names: tuple[str, str]) -> None:
    with publishing(names[0], "--durable-most", HOUR) as rig:
        for n in range(1, 6):
            rig.origin.set({"n": n})
        # The writer pauses here: the put of version 6 follows within --durable-quiet.
        wait_until(lambda: rig.bucket_version() == 6, "version 6 in the bucket")
        assert rig.origin.mirror_status.behind == 0


def test_a_pause_heard_during_a_slow_put_still_puts(store_name: str) -> None:
    """The writer commits and pauses while the loop's put of an older version is under way:
    the pause is news after that put too (it once was forgotten, and the newest version
    waited for ``most``). Driven on ``Commits`` itself, the put played by the test."""

    async def scenario(origin: Store[Any]) -> tuple[bool, bool]:
        with Commits(origin, lambda: True, quiet=0.02, most=3600) as commits:
            origin.set({"n": 1})
            first = await commits.wait_due(1, 60)  # the pause after version 2
            # The put of version 2 takes 25 times `quiet`; the writer commits and pauses.
            origin.set({"n": 2})
            await asyncio.sleep(0.5)
            return first, await commits.wait_due(2, 30)

    with Store.create(store_name) as origin:
        origin.set({"n": 0})
        assert asyncio.run(scenario(origin)) == (True, True)


def test_a_put_waits_for_a_pause_or_durable_most(store_name: str) -> None:
    """The put is deferred, the point of the rules: a commit whose live copy went out is not
    put while the writer has not paused (``quiet`` an hour away) and ``most`` has not passed;
    a writer that never pauses is put at most once per ``most``. Driven on ``Commits``."""

    async def scenario(origin: Store[Any]) -> tuple[bool, int, float]:
        with Commits(origin, lambda: True, quiet=3600, most=3600) as commits:
            origin.set({"n": 1})
            deferred = await commits.wait_due(1, 0.5)  # the timeout is the answer: False
        stop = threading.Event()

        def write() -> None:  # never pauses, as far as the commit thread can tell
            while not stop.is_set():
                origin.set({"n": 2})

        puts = 0
        with Commits(origin, lambda: True, quiet=3600, most=0.2) as commits:
            writer = threading.Thread(target=write)
            writer.start()
            started = asyncio.get_running_loop().time()
            try:
                put = origin.version
                while (elapsed := asyncio.get_running_loop().time() - started) < 1.0:
                    if await commits.wait_due(put, 1.0):
                        puts += 1
                        put = origin.version  # what the put would carry
            finally:
                stop.set()
                await asyncio.to_thread(writer.join)
        return deferred, puts, elapsed

    with Store.create(store_name) as origin:
        origin.set({"n": 0})
        deferred, puts, elapsed = asyncio.run(scenario(origin))
    assert deferred is False
    # One put per `most` (0.2 s) at most, and one more for the first: never one per commit.
    assert 1 <= puts <= elapsed / 0.2 + 1


def test_a_writer_that_never_pauses_is_put_at_least_every_durable_most(
    names: tuple[str, str],
) -> None:
    with publishing(names[0], "--durable-quiet", HOUR, "--durable-most", "0.2") as rig:
        stop = threading.Event()
        versions: list[int] = []

        def write() -> None:  # never pauses, as far as the publisher can tell
            while not stop.is_set():
                versions.append(rig.origin.set({"n": len(versions)}))

        writer = threading.Thread(target=write)
        writer.start()
        try:
            seen = wait_until(
                lambda: (v := rig.bucket_version()) > 1 and v, "a put while the writer writes"
            )
        finally:
            stop.set()
            writer.join()
        # Put while the writer went on: it committed past the version the bucket got.
        assert versions[-1] > seen


def test_a_commit_whose_live_copy_cannot_go_is_put_without_a_pause(
    names: tuple[str, str],
) -> None:
    options = ("--no-live", "--durable-quiet", HOUR, "--durable-most", HOUR)
    with publishing(names[0], *options) as rig:
        rig.origin.set({"n": 1})
        wait_until(lambda: rig.bucket_version() == 2, "version 2 in the bucket")


def test_a_clean_stop_puts_the_newest_version(names: tuple[str, str]) -> None:
    with publishing(names[0], "--durable-quiet", HOUR, "--durable-most", HOUR) as rig:
        rig.origin.set({"n": 1})
        # The live copy is out; the put would wait an hour, but for the stop.
        assert rig.publisher.signal(signal.SIGTERM) == 0
        # (Polled only because a busy server may time out a read: nothing puts any more.)
        wait_until(lambda: rig.bucket_version() == 2, "version 2 in the bucket")


@pytest.mark.parametrize("option", ["--durable-quiet", "--durable-most"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_durable_times_must_be_positive_seconds(option: str, value: str) -> None:
    result = cli("mirror", "publish", "x", "--server", "nats://127.0.0.1:9", option, value)
    assert result.returncode == 2
    assert f"argument {option}:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("publish", "x", "--replicas", "three"), "expected a whole number, got 'three'"),
        (("publish", "x", "--replicas", "9"), "must be between 1 and 5, got 9"),
        (("follow", "x", "--max-readers", "1e3"), "expected a whole number, got '1e3'"),
        (("set", "x", "1", "--expect", "soon"), "expected a version number, got 'soon'"),
        (("set", "x", "1", "--timeout", "a while"), "expected a number of seconds"),
        (("set", "x", "1", "--bucket", "a b"), "bucket name must be letters, digits"),
        (("publish", "x", "--bucket", "b" * 40), "bucket name is 40 characters"),
        (("publish", "x", "--bucket", "evil\n"), "bucket name must be letters, digits"),
        (("follow", "x", "--as", "a/b"), "store name must not contain '/'"),
        # (no server at all made nats-py's connect spin without awaiting: deaf to signals)
        (("follow", "x", "--server", ","), "no server URL in ','"),
        (("publish", "x", "--server", ""), "no server URL in ''"),
        (("follow", "x", "--server", "nats://127.0.0.1:99999"), "not a NATS server URL"),
        (("follow", "x", "--server", "nats://u:pw@:4222"), "'nats://***@:4222'"),
    ],
)
def test_mirror_usage_errors_talk_about_the_value(args: tuple[str, ...], message: str) -> None:
    result = cli("mirror", *args, "--server", "nats://127.0.0.1:9")
    assert result.returncode == 2
    assert message in result.stderr
    assert "invalid" not in result.stderr  # argparse's "invalid <helper> value"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("keyword", ["durable_quiet", "durable_most"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_publisher_refuses_durable_times_that_are_not_positive(keyword: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{keyword} must be a positive number of seconds"):
        Publisher("x", **{keyword: value})
