"""What travels through NATS: the bucket, key and subject names, the record of one version, and
the remote compare-and-set request and reply.

One bucket mirrors one store and holds one key, ``state``, whose newest entry is the newest
version the publisher put. The bucket keeps no history (``history=1``): a mirror has
latest-value semantics, like the store itself, and a follower that comes back after an outage
needs only the newest entry. The entry's value is a :class:`Record` in MessagePack: the origin's
encoded value bytes, untouched (no decode and re-encode on either side), together with what a
follower needs to build and check a replica.

Two paths carry each record
---------------------------
* **durable**: the ``state`` key of the bucket, put with compare-and-set (see ``_publisher``).
  Late followers, restarts and gaps catch up from it.
* **live**: the same bytes published on the plain NATS subject :func:`live_subject`, no
  acknowledgement, just before the durable put. Followers subscribe to it and apply whichever
  copy of a version arrives first; a version already applied is never applied again, so the two
  paths together keep the replica's guarantees (see ``_follower``).

Chunks
------
A record larger than the server's ``max_payload`` cannot travel as one message. Its bytes are
split into chunks of at most ``max_payload - HEADROOM`` bytes, put into the bucket under the keys
``chunk.<version>.<index>`` (each key once: a version's chunks are never overwritten by another
version's), and only then is a **manifest** put into ``state``: a record of format
``CHUNKED_FORMAT`` with the same metadata, an empty value, and the number, total size and
CRC-32 of the chunks. A manifest is therefore put only once every chunk it names is in
the bucket, and a follower that reassembles a manifest checks the size and digest before it
decodes anything: a chunk missing (purged, expired, lost) or replaced makes the version
unusable, never half-applied; the follower waits for the next manifest (the newest complete
version). Chunks of older versions are purged after each manifest (see ``_publisher``).
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from collections.abc import Iterator
from typing import Final

import msgspec

from .. import StateStoreError
from ..replication import validate_name

__all__ = [
    "CHUNKED_FORMAT",
    "DURABLE_OVERHEAD",
    "HEADROOM",
    "KEY",
    "MAX_STORE_VALUE",
    "MIN_PART",
    "RECORD_FORMAT",
    "RECORD_OVERHEAD",
    "Record",
    "SetReply",
    "SetRequest",
    "Reassembly",
    "assemble",
    "check_manifest",
    "chunk_key",
    "chunk_subjects",
    "decode_record",
    "default_bucket",
    "encode_record",
    "live_parts",
    "live_parts_subject",
    "live_subject",
    "manifest",
    "set_subject",
    "split",
    "validate_bucket",
]

KEY: Final = "state"
RECORD_FORMAT: Final = 1
CHUNKED_FORMAT: Final = 2  # a manifest: the record's bytes are in chunk keys
HEADROOM: Final = 512  # a message's subject and headers travel with its payload
MIN_PART: Final = 1024  # bytes of a live part or a chunk but the last: none is smaller
# A live record's bytes beyond its value: names and numbers (a live copy carries no schema).
RECORD_OVERHEAD: Final = 64 * 1024
# A durable record's: also the origin's schema record (kilobytes for real types; generous).
DURABLE_OVERHEAD: Final = 16 << 20
MAX_STORE_VALUE: Final = (1 << 31) - 1  # the largest value a store can hold (its slot field)
MAX_BUCKET: Final = 32  # the header's bucket field (see _layout's mirror block)
_BUCKET_RE = re.compile(r"[A-Za-z0-9_-]+")  # whole: fullmatch, so no trailing newline


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """One committed version of the origin, as put into the bucket."""

    format: int = RECORD_FORMAT
    shmstore: str  # the publisher's shmstore version
    origin: str  # the origin's identity: host/store-name (see _publisher)
    store: str  # the origin store's name
    version: int
    commit_ns: int  # the origin's commit time
    fingerprint: bytes  # the origin's schema fingerprint (16 bytes)
    type_name: str
    slots: int  # the origin's geometry, for a replica created from this record
    slot_size: int
    value: bytes  # the value exactly as encoded in the origin's ring
    max_value_size: int = 0  # how far the origin's values may grow (0: not said)
    # A manifest (format CHUNKED_FORMAT) only: the full record's bytes are in *chunks* keys
    # chunk.<version>.<index>, *size* bytes in all, with this CRC-32 *digest*; *first_seq* is
    # the stream sequence of chunk 0 (older chunk messages are purged once this is in place).
    chunks: int = 0
    size: int = 0
    digest: bytes = b""
    first_seq: int = 0

    @property
    def chunked(self) -> bool:
        return self.format == CHUNKED_FORMAT

    # Every type the origin has had (its schema record, JSON): a replica follows evolutions.
    # Durable records only (the live copy leaves it out); empty from a publisher before it.
    schema: bytes = b""


class RecordView(Record, frozen=True, kw_only=True):
    """A :class:`Record` decoded without copying its value: *value* is a view of the message's
    bytes (a 4 MB value is one copy less on a follower's live path)."""

    value: memoryview  # type: ignore[assignment]  # the same msgpack bytes, not copied out


class SetRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A remote ``set(value, expected_version=expect)``; *value* is JSON."""

    value: msgspec.Raw
    expect: int | None = None


class SetReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The publisher's answer: the new version, or a conflict (with the origin's version), or a
    one-line error."""

    version: int = 0
    conflict: bool = False
    actual: int = 0
    error: str = ""


_record_decoder = msgspec.msgpack.Decoder(Record)
_record_view_decoder = msgspec.msgpack.Decoder(RecordView)
_record_encoder = msgspec.msgpack.Encoder()


def encode_record(record: Record) -> bytes:
    return _record_encoder.encode(record)


def decode_record(data: bytes | bytearray, *, view: bool = False) -> Record:
    """Raise :class:`StateStoreError` for bytes that are not a record of a known format.
    *view*: a :class:`RecordView`, whose value shares *data*'s memory."""
    try:
        record = (_record_view_decoder if view else _record_decoder).decode(data)
    except msgspec.DecodeError as exc:
        raise StateStoreError(f"bucket entry is not a shmstore mirror record: {exc}") from None
    except RecursionError:  # an unknown field nested deeper than msgspec's decoder goes
        raise StateStoreError(
            "bucket entry is not a shmstore mirror record: nested too deeply"
        ) from None
    if record.format not in (RECORD_FORMAT, CHUNKED_FORMAT):
        raise StateStoreError(
            f"mirror record format {record.format} is not supported (this shmstore reads "
            f"{RECORD_FORMAT} and {CHUNKED_FORMAT})"
        )
    return record


def _digest(data: bytes) -> bytes:
    # CRC-32: it guards against chunks that are missing, stale or mixed from two puts, not
    # against an adversary (who could put a whole record), at a fifth of BLAKE2b's cost (4 MB:
    # ~1 ms against ~6 ms here, paid by the publisher and by every follower).
    return zlib.crc32(data).to_bytes(4, "big")


def split(data: bytes, max_payload: int) -> list[bytes]:
    """*data* in chunks that each travel in one message of a server with *max_payload*."""
    size = max(MIN_PART, max_payload - HEADROOM)
    return [data[i : i + size] for i in range(0, len(data), size)]


def manifest(record: Record, data: bytes, chunks: int, first_seq: int) -> Record:
    """The manifest of *record*, whose encoded bytes *data* were put as *chunks* chunks."""
    return msgspec.structs.replace(
        record,
        format=CHUNKED_FORMAT,
        value=b"",
        chunks=chunks,
        size=len(data),
        digest=_digest(data),
        first_seq=first_seq,
    )


def chunk_key(version: int, index: int) -> str:
    return f"chunk.{version}.{index}"


def chunk_subjects(bucket: str) -> str:
    """The stream subjects of every chunk key of *bucket* (for purging old ones)."""
    return f"$KV.{bucket}.chunk.>"


def check_manifest(manifest: Record, limit: int) -> None:
    """Refuse (:class:`StateStoreError`) a manifest whose claims no publisher makes: more than
    *limit* bytes (what the replica can take, with the record around the value), or a number
    of chunks that its size does not explain (``split`` makes chunks of ``MIN_PART`` bytes at
    least). Checked before a chunk is fetched: a 200-byte manifest that claimed a million
    chunks made the follower start a million reads (2.9 GB, then MemoryError)."""
    if not 0 < manifest.size <= limit:
        raise StateStoreError(
            f"version {manifest.version}: the manifest says {manifest.size} bytes; this replica "
            f"takes 1 to {limit}"
        )
    most = -(-manifest.size // MIN_PART)
    if not 0 < manifest.chunks <= most:
        raise StateStoreError(
            f"version {manifest.version}: the manifest says {manifest.chunks} chunks for "
            f"{manifest.size} bytes (1 to {most})"
        )


def assemble(manifest: Record, parts: list[bytes]) -> Record:
    """The full record of *manifest* from its chunks' bytes; :class:`StateStoreError` if they
    are not exactly the chunks the manifest was made from (nothing is decoded then)."""
    data = b"".join(parts)
    if len(parts) != manifest.chunks or len(data) != manifest.size:
        raise StateStoreError(
            f"version {manifest.version}: {len(parts)} chunks, {len(data)} bytes; the manifest "
            f"says {manifest.chunks} chunks, {manifest.size} bytes"
        )
    if _digest(data) != manifest.digest:
        raise StateStoreError(f"version {manifest.version}: the chunks do not match the manifest")
    record = decode_record(data)
    if record.chunked or record.version != manifest.version:
        raise StateStoreError(f"version {manifest.version}: the chunks hold another record")
    return record


def validate_bucket(bucket: str) -> str:
    """Return *bucket* if NATS and the header's bucket field accept it, else raise ValueError."""
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(f"bucket name must be letters, digits, '_' or '-': {bucket!r}")
    if len(bucket) > MAX_BUCKET:
        raise ValueError(f"bucket name is {len(bucket)} characters; the limit is {MAX_BUCKET}")
    return bucket


def default_bucket(name: str) -> str:
    """``shmstore_<name>``; a name NATS would refuse, or one too long, is mangled and gets a
    hash suffix, so that two store names never share a default bucket."""
    validate_name(name)
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    plain = f"shmstore_{safe}"
    if safe == name and len(plain) <= MAX_BUCKET:
        return plain
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=4).hexdigest()
    return f"shmstore_{safe[: MAX_BUCKET - 18]}_{digest}"


# A live part: this header, then its slice of the record's bytes. The record's bytes are the
# slices of parts 0..count-1 in order, *size* bytes with CRC-32 *crc*, which only the last part
# carries (the others carry 0): the publisher computes it part by part as it sends them, while
# the server relays the parts before, and the follower part by part as they arrive in order.
_PART = struct.Struct(">QIIQI")  # version, index, count, size, crc


def live_parts(data: bytes, version: int, max_payload: int) -> Iterator[tuple[bytes, memoryview]]:
    """The encoded record *data* of *version* as live parts (header, slice), each of which
    fits one message: sent as they are, without copying the slices."""
    size = max(MIN_PART, max_payload - HEADROOM - _PART.size)
    view = memoryview(data)
    count = (len(data) + size - 1) // size
    crc = 0
    for i in range(count):
        piece = view[i * size : (i + 1) * size]
        crc = zlib.crc32(piece, crc)
        yield _PART.pack(version, i, count, len(data), crc if i == count - 1 else 0), piece


class Reassembly:
    """The live parts of one version at a time, joined as they arrive: a part that comes in
    order is appended and checked at once, so the record is ready when its last part is (the
    parts of one publisher come in order; a part ahead of its turn waits for the ones before).

    A part of another version starts afresh, whether that version is newer or older: one
    publisher sends a record's parts before the next record's, so the version in progress will
    not complete. (Keeping the highest version instead let one stale or bogus part of a huge
    version block every later record.) Which record is *applied* is not decided here:
    ``Replication.commit_at`` takes only versions newer than the replica's.

    Memory is bounded by one record: parts claiming more than *limit* bytes in all are dropped
    unread, and a version's parts never hold more than the size they claim. So is the count of
    parts held (each costs a few hundred bytes besides its piece): a sender's parts but the
    last carry ``MIN_PART`` bytes or more, so the parts of a version that claims more than
    ``size // MIN_PART + 1`` are dropped unread (1-byte parts once held ~400 bytes per byte
    of record)."""

    def __init__(self) -> None:
        self._start(0, (0, 0))

    def _start(self, version: int, shape: tuple[int, int]) -> None:
        self._version = version
        self._shape = shape  # the version's part count and size, as its first part said
        self._crc = 0  # the last part's: the whole record's
        self._parts: dict[int, memoryview] = {}  # arrived ahead of their turn
        self._held = 0  # bytes in _data and _parts
        self._next = 0  # parts before this one are in _data
        self._data = bytearray()
        self._running = 0  # CRC-32 of _data
        self._broken = False  # this version's parts disagree, or it is done

    def add(self, message: bytes, *, newer_than: int = 0, limit: int) -> bytearray | None:
        """Take one part; the record's bytes once every part of its version is here and they
        match the size and CRC, else ``None``. Parts of versions up to *newer_than* (the
        replica has them) and of records above *limit* bytes are dropped.
        :class:`StateStoreError` for a message too short to be a part."""
        if len(message) < _PART.size:
            raise StateStoreError("not a live part: too short")
        version, index, count, size, crc = _PART.unpack_from(message)
        if version <= newer_than or index >= count or size > limit:
            return None
        if count > size // MIN_PART + 1:
            return None  # tiny parts: no sender makes them
        if version != self._version:
            self._start(version, (count, size))
        if self._broken or index < self._next or index in self._parts:
            return None  # a second send of a part: the first one stands
        piece = memoryview(message)[_PART.size :]
        if (count, size) != self._shape or self._held + len(piece) > size:
            self._broken = True  # parts of two different sends of one version, or damaged
            self._parts, self._data = {}, bytearray()
            return None
        if index == count - 1:
            self._crc = crc
        self._parts[index] = piece
        self._held += len(piece)
        data = self._data
        while self._next in self._parts:
            piece = self._parts.pop(self._next)
            data += piece
            self._running = zlib.crc32(piece, self._running)
            self._next += 1
        if self._next < count:
            return None
        self._broken = True  # done with this version: any later part of it is a duplicate
        self._data = bytearray()
        if len(data) != size or self._running != self._crc:
            return None  # parts of two sends of one version mixed, or damaged: the bucket's copy
        return data


def live_subject(bucket: str) -> str:
    """The plain subject the active publisher sends each record on, before its durable put."""
    return f"shmstore.mirror.{bucket}.live"


def live_parts_subject(bucket: str) -> str:
    """The plain subject the live parts of a record above ``max_payload`` go on."""
    return f"shmstore.mirror.{bucket}.part"


def set_subject(bucket: str) -> str:
    """The subject the bucket's active publisher answers remote ``set`` requests on."""
    return f"shmstore.mirror.{bucket}.set"
