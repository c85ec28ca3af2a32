"""The recorded type of a store: a small immutable segment per schema generation.

A store records its value type's structure (``_schema.describe``) at create and at each
evolution, so that tools and untyped handles can check values without the program's classes and
so that an evolution can be checked against every type whose readers may still run.

Where it lives
--------------
A description does not fit a header slot (a 100-field nested type is tens of kilobytes), and it
changes rarely, so each schema generation ``g`` is a segment of its own, ``<name>.s<g>``::

    off  size  field
      0     8  magic b"SHMSTSCH" (written last)
      8     8  created_ns of the store incarnation it belongs to (u64)
     16     8  schema generation g (u64)
     24     8  length of the record (u64)
     64     -  the record, JSON: {"type_name", "fingerprints": [hex per generation],
               "schemas": [description or null per generation]}

The header word SCHEMA (``_layout.W_SCHEMA``) names the current generation. The segment is
written once and never changed, and the magic goes in last, so a reader that finds the magic
reads a complete, consistent record without any lock. An evolution (holding the writer lock)
writes ``<name>.s<g+1>`` completely, then stores SCHEMA = g+1 (one aligned 8-byte store), then
removes ``<name>.s<g>``. A reader that loses that race -- it read SCHEMA = g, and ``s<g>`` is
gone by the time it opens it -- reads SCHEMA again and finds g+1: the loop in :func:`load`.
The record carries the whole history, so removing older segments loses nothing.

A record segment gets the store's mode and group at create. Where an operator changed the
store's group or mode afterwards, a record this user may not read is, at generation 0, taken
from the header (fingerprint and type name, no structure); after an evolution it is
:class:`StorePermissionError`.

The incarnation check (``created_ns``) keeps a handle of a removed store from reading the record
of a new store of the same name. A store made by a shmstore that recorded no schema (or a
replica, or a type that cannot be described) has no readable structure: its record then says
``null`` for the schema, or is synthesized from the header (generation 0).

Crash safety: an evolution killed before SCHEMA moves leaves an unpublished ``s<g+1>`` that
nobody reads (the next evolution replaces it); killed after, the store is evolved and the old
segment is a leftover that ``remove()`` removes with the store (by listing ``/dev/shm``).
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from ._errors import (
    CorruptStoreError,
    StateStoreError,
    StoreExistsError,
    StoreNotFoundError,
    StorePermissionError,
)
from ._layout import W_SCHEMA, HeaderInfo
from ._names import segment_name
from ._segment import Segment, UnsizedSegmentError, unlink_segment

__all__ = [
    "SchemaRecord",
    "load",
    "publish",
    "record_segment_name",
    "remove_records",
    "retire",
]

MAGIC: Final = b"SHMSTSCH"
_HEADER: Final = struct.Struct("<8sQQQ")
_HEADER_SIZE: Final = 64
_LOAD_TRIES: Final = 100
_MAX_RECORD: Final = 64 << 20  # a sanity bound on a damaged length field


@dataclass(frozen=True, slots=True)
class SchemaRecord:
    """The types a store has had, oldest first; the last is the current one."""

    type_name: str
    fingerprints: tuple[bytes, ...]
    schemas: tuple[dict[str, Any] | None, ...]

    @property
    def generation(self) -> int:
        return len(self.fingerprints) - 1

    @property
    def fingerprint(self) -> bytes:
        return self.fingerprints[-1]

    @property
    def schema(self) -> dict[str, Any] | None:
        return self.schemas[-1]

    def generation_of(self, fingerprint: bytes) -> int | None:
        """The newest generation recorded with *fingerprint*, or ``None``."""
        for generation in range(len(self.fingerprints) - 1, -1, -1):
            if self.fingerprints[generation] == fingerprint:
                return generation
        return None

    def evolved(
        self, type_name: str, fingerprint: bytes, schema: dict[str, Any] | None
    ) -> SchemaRecord:
        return SchemaRecord(type_name, (*self.fingerprints, fingerprint), (*self.schemas, schema))

    def encode(self) -> bytes:
        return msgspec.json.encode(
            {
                "type_name": self.type_name,
                "fingerprints": [fp.hex() for fp in self.fingerprints],
                "schemas": list(self.schemas),
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> SchemaRecord:
        """The record in *raw*; ``ValueError`` for anything that is not one: bad JSON, a
        field missing or of another type, nesting too deep (records come from other
        processes and from other hosts' publishers)."""
        try:
            data = msgspec.json.decode(raw)
            fingerprints = tuple(bytes.fromhex(fp) for fp in data["fingerprints"])
            schemas = tuple(data["schemas"])
            type_name = str(data["type_name"])
        except (ValueError, TypeError, KeyError, RecursionError) as exc:  # DecodeError too
            raise ValueError(str(exc)) from None
        if not fingerprints or len(fingerprints) != len(schemas):
            raise ValueError("a record lists one schema per fingerprint, at least one")
        return cls(type_name, fingerprints, schemas)


def record_segment_name(name: str, generation: int) -> str:
    """``/shmstore.<hash>.s<generation>``: at most 29 bytes below generation 100_000."""
    return f"{segment_name(name)}.s{generation}"


def publish(
    name: str, created_ns: int, record: SchemaRecord, *, mode: int, group: int | None
) -> None:
    """Write *record* as segment ``s<record.generation>`` of store *name*, magic last. The
    caller then makes it current (stores SCHEMA) -- at create, before the store's magic."""
    payload = record.encode()
    os_name = record_segment_name(name, record.generation)
    size = _HEADER_SIZE + len(payload)
    try:
        segment = Segment.create(name, size, mode, group, os_name=os_name)
    except StoreExistsError:
        # An evolution to this generation died before publishing it, or an older incarnation
        # of the name left it: nobody reads it, replace it. A record of another incarnation
        # (the name's new store, seen from an orphaned handle) is never touched.
        if not _ours_or_unwritten(name, os_name, created_ns):
            raise _not_ours(name) from None
        unlink_segment(name, os_name=os_name)
        segment = Segment.create(name, size, mode, group, os_name=os_name)
    try:
        m = segment.map
        m[_HEADER_SIZE:size] = payload
        m[0 : _HEADER.size] = _HEADER.pack(
            b"\0" * len(MAGIC), created_ns, record.generation, len(payload)
        )
        m[0 : len(MAGIC)] = MAGIC
    except BaseException:
        segment.close()
        unlink_segment(name, os_name=os_name)
        raise
    segment.close()


def _read(name: str, created_ns: int, generation: int) -> SchemaRecord | None:
    """Record ``s<generation>`` of this incarnation of store *name*; ``None`` if there is none
    (not yet, no longer, or another incarnation's)."""
    os_name = record_segment_name(name, generation)
    try:
        segment = Segment.open(name, readonly=True, os_name=os_name)
    except (StoreNotFoundError, UnsizedSegmentError):
        return None
    except StorePermissionError:
        if generation == 0:
            # The store's group or mode was changed after create (chown, chmod) and not its
            # record's: generation 0 is also in the header, minus the structure.
            return None
        raise
    try:
        m = segment.map
        if segment.size < _HEADER_SIZE:
            return None
        magic, created, gen, length = _HEADER.unpack_from(m, 0)
        if magic != MAGIC or created != created_ns or gen != generation:
            return None
        if length > min(_MAX_RECORD, segment.size - _HEADER_SIZE):
            raise CorruptStoreError(f"store {name!r}: schema record {generation} is damaged")
        raw = bytes(m[_HEADER_SIZE : _HEADER_SIZE + length])
    finally:
        segment.close()
    try:
        record = SchemaRecord.decode(raw)
    except ValueError as exc:
        raise CorruptStoreError(
            f"store {name!r}: schema record {generation} does not decode: {exc}"
        ) from None
    if record.generation != generation:
        raise CorruptStoreError(
            f"store {name!r}: schema record {generation} lists {record.generation + 1} types"
        )
    return record


def load(words: memoryview, name: str, info: HeaderInfo) -> SchemaRecord:
    """The current record of the store whose header words are *words*. A store without one
    (a replica, or made by a shmstore that recorded no schema) gets a record synthesized from
    its header, with no structure. :class:`CorruptStoreError` if SCHEMA names a record that
    does not exist."""
    for _ in range(_LOAD_TRIES):
        generation = int(words[W_SCHEMA])
        record = _read(name, info.created_ns, generation)
        if record is not None:
            return record
        if int(words[W_SCHEMA]) != generation:
            continue  # an evolution removed it after we read SCHEMA: read the newer one
        if generation == 0:
            return SchemaRecord(info.type_name, (info.fingerprint,), (None,))
        break
    raise CorruptStoreError(
        f"store {name!r}: schema generation {int(words[W_SCHEMA])} has no readable record"
    )


def retire(name: str, created_ns: int, generation: int) -> None:
    """Remove record ``s<generation>`` of the incarnation of store *name* created at
    *created_ns*, once a newer one is current; another incarnation's is left alone."""
    os_name = record_segment_name(name, generation)
    if _ours_or_unwritten(name, os_name, created_ns):
        with contextlib.suppress(StoreNotFoundError):
            unlink_segment(name, os_name=os_name)


def _ours_or_unwritten(name: str, os_name: str, created_ns: int) -> bool:
    """Whether segment *os_name* is a record of the incarnation created at *created_ns*, or one
    whose header was never written (a publisher that died). As in ``_growth``: POSIX has no
    "unlink if still this file", so a caller removes only what this says, right before."""
    try:
        segment = Segment.open(name, readonly=True, os_name=os_name)
    except (StoreNotFoundError, UnsizedSegmentError):
        return True
    except StorePermissionError:
        return False
    try:
        if segment.size < _HEADER_SIZE:
            return True
        magic, created, _gen, _length = _HEADER.unpack_from(segment.map, 0)
        return bool(magic != MAGIC or created == created_ns)
    finally:
        segment.close()


def _not_ours(name: str) -> StateStoreError:
    return StateStoreError(
        f"store {name!r} was removed and its name now belongs to a new store: this handle's "
        "store is orphaned, and cannot record a new type under that name"
    )


def remove_records(name: str, generation: int) -> None:
    """Remove the record segments of store *name* up to *generation* (and one more: an
    evolution that died before publishing), and on Linux every one listed in /dev/shm."""
    for g in range(0, generation + 2):
        with contextlib.suppress(StoreNotFoundError):
            unlink_segment(name, os_name=record_segment_name(name, g))
    prefix = segment_name(name).lstrip("/") + ".s"
    try:
        listing = os.listdir("/dev/shm")
    except OSError:
        return
    for entry in listing:
        if entry.startswith(prefix) and entry[len(prefix) :].isdigit():
            with contextlib.suppress(StoreNotFoundError):
                unlink_segment(name, os_name="/" + entry)
