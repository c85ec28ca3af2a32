"""The FSM worker's state store and snapshot types, shared across processes.

A drop-in for the worker's in-process ``AsyncStateStore``: same methods, arguments, return shapes
and exceptions, the same snapshot types (frozen-dataclass behaviour included), but readers and
subscribers may live in other processes (give the store a ``name``). ``docs/fsm.md`` names the
original API and lists the few deliberate differences.
"""

from .._errors import InvalidSnapshotError as InvalidSnapshotError
from ._errors import StateStoreError as StateStoreError
from ._errors import StateVersionError as StateVersionError
from ._fanout import MAX_QUEUE_SIZE as MAX_QUEUE_SIZE
from ._store import TEST_SUBSCRIBER_TIMEOUT as TEST_SUBSCRIBER_TIMEOUT
from ._store import AsyncStateStore as AsyncStateStore
from ._store import create_initialized_store as create_initialized_store
from ._store import create_store as create_store
from ._types import FsmSnapshotDTO as FsmSnapshotDTO
from ._types import FsmState as FsmState
from ._types import FsmStateView as FsmStateView
from ._types import TransitionDTO as TransitionDTO
from ._types import TransitionStatus as TransitionStatus
from ._types import create_transition as create_transition
from ._types import initial_snapshot as initial_snapshot
from ._types import next_snapshot as next_snapshot

__all__ = [
    # the store
    "AsyncStateStore",
    "create_initialized_store",
    "create_store",
    "MAX_QUEUE_SIZE",
    "TEST_SUBSCRIBER_TIMEOUT",
    # snapshot types and helpers
    "FsmSnapshotDTO",
    "FsmState",
    "FsmStateView",
    "TransitionDTO",
    "TransitionStatus",
    "create_transition",
    "initial_snapshot",
    "next_snapshot",
    # errors
    "InvalidSnapshotError",
    "StateStoreError",
    "StateVersionError",
]
