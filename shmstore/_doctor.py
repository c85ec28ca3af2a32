"""``shmstore doctor``: does this machine (or container) have what a deployment of stores needs?

One line per check, each with a fix when it is not healthy::

    ok    /dev/shm is a tmpfs (tmpfs, 64.0 MiB)
    FAIL  /dev/shm space: 0.9 MiB free of 4.0 MiB; stores use 3.1 MiB, the largest 3.0 MiB
          -- fix: ...

``ok`` and ``warn`` leave the exit status at 0; any ``FAIL`` makes it 1. A ``warn`` is something
that works but has a consequence worth knowing (this process is in a PID namespace of its own,
so ``gc`` cannot see every user of a store).

The checks do what a store does, on a scratch object of their own that they always remove: a
named semaphore is created, posted and taken; an OFD lock is taken through one descriptor and
seen through another; ``posix_fallocate`` reserves a page; a robust mutex is initialized, locked
and unlocked. Reading a kernel version or a libc name would only guess.

Why the writer-lock warning in a PID namespace: the robust mutex records its owner as a thread
id, and thread ids are per PID namespace -- every container's first process is pid 1. When a
writer that *waits* for the lock is killed, the kernel walks its robust list and, if the lock's
recorded owner equals the dying thread's id, marks the lock "owner died" -- though the owner is
a live thread of another container with the same id. The next writer then takes the lock while
that owner is still writing; and glibc lets a thread whose id equals the owner's unlock the
mutex. So a mutex store is written only from its creator's PID namespace: other namespaces read
and wait, and their writes are refused with the reason (``_writelock``, "ForeignLock"). The
``flock`` writer lock belongs to an open file description and has no such confusion.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import posix_ipc

from ._errors import StateStoreError
from ._inventory import SHM_DIR
from ._layout import FLAG_ROBUST_MUTEX, HEADER_SIZE, read_header
from ._names import OS_PREFIX
from ._ofd import ATTACHED_BYTE, OFD_SUPPORTED, byte_lock, byte_locked
from ._procview import process_visibility
from ._writelock import MUTEX_SIZE, RobustMutexLock, robust_mutex_supported

__all__ = ["MIN_OPEN_FILES", "Check", "run_checks", "run_doctor"]

MIN_OPEN_FILES: Final = 1024  # a handle holds one descriptor per segment it maps
_MIB = 1 << 20
_SHM_FIX = (
    "give the container a memory-backed /dev/shm shared with its peers: Docker "
    "--ipc=shareable / --ipc=container:NAME (or a tmpfs volume at /dev/shm), Kubernetes an "
    "emptyDir with medium: Memory mounted at /dev/shm"
)


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``status`` is ``"ok"``, ``"warn"`` or ``"fail"``."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        label = "FAIL" if self.status == "fail" else self.status
        fix = f" -- fix: {self.fix}" if self.fix and self.status != "ok" else ""
        return f"{label:<5} {self.name}: {self.detail}{fix}"


def _mib(n: int) -> str:
    return f"{n / _MIB:.1f} MiB"


def _mount_of(path: Path) -> tuple[str, str] | None:
    """``(mount point, filesystem type)`` of the mount that holds *path* (``/proc/self/mountinfo``:
    the longest mount point that contains it, the last one mounted there)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, right.split()[0])
    return best


def check_tmpfs(shm: Path) -> Check:
    name = f"{shm} is a tmpfs"
    if not shm.is_dir():
        return Check(name, "fail", f"{shm} does not exist", _SHM_FIX)
    mount = _mount_of(shm)
    if mount is None:
        return Check(name, "warn", "cannot read /proc/self/mountinfo", _SHM_FIX)
    point, fstype = mount
    if fstype != "tmpfs":
        return Check(
            name,
            "fail",
            f"it is on {fstype} (mounted at {point}): stores there are files on a disk, or "
            "not shared with other containers",
            _SHM_FIX,
        )
    total = os.statvfs(shm).f_blocks * os.statvfs(shm).f_frsize
    return Check(name, "ok", f"yes, {_mib(total)}")


def _store_files(shm: Path) -> list[tuple[Path, int]]:
    """Our objects in *shm* (segments, grown rings, semaphores) and the bytes each occupies."""
    out = []
    for path in shm.iterdir():
        if OS_PREFIX not in path.name:
            continue
        try:
            out.append((path, os.stat(path).st_blocks * 512))
        except OSError:
            continue
    return out


def check_space(shm: Path) -> Check:
    name = f"{shm} space"
    if not shm.is_dir():
        return Check(name, "fail", f"{shm} does not exist", _SHM_FIX)
    vfs = os.statvfs(shm)
    total, free = vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
    files = _store_files(shm)
    used = sum(size for _p, size in files)
    largest = max((size for _p, size in files), default=0)
    detail = (
        f"{_mib(free)} free of {_mib(total)}; {len(files)} store object(s) use {_mib(used)}, "
        f"the largest {_mib(largest)}"
    )
    # A store that grows creates its next ring (about twice the slots) before it drops the old
    # one, and a new store of the same kind needs as much again: leave room for the largest.
    need = max(largest, _MIB)
    if free < need:
        return Check(
            name,
            "fail",
            detail + f": less than the {_mib(need)} a new or growing store may need",
            f"make /dev/shm larger (docker run --shm-size, compose shm_size, an emptyDir "
            f"sizeLimit) by at least {_mib(need - free)}, or remove unused stores "
            "(shmstore gc)",
        )
    return Check(name, "ok", detail)


def _mutex_stores(shm: Path) -> list[str]:
    names = []
    for path in sorted(shm.glob(OS_PREFIX + "*")):
        try:
            with path.open("rb") as f:
                header = f.read(HEADER_SIZE)
            info = read_header(header, os.stat(path).st_size)
        except (OSError, StateStoreError):
            continue  # not a store segment (a grown ring, a semaphore), or not ours to read
        if info.flags & FLAG_ROBUST_MUTEX:
            names.append(info.store_name)
    return names


def check_pid_namespace(shm: Path) -> Check:
    name = "PID namespace"
    seen = process_visibility()
    if seen.complete:
        return Check(name, "ok", seen.reason)
    detail = seen.reason + "; gc keeps stores it cannot prove unused"
    mutexed = _mutex_stores(shm) if shm.is_dir() else []
    if mutexed:
        shown = ", ".join(repr(n) for n in mutexed[:5]) + (" ..." if len(mutexed) > 5 else "")
        detail += (
            f". {len(mutexed)} store(s) serialize writers with the robust mutex ({shown}): "
            "only their creator's PID namespace may write to them (thread ids repeat across "
            "PID namespaces)"
        )
    return Check(
        name,
        "warn",
        detail,
        "run gc on the host, or share the PID namespace (Kubernetes shareProcessNamespace: true, "
        'Compose pid: "service:NAME"); create stores written from several containers with '
        "Store.create(..., writer_lock='flock')",
    )


def check_robust_mutex() -> Check:
    name = "robust mutexes"
    fix = "none needed to work: stores fall back to the flock writer lock (about 1 us slower)"
    if not robust_mutex_supported():
        return Check(name, "warn", "this C library has no robust process-shared mutexes", fix)
    buf = mmap.mmap(-1, MUTEX_SIZE)
    try:
        RobustMutexLock.initialize(buf, 0)
        lock = RobustMutexLock(buf, 0, "doctor")
        try:
            rc = lock.acquire()
            lock.release()
        finally:
            lock.close()
    except (OSError, ValueError) as exc:
        return Check(name, "warn", f"a robust mutex cannot be made here: {exc}", fix)
    finally:
        buf.close()
    if rc != 0:
        return Check(name, "warn", f"locking a robust mutex failed: {os.strerror(rc)}", fix)
    return Check(name, "ok", "a process-shared robust mutex locks and unlocks")


@contextlib.contextmanager
def _scratch_file(shm: Path) -> Iterator[Path]:
    path = shm / f"shmstore-doctor.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_ofd_locks(shm: Path) -> Check:
    name = "OFD locks"
    fix = (
        "use Linux 3.15 or newer: without them reader liveness falls back to PIDs, which "
        "mean nothing across containers"
    )
    if not OFD_SUPPORTED:
        return Check(name, "fail", "this platform has no open-file-description locks", fix)
    if not shm.is_dir():
        return Check(name, "fail", f"{shm} does not exist", _SHM_FIX)
    with _scratch_file(shm) as path:
        try:
            one = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            return Check(name, "fail", f"cannot create a file in {shm}: {exc.strerror}", _SHM_FIX)
        try:
            two = os.open(path, os.O_RDONLY)
            try:
                took = byte_lock(one, ATTACHED_BYTE, fcntl.F_RDLCK)
                seen = byte_locked(two, ATTACHED_BYTE)
            finally:
                os.close(two)
        except OSError as exc:
            return Check(name, "fail", f"an OFD lock failed: {exc.strerror}", fix)
        finally:
            os.close(one)
    if not (took and seen):
        return Check(name, "fail", "an OFD lock taken was not seen from another descriptor", fix)
    return Check(name, "ok", "a byte lock taken through one descriptor is seen through another")


def check_semaphores() -> Check:
    name = "named semaphores"
    fix = "readers sleep on named semaphores in /dev/shm: it must be a writable tmpfs"
    sem_name = f"/shmstore-doctor.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        sem = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
    except posix_ipc.Error as exc:
        return Check(name, "fail", f"cannot create one: {exc}", fix)
    try:
        sem.release()
        sem.acquire(0)
    except posix_ipc.Error as exc:
        return Check(name, "fail", f"post and wait failed: {exc}", fix)
    finally:
        sem.close()
        with contextlib.suppress(posix_ipc.Error):
            posix_ipc.unlink_semaphore(sem_name)
    timed = "with" if posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED else "without"
    return Check(name, "ok", f"create, post and wait work ({timed} timed waits)")


def check_fallocate(shm: Path) -> Check:
    name = "posix_fallocate"
    if not shm.is_dir():
        return Check(name, "fail", f"{shm} does not exist", _SHM_FIX)
    with _scratch_file(shm) as path:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            return Check(name, "fail", f"cannot create a file in {shm}: {exc.strerror}", _SHM_FIX)
        try:
            os.posix_fallocate(fd, 0, mmap.PAGESIZE)
        except OSError as exc:
            return Check(
                name,
                "fail",
                f"reserving a page failed ({exc.strerror}): stores cannot reserve their memory, "
                "and touching unreserved tmpfs pages that do not fit kills with SIGBUS",
                "give /dev/shm free space (see the space check)",
            )
        finally:
            os.close(fd)
    return Check(name, "ok", f"reserving memory in {shm} works")


def check_open_files() -> Check:
    name = "open-files limit"
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    shown = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        return Check(
            name,
            "fail",
            f"{shown} (below {MIN_OPEN_FILES}): each store handle holds a descriptor per segment",
            f"raise it: ulimit -n {MIN_OPEN_FILES * 4}, docker run --ulimit nofile="
            f"{MIN_OPEN_FILES * 4}, or the Compose ulimits key",
        )
    return Check(name, "ok", shown)


def run_checks(shm: Path = SHM_DIR) -> list[Check]:
    """Every check, in order (see the module docstring)."""
    return [
        check_tmpfs(shm),
        check_space(shm),
        check_pid_namespace(shm),
        check_robust_mutex(),
        check_ofd_locks(shm),
        check_semaphores(),
        check_fallocate(shm),
        check_open_files(),
    ]


def run_doctor(shm: Path = SHM_DIR) -> int:
    """Print one line per check; 0 if none failed, else 1."""
    checks = run_checks(shm)
    for check in checks:
        sys.stdout.write(check.line() + "\n")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    summary = f"{failed} check(s) failed" if failed else "healthy"
    sys.stdout.write(summary + (f", {warned} warning(s)" if warned else "") + "\n")
    sys.stdout.flush()
    return 1 if failed else 0
