"""The values every system is measured with, by size: importable, so pickling peers and spawned
processes can rebuild them."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from shmstore.fsm import FsmSnapshotDTO, FsmState, TransitionDTO


class Small(msgspec.Struct, frozen=True):
    id: int
    name: str
    score: float
    active: bool
    tags: list[str]


class Blob(msgspec.Struct, frozen=True):
    seq: int
    data: bytes


def small(i: int) -> Small:
    return Small(i, "sensor-front-left", 0.5 + i, True, ["alpha", "beta", "gamma", "delta"])


def fsm(
    i: int,
    entries: int = 8,
    snapshot_type: Any = FsmSnapshotDTO,
    transition_type: Any = TransitionDTO,
) -> Any:
    """Deterministic (ids and times derived from *i*), so that fsm(i) == fsm(i) in any process:
    the throughput scenario checks every value it reads against its own copy. The types may be
    replaced by others of the same fields (benchmarks/fsm.py compares DTO designs)."""
    history = tuple(
        transition_type(
            from_state=FsmState(k % 5 + 1),
            to_state=FsmState((k + 1) % 5 + 1),
            trigger_event=f"EVENT_{k}",
            ts_mono=1000.0 + i + k / 10,
            ts_wall=1.7e9 + i + k / 10,
        )
        for k in range(entries)
    )
    return snapshot_type(
        version=i,
        state=FsmState.ACTIVE,
        reason="transition requested by scheduler",
        ts_mono=1000.0 + i,
        ts_wall=1.7e9 + i,
        snapshot_id=str(uuid.UUID(int=i)),
        prev_state=FsmState.IDLE,
        fsm_instance_id="6f1c1a9e-0000-4000-8000-000000000001",
        history=history,
        context_data={f"key_{k}": f"value-{k}-{i}" for k in range(8)},
    )


def fsm100(i: int) -> FsmSnapshotDTO:
    """The realistic FSM snapshot: 100 history entries (about 10.5 KB)."""
    return fsm(i, 100)


class FsmHead(msgspec.Struct, frozen=True):
    """What a reader that only needs the state reads of a snapshot (a projection)."""

    version: int
    state: FsmState
    reason: str
    ts_wall: float


def blob(size: int) -> Callable[[int], Blob]:
    def make(i: int) -> Blob:
        return Blob(i, bytes([i % 256]) * size)

    return make


# name -> (type, factory, slot capacity in bytes)
SIZES: dict[str, tuple[Any, Callable[[int], Any], int]] = {
    "100B": (Small, small, 4096),
    "fsm": (FsmSnapshotDTO, fsm, 8192),
    "64KB": (Blob, blob(64_000), 70_000),
    "1MB": (Blob, blob(1_000_000), 1_100_000),
}
