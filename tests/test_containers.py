"""One store used from several containers: processes in different PID namespaces (issue 22, part 2,
and issue 20 item 15).

Containers that share ``/dev/shm`` do not share PIDs. Each process under test here is the first
process (pid 1) of a PID namespace of its own with its own ``/proc``, made with
``unshare --pid --fork --mount-proc`` -- what a container's process sees -- and, where a container
would have its own ``/dev/shm``, with a small tmpfs mounted there in a mount namespace of its own
(the machine's ``/dev/shm`` is never touched). Needs root; skipped with the reason otherwise.

``--kill-child`` ties each namespace to the ``unshare`` process the test started: killing that one
kills the namespace's pid 1, and with it every process of the namespace, pass or fail.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import objects_of
from test_waiting import wait_for_registrations

import shmstore
from shmstore import Store
from shmstore._writelock import robust_mutex_supported

TESTS = str(Path(__file__).parent)
WAIT = 60.0  # seconds: bounds a hang, never a duration
SHMSTORE = str(Path(sys.executable).parent / "shmstore")


def _namespaces_available() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to make PID and mount namespaces (unshare)"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    if probe.returncode != 0:
        return f"unshare cannot make a PID namespace here: {probe.stderr.decode().strip()}"
    return None


WHY_NO_NAMESPACES = _namespaces_available()
pytestmark = pytest.mark.skipif(WHY_NO_NAMESPACES is not None, reason=WHY_NO_NAMESPACES or "")


def _unshare(argv: list[str], shm: str | None) -> list[str]:
    """*argv* as pid 1 of a PID namespace of its own, with its own ``/proc``; with *shm*, also
    with a ``/dev/shm`` of its own: a tmpfs of that size, or a bind mount of that directory
    (unshare's mount namespace is private: the machine's ``/dev/shm`` stays as it is)."""
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if shm is None:
        return [*unshare, *argv]
    if shm.startswith("/"):
        mount = f"mount --bind {shm} /dev/shm"
    else:
        mount = f"mount -t tmpfs -o size={shm} tmpfs /dev/shm"
    return [*unshare, "sh", "-c", f'{mount} && exec "$@"', "sh", *argv]


def _command(argv: tuple[str, ...]) -> list[str]:
    if argv[0] == "shmstore":
        return [SHMSTORE, *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return [sys.executable, "-m", "ns_workers", *argv]


_ENV = {**os.environ, "PYTHONPATH": TESTS}


class Contained:
    """A process that stays alive in a PID namespace of its own; lines of its stdout on demand."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=_ENV,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self) -> str:
        try:
            got = self._lines.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail("a contained process said nothing in time")
        if got is None:
            pytest.fail(f"a contained process ended early (exit status {self.proc.wait(WAIT)})")
        return got

    def result(self) -> Any:
        return json.loads(self.line())

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL the namespace's pid 1 (through ``--kill-child``) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)

    def close(self) -> None:
        self.kill()
        self._pumping.join(WAIT)  # the namespace is gone: its stdout is at end of file
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def contained(*argv: str) -> Iterator[Contained]:
    """``python -m ns_workers ARGV`` in a PID namespace of its own, killed (and with it everything
    in that namespace) however the test ends."""
    c = Contained(_unshare(_command(argv), None))
    try:
        yield c
    finally:
        c.close()


def run_contained(*argv: str, shm: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``ns_workers`` ARGV (or ``shmstore ...``, ``python ...``) to its end in a PID
    namespace of its own."""
    return subprocess.run(
        _unshare(_command(argv), shm),
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=_ENV,
        check=False,
    )


def live_readers(st: Store[Any]) -> int:
    return sum(r.alive for r in st.readers())


def blocked_in_the_kernel(c: Contained) -> None:
    """Until the namespace's pid 1 sleeps in a lock system call (``futex`` for the mutex,
    ``flock``): the state the test is about, read from ``/proc/<pid>/syscall`` -- there is no
    event to wait on."""
    children = Path(f"/proc/{c.proc.pid}/task/{c.proc.pid}/children")
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            (pid,) = children.read_text().split()
            number = Path(f"/proc/{pid}/syscall").read_text().split()[0]
            if number in (_SYS_FUTEX, _SYS_FLOCK):
                return
        time.sleep(0.005)
    pytest.fail("the waiting writer never blocked on the lock")


_SYS_FUTEX, _SYS_FLOCK = "202", "73"  # x86-64 system call numbers


# ---------------------------------------------------------------------------- the store itself


# Writers in several namespaces need the flock writer lock (a robust mutex names its owner by
# thread id: see test_a_mutex_store_is_written_only_from_its_creators_namespace).
CROSS = "flock"


def test_a_reader_in_another_namespace_is_woken_by_a_writer_in_a_third(store_name: str) -> None:
    with (
        Store.create(store_name, int, writer_lock=CROSS) as st,
        contained("wait", store_name, "0") as reader,
    ):
        assert reader.line() == "ready"
        wait_for_registrations(st, 1)  # asleep in wait(), on its semaphore
        assert run_contained("commit", store_name, "42").stdout.strip() == '{"version": 1}'
        woke = reader.result()
        assert woke == {
            "version": 1,
            "value": 42,
            "at": 1,
            "wait_mode": "semaphore",
            "late_wakeups": 0,  # woken by the post, not by a capped sleep running out
        }
        assert st.get_with_version() == (42, 1)


def test_compare_and_set_between_namespaces(store_name: str) -> None:
    with Store.create(store_name, int, writer_lock=CROSS) as st:
        st.set(0)
        first = json.loads(run_contained("commit", store_name, "1", "1").stdout)
        assert first == {"version": 2}
        lost = json.loads(run_contained("commit", store_name, "2", "1").stdout)
        assert lost == {"conflict": True, "expected": 1, "actual": 2}
        assert st.get_with_version() == (1, 2)
        assert st.conflicts == 1


def test_a_subscriber_in_another_namespace_gets_every_version_or_its_exact_lag(
    store_name: str,
) -> None:
    with (
        Store.create(store_name, int, slots=4, writer_lock=CROSS) as st,
        contained("subscribe", store_name, "10", "11") as sub,
    ):
        assert sub.line() == "ready"
        for v in range(1, 11):
            committed = json.loads(run_contained("commit", store_name, str(v * 10)).stdout)
            assert committed == {"version": v}
        sub.send("go\n")  # version 1 is overwritten (a ring of 4 holds 7..10)
        caught_up = sub.result()
        # Told exactly what it lost (1..9: it resumes at the newest), as in one namespace.
        assert caught_up == {"seen": [[10, 100]], "lags": [[9, 10]]}
        st.set(110)  # it sleeps for version 11 now, or will: either way it must get it
        assert sub.result() == {"seen": [[11, 110]], "lags": []}


def test_a_writer_killed_inside_the_lock_in_one_namespace_does_not_stop_another(
    store_name: str,
) -> None:
    with Store.create(store_name, int, writer_lock=CROSS) as st:
        st.set(1)
        with contained("die_inside_commit", store_name, "2") as victim:
            assert victim.line() == "frozen"
            assert st.statistics().writer_lock_held  # frozen inside the critical section
            victim.kill()
        after = json.loads(run_contained("commit", store_name, "3").stdout)
        assert after == {"version": 2}  # the half-written version 2 was never published
        assert st.get_with_version() == (3, 2)
        assert not st.statistics().writer_lock_held


def test_a_waiting_writer_killed_in_another_namespace_leaves_the_holder_its_lock(
    store_name: str,
) -> None:
    """Two containers' writers, both pid 1: one holds the writer lock, the other waits for it
    and is killed. The lock must still be held -- nobody else may take it. (flock: a mutex store
    never lets the second container near its lock, see the next test.)"""
    with Store.create(store_name, int, writer_lock=CROSS) as st:
        with contained("hold_lock", store_name) as holder:
            assert holder.line() == "held rc 0 tid 1"
            with contained("wait_for_lock", store_name) as waiter:
                assert waiter.line() == "waiting tid 1"
                blocked_in_the_kernel(waiter)
                waiter.kill()
            rc = st._lock.try_acquire()
            if rc in (0, errno.EOWNERDEAD):
                st._lock.release()
            assert errno.errorcode.get(rc, rc) == "EBUSY"


def test_a_refused_writer_in_another_namespace_leaves_the_exclusive_writer_its_lock(
    store_name: str,
) -> None:
    with Store.create(store_name, int, writer_lock=CROSS) as st:
        with contained("keep", store_name) as keeper:
            tid = keeper.line().removeprefix("keeper tid ")
            refused = run_contained("set_from_tid", store_name, tid)
            assert refused.returncode == 0, f"the refused writer died: {refused.returncode}"
            assert json.loads(refused.stdout)["outcome"].startswith("refused: ")
            rc = st._lock.try_acquire()
            if rc in (0, errno.EOWNERDEAD):
                st._lock.release()
            assert errno.errorcode.get(rc, rc) == "EBUSY"


def test_a_mutex_store_is_written_only_from_its_creators_namespace(store_name: str) -> None:
    """A robust mutex names its owner by thread id, and thread ids repeat across PID namespaces:
    a writer in a second container could unlock the holder's mutex, or, killed while waiting
    for it, make the kernel mark the live holder's lock "owner died" (both reproduced with the
    mutex before this rule). So a process of another namespace never touches a mutex store's
    lock: every way to write says why, it reads and is woken as anyone, and the creator's
    namespace keeps its lock and its value."""
    if not robust_mutex_supported():
        pytest.skip("this platform has no robust mutexes")
    with Store.create(store_name, int, writer_lock="mutex") as st:
        st.set(1)
        with st._lock:  # held by this namespace while the other one tries
            tried = run_contained("try_writes", store_name)
            assert tried.returncode == 0, tried.stderr
        outcome = json.loads(tried.stdout)
        for way in ("set", "keep_writer_lock", "app_counter"):
            assert "another PID namespace" in outcome[way], (way, outcome[way])
            assert "writer_lock='flock'" in outcome[way]
        assert outcome["writable"] is False
        assert outcome["read"] == [1, 1]
        assert outcome["lock_held_seen"] is True  # it looks at the lock word, never takes it
        # Nothing changed here, and this namespace still writes; a reader there is woken.
        assert st.get_with_version() == (1, 1)
        with contained("wait", store_name, "1") as reader:
            assert reader.line() == "ready"
            wait_for_registrations(st, 1)
            st.set(42)
            assert reader.result()["value"] == 42


def test_the_cli_says_why_a_mutex_store_refuses_a_write_from_another_namespace(
    store_name: str,
) -> None:
    if not robust_mutex_supported():
        pytest.skip("this platform has no robust mutexes")
    with Store.create(store_name, int, writer_lock="mutex") as st:
        st.set(1)
        refused = run_contained("shmstore", "set", store_name, "5")
        assert refused.returncode == 1
        (line,) = refused.stderr.strip().splitlines()
        assert "another PID namespace" in line, line
        assert st.get_with_version() == (1, 1)


# ---------------------------------------------------------------------------- liveness


def test_the_mirror_status_trusts_no_pid_from_another_namespace(store_name: str) -> None:
    """The mirroring process records its pid, a number of *its* namespace (1 in a container).
    Whether it is connected comes from its liveness lock: killed, it is disconnected here,
    though pid 1 here is alive."""
    with Store.create(store_name, int, writer_lock=CROSS) as st:
        with contained("claim_mirror", store_name) as mirror:
            assert mirror.line() == "claimed"
            status = st.mirror_status
            assert (status.role, status.pid, status.connected) == ("origin", 1, True)
            mirror.kill()
        # The kill reaps `unshare`; its child, the namespace's pid 1, is SIGKILLed on the way
        # and drops its locks as it exits: no event to wait on, so look until it has.
        deadline = time.monotonic() + WAIT
        while st.mirror_status.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        status = st.mirror_status
        assert (status.pid, status.connected) == (1, False)
        assert st.statistics().mirror_connected is False


def test_reader_liveness_and_reclaim_across_namespaces_never_trust_a_pid(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        with contained("wait", store_name, "0") as reader:
            assert reader.line() == "ready"
            wait_for_registrations(st, 1)
            (entry,) = st.readers()
            # It recorded pid 1 -- its own namespace's. Here pid 1 is another process: the
            # liveness lock, not the pid, says it is alive.
            assert (entry.pid, entry.alive) == (1, True)
            assert st.reclaim_dead_readers() == 0
            semaphores = [n for n in objects_of(store_name) if n.startswith("sem.")]
            assert len(semaphores) == 1
            reader.kill()
        # Dead now, though pid 1 here is alive and well: the lock went with the process.
        assert st.readers() == [type(entry)(entry.index, 1, False)]
        assert st.reclaim_dead_readers() == 1
        assert st.readers() == []
        assert not [n for n in objects_of(store_name) if n.startswith("sem.")]


def test_stat_names_the_readers_it_cannot_attribute(store_name: str) -> None:
    with Store.create(store_name, int) as st, contained("wait", store_name, "0") as reader:
        assert reader.line() == "ready"
        wait_for_registrations(st, 1)
        # From the host, the reader's process is visible: attributed.
        here = subprocess.run(
            [SHMSTORE, "stat", store_name, "--json"], capture_output=True, text=True, check=True
        )
        assert json.loads(here.stdout)["readers_unattributed"] == []
        # From a third container, it is not: stat says which entry, and that it is alive.
        there = run_contained("shmstore", "stat", store_name, "--json")
        assert there.returncode == 0, there.stderr
        data = json.loads(there.stdout)
        assert data["readers_alive"] == 1
        assert data["readers_unattributed"] == [{"entry": st.readers()[0].index, "pid": 1}]
        text = run_contained("shmstore", "stat", store_name).stdout
        assert "readers_unattributed  1  (entry 0 (pid 1 in its namespace): alive" in text
        assert "another PID namespace" in text


# ---------------------------------------------------------------------------- gc


def gc_in_a_container(*args: str) -> subprocess.CompletedProcess[str]:
    return run_contained("shmstore", "gc", *args)


def test_gc_in_a_container_keeps_stores_used_from_other_namespaces(store_name: str) -> None:
    waited = store_name + "-waited"  # a reader sleeps in wait() on it, in another namespace
    opened = store_name + "-opened"  # a writer has it open and is idle, in another namespace
    for name in (waited, opened):
        Store.create(name, int).close()
    try:
        with contained("wait", waited, "0") as reader, contained("idle", opened) as writer:
            assert reader.line() == "ready"
            assert writer.line().startswith("ready")
            with Store.open(waited, int) as st:
                wait_for_registrations(st, 1)
            dry = gc_in_a_container("--older-than", "0s", "--prefix", store_name)
            assert dry.returncode == 0, dry.stderr
            assert f"keeping store {waited!r}: in use" in dry.stdout
            assert f"keeping store {opened!r}: in use: a process has it open" in dry.stdout
            assert "would remove" not in dry.stdout
            # It says plainly that it cannot see everything, and why.
            assert "gc may not see every process" in dry.stderr
            assert "PID namespace of its own" in dry.stderr
            done = gc_in_a_container("--yes", "--all", "--prefix", store_name)
            assert done.returncode == 0, done.stderr
            assert "removed 0 object(s)" in done.stdout
            assert objects_of(waited)
            assert objects_of(opened)
        # Both users gone: now the stores are garbage to the same command.
        done = gc_in_a_container("--yes", "--all", "--prefix", store_name)
        assert f"removing store {waited!r}" in done.stdout
        assert f"removing store {opened!r}" in done.stdout
        assert not objects_of(waited)
        assert not objects_of(opened)
    finally:
        shmstore.remove(waited)
        shmstore.remove(opened)


def test_gc_in_a_container_keeps_a_store_whose_writer_lock_is_held(store_name: str) -> None:
    with Store.create(store_name, int, writer_lock="flock") as st:
        st.close()
        with contained("hold_lock", store_name) as holder:
            assert holder.line().startswith("held rc 0")
            with Store.open(store_name, int) as look:
                assert look.statistics().writer_lock_held
            dry = gc_in_a_container("--all", "--prefix", store_name)
            assert f"keeping store {store_name!r}: in use" in dry.stdout


def test_gc_on_the_host_says_nothing_about_namespaces(store_name: str) -> None:
    Store.create(store_name, int).close()
    here = subprocess.run(
        [SHMSTORE, "gc", "--prefix", store_name], capture_output=True, text=True, check=True
    )
    assert "gc may not see" not in here.stderr


def test_gc_in_a_container_leaves_semaphores_of_removed_stores_alone(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.unlink()  # the store is gone by name; this handle lives on, and may still wait
        with pytest.raises(TimeoutError):
            st.wait(0, timeout=0.01)  # registers: a semaphore of a removed store, open here
        (held,) = [n for n in objects_of(store_name) if n.startswith("sem.")]
        # A dry run only (this machine's /dev/shm is shared): from a container, the semaphore
        # looks like a stray -- no process it can see maps it -- but it is not garbage.
        there = gc_in_a_container()
        assert there.returncode == 0, there.stderr
        assert f"would remove semaphore {held}" not in there.stdout
        assert "semaphore(s) and segment(s) of removed stores" in there.stdout


def test_gc_keeps_the_semaphore_its_creator_still_maps(store_name: str) -> None:
    """glibc maps a semaphore it creates under a temporary name: gc must know it by inode."""
    with Store.create(store_name, int) as st:
        st.unlink()
        with pytest.raises(TimeoutError):
            st.wait(0, timeout=0.01)  # creates and maps its semaphore
        (held,) = [n for n in objects_of(store_name) if n.startswith("sem.")]
        here = subprocess.run([SHMSTORE, "gc"], capture_output=True, text=True, check=True)
        assert f"would remove semaphore {held}" not in here.stdout


# ---------------------------------------------------------------------------- doctor


def test_doctor_in_a_container_with_a_tiny_dev_shm_fails_with_a_fix(store_name: str) -> None:
    # A container whose own /dev/shm (a 1 MiB tmpfs) is nearly filled by one store.
    script = (
        "import sys; from shmstore import Store; from shmstore._cli import main; "
        f"Store.create({store_name!r}, int, slot_size=64 * 1024, slots=14).close(); "
        "sys.exit(main(['doctor']))"
    )
    result = run_contained("python", "-c", script, shm="1m")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    space = next(line for line in lines if "/dev/shm space" in line)
    assert space.startswith("FAIL")
    assert "-- fix: make /dev/shm larger" in space
    assert next(line for line in lines if "PID namespace" in line).startswith("warn")
    assert lines[-1].startswith("1 check(s) failed")
    assert not objects_of(store_name)  # that /dev/shm went away with its namespace


def test_doctor_says_when_dev_shm_is_not_a_tmpfs(tmp_path: Path) -> None:
    # A container whose /dev/shm is a plain directory of its image.
    plain = tmp_path / "shm"
    plain.mkdir()
    result = run_contained("shmstore", "doctor", shm=str(plain))
    assert result.returncode == 1, result.stdout + result.stderr
    tmpfs = next(line for line in result.stdout.splitlines() if "is a tmpfs" in line)
    assert tmpfs.startswith("FAIL")
    assert "-- fix: give the container a memory-backed /dev/shm" in tmpfs


def test_doctor_on_this_machine_is_healthy() -> None:
    here = subprocess.run([SHMSTORE, "doctor"], capture_output=True, text=True, check=False)
    assert here.returncode == 0, here.stdout
    names = [line.split(":")[0].split(None, 1)[1] for line in here.stdout.splitlines()[:-1]]
    assert names == [
        "/dev/shm is a tmpfs",
        "/dev/shm space",
        "PID namespace",
        "robust mutexes",
        "OFD locks",
        "named semaphores",
        "posix_fallocate",
        "open-files limit",
    ]
    assert here.stdout.splitlines()[-1].startswith("healthy")
    assert not [n for n in os.listdir("/dev/shm") if "shmstore-doctor" in n]
