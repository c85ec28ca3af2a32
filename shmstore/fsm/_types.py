"""The FSM worker's snapshot types, as frozen msgspec Structs, and the helpers that make them.

Snapshots are immutable: every change makes a new one (``add_transition``, ``next_snapshot``),
which is what lets the store hand the same decoded object to every reader of a version.
Timestamps are ``time.monotonic()`` (system-wide on Linux, so comparable across processes) and
``time.time()``.
"""

from __future__ import annotations

import enum
import time
import uuid
from typing import Any

import msgspec

__all__ = [
    "FsmSnapshotDTO",
    "FsmState",
    "TransitionDTO",
    "TransitionStatus",
    "create_transition",
    "initial_snapshot",
    "next_snapshot",
]


class FsmState(enum.IntEnum):
    UNSPECIFIED = 0
    BOOTING = 1
    IDLE = 2
    ACTIVE = 3
    ERROR_STATE = 4
    SHUTDOWN = 5


class TransitionStatus(enum.IntEnum):
    UNSPECIFIED = 0
    SUCCESS = 1
    FAILED = 2
    PENDING = 3


def _uuid() -> str:
    return str(uuid.uuid4())


class TransitionDTO(msgspec.Struct, frozen=True):
    """One state change of the FSM."""

    from_state: FsmState
    to_state: FsmState
    trigger_event: str
    status: TransitionStatus = TransitionStatus.SUCCESS
    error_message: str = ""
    ts_mono: float = msgspec.field(default_factory=time.monotonic)
    ts_wall: float = msgspec.field(default_factory=time.time)


class FsmSnapshotDTO(msgspec.Struct, frozen=True):
    """A versioned, immutable snapshot of the FSM."""

    version: int
    state: FsmState
    reason: str = ""
    ts_mono: float = msgspec.field(default_factory=time.monotonic)
    ts_wall: float = msgspec.field(default_factory=time.time)
    snapshot_id: str = msgspec.field(default_factory=_uuid)
    prev_state: FsmState | None = None
    fsm_instance_id: str = msgspec.field(default_factory=_uuid)
    source_module: str = "fsm_handler"
    attempt_count: int = 0
    history: tuple[TransitionDTO, ...] = ()
    context_data: dict[str, Any] = msgspec.field(default_factory=dict)
    state_metadata: dict[str, Any] = msgspec.field(default_factory=dict)

    def add_transition(
        self, transition: TransitionDTO, max_history: int | None = None
    ) -> FsmSnapshotDTO:
        """A copy with *transition* appended to the history, keeping at most the newest
        *max_history* transitions."""
        history = (*self.history, transition)
        if max_history is not None:
            history = history[-max_history:] if max_history > 0 else ()
        return msgspec.structs.replace(self, history=history)


def initial_snapshot() -> FsmSnapshotDTO:
    """The cold-start snapshot: version 0, BOOTING."""
    return FsmSnapshotDTO(
        version=0, state=FsmState.BOOTING, reason="COLD_START", source_module="initial_boot"
    )


def create_transition(
    from_state: FsmState,
    to_state: FsmState,
    trigger_event: str,
    status: TransitionStatus = TransitionStatus.SUCCESS,
    error_message: str = "",
) -> TransitionDTO:
    return TransitionDTO(
        from_state=from_state,
        to_state=to_state,
        trigger_event=trigger_event,
        status=status,
        error_message=error_message,
    )


def next_snapshot(
    current: FsmSnapshotDTO,
    new_state: FsmState,
    reason: str,
    transition: TransitionDTO | None = None,
) -> FsmSnapshotDTO:
    """The snapshot after moving *current* to *new_state*.

    The version goes up by one only when the state changes; the instance id is kept and the
    context copied, so that the new snapshot shares nothing mutable with the old one.
    """
    changed = new_state != current.state
    snapshot = FsmSnapshotDTO(
        version=current.version + 1 if changed else current.version,
        state=new_state,
        reason=reason,
        prev_state=current.state,
        fsm_instance_id=current.fsm_instance_id,
        source_module=current.source_module,
        attempt_count=current.attempt_count,
        history=current.history,
        context_data=dict(current.context_data),
        state_metadata=dict(current.state_metadata),
    )
    if transition is not None:
        snapshot = snapshot.add_transition(transition)
    return snapshot
