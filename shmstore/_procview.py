"""What ``/proc`` shows of the other processes that share ``/dev/shm`` (Linux): PID namespaces, and
which visible process holds a store's locks.

Containers that share a store share ``/dev/shm`` (Docker ``--ipc=shareable`` /
``--ipc=container:NAME``, a memory-backed volume at ``/dev/shm``; a Kubernetes ``emptyDir`` with
``medium: Memory``) but, by default, not their PID namespace. Two consequences for the tools:

* A process in a PID namespace of its own sees, in ``/proc``, only the processes of that namespace
  (and of namespaces nested in it). ``gc`` then cannot read the maps of every process that may use
  a store, and must say so (:func:`process_visibility`) and decide with what the kernel keeps
  regardless of namespaces: OFD locks (``_ofd``) and the writer lock.
* A PID recorded in a store (a registry entry's owner, an exclusive writer) is a number in the
  *recorder's* namespace: here it may name nobody, or somebody else. No decision is ever taken
  from it. To say *who* holds a registry entry, :func:`lock_holders` looks for the open file
  description that holds the entry's liveness byte among the descriptors of the processes it can
  see (``/proc/<pid>/fdinfo/<fd>`` lists the locks of that description, with byte ranges). An
  entry whose byte is held but by no visible process belongs to a process of another namespace.

How "a PID namespace of its own" is told. The initial PID namespace has the fixed inode
``PROC_PID_INIT_INO`` (``0xEFFFFFFC``, ``include/linux/proc_ns.h``, stable since Linux 3.8), so
``stat("/proc/self/ns/pid").st_ino`` answers it directly. Comparing ``/proc/self/ns/pid`` with
``/proc/1/ns/pid`` does *not*: inside a container, pid 1 is the container's own init, in the same
namespace. ``NSpid`` in ``/proc/self/status`` lists this process's PID in each namespace from the
one ``/proc`` was mounted for down to its own, which says which PID this process has where.

Open question: a process in the initial PID namespace of a *nested* setup (a VM, or a host
sharing ``/dev/shm`` with another host's containers through a network filesystem) is out of
scope: ``/dev/shm`` is per kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["PROC_PID_INIT_INO", "Visibility", "lock_holders", "process_visibility"]

PROC_PID_INIT_INO: Final = 0xEFFFFFFC
_PROC = Path("/proc")


@dataclass(frozen=True)
class Visibility:
    """Whether ``/proc`` shows every process that may map a store, and why (one line)."""

    complete: bool
    reason: str
    nspid: tuple[int, ...] = ()  # this process's PIDs, outermost visible namespace first


def _nspid() -> tuple[int, ...]:
    try:
        for line in (_PROC / "self" / "status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return tuple(int(field) for field in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def process_visibility() -> Visibility:
    """Whether this process sees every process on the machine (see the module essay)."""
    nspid = _nspid()
    try:
        ino = os.stat(_PROC / "self" / "ns" / "pid").st_ino
    except OSError as exc:
        return Visibility(
            False, f"cannot tell which PID namespace this process is in ({exc.strerror})", nspid
        )
    if ino == PROC_PID_INIT_INO:
        return Visibility(True, "this process is in the host's PID namespace", nspid)
    where = f" (pid {nspid[-1]} here)" if nspid else ""
    return Visibility(
        False,
        f"this process is in a PID namespace of its own{where}, as in a container: /proc does "
        "not show the processes of other containers or of the host",
        nspid,
    )


def _lock_lines(fdinfo: Path) -> list[str]:
    try:
        text = fdinfo.read_text()
    except OSError:
        return []
    return [line for line in text.splitlines() if line.startswith("lock:")]


def _parse_lock(line: str) -> tuple[int, int, int, int, int] | None:
    """``lock:\t1: OFDLCK ADVISORY  WRITE -1 00:1b:101 1099511627779 1099511627779`` ->
    ``(major, minor, inode, start, end)``; None for a line of another shape (``EOF`` ends)."""
    fields = line.split()
    try:
        device, start, end = fields[-3], fields[-2], fields[-1]
        major, minor, inode = device.split(":")
        return (
            int(major, 16),
            int(minor, 16),
            int(inode),
            int(start),
            -1 if end == "EOF" else int(end),
        )
    except (IndexError, ValueError):
        return None


def lock_holders(path: str | os.PathLike[str], offsets: list[int]) -> dict[int, int]:
    """Which visible process holds a lock on each byte of *offsets* of file *path*:
    ``{offset: pid}`` (PIDs of this namespace's ``/proc``); an offset nobody visible holds is
    missing. Reads ``/proc/<pid>/fd`` and ``fdinfo`` of every visible process: for tools, not
    for any hot path. Processes it may not inspect (another user's, without root) are skipped."""
    try:
        target = os.stat(path)
    except OSError:
        return {}
    wanted = set(offsets)
    found: dict[int, int] = {}
    me = (os.major(target.st_dev), os.minor(target.st_dev), target.st_ino)
    for proc in _PROC.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # exited, or not ours to look at
        for fd in fds:
            try:
                st = os.stat(fd)  # follows the magic link to the open file, in any mount ns
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
                continue
            for line in _lock_lines(proc / "fdinfo" / fd.name):
                parsed = _parse_lock(line)
                if parsed is None or parsed[:3] != me:
                    continue
                start, end = parsed[3], parsed[4]
                for offset in wanted:
                    if start <= offset and (end < 0 or offset <= end):
                        found.setdefault(offset, int(proc.name))
    return found
