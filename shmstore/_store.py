"""``Store[T]``: a typed, versioned value shared by processes through one shared-memory segment.

This module ties the pieces together: the segment (``_segment``), the layout (``_layout``), the
seqlock ring (``_ring``), the writer lock (``_writelock``) and the codec (``_codec``). Reads never
block and never take a lock; writes encode and validate outside the lock and hold it only for the
compare-and-set and one memcpy.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import threading
import time
import warnings
import weakref
from types import TracebackType
from typing import Any, Final, Generic, Literal, TypeVar, overload

import msgspec

from ._checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from ._codec import ANY_FINGERPRINT, Codec
from ._errors import (
    CheckpointError,
    CorruptStoreError,
    SchemaMismatchError,
    SnapshotTooLargeError,
    StateStoreError,
    StateVersionError,
    StoreNotFoundError,
    StorePermissionError,
)
from ._layout import (
    FLAG_CRC,
    FLAG_REPLICA,
    FLAG_ROBUST_MUTEX,
    MAGIC,
    MAX_REGISTRY,
    MIRROR_BUCKET_FIELD,
    MIRROR_CONNECTED,
    MIRROR_ORIGIN_FIELD,
    MIRROR_ROLE_MASK,
    MIRROR_ROLE_ORIGIN,
    MIRROR_ROLE_REPLICA,
    OFF_APP_COUNTERS,
    OFF_HEAD,
    OFF_MIRROR_BEHIND,
    OFF_MIRROR_BUCKET,
    OFF_MIRROR_ORIGIN,
    OFF_MIRROR_PID,
    OFF_MIRROR_STATE,
    OFF_MIRROR_SYNC,
    OFF_MUTEX,
    OFF_REG_HIGH,
    OFF_STORE_NAME,
    OFF_TYPE_NAME,
    Geometry,
    HeaderInfo,
    name_field,
    pack_header,
    read_header,
    read_text_field,
    text_field,
)
from ._names import validate_name
from ._registry import Registry, unlink_all_semaphores
from ._ring import Ring
from ._segment import Segment, UnsizedSegmentError, unlink_segment
from ._stats import MirrorStatus, StoreStatistics
from ._subscription import Subscription
from ._waiting import WaitGate
from ._writelock import FlockLock, RobustMutexLock, WriteLock, robust_mutex_supported

__all__ = ["Store"]

T = TypeVar("T")
WriterLockKind = Literal["auto", "mutex", "flock"]

log = logging.getLogger("shmstore")

DEFAULT_SLOTS: Final = 8
DEFAULT_SLOT_SIZE: Final = 65536
DEFAULT_MAX_READERS: Final = 64
OPEN_WAIT: Final = 1.0  # how long open() waits for a concurrent create to finish

_HEAD: Final = OFF_HEAD // 8
_REG_HIGH: Final = OFF_REG_HIGH // 8
_WEAKLY_ORDERED_SAFE = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})

_live_handles: weakref.WeakSet[Store[Any]] = weakref.WeakSet()


def _default_crc() -> bool:
    # x86 keeps load->load and store->store order; elsewhere the CRC catches what the
    # hardware may reorder (see _ring).
    return platform.machine().lower() not in _WEAKLY_ORDERED_SAFE


class Store(Generic[T]):
    """A typed value in shared memory: one writer at a time, any number of lock-free readers.

    Make one with :meth:`create` or :meth:`open`; ``close()`` detaches this process, ``unlink()``
    removes the store for everyone. A handle may be shared by the threads of one process.
    """

    # ---------------------------------------------------------------- construction

    def __init__(self, segment: Segment, info: HeaderInfo, codec: Codec[T], writable: bool) -> None:
        self._segment = segment
        self._info = info
        self._codec = codec
        # A replica (shmstore.mirror) takes commits only from its follower: see the class end.
        self._writable = writable and not info.flags & FLAG_REPLICA
        self._ring = Ring(segment.map, info.geometry, crc=bool(info.flags & FLAG_CRC))
        # The hot paths read HEAD through this view directly: one indexed load, no method call.
        self._words = self._ring.words
        self._cache: tuple[int, T | None] = (0, None)
        self._lock: WriteLock
        if info.flags & FLAG_ROBUST_MUTEX:
            self._lock = RobustMutexLock(segment.map, OFF_MUTEX, segment.name)
        else:
            self._lock = FlockLock(segment.fd)
        self._registry = Registry(
            self._words, info.geometry, segment.name, self._lock, fd=segment.fd, mode=segment.mode()
        )
        self._gate = WaitGate(lambda: self.version, self._registry)
        self._closed = False
        # Held by set() from its lock to its notifications, and by close(): the writer mutex
        # lives in the mapping, so close() must not unmap it under a thread that is using it.
        self._in_use = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._pid = os.getpid()
        _live_handles.add(self)

    @overload
    @classmethod
    def create(
        cls,
        name: str,
        type: type[T],
        *,
        slots: int = ...,
        slot_size: int = ...,
        max_readers: int = ...,
        crc: bool | None = ...,
        mode: int = ...,
        writer_lock: WriterLockKind = ...,
        restore_from: str | os.PathLike[str] | None = ...,
    ) -> Store[T]: ...

    @overload
    @classmethod
    def create(
        cls,
        name: str,
        type: Any = ...,
        *,
        slots: int = ...,
        slot_size: int = ...,
        max_readers: int = ...,
        crc: bool | None = ...,
        mode: int = ...,
        writer_lock: WriterLockKind = ...,
        restore_from: str | os.PathLike[str] | None = ...,
    ) -> Store[Any]: ...

    @classmethod
    def create(
        cls,
        name: str,
        type: Any = Any,
        *,
        slots: int = DEFAULT_SLOTS,
        slot_size: int = DEFAULT_SLOT_SIZE,
        max_readers: int = DEFAULT_MAX_READERS,
        crc: bool | None = None,
        mode: int = 0o600,
        writer_lock: WriterLockKind = "auto",
        restore_from: str | os.PathLike[str] | None = None,
    ) -> Store[Any]:
        """Create a new store named *name* holding values of *type* (any msgspec-supported type).

        *slots* is the ring depth (how many versions stay readable), *slot_size* the largest
        encoded value in bytes, *max_readers* the number of processes that may wait on the store
        at once. *crc* adds a CRC32 check to every read (default: on where the CPU reorders
        loads). *mode* is the permission bits of the segment. *writer_lock* picks how writers
        are serialized: ``"mutex"`` (a robust process-shared mutex, Linux), ``"flock"``, or
        ``"auto"`` (the mutex where the C library has robust mutexes); see ``_writelock``.
        *restore_from* starts the store from a :meth:`checkpoint` file: it holds the saved value
        at the saved version, and the next commit is that version + 1.

        Raises :class:`StoreExistsError` if the name is taken, ``ValueError`` for a bad name or
        geometry, :class:`StateStoreError` if shared memory cannot hold the store,
        :class:`CheckpointError` / :class:`SchemaMismatchError` for a checkpoint that cannot be
        restored (checked before anything is created).
        """
        validate_name(name)
        geometry, codec, flags, restore = _plan(
            type,
            slots=slots,
            slot_size=slot_size,
            max_readers=max_readers,
            crc=crc,
            mode=mode,
            writer_lock=writer_lock,
            restore_from=restore_from,
        )
        segment = Segment.create(name, geometry.total_size, mode)
        return cls._initialize(
            segment, geometry, codec, flags, unlink_on_error=True, restore=restore
        )

    @classmethod
    def _private(
        cls,
        type: Any,
        *,
        slots: int = DEFAULT_SLOTS,
        slot_size: int = DEFAULT_SLOT_SIZE,
        writer_lock: WriterLockKind = "auto",
        restore_from: str | os.PathLike[str] | None = None,
    ) -> Store[Any]:
        """A store no other process can open (see ``Segment.anonymous``)."""
        geometry, codec, flags, restore = _plan(
            type,
            slots=slots,
            slot_size=slot_size,
            max_readers=1,
            crc=None,
            mode=0o600,
            writer_lock=writer_lock,
            restore_from=restore_from,
        )
        label = f"private-{os.getpid()}-{os.urandom(6).hex()}"
        segment = Segment.anonymous(label, geometry.total_size)
        return cls._initialize(
            segment, geometry, codec, flags, unlink_on_error=False, restore=restore
        )

    @classmethod
    def _initialize(
        cls,
        segment: Segment,
        geometry: Geometry,
        codec: Codec[Any],
        flags: int,
        *,
        unlink_on_error: bool,
        restore: Checkpoint | None = None,
    ) -> Store[Any]:
        try:
            created = time.time_ns()
            m = segment.map
            m[OFF_TYPE_NAME : OFF_TYPE_NAME + 64] = name_field(codec.type_name)
            m[OFF_STORE_NAME : OFF_STORE_NAME + 64] = name_field(segment.name)
            header = pack_header(geometry, flags, created, codec.fingerprint, magic=b"\0" * 8)
            m[0 : len(header)] = header
            if flags & FLAG_ROBUST_MUTEX:
                RobustMutexLock.initialize(m, OFF_MUTEX)
            if restore is not None:
                ring = Ring(m, geometry, crc=bool(flags & FLAG_CRC))
                ring.restore(restore.version, restore.payload, time.time_ns())
                ring.release()
            # The magic goes in last: until it is there, open() treats the segment as unborn.
            m[0 : len(MAGIC)] = MAGIC
            info = read_header(m, segment.size)
        except BaseException:
            segment.close()
            if unlink_on_error:
                unlink_segment(segment.name)
            raise
        return cls(segment, info, codec, writable=True)

    @overload
    @classmethod
    def open(cls, name: str, type: type[T], *, allow_other_owner: bool = ...) -> Store[T]: ...

    @overload
    @classmethod
    def open(cls, name: str, type: Any = ..., *, allow_other_owner: bool = ...) -> Store[Any]: ...

    @classmethod
    def open(cls, name: str, type: Any = None, *, allow_other_owner: bool = False) -> Store[Any]:
        """Attach to the existing store *name*.

        With *type*, the store must have been created for a type of the same schema
        (:class:`SchemaMismatchError` otherwise). Without it, values decode to builtins
        (dict, list, ...) and the handle may write only if the store itself is untyped.

        A segment owned by another user is refused (:class:`StorePermissionError`) unless
        *allow_other_owner*: whoever owns it controls what this process reads.

        Raises :class:`StoreNotFoundError` if there is no such store and
        :class:`CorruptStoreError` if the segment is not a valid store.
        """
        validate_name(name)
        segment, info = _attach(name)
        try:
            owner = segment.owner_uid()
            if owner != os.geteuid() and not allow_other_owner:
                raise StorePermissionError(
                    errno.EPERM,
                    f"store {name!r} is owned by uid {owner}, not by this process's uid "
                    f"{os.geteuid()}; pass allow_other_owner=True to open it anyway",
                )
            if type is None:
                codec: Codec[Any] = Codec(Any)
                writable = info.fingerprint == ANY_FINGERPRINT
            else:
                codec = Codec(type)
                if codec.fingerprint != info.fingerprint:
                    raise SchemaMismatchError(
                        f"store {name!r} holds {info.type_name}, "
                        f"which does not match the requested type {codec.type_name}"
                    )
                writable = True
        except BaseException:
            segment.close()
            raise
        return cls(segment, info, codec, writable)

    # ---------------------------------------------------------------- reading

    @property
    def name(self) -> str:
        return self._segment.name

    @property
    def value_type(self) -> Any:
        """The value type this handle decodes to (``typing.Any`` for an untyped handle)."""
        return self._codec.type

    @property
    def geometry(self) -> Geometry:
        return self._info.geometry

    @property
    def version(self) -> int:
        """The newest committed version: 0 while empty, +1 per commit. One shared-memory load."""
        try:
            return int(self._words[_HEAD])
        except ValueError:
            raise self._closed_error() from None

    def get(self) -> T | None:
        """The newest committed value, or ``None`` while the store is empty.

        Lock-free and never torn. While the version is unchanged this returns the same decoded
        object again without copying or decoding, so treat values as immutable.
        """
        version, value = self._cache
        try:
            head = self._words[_HEAD]
        except ValueError:
            raise self._closed_error() from None
        if head == version:
            return value
        return self._refresh()[0]

    def get_with_version(self) -> tuple[T | None, int]:
        """The newest value together with its version, read as one consistent pair."""
        cached = self._cache
        try:
            head = self._words[_HEAD]
        except ValueError:
            raise self._closed_error() from None
        if head == cached[0]:
            return cached[1], head
        value, version = self._refresh()
        return value, version

    def _refresh(self) -> tuple[T | None, int]:
        payload, version, _ts = self._ring.read_newest()
        if payload is None:
            return None, 0
        value = self._decode(payload, version)
        self._cache = (version, value)
        return value, version

    def _decode(self, payload: bytes | memoryview, version: int) -> T:
        try:
            return self._codec.decode(payload)
        except msgspec.DecodeError as exc:
            raise CorruptStoreError(
                f"store {self.name!r}: version {version} does not decode as "
                f"{self._codec.type_name}: {exc}"
            ) from exc

    def _read_version(self, version: int) -> tuple[T] | None:
        """Version *version* if the ring still holds it, as a 1-tuple; else ``None``."""
        cached = self._cache
        if cached[0] == version:
            return (cached[1],)  # type: ignore[return-value]
        got = self._ring.read(version)
        if got is None:
            return None
        return (self._decode(got[0], version),)

    # ---------------------------------------------------------------- waiting

    def wait(self, after_version: int, timeout: float | None = None, *, spin: bool = True) -> int:
        """Block until the store's version is greater than *after_version*; return it.

        Sleeps on a semaphore the writer posts after each commit (no CPU while asleep).
        ``timeout`` is in seconds: ``TimeoutError`` when it passes, and ``timeout=0`` is a
        non-blocking check. While recent waits were short (< 0.1 ms), it first re-reads the
        version for up to 0.1 ms before sleeping, which turns a ~24 us wake-up into ~1 us;
        ``spin=False`` never spins. The first blocking call registers this handle as a reader
        of the store (see ``max_readers``); the registration lasts until :meth:`close`.
        """
        return self._gate.wait(after_version, timeout, spin=spin)

    def subscribe(
        self, after_version: int | None = None, *, timeout: float | None = None
    ) -> Subscription[T]:
        """Iterate over every committed ``(version, value)`` in order, blocking for the next.

        Starts with the current value (or, with *after_version*, just after that version).
        A subscriber that falls more than ``slots`` versions behind gets
        :class:`SubscriberLaggedError` with the exact number missed, and continues with the
        newest version when iterated again. *timeout* bounds each wait for the next version.
        """
        self._check_open()
        return Subscription(self, after_version, timeout)

    # ---------------------------------------------------------------- writing

    def set(self, value: T, expected_version: int | None = None) -> int:
        """Commit *value* as the next version and return that version.

        With *expected_version*, commit only if the store is still at that version, else raise
        :class:`StateVersionError` (optimistic concurrency: read, compute, set, retry on
        conflict). Raises :class:`SnapshotTooLargeError` if the encoded value does not fit a
        slot and :class:`InvalidSnapshotError` if readers could not decode it; in every error
        case nothing is written.
        """
        return self._set(value, expected_version, log_conflict=True)

    def _set(self, value: T, expected_version: int | None, *, log_conflict: bool) -> int:
        if not self._writable:
            self._check_open()
            if self._info.flags & FLAG_REPLICA:
                raise self._replica_error()
            raise StateStoreError(
                f"store {self.name!r} holds {self._info.type_name}; open it with that type "
                "to write (an untyped handle could publish values its readers cannot decode)"
            )
        codec = self._codec
        data = codec.encode(value)
        capacity = self._info.geometry.slot_size
        if len(data) > capacity:
            raise SnapshotTooLargeError(
                f"encoded value is {len(data)} bytes; store {self.name!r} holds at most "
                f"{capacity} bytes per slot"
            )
        checked = codec.validate(data)
        ring = self._ring
        lock = self._lock
        with self._in_use:
            if self._closed:
                raise self._closed_error()
            rc = lock.acquire()
            if rc:
                lock.recover(rc)
            try:
                head = ring.head()
                if expected_version is not None and head != expected_version:
                    ring.count_conflict()
                    conflict = StateVersionError(expected_version, head)
                else:
                    conflict = None
                    version = ring.commit(data, time.time_ns())
            finally:
                lock.release()  # also the barrier between publishing HEAD and notify()
            if conflict is None:
                self._cache = (version, checked)
                if self._words[_REG_HIGH]:
                    self._registry.notify()
                return version
        if log_conflict:
            log.warning("store %r: %s", self.name, conflict)
        raise conflict

    # ---------------------------------------------------------------- checkpoints

    def checkpoint(self, path: str | os.PathLike[str]) -> int:
        """Save the newest value, its version and the schema fingerprint to *path*, atomically
        (temporary file, ``fsync``, rename). Returns the version saved. Raises
        :class:`StateStoreError` while the store is empty."""
        self._check_open()
        # Serialized per handle, with the value read inside: of two checkpoints racing to the
        # same path, the one renamed last is always the newer.
        with self._checkpoint_lock:
            payload, version, _ts = self._ring.read_newest()
            if payload is None:
                raise StateStoreError(f"store {self.name!r} is empty: nothing to checkpoint")
            write_checkpoint(
                path,
                fingerprint=self._info.fingerprint,
                type_name=self._info.type_name,
                version=version,
                payload=payload,
            )
        return version

    # ---------------------------------------------------------------- statistics

    def statistics(self) -> StoreStatistics:
        """A frozen snapshot of the store's counters and of this handle's."""
        self._check_open()
        entries = self._registry.entries()
        geometry = self._info.geometry
        version = self.version
        return StoreStatistics(
            name=self.name,
            type_name=self._info.type_name,
            fingerprint=self._info.fingerprint.hex(),
            version=version,
            commits=self._ring.commits(),
            conflicts=self._ring.conflicts(),
            last_update_ns=self._ring.last_update_ns(),
            created_ns=self._info.created_ns,
            slots=geometry.slots,
            slot_size=geometry.slot_size,
            max_readers=geometry.registry_capacity,
            readers_registered=len(entries),
            readers_alive=sum(alive for _i, _pid, alive in entries),
            writer_lock_held=self._lock.held_elsewhere(),
            lag=version - self._cache[0],
            reads=self._ring.reads,
            retries=self._ring.retries,
            **self._mirror_statistics(),
        )

    # ---------------------------------------------------------------- counters

    @property
    def commits(self) -> int:
        """Commits made by every process since the store was created."""
        self._check_open()
        return self._ring.commits()

    @property
    def conflicts(self) -> int:
        """``set(expected_version=...)`` calls refused, by every process."""
        self._check_open()
        return self._ring.conflicts()

    @property
    def last_update_ns(self) -> int:
        """Wall-clock time of the newest commit (ns since the epoch), 0 while empty."""
        self._check_open()
        return self._ring.last_update_ns()

    @property
    def created_ns(self) -> int:
        return self._info.created_ns

    def _app_counter(self, index: int) -> int:
        """One of the header's counters reserved for layers above the store (``shmstore.fsm``)."""
        self._check_open()
        return int(self._words[OFF_APP_COUNTERS // 8 + index])

    def _bump_app_counter(self, index: int) -> None:
        with self._in_use:
            self._check_open()
            with self._lock:  # a read-modify-write of a shared word: under the writer lock
                self._words[OFF_APP_COUNTERS // 8 + index] += 1

    # ---------------------------------------------------------------- lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Detach this process from the store. The store itself stays; see :meth:`unlink`."""
        if self._closed:
            return
        self._gate.close()  # wakes this handle's sleeping threads first
        with self._in_use:
            if self._closed:
                return
            self._closed = True
            _live_handles.discard(self)
            self._registry.close()
            self._lock.close()
            self._ring.release()
            self._segment.close()

    def unlink(self) -> None:
        """Remove the store's names for everyone. Attached handles keep working until closed;
        no new handle can open it."""
        remove(self.name)

    def __enter__(self) -> Store[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_pid", None) == os.getpid():
            warnings.warn(
                f"shmstore.Store {self.name!r} was never closed", ResourceWarning, stacklevel=1
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"version={self.version}"
        return f"<shmstore.Store {self.name!r} {self._info.type_name} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> StateStoreError:
        return StateStoreError(f"store {self.name!r} is closed")

    def _after_fork_in_child(self) -> None:
        self._pid = os.getpid()
        self._in_use = threading.Lock()
        try:
            self._segment.reopen()
            self._lock.after_fork_in_child(self._segment.fd)
            self._registry.after_fork_in_child(self._segment.fd)
            self._gate.after_fork_in_child()
        except StoreNotFoundError:
            # Unlinked before the fork: reads still work on the inherited mapping, but this child
            # must not write under the parent's lock, so it gets no writer lock at all.
            self._writable = False

    # ---------------------------------------------------------------- mirror hooks
    #
    # Used by shmstore.mirror (its publisher and follower processes); nothing above depends on
    # them except the replica refusal in _set() and the mirror fields of statistics(). The words
    # live in the header's mirror block (see the end of _layout).

    @classmethod
    def create_replica(
        cls,
        name: str,
        *,
        fingerprint: bytes,
        type_name: str,
        origin: str,
        bucket: str,
        slots: int = DEFAULT_SLOTS,
        slot_size: int = DEFAULT_SLOT_SIZE,
        max_readers: int = DEFAULT_MAX_READERS,
        mode: int = 0o600,
    ) -> Store[Any]:
        """Create the store *name* as a replica of the store *origin* mirrored through NATS
        bucket *bucket*: it records the origin's schema *fingerprint* and *type_name*, so that
        readers open it with the origin's type and the usual schema check, and it refuses
        ``set()`` in every process. Only :meth:`commit_replicated` writes to it. The returned
        handle decodes to builtins.

        Raises like :meth:`create` (:class:`StoreExistsError`, ``ValueError``, ...).
        """
        validate_name(name)
        if len(fingerprint) != 16:
            raise ValueError(f"a schema fingerprint is 16 bytes, got {len(fingerprint)}")
        geometry, codec, flags, _restore = _plan(
            Any,
            slots=slots,
            slot_size=slot_size,
            max_readers=max_readers,
            crc=None,
            mode=mode,
            writer_lock="auto",
            restore_from=None,
        )
        # The replica's handles decode like an untyped handle, but the header must carry the
        # origin's schema: that is what typed readers are checked against.
        codec.fingerprint = fingerprint
        codec.type_name = type_name
        segment = Segment.create(name, geometry.total_size, mode)
        m = segment.map
        try:
            m[OFF_MIRROR_BUCKET : OFF_MIRROR_BUCKET + MIRROR_BUCKET_FIELD] = text_field(
                bucket, MIRROR_BUCKET_FIELD
            )
            m[OFF_MIRROR_ORIGIN : OFF_MIRROR_ORIGIN + MIRROR_ORIGIN_FIELD] = text_field(
                origin, MIRROR_ORIGIN_FIELD
            )
            memoryview(m).cast("Q")[OFF_MIRROR_STATE // 8] = MIRROR_ROLE_REPLICA
        except BaseException:
            segment.close()
            unlink_segment(segment.name)
            raise
        return cls._initialize(segment, geometry, codec, flags | FLAG_REPLICA, unlink_on_error=True)

    @property
    def is_replica(self) -> bool:
        """True if this store is a replica kept by ``shmstore mirror follow``."""
        return bool(self._info.flags & FLAG_REPLICA)

    @property
    def fingerprint(self) -> bytes:
        """The 16-byte schema fingerprint recorded in the header."""
        return self._info.fingerprint

    def get_encoded(self) -> tuple[bytes, int, int]:
        """The newest value as the encoded bytes stored in the ring, with its version and commit
        time (ns since the epoch): ``(b"", 0, 0)`` while empty. For mirroring without a decode
        and re-encode round trip. Raises :class:`StateStoreError` if the handle is closed."""
        self._check_open()
        payload, version, ts_ns = self._ring.read_newest()
        if payload is None:
            return b"", 0, 0
        return bytes(payload), version, ts_ns

    def commit_replicated(self, payload: bytes, version: int, commit_ns: int) -> int:
        """Commit the origin's encoded *payload* as the origin's *version* (with its commit time
        *commit_ns*) into this replica; return *version*.

        *version* must be greater than the replica's version; versions in between may be
        skipped (the replica has latest-value semantics): subscribers then get
        :class:`SubscriberLaggedError` with the exact number skipped, as for a lap of the ring.
        Raises :class:`StateStoreError` if this store is not a replica,
        :class:`StateVersionError` (nothing written) if *version* is not newer,
        :class:`SnapshotTooLargeError` if the payload does not fit a slot and
        :class:`InvalidSnapshotError` if it is not a value this handle can decode.
        """
        if not self._info.flags & FLAG_REPLICA:
            self._check_open()
            raise StateStoreError(f"store {self.name!r} is not a replica")
        capacity = self._info.geometry.slot_size
        if len(payload) > capacity:
            raise SnapshotTooLargeError(
                f"replicated value is {len(payload)} bytes; replica {self.name!r} holds at most "
                f"{capacity} bytes per slot"
            )
        checked = self._codec.validate(bytes(payload))
        ring = self._ring
        lock = self._lock
        with self._in_use:
            if self._closed:
                raise self._closed_error()
            rc = lock.acquire()
            if rc:
                lock.recover(rc)
            try:
                head = ring.head()
                if version > head:
                    ring.commit_at(version, bytes(payload), commit_ns)
            finally:
                lock.release()  # also the barrier between publishing HEAD and notify()
            if version <= head:
                raise StateVersionError(
                    version - 1,
                    head,
                    f"replicated version {version} is not newer than replica {self.name!r} "
                    f"at version {head}",
                )
            self._cache = (version, checked)
            if self._words[_REG_HIGH]:
                self._registry.notify()
            return version

    @property
    def mirror_status(self) -> MirrorStatus:
        """The mirror block of the header: role, connection, last sync, lag, bucket, origin."""
        self._check_open()
        words = self._words
        state = int(words[OFF_MIRROR_STATE // 8])
        pid = int(words[OFF_MIRROR_PID // 8])
        role = {MIRROR_ROLE_ORIGIN: "origin", MIRROR_ROLE_REPLICA: "replica"}.get(
            state & MIRROR_ROLE_MASK, ""
        )
        m = self._segment.map
        return MirrorStatus(
            role=role,
            connected=bool(state & MIRROR_CONNECTED) and pid != 0 and _mirror_pid_alive(pid),
            pid=pid,
            last_sync_ns=int(words[OFF_MIRROR_SYNC // 8]),
            behind=int(words[OFF_MIRROR_BEHIND // 8]),
            bucket=read_text_field(m, OFF_MIRROR_BUCKET, MIRROR_BUCKET_FIELD) if role else "",
            origin=read_text_field(m, OFF_MIRROR_ORIGIN, MIRROR_ORIGIN_FIELD) if role else "",
        )

    def claim_mirror(self, bucket: str) -> None:
        """Mark this store as the origin of a mirror through NATS bucket *bucket* and this
        process as its mirroring process (the publisher). A replica keeps its replica role."""
        self._check_open()
        m = self._segment.map
        if not self._info.flags & FLAG_REPLICA:
            m[OFF_MIRROR_BUCKET : OFF_MIRROR_BUCKET + MIRROR_BUCKET_FIELD] = text_field(
                bucket, MIRROR_BUCKET_FIELD
            )
            m[OFF_MIRROR_ORIGIN : OFF_MIRROR_ORIGIN + MIRROR_ORIGIN_FIELD] = text_field(
                self.name, MIRROR_ORIGIN_FIELD
            )
        self._words[OFF_MIRROR_PID // 8] = os.getpid()
        self.set_mirror_status(connected=False)

    def set_mirror_status(
        self,
        *,
        connected: bool,
        last_sync_ns: int | None = None,
        behind: int | None = None,
    ) -> None:
        """Record the mirror's state in the header (by the one mirroring process of the store).
        *last_sync_ns* and *behind* are left as they are when ``None``."""
        self._check_open()
        words = self._words
        role = MIRROR_ROLE_REPLICA if self._info.flags & FLAG_REPLICA else MIRROR_ROLE_ORIGIN
        if last_sync_ns is not None:
            words[OFF_MIRROR_SYNC // 8] = last_sync_ns
        if behind is not None:
            words[OFF_MIRROR_BEHIND // 8] = max(0, behind)
        words[OFF_MIRROR_STATE // 8] = role | (MIRROR_CONNECTED if connected else 0)

    def _mirror_statistics(self) -> dict[str, Any]:
        status = self.mirror_status
        return {
            "mirror_role": status.role,
            "mirror_connected": status.connected,
            "mirror_last_sync_ns": status.last_sync_ns,
            "mirror_behind": status.behind,
            "mirror_bucket": status.bucket,
            "mirror_origin": status.origin,
        }

    def _replica_error(self) -> StateStoreError:
        status = self.mirror_status
        return StateStoreError(
            f"store {self.name!r} is a replica of store {status.origin!r} (NATS bucket "
            f"{status.bucket!r}) and refuses local writes; write to the origin instead: "
            f"`shmstore mirror set {status.origin} VALUE --server URL --bucket {status.bucket}` "
            "or shmstore.mirror.RemoteStore"
        )


def _load_checkpoint(
    path: str | os.PathLike[str], codec: Codec[Any], geometry: Geometry
) -> Checkpoint:
    checkpoint = read_checkpoint(path)
    if checkpoint.fingerprint != codec.fingerprint:
        raise SchemaMismatchError(
            f"checkpoint {str(path)!r} holds {checkpoint.type_name}, which does not match the "
            f"store's type {codec.type_name}"
        )
    if len(checkpoint.payload) > geometry.slot_size:
        raise SnapshotTooLargeError(
            f"checkpoint value is {len(checkpoint.payload)} bytes; the store's slot_size is "
            f"{geometry.slot_size}"
        )
    try:
        codec.decode(checkpoint.payload)
    except msgspec.DecodeError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not decode as {codec.type_name}: {exc}"
        ) from exc
    return checkpoint


def _plan(
    tp: Any,
    *,
    slots: int,
    slot_size: int,
    max_readers: int,
    crc: bool | None,
    mode: int,
    writer_lock: str,
    restore_from: str | os.PathLike[str] | None,
) -> tuple[Geometry, Codec[Any], int, Checkpoint | None]:
    """Validate the create options (and any checkpoint to restore) before anything is created;
    return the geometry, codec, header flags and checkpoint."""
    geometry = Geometry(slots, slot_size, max_readers)
    codec: Codec[Any] = Codec(tp)
    if mode & ~0o777:
        raise ValueError(f"mode must be permission bits (0o000-0o777), got {mode:#o}")
    flags = FLAG_CRC if (_default_crc() if crc is None else crc) else 0
    if writer_lock == "auto":
        writer_lock = "mutex" if robust_mutex_supported() else "flock"
    if writer_lock == "mutex":
        if not robust_mutex_supported():
            raise ValueError("writer_lock='mutex' needs robust mutexes, which this platform lacks")
        flags |= FLAG_ROBUST_MUTEX
    elif writer_lock != "flock":
        raise ValueError(f"writer_lock must be 'auto', 'mutex' or 'flock', got {writer_lock!r}")
    restore = None if restore_from is None else _load_checkpoint(restore_from, codec, geometry)
    return geometry, codec, flags, restore


def _attach(name: str, wait: float = OPEN_WAIT) -> tuple[Segment, HeaderInfo]:
    """Open and validate the segment, waiting up to *wait* seconds for a concurrent create."""
    deadline = time.monotonic() + wait
    while True:
        try:
            segment = Segment.open(name)
        except UnsizedSegmentError:
            if time.monotonic() > deadline:
                raise CorruptStoreError(f"store {name!r} has no size: not a store") from None
            time.sleep(0.001)
            continue
        try:
            unborn = segment.map[0 : len(MAGIC)] == b"\0" * len(MAGIC)
            if unborn and time.monotonic() < deadline:
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


def remove(name: str) -> bool:
    """Remove every OS object of store *name* (segment and reader semaphores) for everyone.
    ``False`` if there was no segment. Attached handles keep working until they close."""
    validate_name(name)
    capacity = MAX_REGISTRY
    try:
        segment, info = _attach(name, wait=0.0)
    except StoreNotFoundError:
        pass
    except StateStoreError:
        pass  # damaged: still remove it, and every semaphore name it could have
    else:
        capacity = info.geometry.registry_capacity
        segment.close()
    existed = unlink_segment(name)
    unlink_all_semaphores(name, capacity)
    return existed


def _after_fork_in_child() -> None:
    for handle in list(_live_handles):
        handle._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _mirror_pid_alive(pid: int) -> bool:
    """Whether the mirroring process *pid* still lives (a killed publisher or follower leaves
    its "connected" bit set; the pid tells the truth)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
