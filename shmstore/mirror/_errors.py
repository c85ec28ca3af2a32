"""The mirror's errors: both are :class:`shmstore.StateStoreError` subclasses."""

from __future__ import annotations

from .. import StateStoreError

__all__ = ["MirrorError", "NoPublisherError"]


class MirrorError(StateStoreError):
    """Raised when the mirror cannot do what was asked: NATS unreachable or refusing (bad
    credentials, TLS), a bucket that holds something else, a publisher that answered with an
    error. The message never contains a secret."""


class NoPublisherError(MirrorError, ConnectionError):
    """Raised by a remote ``set`` when no publisher of the origin answers: the publisher is not
    running, is a standby, or cannot reach NATS."""
