"""Prometheus text exposition of store statistics (no ``prometheus_client`` needed).

>>> print(prometheus_text([store.statistics()]))          # doctest: +SKIP
# HELP shmstore_version Newest committed version of the store.
# TYPE shmstore_version gauge
shmstore_version{store="fsm",type="shmstore.fsm._types:FsmSnapshotDTO"} 1234
...
"""

from __future__ import annotations

from collections.abc import Iterable

from ._stats import StoreStatistics

__all__ = ["prometheus_text"]

# (field, metric name, type, help)
_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("version", "shmstore_version", "gauge", "Newest committed version of the store."),
    ("commits", "shmstore_commits_total", "counter", "Commits made by every process."),
    ("conflicts", "shmstore_conflicts_total", "counter", "Compare-and-set commits refused."),
    ("last_update_ns", "shmstore_last_update_seconds", "gauge", "Time of the newest commit."),
    ("created_ns", "shmstore_created_seconds", "gauge", "Time the store was created."),
    ("slots", "shmstore_slots", "gauge", "Ring depth: versions kept readable."),
    ("slot_size", "shmstore_slot_size_bytes", "gauge", "Current slot capacity, in bytes."),
    ("max_value_size", "shmstore_max_value_size_bytes", "gauge", "Capacity it may grow to."),
    ("growths", "shmstore_growths_total", "counter", "Moves to a larger ring."),
    ("max_readers", "shmstore_max_readers", "gauge", "Capacity of the reader registry."),
    ("readers_registered", "shmstore_readers_registered", "gauge", "Registry entries in use."),
    ("readers_alive", "shmstore_readers_alive", "gauge", "Registry entries whose owner lives."),
    ("writer_lock_held", "shmstore_writer_lock_held", "gauge", "1 while a writer holds the lock."),
    ("removed", "shmstore_removed", "gauge", "1 once the name no longer points to this store."),
    ("schema_generation", "shmstore_schema_generation", "gauge", "Evolutions of the value type."),
)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(stats: Iterable[StoreStatistics]) -> str:
    """The Prometheus text format (version 0.0.4) for the given stores' statistics."""
    rows = list(stats)
    lines: list[str] = []
    for field, metric, kind, help_text in _METRICS:
        lines.append(f"# HELP {metric} {help_text}")
        lines.append(f"# TYPE {metric} {kind}")
        for s in rows:
            value = getattr(s, field)
            if field.endswith("_ns"):
                value = value / 1e9
            elif isinstance(value, bool):
                value = int(value)
            labels = f'store="{_escape(s.name)}",type="{_escape(s.type_name)}"'
            lines.append(f"{metric}{{{labels}}} {value}")
    lines.extend(_mirror_lines(rows))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- mirror

_MIRROR_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("mirror_connected", "shmstore_mirror_connected", "gauge", "1 while the mirror is connected."),
    (
        "mirror_last_sync_ns",
        "shmstore_mirror_last_sync_seconds",
        "gauge",
        "Last time the mirror was confirmed current.",
    ),
    ("mirror_behind", "shmstore_mirror_behind_versions", "gauge", "Versions not yet mirrored."),
)


def _mirror_lines(rows: list[StoreStatistics]) -> list[str]:
    """The mirror metrics, for the mirrored stores only (labelled with their role and bucket)."""
    mirrored = [s for s in rows if s.mirror_role]
    lines: list[str] = []
    if not mirrored:
        return lines
    for field, metric, kind, help_text in _MIRROR_METRICS:
        lines.append(f"# HELP {metric} {help_text}")
        lines.append(f"# TYPE {metric} {kind}")
        for s in mirrored:
            value = getattr(s, field)
            if field.endswith("_ns"):
                value = value / 1e9
            elif isinstance(value, bool):
                value = int(value)
            labels = (
                f'store="{_escape(s.name)}",role="{_escape(s.mirror_role)}",'
                f'bucket="{_escape(s.mirror_bucket)}"'
            )
            lines.append(f"{metric}{{{labels}}} {value}")
    return lines
