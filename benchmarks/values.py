"""The values every system is measured with, by size: importable, so pickling peers and spawned
processes can rebuild them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from shmstore.fsm import FsmSnapshotDTO, FsmState, create_transition


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


def fsm(i: int) -> FsmSnapshotDTO:
    snap = FsmSnapshotDTO(
        version=i,
        state=FsmState.ACTIVE,
        reason="transition requested by scheduler",
        prev_state=FsmState.IDLE,
        context_data={f"key_{k}": f"value-{k}-{i}" for k in range(8)},
    )
    for k in range(8):
        snap = snap.add_transition(
            create_transition(FsmState(k % 5 + 1), FsmState((k + 1) % 5 + 1), f"EVENT_{k}")
        )
    return snap


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
