"""Store names and the OS names derived from them.

A store name is what users type; the operating-system names of its segment and semaphores are
derived from it by hashing, so that every derived name fits macOS's 31-byte limit for shm and
semaphore names whatever the store name is, and stays recognizable in ``/dev/shm``
(``shmstore.<hash>`` and ``sem.shmstore.<hash>.<tag>``). The store name itself is kept in the
segment header for tools.

A reader's semaphore is named after the store, its registry entry *and one claim of that entry*:
the tag hashes the store's creation time (which incarnation of the name), the entry index and
the entry's claim generation. So a handle of a removed-and-recreated store can never unlink or
post the semaphore of a reader of the new store, and a claim never has to remove the previous
claimant's semaphore first (which sticky ``/dev/shm`` forbids when that claimant was another
user).

A ring the store grew into (``_growth``) is named the same way, after the incarnation and the
ring's generation: ``shmstore.<hash>.g<tag>``. A handle of a removed store that grows therefore
creates and removes only names of its own incarnation, never the rings of a new store of the same
name (issue 20); the ring's header repeats the incarnation, checked on attach.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = [
    "MAX_NAME_BYTES",
    "OS_PREFIX",
    "generation_prefix",
    "generation_segment_name",
    "reader_semaphore_name",
    "semaphore_prefix",
    "segment_name",
    "validate_name",
]

MAX_NAME_BYTES = 64
OS_PREFIX = "shmstore."
_HASH_CHARS = 13  # 65 bits of blake2b: collisions are not a practical concern on one machine
_TAG_CHARS = 7  # 35 bits; with the prefix, 31 bytes: macOS's limit for a semaphore name
_RING_TAG_CHARS = 6  # 30 bits; "/shmstore.<hash>.g<tag>" is 31 bytes: macOS's limit


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


def _digest(text: str, chars: int = _HASH_CHARS) -> str:
    raw = hashlib.blake2b(text.encode("utf-8"), digest_size=10).digest()
    return base64.b32encode(raw).decode("ascii").lower()[:chars]


def segment_name(name: str) -> str:
    """``/shmstore.<hash>``: 23 bytes."""
    return f"/{OS_PREFIX}{_digest(name)}"


def generation_segment_name(name: str, created_ns: int, generation: int) -> str:
    """``/shmstore.<hash>.g<tag>``: ring *generation* of the incarnation of store *name* created
    at *created_ns* (31 bytes). Every name it can return starts with
    :func:`generation_prefix`."""
    tag = _digest(f"{created_ns}:ring:{generation}", _RING_TAG_CHARS)
    return f"{generation_prefix(name)}{tag}"


def generation_prefix(name: str) -> str:
    """What the OS name of every ring of every incarnation of store *name* starts with."""
    return f"{segment_name(name)}.g"


def semaphore_prefix(name: str) -> str:
    """What every reader semaphore name of store *name* starts with (for cleanup by listing)."""
    return f"{segment_name(name)}."


def reader_semaphore_name(name: str, created_ns: int, index: int, generation: int) -> str:
    """``/shmstore.<hash>.<tag>`` for claim *generation* of entry *index* of the store
    incarnation created at *created_ns*: 31 bytes."""
    tag = _digest(f"{created_ns}:{index}:{generation}", _TAG_CHARS)
    return f"{semaphore_prefix(name)}{tag}"
