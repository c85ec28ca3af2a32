"""``Store.statistics()``: a frozen snapshot of one store's counters, for tools and monitoring."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["StoreStatistics"]


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """Counters of a store, read at one moment. The ``*_ns`` times are ns since the epoch.

    ``commits``, ``conflicts`` and ``last_update_ns`` are shared by every process; ``lag``,
    ``reads`` and ``retries`` describe the handle that took the snapshot (``reads`` counts slot
    copies, i.e. reads of a changed version: cached reads cost nothing and are not counted).
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
