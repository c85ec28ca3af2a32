"""Store names and the OS names derived from them.

A store name is what users type; the operating-system names of its segment and semaphores are
derived from it by hashing, so that every derived name fits macOS's 31-byte limit for shm and
semaphore names whatever the store name is, and stays recognizable in ``/dev/shm``
(``shmstore.<hash>`` and ``sem.shmstore.<hash>.<n>``). The store name itself is kept in the
segment header for tools.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["MAX_NAME_BYTES", "OS_PREFIX", "reader_semaphore_name", "segment_name", "validate_name"]

MAX_NAME_BYTES = 64
OS_PREFIX = "shmstore."
_HASH_CHARS = 13  # 65 bits of blake2b: collisions are not a practical concern on one machine


def validate_name(name: object) -> str:
    """Return *name* if it is a usable store name, else raise ``ValueError`` saying why."""
    if not isinstance(name, str):
        raise TypeError(f"store name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("store name must not be empty")
    if "/" in name:
        raise ValueError(f"store name must not contain '/': {name!r}")
    if not name.isprintable() or any(ch.isspace() for ch in name):
        raise ValueError(f"store name must be printable and without whitespace: {name!r}")
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"store name is {size} bytes long; the limit is {MAX_NAME_BYTES}")
    return name


def _digest(name: str) -> str:
    raw = hashlib.blake2b(name.encode("utf-8"), digest_size=10).digest()
    return base64.b32encode(raw).decode("ascii").lower()[:_HASH_CHARS]


def segment_name(name: str) -> str:
    """``/shmstore.<hash>``: 23 bytes."""
    return f"/{OS_PREFIX}{_digest(name)}"


def reader_semaphore_name(name: str, index: int) -> str:
    """``/shmstore.<hash>.<index>``: at most 28 bytes for the largest registry."""
    return f"{segment_name(name)}.{index}"
