"""``Store.statistics()``: a frozen snapshot of one store's counters, for tools and monitoring."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["MirrorStatus", "ReaderEntry", "StoreStatistics"]


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """Counters of a store, read at one moment. The ``*_ns`` times are ns since the epoch.

    ``commits``, ``conflicts`` and ``last_update_ns`` are shared by every process; ``lag``,
    ``reads`` and ``retries`` describe the handle that took the snapshot (``reads`` counts slot
    copies, i.e. reads of a changed version: cached reads cost nothing and are not counted).
    ``readonly``, ``wait_mode`` and ``removed`` describe the handle too: ``removed`` is true once
    the store was removed (``unlink()``, ``shmstore rm``) or replaced by a new store of the same
    name -- this handle then holds a private, orphaned store that nobody else will open, and
    what it commits nobody else sees.
    """

    name: str
    type_name: str
    fingerprint: str  # hex of the schema fingerprint: equal strings, compatible types
    version: int
    commits: int
    conflicts: int
    last_update_ns: int
    created_ns: int
    slots: int
    slot_size: int
    max_readers: int
    readers_registered: int
    readers_alive: int
    writer_lock_held: bool
    lag: int
    reads: int
    retries: int
    max_value_size: int = 0  # the store grows its slots (slot_size) up to this
    growths: int = 0  # how many times the store moved to a larger ring
    readonly: bool = False  # this handle maps the segment read-only
    wait_mode: str = "semaphore"  # how this handle's wait() sleeps: "semaphore" or "poll"
    removed: bool = False  # the store's name no longer points to this handle's segment
    # shmstore.mirror: empty role and zeros for a store that is not mirrored (see MirrorStatus).
    mirror_role: str = ""
    mirror_connected: bool = False
    mirror_last_sync_ns: int = 0
    mirror_behind: int = 0
    mirror_bucket: str = ""
    mirror_origin: str = ""
    # This handle's sleeps that ran out although a commit had come: a lost (or raced) wake-up.
    # 0 is what the wake-up protocol promises; sleeps are capped, so such a reader is late, not
    # stuck.
    late_wakeups: int = 0
    # Evolutions of the store's type (Store.open(..., evolve=True)): 0 at create.
    schema_generation: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- mirror


@dataclass(frozen=True, slots=True)
class MirrorStatus:
    """The mirror block of a store's header (``Store.mirror_status``), written by the store's
    mirroring process (``shmstore mirror publish`` on an origin, ``follow`` on a replica).

    ``role`` is ``"origin"``, ``"replica"`` or ``""`` (not mirrored). ``connected`` is false
    when the mirroring process is not connected to NATS or is dead. ``last_sync_ns`` is the last
    time the mirror was confirmed current (ns since the epoch, 0 never). ``behind`` is, on an
    origin, the versions committed but not yet in the bucket; on a replica, the versions known
    to exist at the origin but not applied here (a lower bound while disconnected).
    """

    role: str
    connected: bool
    pid: int
    last_sync_ns: int
    behind: int
    bucket: str
    origin: str


# ---------------------------------------------------------------------------- readers


@dataclass(frozen=True, slots=True)
class ReaderEntry:
    """One registry entry in use (``Store.readers()``): a handle that waits, or waited, for
    commits. ``alive`` is what the entry's liveness lock says (the kernel's word, valid across
    PID namespaces). ``pid`` is the owner's PID *in its own PID namespace* as it recorded it: in
    another container it may name nobody here, or another process."""

    index: int
    pid: int
    alive: bool
