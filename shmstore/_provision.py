"""Provisioning: making, finding and removing the segment of a store.

Everything that happens before a :class:`~shmstore.Store` handle exists, and after the last one
is gone, lives here: validating create options, restoring a checkpoint into a fresh ring,
initializing the header (magic last), attaching to an existing segment (waiting out a
concurrent create, validating the header), and removing a store's OS objects.

The handle itself (``_store``) only ever gets a finished, validated :class:`Attached` segment.
Nothing here imports ``_store``: provisioning is below the operations.

Create protocol: ``shm_open(O_CREAT | O_EXCL)`` decides the one creator; the segment is sized
(``posix_fallocate``), the header written, the writer mutex initialized, any checkpoint restored,
the type's schema record published (``_schemarecord``: segment ``<name>.s0``), and the magic
stored *last*. A process that opens the name meanwhile sees no magic ("unborn") and
waits up to :data:`OPEN_WAIT` for it, so concurrent starters see one complete store or a clear
error, never a half-made one. A creator that fails (or is interrupted) unlinks what it made.
"""

from __future__ import annotations

import errno
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from . import _schemarecord
from ._checkpoint import Checkpoint, read_checkpoint
from ._codec import ANY_FINGERPRINT, Codec
from ._errors import (
    CheckpointError,
    CorruptStoreError,
    SchemaMismatchError,
    SnapshotTooLargeError,
    StateStoreError,
    StorePermissionError,
)
from ._evolve import CheckedCodec, check_checkpoint_successor, describe_or_none
from ._growth import remove_listed_generations, unlink_generations
from ._layout import (
    FLAG_CRC,
    FLAG_REPLICA,
    FLAG_ROBUST_MUTEX,
    MAX_SLOT_SIZE,
    MIRROR_BUCKET_FIELD,
    MIRROR_ORIGIN_FIELD,
    MIRROR_ROLE_REPLICA,
    OFF_CREATOR_PIDNS,
    OFF_MIRROR_BUCKET,
    OFF_MIRROR_ORIGIN,
    OFF_MUTEX,
    W_GENERATION,
    W_MIRROR_STATE,
    W_SCHEMA,
    Geometry,
    HeaderInfo,
    is_unborn,
    read_header,
    text_field,
    write_header,
    write_magic,
)
from ._names import semaphore_prefix, validate_name
from ._registry import registered_semaphore_names, unlink_semaphore
from ._ring import Ring
from ._segment import Segment, UnsizedSegmentError, resolve_group, unlink_segment
from ._writelock import RobustMutexLock, pid_namespace, robust_mutex_supported

__all__ = [
    "DEFAULT_MAX_READERS",
    "DEFAULT_MAX_VALUE_SIZE",
    "DEFAULT_SLOTS",
    "DEFAULT_SLOT_SIZE",
    "OPEN_WAIT",
    "Attached",
    "CreateOptions",
    "attach",
    "create",
    "create_private",
    "remove",
    "remove_orphaned",
]

DEFAULT_SLOTS: Final = 8
DEFAULT_SLOT_SIZE: Final = 4096  # the initial capacity: stores grow when a value needs it
DEFAULT_MAX_VALUE_SIZE: Final = 64 << 20
DEFAULT_MAX_READERS: Final = 64
OPEN_WAIT: Final = 1.0  # how long open() waits for a concurrent create to finish
MAX_GENERATIONS: Final = 64  # doubling from 1 byte passes any max_value_size long before

# CPUs that keep load->load and store->store order (TSO): the seqlock needs no CRC there.
_STRONGLY_ORDERED = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


@dataclass(frozen=True, slots=True)
class Attached:
    """A mapped, validated segment and how this process may use it."""

    segment: Segment
    info: HeaderInfo
    codec: Codec[Any]
    writable: bool
    private: bool = False
    record: _schemarecord.SchemaRecord | None = None
    """The store's recorded types (``_schemarecord``) as read at open."""
    schema_generation: int = 0
    """The schema generation this handle's type was recorded at: a commit from a handle whose
    generation is not the store's current one is refused (or adopted, see ``_evolve``)."""
    evolve: bool = False
    """Record the handle's type as the store's successor type before returning it."""


@dataclass(frozen=True, slots=True)
class CreateOptions:
    """The create options of a store, as the user gave them (validated by :func:`create`)."""

    slots: int = DEFAULT_SLOTS
    slot_size: int = DEFAULT_SLOT_SIZE
    max_readers: int = DEFAULT_MAX_READERS
    crc: bool | None = None
    mode: int = 0o600
    writer_lock: str = "auto"
    restore_from: str | os.PathLike[str] | None = None
    max_value_size: int | None = None  # default: DEFAULT_MAX_VALUE_SIZE, or slot_size if larger
    group: int | str | None = None


def _default_crc() -> bool:
    # Elsewhere the CRC catches what the hardware may reorder (see _ring).
    return platform.machine().lower() not in _STRONGLY_ORDERED


@dataclass(frozen=True, slots=True)
class _Plan:
    geometry: Geometry
    codec: Codec[Any]
    flags: int
    restore: Checkpoint | None
    max_value_size: int
    schema: dict[str, Any] | None = None
    record: _schemarecord.SchemaRecord | None = None  # a replica's: the origin's types


def _plan(tp: Any, options: CreateOptions) -> _Plan:
    """Validate the create options (and any checkpoint to restore) before anything is
    created."""
    for label, value in (
        ("slots", options.slots),
        ("slot_size", options.slot_size),
        ("max_readers", options.max_readers),
        ("mode", options.mode),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{label} must be an int, got {type(value).__name__}")
    geometry = Geometry(options.slots, options.slot_size, options.max_readers)
    max_value_size = options.max_value_size
    if max_value_size is None:
        max_value_size = max(DEFAULT_MAX_VALUE_SIZE, options.slot_size)
    if not isinstance(max_value_size, int) or isinstance(max_value_size, bool):
        raise TypeError(f"max_value_size must be an int, got {type(max_value_size).__name__}")
    if not options.slot_size <= max_value_size <= MAX_SLOT_SIZE:
        raise ValueError(
            f"max_value_size must be between slot_size ({options.slot_size}) and "
            f"{MAX_SLOT_SIZE}, got {max_value_size}"
        )
    codec: Codec[Any] = Codec(tp)
    if options.mode & ~0o777 or options.mode < 0:
        raise ValueError(f"mode must be permission bits (0o000-0o777), got {options.mode:#o}")
    crc = _default_crc() if options.crc is None else options.crc
    flags = FLAG_CRC if crc else 0
    writer_lock = options.writer_lock
    if writer_lock == "auto":
        writer_lock = "mutex" if robust_mutex_supported() else "flock"
    if writer_lock == "mutex":
        if not robust_mutex_supported():
            raise ValueError("writer_lock='mutex' needs robust mutexes, which this platform lacks")
        flags |= FLAG_ROBUST_MUTEX
    elif writer_lock != "flock":
        raise ValueError(f"writer_lock must be 'auto', 'mutex' or 'flock', got {writer_lock!r}")
    restore = None
    if options.restore_from is not None:
        restore = _load_checkpoint(options.restore_from, codec, max_value_size)
        if len(restore.payload) > geometry.slot_size:
            # Start as large as the saved value needs, as a commit of it would grow the store.
            geometry = Geometry(options.slots, len(restore.payload), options.max_readers)
    return _Plan(geometry, codec, flags, restore, max_value_size, describe_or_none(tp))


def _load_checkpoint(
    path: str | os.PathLike[str], codec: Codec[Any], max_value_size: int
) -> Checkpoint:
    checkpoint = read_checkpoint(path)
    if checkpoint.fingerprint != codec.fingerprint:
        try:
            # Taken before an evolution: fine if the type is a successor of every type the
            # checkpointed store had (the value then decodes as it, defaults filled in).
            check_checkpoint_successor(checkpoint.schema_record, codec)
        except SchemaMismatchError as exc:
            raise SchemaMismatchError(
                f"checkpoint {str(path)!r} holds {checkpoint.type_name}, which does not match "
                f"the store's type {codec.type_name}: {exc}"
            ) from None
    if len(checkpoint.payload) > max_value_size:
        raise SnapshotTooLargeError(
            f"checkpoint value is {len(checkpoint.payload)} bytes; the store's max_value_size "
            f"is {max_value_size}"
        )
    try:
        codec.decode(checkpoint.payload)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not decode as {codec.type_name}: {exc}"
        ) from exc
    return checkpoint


def create(name: str, tp: Any, options: CreateOptions) -> Attached:
    """Create store *name*: a new segment, fully initialized before its magic appears."""
    validate_name(name)
    plan = _plan(tp, options)
    group = None if options.group is None else resolve_group(options.group)
    segment = Segment.create(name, plan.geometry.total_size, options.mode, group)
    return _initialize(segment, plan, unlink_on_error=True)


def create_private(tp: Any, options: CreateOptions) -> Attached:
    """A store no other process can open (see ``Segment.anonymous``)."""
    plan = _plan(tp, options)
    label = f"private-{os.getpid()}-{os.urandom(6).hex()}"
    segment = Segment.anonymous(label, plan.geometry.total_size)
    attached = _initialize(segment, plan, unlink_on_error=False)
    return Attached(attached.segment, attached.info, attached.codec, True, True, attached.record)


def _initialize(segment: Segment, plan: _Plan, *, unlink_on_error: bool) -> Attached:
    geometry, codec, flags, restore = plan.geometry, plan.codec, plan.flags, plan.restore
    created_ns = time.time_ns()
    record = plan.record or _schemarecord.SchemaRecord(
        codec.type_name, (codec.fingerprint,), (plan.schema,)
    )
    try:
        m = segment.map
        write_header(
            m,
            geometry,
            flags=flags,
            created_ns=created_ns,
            fingerprint=codec.fingerprint,
            type_name=codec.type_name,
            store_name=segment.name,
            max_value_size=plan.max_value_size,
        )
        if flags & FLAG_ROBUST_MUTEX:
            RobustMutexLock.initialize(m, OFF_MUTEX)
            # Only this PID namespace may take the mutex (see _writelock, "ForeignLock").
            m[OFF_CREATOR_PIDNS : OFF_CREATOR_PIDNS + 8] = pid_namespace().to_bytes(8, "little")
        if restore is not None:
            ring = Ring(m, geometry, crc=bool(flags & FLAG_CRC))
            ring.restore(restore.version, restore.payload, time.time_ns())
            ring.release()
        if segment.named:  # a private store keeps its record in its one handle
            _schemarecord.publish(
                segment.name, created_ns, record, mode=segment.mode(), group=segment.group()
            )
            if record.generation:  # a replica of an evolved origin
                words = memoryview(m).cast("Q")
                words[W_SCHEMA] = record.generation
                words.release()
        write_magic(m)  # last: until now, open() treats the segment as unborn
        info = read_header(m, segment.size)
    except BaseException:
        segment.close()
        if unlink_on_error:
            unlink_segment(segment.name)
            _schemarecord.remove_records(segment.name, record.generation)
        raise
    return Attached(segment, info, codec, writable=True, record=record)


def attach(
    name: str,
    tp: Any,
    *,
    allow_other_owner: bool,
    readonly: bool | None = None,
    evolve: bool = False,
) -> Attached:
    """Open store *name* for values of *tp* (``None``: untyped, for tools); *readonly* as
    :meth:`Segment.open` takes it. A *tp* of an older recorded generation opens to read (its
    writes are refused); with *evolve*, a *tp* that is not the current type is returned marked
    for evolution (the handle records it under the writer lock, see ``_evolve``)."""
    validate_name(name)
    segment, info = _attach(name, readonly=readonly)
    try:
        owner = segment.owner_uid()
        if owner != os.geteuid() and not allow_other_owner:
            raise StorePermissionError(
                errno.EPERM,
                f"store {name!r} is owned by uid {owner}, not by this process's uid "
                f"{os.geteuid()}; pass allow_other_owner=True to open it anyway",
            )
        words = memoryview(segment.map).cast("Q")
        try:
            unevolved = int(words[W_SCHEMA]) == 0
            codec_now: Codec[Any] | None = None if tp is None else Codec(tp)
            if unevolved and codec_now is not None and codec_now.fingerprint == info.fingerprint:
                # The common open: the creator's type, never evolved. The header says all that
                # is needed; the record is read when someone asks (Store._current_record).
                return Attached(segment, info, codec_now, not segment.readonly)
            record = _schemarecord.load(words, name, info)
        finally:
            words.release()
        generation = record.generation
        if tp is None:
            codec: Codec[Any] = Codec(Any)
            writable = record.fingerprint == ANY_FINGERPRINT
            if not writable and record.schema is not None and not info.flags & FLAG_REPLICA:
                codec = CheckedCodec(record)  # writes checked against the recorded type
                writable = True
        else:
            assert codec_now is not None
            codec = codec_now
            known = record.generation_of(codec.fingerprint)
            if known is not None and (known == generation or not evolve):
                generation = known  # an older generation's handle reads; its writes are refused
            elif not evolve:
                raise SchemaMismatchError(
                    f"store {name!r} holds {record.type_name}, which does not match the "
                    f"requested type {codec.type_name} (pass evolve=True to record it as the "
                    "store's new type, if it is a compatible successor)"
                )
            else:
                generation = -1  # the handle evolves the store before it is returned
            writable = True
        writable = writable and not segment.readonly
        if generation < 0 and not writable:
            raise SchemaMismatchError(
                f"store {name!r}: evolving its type needs write access to the store"
            )
    except BaseException:
        segment.close()
        raise
    return Attached(
        segment, info, codec, writable, False, record, generation, evolve=generation < 0
    )


def _attach(
    name: str, wait: float | None = None, *, readonly: bool | None = None
) -> tuple[Segment, HeaderInfo]:
    """Open and validate the segment, waiting up to *wait* seconds (default
    :data:`OPEN_WAIT`) for a concurrent create."""
    deadline = time.monotonic() + (OPEN_WAIT if wait is None else wait)
    while True:
        try:
            segment = Segment.open(name, readonly=readonly)
        except UnsizedSegmentError:
            if time.monotonic() > deadline:
                raise CorruptStoreError(f"store {name!r} has no size: not a store") from None
            time.sleep(0.001)
            continue
        try:
            if is_unborn(segment.map) and time.monotonic() < deadline:
                segment.close()
                time.sleep(0.001)
                continue
            info = read_header(segment.map, segment.size)
            if info.store_name != name:
                raise CorruptStoreError(
                    f"segment for {name!r} names itself {info.store_name!r}: not this store"
                )
        except BaseException:
            if not segment.map.closed:
                segment.close()
            raise
        return segment, info


def remove(name: str, *, incarnation: int | None = None) -> bool:
    """Remove every OS object of store *name* (segment and reader semaphores) for everyone.
    ``False`` if there was no segment. Raises :class:`StorePermissionError` for a store this
    user may not remove.

    With *incarnation* (a store's ``created_ns``: what a handle's ``unlink()`` passes), only that
    incarnation is removed: a name that now holds another store -- or a damaged one, which
    cannot say -- is left alone, and ``False`` returned (an orphaned handle never removes the
    new store of its name: issue 20)."""
    validate_name(name)
    semaphores: list[str] = []
    generation = created_ns = schema_generation = 0
    try:
        segment, info = _attach(name, wait=0.0, readonly=True)  # it only reads the registry
    except StateStoreError:
        if incarnation is not None:
            return False  # gone, or not provably this incarnation: not ours to remove
        # missing or damaged: still remove the name, and every semaphore we can find
    else:
        words = memoryview(segment.map).cast("Q")
        try:
            semaphores = registered_semaphore_names(
                words, info.geometry.registry_capacity, name, info.created_ns
            )
            generation = int(words[W_GENERATION])
            created_ns = info.created_ns
            schema_generation = int(words[W_SCHEMA])
        finally:
            words.release()
            segment.close()
        if incarnation is not None and created_ns != incarnation:
            return False
    existed = unlink_segment(name)
    # Every ring it grew into, and one more: a move that died before publishing it.
    unlink_generations(name, created_ns, range(1, min(generation, MAX_GENERATIONS) + 2))
    remove_listed_generations(name)
    _schemarecord.remove_records(name, min(schema_generation, MAX_GENERATIONS))
    for sem in semaphores:
        unlink_semaphore(sem)
    _remove_listed_semaphores(name)
    return existed


def remove_orphaned(name: str, root: Any, info: HeaderInfo) -> None:
    """What ``unlink()`` of a handle whose store's name was removed (or taken by a new store)
    removes: only the names derived from its own incarnation -- the rings it grew into and its
    readers' semaphores -- read from the handle's own mapping *root*, never from the name."""
    words = memoryview(root).cast("Q")
    try:
        semaphores = registered_semaphore_names(
            words, info.geometry.registry_capacity, name, info.created_ns
        )
        generation = int(words[W_GENERATION])
    finally:
        words.release()
    unlink_generations(name, info.created_ns, range(1, min(generation, MAX_GENERATIONS) + 2))
    for sem in semaphores:
        unlink_semaphore(sem)


def _remove_listed_semaphores(name: str) -> None:
    """On Linux, semaphores are files in /dev/shm: remove every one of the store's, including
    stale ones of dead readers that nobody could remove."""
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        return
    prefix = "sem." + semaphore_prefix(name).lstrip("/")
    try:
        listing = os.listdir(shm)
    except OSError:
        return
    for entry in listing:
        if entry.startswith(prefix):
            unlink_semaphore("/" + entry[len("sem.") :])


# ---------------------------------------------------------------------------- replicas


def create_replica(
    name: str,
    *,
    fingerprint: bytes,
    type_name: str,
    origin: str,
    bucket: str,
    options: CreateOptions,
    schema_record: bytes = b"",
) -> Attached:
    """Create store *name* as a replica (``shmstore.mirror``): the header records the origin's
    schema *fingerprint* and *type_name* (typed readers are checked against them), the replica
    flag, and the mirror block's origin and bucket, all before the magic appears. The handle
    decodes to builtins."""
    validate_name(name)
    if len(fingerprint) != 16:
        raise ValueError(f"a schema fingerprint is 16 bytes, got {len(fingerprint)}")
    record = None
    if schema_record:  # checked before anything exists: a bad one leaves no segment behind
        try:
            record = _schemarecord.SchemaRecord.decode(schema_record)
        except ValueError as exc:
            raise SchemaMismatchError(
                f"the origin's schema record does not decode: {exc}"
            ) from None
        if record.fingerprint != fingerprint:
            raise ValueError("the schema record's newest type is not the given fingerprint")
    plan = _plan(Any, options)
    plan.codec.fingerprint = fingerprint
    plan.codec.type_name = type_name
    segment = Segment.create(name, plan.geometry.total_size, options.mode)
    m = segment.map
    try:
        m[OFF_MIRROR_BUCKET : OFF_MIRROR_BUCKET + MIRROR_BUCKET_FIELD] = text_field(
            bucket, MIRROR_BUCKET_FIELD
        )
        m[OFF_MIRROR_ORIGIN : OFF_MIRROR_ORIGIN + MIRROR_ORIGIN_FIELD] = text_field(
            origin, MIRROR_ORIGIN_FIELD
        )
        words = memoryview(m).cast("Q")
        words[W_MIRROR_STATE] = MIRROR_ROLE_REPLICA
        words.release()
    except BaseException:
        segment.close()
        unlink_segment(segment.name)
        raise
    replica_plan = _Plan(
        plan.geometry,
        plan.codec,
        plan.flags | FLAG_REPLICA,
        None,
        plan.max_value_size,
        None,
        record,
    )
    return _initialize(segment, replica_plan, unlink_on_error=True)
