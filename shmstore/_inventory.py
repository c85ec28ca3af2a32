"""What stores exist on this machine, who uses them, and which ``gc`` may remove (Linux).

POSIX has no call that lists shared-memory objects; on Linux they are the files of ``/dev/shm``,
which is what ``shmstore ls`` and ``shmstore gc`` read. A store's segment is
``shmstore.<hash>`` there and its reader semaphores ``sem.shmstore.<hash>.<n>``; the store name
itself comes from the segment header.

Whether anyone still uses a store is read from ``/proc/<pid>/maps``: every process attached to
a store maps its segment. A process whose maps cannot be read (another user's, without root) makes
the answer unknown, and ``gc`` then removes nothing.

What ``gc`` may remove
----------------------
A store that no process has open is not garbage by itself: stores outlive their processes on
purpose (a configuration published once, a state kept across a restart). So "unused" is
necessary, never sufficient. ``gc`` removes an unused store only when one more thing is true:

* it was **abandoned by a crash** (the default): its registry still lists a reader whose process
  died without closing its handle. A process that meant to leave the store behind closes its
  handles; one that was killed cannot. Or
* it has been **idle longer than** ``--older-than`` (no commit, and created before that); or
* the operator said ``--all``: every unused store.

Semaphores whose store segment no longer exists, and that no live process has open, are always
garbage: nothing can use them.

What the default cannot see: a store whose only users were writers, or readers that never waited
(only waiting registers a reader), leaves no trace of how its processes ended. Such a store is
kept until ``--older-than`` or ``--all`` says otherwise.

In use, whatever ``/proc`` shows
--------------------------------
``/proc`` shows only the processes of this process's PID namespace. Run inside a container that
shares ``/dev/shm`` with others, ``gc`` sees none of the other containers' processes, so "no
process maps it" proves nothing there (``_procview``). Three signals of the kernel hold across
PID namespaces, and any one of them makes a store **in use**, never removed, not even by
``--all``:

* a registered reader whose liveness lock is held (``readers_alive``, ``_registry``);
* the writer lock held (a writer inside ``set()``, or an exclusive writer);
* an open handle anywhere: every handle holds a shared OFD lock on the segment while it is open
  (``_segment.attached_elsewhere``). This covers writers and readers that never waited; only a
  process of a shmstore older than that lock escapes it, and then only outside ``/proc``'s view.

And ``gc`` says, first thing, when it cannot see every process. Semaphores of removed stores are
then kept: one may still be open in a handle this process cannot see.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._layout import HEADER_SIZE, MAGIC, NAME_FIELD, OFF_STORE_NAME
from ._names import OS_PREFIX, segment_name
from ._ofd import LIVENESS_BASE, OFD_SUPPORTED
from ._procview import Visibility, lock_holders
from ._stats import ReaderEntry, StoreStatistics

__all__ = [
    "SHM_DIR",
    "Orphans",
    "Verdict",
    "find_orphans",
    "gc_blind_spot",
    "gc_verdict",
    "list_store_names",
    "listing_supported",
    "parse_duration",
    "unattributed_readers",
]

SHM_DIR = Path("/dev/shm")


def listing_supported() -> bool:
    return SHM_DIR.is_dir()


def list_store_names() -> list[str]:
    """Names of the stores whose segments are in ``/dev/shm`` (unreadable ones skipped)."""
    names = []
    for path in sorted(SHM_DIR.glob(OS_PREFIX + "*")):
        name = _store_name_of(path)
        if name is not None and segment_name(name) == "/" + path.name:
            names.append(name)
    return names


def _store_name_of(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            header = f.read(HEADER_SIZE)
    except OSError:
        return None
    if len(header) < HEADER_SIZE or header[: len(MAGIC)] != MAGIC:
        return None
    raw = header[OFF_STORE_NAME : OFF_STORE_NAME + NAME_FIELD].rstrip(b"\0")
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class Orphans:
    """What no live process uses, and whether that can be known."""

    unused_stores: list[str]  # no live process maps their segment
    stray_semaphores: list[str]  # semaphores whose segment is gone and that nobody has open
    unreadable_processes: int  # processes whose mappings we could not inspect
    # Rings a store grew into (``.g<tag>``) and its type records (``.s<generation>``) whose
    # store's segment is gone and that no process maps: left by a process killed while it
    # removed its store, or a removed store's handle that grew after the removal and was killed.
    stray_segments: list[str] = field(default_factory=list)


def _mapped_objects() -> tuple[set[str], set[int], int]:
    """What live processes map in ``/dev/shm``: the names of our files (segments), the inodes of
    every file, and how many processes were unreadable. Semaphores are told by inode: glibc's
    ``sem_open`` creates one as a temporary file, maps it and only then links it under its name,
    so its creator's maps show ``sem.XXXXXX (deleted)``, never the name."""
    mapped: set[str] = set()
    inodes: set[int] = set()
    unreadable = 0
    marker = f"{SHM_DIR}/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            maps = (proc / "maps").read_text()
        except FileNotFoundError:
            continue  # exited meanwhile
        except OSError:
            unreadable += 1
            continue
        for line in maps.splitlines():
            where = line.find(marker)
            if where >= 0:
                with contextlib.suppress(IndexError, ValueError):
                    inodes.add(int(line.split(maxsplit=5)[4]))
                file = line[where + len(marker) :].split(" ")[0]
                if OS_PREFIX in file:
                    mapped.add(file)
    return mapped, inodes, unreadable


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def find_orphans() -> Orphans:
    mapped, inodes, unreadable = _mapped_objects()
    unused = [name for name in list_store_names() if segment_name(name).lstrip("/") not in mapped]
    segments = {p.name for p in SHM_DIR.glob(OS_PREFIX + "*")}
    # A semaphore whose segment is gone may still be open in a handle of the unlinked store
    # ("attached handles keep working"): only an unmapped one is garbage.
    stray = sorted(
        p.name
        for p in SHM_DIR.glob(f"sem.{OS_PREFIX}*")
        if p.name[len("sem.") :].rsplit(".", 1)[0] not in segments
        and p.name not in mapped
        and _inode(p) not in inodes
    )
    # A store's other segments (rings, type records) are garbage on the same terms.
    parts = sorted(
        name
        for name in segments
        if "." in name[len(OS_PREFIX) :]
        and name.rsplit(".", 1)[0] not in segments
        and name not in mapped
        and _inode(SHM_DIR / name) not in inodes
    )
    if os.geteuid() == 0:
        unreadable = 0  # root reads every process's maps; failures are exits mid-scan
    return Orphans(unused, stray, unreadable, parts)


def unattributed_readers(name: str, readers: list[ReaderEntry]) -> list[ReaderEntry]:
    """The live registry entries of store *name* whose liveness lock no process visible in
    ``/proc`` holds: their owners are in another PID namespace (a container), and the PIDs they
    recorded mean nothing here (``_procview``)."""
    alive = [r for r in readers if r.alive]
    if not alive or not OFD_SUPPORTED or not listing_supported():
        return []
    path = SHM_DIR / segment_name(name).lstrip("/")
    held = lock_holders(path, [LIVENESS_BASE + r.index for r in alive])
    return [r for r in alive if LIVENESS_BASE + r.index not in held]


# ---------------------------------------------------------------------------- the gc policy


def gc_blind_spot(visibility: Visibility) -> str:
    """What ``gc`` says first when ``/proc`` may not show every process (one line)."""
    return (
        f"gc may not see every process that uses a store: {visibility.reason}. Stores with "
        "live readers, a held writer lock or an open handle are kept anyway; to see "
        "everything, run gc on the host or in a container that shares the PID namespace"
    )


@dataclass(frozen=True)
class Verdict:
    """What ``gc`` does with one unused store, and why (one line for the operator)."""

    remove: bool
    reason: str
    in_use: bool = False  # kept because something outside /proc's view uses it


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def gc_verdict(
    stats: StoreStatistics,
    *,
    older_than: float | None = None,
    everything: bool = False,
    now_ns: int | None = None,
) -> Verdict:
    """Decide about a store that no visible process maps (see the module docstring).

    *stats* is read from a fresh handle; *older_than* is in seconds. (A store that some handle
    holds open, ``attached_elsewhere``, is in use too: asked before that fresh handle opens.)
    """
    if stats.readers_alive:
        return Verdict(False, f"in use: {stats.readers_alive} live reader(s) registered", True)
    if stats.writer_lock_held:
        return Verdict(False, "in use: a writer holds its writer lock", True)
    now = time.time_ns() if now_ns is None else now_ns
    idle = max(0.0, (now - max(stats.created_ns, stats.last_update_ns)) / 1e9)
    dead = stats.readers_registered - stats.readers_alive
    if dead > 0:
        return Verdict(True, f"abandoned: {dead} reader(s) died without closing it")
    if older_than is not None and idle >= older_than:
        return Verdict(True, f"idle for {_ago(idle)} (--older-than {_ago(older_than)})")
    if everything:
        return Verdict(True, f"unused, idle for {_ago(idle)} (--all)")
    return Verdict(False, f"unused, idle for {_ago(idle)}, but nothing says it was abandoned")


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", re.IGNORECASE)
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"30m"``, ``"12h"``, ``"7d"`` -> seconds. ``ValueError`` otherwise."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"expected a duration like 90s, 30m, 12h or 7d, got {text!r}")
    seconds = float(match.group(1)) * _UNIT[match.group(2).lower()]
    if not math.isfinite(seconds):
        raise ValueError(f"duration out of range: {text!r}")
    return seconds
