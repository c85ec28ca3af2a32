"""The FSM layer's errors: the worker's own two, as the core's classes.

``StateStoreError`` is the core's (any message). The worker's code builds
``StateVersionError("...")`` from a plain message, while the core's class takes
``(expected, actual, message)``; the FSM layer's ``StateVersionError`` is a subclass of the core's
that accepts both, so ``except shmstore.StateVersionError`` still catches the FSM layer's
conflicts.
"""

from __future__ import annotations

from .._errors import StateStoreError
from .._errors import StateVersionError as CoreStateVersionError

__all__ = ["StateStoreError", "StateVersionError"]


class StateVersionError(CoreStateVersionError):
    """Raised by ``AsyncStateStore.set(..., enforce_version=True)`` when the snapshot's version is
    not newer than the stored one. ``expected`` is the lowest version that would have been
    accepted, ``actual`` the snapshot's version (``-1`` each when built from a message alone)."""

    def __init__(self, message: str = "", *, expected: int = -1, actual: int = -1) -> None:
        super().__init__(expected, actual, message or "version conflict")


StateVersionError.__module__ = "shmstore.fsm"
