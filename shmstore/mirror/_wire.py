"""What travels through NATS: the bucket, key and subject names, the record of one version, and
the remote compare-and-set request and reply.

One bucket mirrors one store and holds one key, ``state``, whose newest entry is the newest
version the publisher put. The bucket keeps no history (``history=1``): a mirror has
latest-value semantics, like the store itself, and a follower that comes back after an outage
needs only the newest entry. The entry's value is a :class:`Record` in MessagePack: the origin's
encoded value bytes, untouched (no decode and re-encode on either side), together with what a
follower needs to build and check a replica.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

import msgspec

from .._errors import StateStoreError
from .._names import validate_name

__all__ = [
    "KEY",
    "RECORD_FORMAT",
    "Record",
    "SetReply",
    "SetRequest",
    "decode_record",
    "default_bucket",
    "encode_record",
    "set_subject",
    "validate_bucket",
]

KEY: Final = "state"
RECORD_FORMAT: Final = 1
MAX_BUCKET: Final = 32  # the header's bucket field (see _layout's mirror block)
_BUCKET_RE = re.compile(r"^[A-Za-z0-9_-]+$")


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
    # Every type the origin has had (its schema record, JSON): a replica follows evolutions.
    # Empty from a publisher older than issue 21.
    schema: bytes = b""


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
_record_encoder = msgspec.msgpack.Encoder()


def encode_record(record: Record) -> bytes:
    return _record_encoder.encode(record)


def decode_record(data: bytes) -> Record:
    """Raise :class:`StateStoreError` for bytes that are not a record of a known format."""
    try:
        record = _record_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise StateStoreError(f"bucket entry is not a shmstore mirror record: {exc}") from None
    if record.format != RECORD_FORMAT:
        raise StateStoreError(
            f"mirror record format {record.format} is not supported (this shmstore reads "
            f"{RECORD_FORMAT})"
        )
    return record


def validate_bucket(bucket: str) -> str:
    """Return *bucket* if NATS and the header's bucket field accept it, else raise ValueError."""
    if not _BUCKET_RE.match(bucket):
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


def set_subject(bucket: str) -> str:
    """The subject the bucket's active publisher answers remote ``set`` requests on."""
    return f"shmstore.mirror.{bucket}.set"
