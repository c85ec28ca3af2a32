"""What stores exist on this machine, and who uses them (Linux: ``/dev/shm`` and ``/proc``).

POSIX has no call that lists shared-memory objects; on Linux they are the files of ``/dev/shm``,
which is what ``shmstore ls`` and ``shmstore gc`` read. A store's segment is
``shmstore.<hash>`` there and its reader semaphores ``sem.shmstore.<hash>.<n>``; the store name
itself comes from the segment header.

Whether anyone still uses a store is read from ``/proc/<pid>/maps``: every process attached to
a store maps its segment. A process whose maps cannot be read (another user's, without root) makes
the answer unknown, and ``gc`` then removes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ._layout import HEADER_SIZE, MAGIC, NAME_FIELD, OFF_STORE_NAME
from ._names import OS_PREFIX, segment_name

__all__ = ["SHM_DIR", "Orphans", "find_orphans", "list_store_names", "listing_supported"]

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
    """What ``gc`` would remove, and whether it can know."""

    unused_stores: list[str]  # no live process maps their segment
    stray_semaphores: list[str]  # semaphores whose store segment no longer exists
    unreadable_processes: int  # processes whose mappings we could not inspect


def _mapped_segments() -> tuple[set[str], int]:
    mapped: set[str] = set()
    unreadable = 0
    marker = f"{SHM_DIR}/{OS_PREFIX}"
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
                mapped.add(line[where + len(str(SHM_DIR)) + 1 :].split(" ")[0])
    return mapped, unreadable


def find_orphans() -> Orphans:
    mapped, unreadable = _mapped_segments()
    unused = [name for name in list_store_names() if segment_name(name).lstrip("/") not in mapped]
    segments = {p.name for p in SHM_DIR.glob(OS_PREFIX + "*")}
    stray = sorted(
        p.name
        for p in SHM_DIR.glob(f"sem.{OS_PREFIX}*")
        if p.name[len("sem.") :].rsplit(".", 1)[0] not in segments
    )
    if os.geteuid() == 0:
        unreadable = 0  # root reads every process's maps; failures are exits mid-scan
    return Orphans(unused, stray, unreadable)
