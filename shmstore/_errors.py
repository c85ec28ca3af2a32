"""The error tree.

Every error the public API raises is a :class:`StateStoreError`; where a standard-library base is
what a caller would naturally catch, the class inherits that too (``StoreNotFoundError`` is a
``FileNotFoundError``). Exceptions of ``posix_ipc`` and ``msgspec`` are translated at the boundary
and never escape untranslated; the original is kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CorruptStoreError",
    "InvalidSnapshotError",
    "RegistryFullError",
    "SchemaMismatchError",
    "SnapshotTooLargeError",
    "StateStoreError",
    "StateVersionError",
    "StoreExistsError",
    "StoreNotFoundError",
    "StorePermissionError",
    "SubscriberLaggedError",
]


class StateStoreError(Exception):
    """Base class of every error raised by shmstore."""


class StateVersionError(StateStoreError):
    """Raised by ``set(..., expected_version=v)`` when another commit moved the store past *v*.

    Nothing was written. ``expected`` is the version the caller based its value on, ``actual`` the
    version the store held when the write was attempted.
    """

    def __init__(self, expected: int, actual: int, message: str | None = None) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            message
            or f"version conflict: expected version {expected}, store is at version {actual}"
        )


class StoreNotFoundError(StateStoreError, FileNotFoundError):
    """Raised by ``Store.open`` when no store of that name exists."""


class StoreExistsError(StateStoreError, FileExistsError):
    """Raised by ``Store.create`` when a store of that name already exists."""


class StorePermissionError(StateStoreError, PermissionError):
    """Raised when the operating system refuses this user access to a store's segment."""


class SnapshotTooLargeError(StateStoreError, ValueError):
    """Raised by ``set()`` when the encoded value does not fit in one slot. Nothing was written."""


class InvalidSnapshotError(StateStoreError, ValueError):
    """Raised by ``set()`` when the value cannot be encoded, or encodes to bytes that a reader of
    the store's type could not decode (an enum field holding an unknown number, say). Nothing was
    written: a value readers cannot decode is never published."""


class SchemaMismatchError(StateStoreError, TypeError):
    """Raised by ``Store.open`` when the store was created for a type whose schema differs from
    the type the caller asked for."""


class CorruptStoreError(StateStoreError):
    """Raised when the segment is not a valid store (bad magic, layout version or sizes), or when
    a committed slot cannot be read consistently within the retry bound. A reader never returns a
    torn value; it raises this instead."""


class CheckpointError(StateStoreError, ValueError):
    """Raised when a checkpoint file cannot be read, is truncated or damaged, or holds a value
    that does not decode as the store's type. A checkpoint of another schema raises
    :class:`SchemaMismatchError` instead."""


class SubscriberLaggedError(StateStoreError):
    """Raised by a subscription iterator when the writer overwrote versions the subscriber had not
    read yet. ``missed`` is the exact number of versions lost; the subscription continues from
    the newest version on the next iteration."""

    def __init__(self, missed: int, resume_version: int) -> None:
        self.missed = missed
        self.resume_version = resume_version
        super().__init__(
            f"subscriber fell behind the ring: {missed} version(s) missed, "
            f"resuming at version {resume_version}"
        )


class RegistryFullError(StateStoreError):
    """Raised by ``wait()``/``subscribe()`` when every reader entry of the store is taken by a
    live process. The limit is the store's ``max_readers`` create option."""
