"""The binary layout of a store segment: the one place it is defined.

All integers are little-endian. Every field that another process reads while it may change (HEAD,
the counters, slot ``seq``, registry words) is a ``u64`` at an 8-byte-aligned offset, so that one
aligned 8-byte ``mov`` stores or loads it whole.

Segment::

    0        +--------------------------------------------------------------+
             | header (512 bytes)                                           |
    512      +--------------------------------------------------------------+
             | reader registry: registry_capacity x 32-byte entries         |
    slots_at +--------------------------------------------------------------+  64-byte aligned
             | slot 0: 32-byte slot header | payload (slot_size bytes)      |
             | slot 1                                                       |  stride is a
             | ...                                                          |  multiple of 64
             | slot N-1                                                     |
             +--------------------------------------------------------------+  page aligned

Header::

    off  size  field
      0     8  magic  b"SHMSTORE"  (written last at create: a half-made segment is not a store)
      8     4  layout version (u32)
     12     4  flags (u32): bit 0 = payload CRC32 checked by readers,
                             bit 1 = writers lock the robust mutex at 320 (else flock)
     16     4  slot count (u32)
     20     4  slot payload capacity in bytes (u32)
     24     4  registry capacity (u32)
     28     4  max_value_size: the largest encoded value the store may grow to (u32)
     32     8  total segment size (u64)
     40     8  created, ns since the epoch (u64)
     48    16  schema fingerprint (blake2b-128 of the type's JSON schema)
     64     8  HEAD = version of the newest committed value, 0 while empty (u64)
     72     8  pid of the exclusive writer that keeps the writer lock, 0 if none (u64; written
               only when such a writer comes and goes, so HEAD's cache line stays quiet)
     80     8  schema generation (u64): evolutions of the value type, 0 at create; the recorded
               type is in segment "<name>.s<g>" (see _schemarecord); written only by an
               evolution, under the writer lock
     88     8  PID namespace of the creator: the inode of its /proc/self/ns/pid (u64; 0 unknown).
               With the robust mutex only processes of this namespace may write (_writelock)
    128     8  base version: HEAD when the store was created or restored; commits = HEAD - base
    136     8  version conflicts refused by set() (u64)
    144     8  generation of the ring that accepts commits: 0 = the slots in this segment,
               g > 0 = segment "<name>.g<tag>" of this incarnation (values that grow, see
               _growth)
    152     8  registry high-water mark: entries at or above it were never used (u64)
    160    32  four counters for layers above the store, e.g. the FSM layer's conflicts (u64)
    192    64  type name, UTF-8, NUL padded (for tools)
    256    64  store name, UTF-8, NUL padded (for tools)
    320    64  writer mutex (pthread_mutex_t, process-shared and robust), when flag bit 1
    384   128  mirror block (shmstore.mirror): see "Mirror block" at the end of this module

Registry entry (32 bytes)::

      0     8  generation (u64): bumped each time the entry is claimed
      8     8  pid of the owner (u64), informational
     16     8  state (u64): 0 free, 1 in use
     24     8  claimed, ns since the epoch (u64)

Generation segment (a ring the store grew into): a 64-byte header, then the slots::

      0     8  magic b"SHMSTGEN" (written last)
      8     8  generation (u64)
     16     4  slot count (u32), equal to the store's
     20     4  slot payload capacity in bytes (u32)
     24     8  total segment size (u64)
     32     8  the store's incarnation: its header's "created" word (u64), checked on attach
     64     -  slot 0 | slot 1 | ... as in the store segment

Slot header (32 bytes)::

      0     8  seq (u64): 2m-1 while message m is being written, 2m once it is complete
      8     4  payload length (u32)
     12     4  CRC32 of the payload (u32), 0 when CRC is off
     16     8  commit time, ns since the epoch (u64)
     24     8  reserved
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

from ._errors import CorruptStoreError

__all__ = [
    "APP_COUNTERS",
    "FLAG_CRC",
    "FLAG_REPLICA",
    "FLAG_ROBUST_MUTEX",
    "HEADER",
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "MAGIC",
    "W_BASE_VERSION",
    "W_CONFLICTS",
    "W_EXCLUSIVE",
    "W_GENERATION",
    "W_HEAD",
    "W_MIRROR_BEHIND",
    "W_MIRROR_PID",
    "W_MIRROR_STATE",
    "W_MIRROR_SYNC",
    "W_REG_HIGH",
    "W_SCHEMA",
    "W_CREATOR_PIDNS",
    "Geometry",
    "HeaderInfo",
    "app_counter_word",
    "decode_name_field",
    "entry_word",
    "is_unborn",
    "read_header",
    "write_header",
    "write_magic",
]

MAGIC = b"SHMSTORE"
GEN_MAGIC = b"SHMSTGEN"
# 2: rings that grow (generation word, max_value_size); 3: rings named after, and stamped with,
# the store's incarnation (a version-2 process would look for rings under their old names)
LAYOUT_VERSION = 3
FLAG_CRC = 1
FLAG_ROBUST_MUTEX = 2

HEADER_SIZE = 512
REGISTRY_ENTRY_SIZE = 32
SLOT_HEADER_SIZE = 32
CACHE_LINE = 64
PAGE = 4096

MAX_SLOTS = 1 << 16
MAX_SLOT_SIZE = (1 << 31) - 1
MAX_REGISTRY = 4096
NAME_FIELD = 64

# Byte offsets of the live u64 words.
OFF_HEAD = 64
OFF_EXCLUSIVE = 72
OFF_SCHEMA = 80
OFF_CREATOR_PIDNS = 88
OFF_BASE_VERSION = 128
OFF_CONFLICTS = 136
OFF_GENERATION = 144
OFF_REG_HIGH = 152
OFF_APP_COUNTERS = 160
APP_COUNTERS = 4

# The same words as indexes into the segment viewed as u64s (``memoryview.cast("Q")``): every
# module that loads or stores a live word takes its index from here.
W_HEAD = OFF_HEAD // 8
W_EXCLUSIVE = OFF_EXCLUSIVE // 8
W_SCHEMA = OFF_SCHEMA // 8
W_CREATOR_PIDNS = OFF_CREATOR_PIDNS // 8
W_BASE_VERSION = OFF_BASE_VERSION // 8
W_CONFLICTS = OFF_CONFLICTS // 8
W_GENERATION = OFF_GENERATION // 8
W_REG_HIGH = OFF_REG_HIGH // 8
W_APP_COUNTERS = OFF_APP_COUNTERS // 8

# The static part of the header, written once at create before the magic.
HEADER = struct.Struct("<8sIIIIIIQQ16s")
GEN_HEADER = struct.Struct("<8sQIIQQ")
GEN_HEADER_SIZE = 64
NAME_FIELD_STRUCT = struct.Struct("<64s")
OFF_TYPE_NAME = 192
OFF_STORE_NAME = 256
OFF_MUTEX = 320

# Registry entry fields, as u64 indexes relative to the entry start.
REG_GEN = 0
REG_PID = 1
REG_STATE = 2
REG_CLAIMED = 3

# Slot header fields after seq (the slot's first u64): ts is a u64 index, length and crc are u32
# indexes, relative to the slot start.
SLOT_LEN_I = 2
SLOT_CRC_I = 3
SLOT_TS_Q = 2


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, slots=True)
class Geometry:
    """Sizes and offsets derived from the three create parameters."""

    slots: int
    slot_size: int
    registry_capacity: int

    def __post_init__(self) -> None:
        if not 2 <= self.slots <= MAX_SLOTS:
            # One slot cannot work: the slot being rewritten would be the one HEAD names.
            raise ValueError(f"slots must be between 2 and {MAX_SLOTS}, got {self.slots}")
        if not 1 <= self.slot_size <= MAX_SLOT_SIZE:
            raise ValueError(
                f"slot_size must be between 1 and {MAX_SLOT_SIZE}, got {self.slot_size}"
            )
        if not 1 <= self.registry_capacity <= MAX_REGISTRY:
            raise ValueError(
                f"max_readers must be between 1 and {MAX_REGISTRY}, got {self.registry_capacity}"
            )

    @property
    def registry_at(self) -> int:
        return HEADER_SIZE

    @property
    def slots_at(self) -> int:
        return _align(HEADER_SIZE + self.registry_capacity * REGISTRY_ENTRY_SIZE, CACHE_LINE)

    @property
    def stride(self) -> int:
        return slot_stride(self.slot_size)

    @property
    def total_size(self) -> int:
        return _align(self.slots_at + self.slots * self.stride, PAGE)

    def slot_at(self, version: int) -> int:
        """Byte offset of the slot that holds message *version*."""
        return self.slots_at + (version % self.slots) * self.stride


def slot_stride(slot_size: int) -> int:
    """Bytes from one slot to the next for payloads of up to *slot_size* bytes."""
    return _align(SLOT_HEADER_SIZE + slot_size, CACHE_LINE)


def generation_size(slots: int, slot_size: int) -> int:
    """Total size of a generation segment holding *slots* slots of *slot_size* bytes."""
    return _align(GEN_HEADER_SIZE + slots * slot_stride(slot_size), PAGE)


def write_generation_header(
    buf: bytearray | mmap.mmap, generation: int, slots: int, slot_size: int, created_ns: int
) -> None:
    """Describe a fresh generation segment of the store incarnation created at *created_ns*;
    its magic goes in last (:func:`publish_generation`)."""
    size = generation_size(slots, slot_size)
    buf[0 : GEN_HEADER.size] = GEN_HEADER.pack(
        b"\0" * len(GEN_MAGIC), generation, slots, slot_size, size, created_ns
    )


def generation_incarnation(buf: bytes | bytearray | mmap.mmap, real_size: int) -> int:
    """The incarnation a generation segment was stamped with, 0 while its header is unwritten
    (or the segment is too short to have one)."""
    if real_size < GEN_HEADER_SIZE:
        return 0
    return int(GEN_HEADER.unpack_from(buf, 0)[5])


def publish_generation(buf: bytearray | mmap.mmap) -> None:
    buf[0 : len(GEN_MAGIC)] = GEN_MAGIC


def read_generation_header(
    buf: bytes | bytearray | mmap.mmap,
    real_size: int,
    generation: int,
    slots: int,
    created_ns: int,
) -> int:
    """Validate a generation segment against what the store header says (its incarnation
    *created_ns* included); returns its slot payload capacity. :class:`CorruptStoreError` for
    anything else."""
    if real_size < GEN_HEADER_SIZE:
        raise CorruptStoreError(f"generation {generation} segment is only {real_size} bytes")
    magic, gen, nslots, slot_size, total, incarnation = GEN_HEADER.unpack_from(buf, 0)
    if magic == GEN_MAGIC and incarnation != created_ns:
        raise CorruptStoreError(
            f"generation {generation} segment belongs to the store created at {incarnation} ns, "
            f"not to this one (created at {created_ns} ns)"
        )
    if magic != GEN_MAGIC or gen != generation or nslots != slots:
        raise CorruptStoreError(
            f"generation {generation} segment is not one: magic {magic!r}, generation {gen}, "
            f"{nslots} slots (store has {slots})"
        )
    if not 1 <= slot_size <= MAX_SLOT_SIZE or total != generation_size(slots, slot_size):
        raise CorruptStoreError(f"generation {generation} segment has impossible sizes")
    if total > real_size:
        raise CorruptStoreError(
            f"generation {generation} segment says {total} bytes, has {real_size}"
        )
    return int(slot_size)


def entry_word(index: int, field: int) -> int:
    """u64 index of *field* (``REG_*``) of registry entry *index*."""
    return (HEADER_SIZE + index * REGISTRY_ENTRY_SIZE) // 8 + field


def app_counter_word(index: int) -> int:
    """u64 index of the header counter *index* reserved for layers above the store."""
    if not 0 <= index < APP_COUNTERS:
        raise IndexError(f"app counter index must be 0..{APP_COUNTERS - 1}, got {index}")
    return W_APP_COUNTERS + index


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """The static header fields as read from a segment."""

    flags: int
    geometry: Geometry
    max_value_size: int
    created_ns: int
    fingerprint: bytes
    type_name: str
    store_name: str


def write_header(
    buf: bytearray | mmap.mmap,
    geometry: Geometry,
    *,
    flags: int,
    created_ns: int,
    fingerprint: bytes,
    type_name: str,
    store_name: str,
    max_value_size: int,
) -> None:
    """Write the static header of a fresh segment, all but the magic (see :func:`write_magic`)."""
    buf[OFF_TYPE_NAME : OFF_TYPE_NAME + NAME_FIELD] = name_field(type_name)
    buf[OFF_STORE_NAME : OFF_STORE_NAME + NAME_FIELD] = name_field(store_name)
    header = pack_header(
        geometry,
        flags,
        created_ns,
        fingerprint,
        magic=b"\0" * len(MAGIC),
        max_value_size=max_value_size,
    )
    buf[0 : len(header)] = header


def write_magic(buf: bytearray | mmap.mmap) -> None:
    """Publish a fully initialized segment: until the magic is there it is not a store."""
    buf[0 : len(MAGIC)] = MAGIC


def is_unborn(buf: bytes | bytearray | mmap.mmap) -> bool:
    """Whether the segment is still being created (no magic yet)."""
    return buf[0 : len(MAGIC)] == b"\0" * len(MAGIC)


def pack_header(
    geometry: Geometry,
    flags: int,
    created_ns: int,
    fingerprint: bytes,
    magic: bytes,
    *,
    max_value_size: int | None = None,
) -> bytes:
    return HEADER.pack(
        magic,
        LAYOUT_VERSION,
        flags,
        geometry.slots,
        geometry.slot_size,
        geometry.registry_capacity,
        geometry.slot_size if max_value_size is None else max_value_size,
        geometry.total_size,
        created_ns,
        fingerprint,
    )


def decode_name_field(raw: bytes) -> str:
    """The text of a NUL-padded name field (header or checkpoint); never raises."""
    return raw[:NAME_FIELD].rstrip(b"\0").decode("utf-8", "replace")


def read_header(buf: bytes | bytearray | mmap.mmap, real_size: int) -> HeaderInfo:
    """Parse and validate the static header against the segment's real size.

    Raises :class:`CorruptStoreError` for anything that is not a store of this layout. Never
    trusts a size field beyond *real_size*, so a hostile header cannot make a reader allocate or
    index past the mapping.
    """
    if real_size < HEADER_SIZE:
        raise CorruptStoreError(f"segment is {real_size} bytes, smaller than a store header")
    magic, layout, flags, slots, slot_size, reg_cap, max_value, total, created, fp = (
        HEADER.unpack_from(buf, 0)
    )
    if magic != MAGIC:
        raise CorruptStoreError(f"bad magic {magic!r}: not a shmstore segment")
    if layout != LAYOUT_VERSION:
        raise CorruptStoreError(
            f"layout version {layout} is not supported (this shmstore reads {LAYOUT_VERSION})"
        )
    try:
        geometry = Geometry(slots, slot_size, reg_cap)
    except ValueError as exc:
        raise CorruptStoreError(f"header has impossible geometry: {exc}") from None
    if total != geometry.total_size or total > real_size:
        raise CorruptStoreError(
            f"header says {total} bytes, geometry needs {geometry.total_size}, "
            f"segment has {real_size}"
        )
    if flags & ~(FLAG_CRC | FLAG_ROBUST_MUTEX | FLAG_REPLICA):
        raise CorruptStoreError(f"unknown header flags {flags:#x}")
    if not slot_size <= max_value <= MAX_SLOT_SIZE:
        raise CorruptStoreError(
            f"header has max_value_size {max_value} (slot size {slot_size}, limit {MAX_SLOT_SIZE})"
        )
    return HeaderInfo(
        flags=flags,
        geometry=geometry,
        max_value_size=max_value,
        created_ns=created,
        fingerprint=fp,
        type_name=decode_name_field(bytes(buf[OFF_TYPE_NAME : OFF_TYPE_NAME + NAME_FIELD])),
        store_name=decode_name_field(bytes(buf[OFF_STORE_NAME : OFF_STORE_NAME + NAME_FIELD])),
    )


def name_field(text: str) -> bytes:
    """*text* as a NUL-padded 64-byte field, cut at a character boundary."""
    raw = text.encode("utf-8")
    while len(raw) > NAME_FIELD:
        text = text[:-1]
        raw = text.encode("utf-8")
    return NAME_FIELD_STRUCT.pack(raw)


# ---------------------------------------------------------------------------- mirror block
#
# Used by ``shmstore.mirror`` (publisher and follower processes); a store that is not mirrored
# keeps these 128 bytes zero. Flag bit 2 (FLAG_REPLICA) is static: it is written at create, before
# the magic, by the follower that creates a replica, and every handle of every process refuses
# local writes to such a store. The words are written by the one mirroring process of the store
# (its publisher, or its follower), each one aligned u64 store, and read by anyone::
#
#     off  size  field
#     384     8  mirror state (u64): 0 not mirrored, else role (1 origin, 2 replica) | 4 connected
#     392     8  pid of the mirroring process (u64): a dead pid means "not connected"
#     400     8  last sync, ns since the epoch (u64): last confirmation the mirror was current
#     408     8  versions behind (u64): origin: committed, not yet published; replica: known at
#                the origin, not yet applied here
#     416    32  NATS bucket name, UTF-8, NUL padded
#     448    64  origin store name, UTF-8, NUL padded (a replica's origin; the store's own name
#                for an origin)

FLAG_REPLICA = 4
"""Header flag bit 2: the store is a replica kept by ``shmstore mirror follow``."""

OFF_MIRROR_STATE = 384
OFF_MIRROR_PID = 392
OFF_MIRROR_SYNC = 400
OFF_MIRROR_BEHIND = 408
OFF_MIRROR_BUCKET = 416
MIRROR_BUCKET_FIELD = 32
OFF_MIRROR_ORIGIN = 448
MIRROR_ORIGIN_FIELD = 64

MIRROR_ROLE_ORIGIN = 1
MIRROR_ROLE_REPLICA = 2
MIRROR_ROLE_MASK = 3
MIRROR_CONNECTED = 4

# The mirror's live words as indexes into the segment viewed as u64s, like W_HEAD.
W_MIRROR_STATE = OFF_MIRROR_STATE // 8
W_MIRROR_PID = OFF_MIRROR_PID // 8
W_MIRROR_SYNC = OFF_MIRROR_SYNC // 8
W_MIRROR_BEHIND = OFF_MIRROR_BEHIND // 8


def text_field(text: str, size: int) -> bytes:
    """*text* as a NUL-padded field of *size* bytes, cut at a character boundary."""
    raw = text.encode("utf-8")
    while len(raw) > size:
        text = text[:-1]
        raw = text.encode("utf-8")
    return raw.ljust(size, b"\0")


def read_text_field(buf: bytes | bytearray | mmap.mmap, offset: int, size: int) -> str:
    """The NUL-padded UTF-8 field of *size* bytes at *offset*."""
    return decode_name_field(bytes(buf[offset : offset + size]))
