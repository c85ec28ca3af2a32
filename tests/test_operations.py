"""Operating a store: statistics, Prometheus text, checkpoint and restore."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from test_multiprocess import JOIN
from workers import checkpoint_forever, checkpoint_stopped_at, create_and_checkpoint

import shmstore
from shmstore import (
    CheckpointError,
    SchemaMismatchError,
    SnapshotTooLargeError,
    StateStoreError,
    Store,
    StoreNotFoundError,
)
from shmstore._checkpoint import read_checkpoint, write_checkpoint
from shmstore.metrics import prometheus_text

ctx = mp.get_context("spawn")


# ---------------------------------------------------------------- statistics and metrics


def test_statistics_snapshot(store_name: str) -> None:
    with (
        Store.create(store_name, int, slots=4, max_readers=8) as st,
        Store.open(store_name, int) as reader,
    ):
        st.set(1)
        st.set(2)
        with pytest.raises(shmstore.StateVersionError):
            st.set(3, expected_version=0)
        assert reader.get() == 2
        st.set(3)
        stats = reader.statistics()
        assert (stats.name, stats.version, stats.commits, stats.conflicts) == (store_name, 3, 3, 1)
        assert (stats.slots, stats.max_readers) == (4, 8)
        assert stats.lag == 1  # this handle last read version 2
        assert stats.reads == 1
        assert stats.writer_lock_held is False
        assert stats.created_ns <= stats.last_update_ns
        assert stats.type_name == "builtins:int"
        with pytest.raises(TimeoutError):
            reader.wait(3, timeout=0.01)
        assert st.statistics().readers_alive == 1
        with pytest.raises(AttributeError):
            stats.version = 9  # type: ignore[misc]


def test_prometheus_text(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(5)
        text = prometheus_text([st.statistics()])
    assert text.endswith("\n")
    assert "# TYPE shmstore_commits_total counter" in text
    assert f'shmstore_version{{store="{store_name}",type="builtins:int"}} 1' in text
    assert f'shmstore_writer_lock_held{{store="{store_name}",type="builtins:int"}} 0' in text
    for line in text.splitlines():
        if not line.startswith("#"):
            _metric, value = line.rsplit(" ", 1)
            float(value)


# ---------------------------------------------------------------- checkpoint / restore


def test_checkpoint_and_restore_continue_the_version(store_name: str, tmp_path: Path) -> None:
    path = tmp_path / "state.ckpt"
    with Store.create(store_name, dict[str, int]) as st:
        for i in range(5):
            st.set({"i": i})
        assert st.checkpoint(path) == 5
        st.unlink()
    with Store.create(store_name, dict[str, int], restore_from=path) as restored:
        assert restored.get_with_version() == ({"i": 4}, 5)
        assert restored.set({"i": 5}) == 6
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_cleanup_asks_the_writers_lock_not_its_pid(tmp_path: Path) -> None:
    """Temporary files of dead checkpoint writers are removed by the next write, and a live
    writer's never is -- decided by the lock a writer holds on its file, not the PID in its name,
    which in a directory shared by containers names nobody here, or somebody else."""
    path = tmp_path / "state.ckpt"

    def write(version: int) -> None:
        write_checkpoint(path, fingerprint=b"f" * 16, type_name="t", version=version, payload=b"")

    write(1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    # A live writer in another PID namespace: its PID names nobody here; it holds its lock.
    live = tmp_path / f".state.ckpt.{dead.stdout.strip()}-00000000.tmp"
    live.write_bytes(b"half a checkpoint")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(live)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        # A dead writer whose PID names a live process here (this one): nobody holds its lock.
        orphan = tmp_path / f".state.ckpt.{os.getpid()}-11111111.tmp"
        orphan.write_bytes(b"half a checkpoint")
        write(2)
        assert live.exists()
        assert not orphan.exists()
    finally:
        holder.communicate("", timeout=60)  # its writer "dies": the kernel drops the lock
    write(3)
    assert not live.exists()
    assert read_checkpoint(path).version == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.ckpt"]


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_empty_store_has_nothing_to_checkpoint(store_name: str, tmp_path: Path) -> None:
    with Store.create(store_name, int) as st:
        with pytest.raises(StateStoreError, match="empty: nothing to checkpoint"):
            st.checkpoint(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_checkpoint_of_another_schema_is_refused(store_name: str, tmp_path: Path) -> None:
    path = tmp_path / "ints.ckpt"
    with Store.create(store_name, list[int]) as st:
        st.set([1, 2])
        st.checkpoint(path)
        st.unlink()
    with pytest.raises(SchemaMismatchError, match=r"holds list\[int\].*dict\[str, int\]"):
        Store.create(store_name, dict[str, int], restore_from=path)
    with pytest.raises(StoreNotFoundError):
        Store.open(store_name)  # a refused restore creates nothing


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:-5], "truncated"),
        (lambda raw: raw[:50], "truncated"),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 0xFF]), "CRC mismatch"),
        (lambda raw: raw[:40] + bytes([raw[40] ^ 1]) + raw[41:], "CRC mismatch"),
        (lambda raw: b"NOTACKPT" + raw[8:], "not a shmstore checkpoint"),
        (lambda raw: b"", "truncated"),
    ],
    ids=["short-payload", "short-header", "payload-bit", "header-bit", "magic", "empty"],
)
def test_damaged_checkpoint_is_a_clear_error(
    store_name: str, tmp_path: Path, damage: object, message: str
) -> None:
    path = tmp_path / "state.ckpt"
    with Store.create(store_name, dict[str, int]) as st:
        st.set({"a": 1})
        st.checkpoint(path)
        st.unlink()
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=message):
        Store.create(store_name, dict[str, int], restore_from=path)
    with pytest.raises(StoreNotFoundError):
        Store.open(store_name)


def test_missing_checkpoint_and_oversize_value(store_name: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        Store.create(store_name, int, restore_from=tmp_path / "nope")
    path = tmp_path / "big.ckpt"
    with Store.create(store_name, bytes) as st:
        st.set(b"x" * 5000)
        st.checkpoint(path)
        st.unlink()
    with pytest.raises(SnapshotTooLargeError, match="max_value_size is 1000"):
        Store.create(store_name, bytes, slot_size=1000, max_value_size=1000, restore_from=path)
    with Store.create(store_name, bytes, slot_size=1000, restore_from=path) as st:
        assert st.get() == b"x" * 5000  # a store created small starts as large as it needs
        st.unlink()


def test_restore_across_processes(store_name: str, tmp_path: Path) -> None:
    path = tmp_path / "from-child.ckpt"
    p = ctx.Process(target=create_and_checkpoint, args=(store_name, str(path)))
    p.start()
    p.join(JOIN)
    assert p.exitcode == 0
    with Store.create(store_name, dict[str, int], restore_from=path) as st:
        assert st.get_with_version() == ({"step": 6}, 7)


def test_sigkill_during_checkpoint_leaves_the_previous_one_valid(
    store_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "busy.ckpt"
    rng = random.Random(7)
    with Store.create(store_name, bytes, slot_size=600_000) as st:
        for _ in range(6):
            ready = ctx.Event()
            p = ctx.Process(target=checkpoint_forever, args=(store_name, str(path), ready))
            p.start()
            assert ready.wait(JOIN)
            time.sleep(rng.uniform(0, 0.05))  # where the kill lands, not synchronization
            p.kill()
            p.join(JOIN)
            assert p.exitcode == -signal.SIGKILL
            saved = read_checkpoint(path)  # never a torn file
            value = msgspec.msgpack.decode(saved.payload, type=bytes)
            assert value == bytes([value[0]]) * 500_000
            assert 1 <= saved.version <= st.version


@pytest.mark.parametrize(
    "marker",
    [
        "os.write(fd, header)",  # temporary file created, nothing written
        "view = view[os.write(fd, view) :]",  # header written, payload not yet
        "os.fsync(fd)",  # all written, not yet durable
        "os.replace(tmp, target)",  # complete, not yet renamed over the old one
    ],
)
def test_sigkill_at_each_step_of_a_checkpoint_keeps_the_old_one(
    store_name: str, tmp_path: Path, marker: str
) -> None:
    path = tmp_path / "state.ckpt"
    with Store.create(store_name, bytes) as st:
        st.set(b"old")
        st.checkpoint(path)
        st.set(b"new" * 1000)
        reached = ctx.Event()
        p = ctx.Process(target=checkpoint_stopped_at, args=(store_name, str(path), marker, reached))
        p.start()
        assert reached.wait(JOIN)
        p.kill()
        p.join(JOIN)
        saved = read_checkpoint(path)
        assert (saved.version, msgspec.msgpack.decode(saved.payload)) == (1, b"old")
        # The next checkpoint succeeds, and clears the dead writer's temporary file.
        assert st.checkpoint(path) == 2
        assert read_checkpoint(path).version == 2
        assert [f.name for f in tmp_path.iterdir()] == ["state.ckpt"]
