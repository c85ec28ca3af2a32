"""Reading a store's counters: ``statistics()`` and the application counters.

Every counter lives in the store's header (shared by every process) or in this handle's ring
(``reads``, ``retries``). ``statistics()`` reads them all under the handle's ``in_use`` lock, so
that ``close()`` cannot unmap the header halfway, and takes ``version``, ``commits`` and
``last_update_ns`` from one consistent read of the ring (``Ring.consistent_counters``).
"""

from __future__ import annotations

from ._attachment import Attachment
from ._layout import APP_COUNTERS, W_GENERATION, app_counter_word
from ._replication import read_mirror_status
from ._stats import StoreStatistics

__all__ = ["AppCounters", "collect_statistics"]


class AppCounters:
    """Four shared u64 counters in the store header for layers above the store (the FSM layer
    keeps its ``version_conflicts`` here): every process attached to the store sees the same
    values. ``counters[i]`` reads one; :meth:`increment` adds one under the writer lock."""

    __slots__ = ("_att",)

    def __init__(self, attachment: Attachment) -> None:
        self._att = attachment

    def __len__(self) -> int:
        return APP_COUNTERS

    def __getitem__(self, index: int) -> int:
        """Counter *index* (0-3); ``IndexError`` outside that range."""
        word = app_counter_word(index)
        att = self._att
        with att.in_use:
            att.check_open()
            return int(att.words[word])

    def increment(self, index: int) -> int:
        """Add one to counter *index* for every process; returns the new value."""
        word = app_counter_word(index)
        att = self._att
        with att.in_use:
            att.check_open()
            if att.segment.readonly:
                raise att.readonly_error()
            with att.writer.locked():  # a read-modify-write of a shared word
                att.words[word] += 1
                return int(att.words[word])


def collect_statistics(att: Attachment, cached_version: int) -> StoreStatistics:
    """The store's counters and this handle's, read at one moment (see ``Store.statistics``).
    *cached_version* is the version of the handle's cached value, for ``lag``."""
    with att.in_use:
        att.check_open()
        entries = att.registry.entries()
        writer_lock_held = att.lock.held_elsewhere()
        ring = att.ring
        version, commits, last_update_ns = ring.consistent_counters()
        conflicts = ring.conflicts()
        growths = int(att.words[W_GENERATION])
        removed = att.segment.removed()
        mirror = read_mirror_status(att)
    info = att.info
    record = att.current_record()
    return StoreStatistics(
        name=att.name,
        type_name=record.type_name,
        fingerprint=record.fingerprint.hex(),
        version=version,
        commits=commits,
        conflicts=conflicts,
        last_update_ns=last_update_ns,
        created_ns=info.created_ns,
        slots=info.geometry.slots,
        slot_size=ring.capacity,
        max_readers=info.geometry.registry_capacity,
        readers_registered=len(entries),
        readers_alive=sum(alive for _i, _pid, alive in entries),
        writer_lock_held=writer_lock_held,
        lag=max(0, version - cached_version),
        reads=ring.reads,
        retries=ring.retries,
        max_value_size=info.max_value_size,
        growths=growths,
        readonly=att.segment.readonly,
        wait_mode=att.gate.mode,
        removed=removed,
        mirror_role=mirror.role,
        mirror_connected=mirror.connected,
        mirror_last_sync_ns=mirror.last_sync_ns,
        mirror_behind=mirror.behind,
        mirror_bucket=mirror.bucket,
        mirror_origin=mirror.origin,
        late_wakeups=att.gate.late_wakeups,
        schema_generation=record.generation,
    )
