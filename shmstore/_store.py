"""``Store[T]``: a typed, versioned value shared by processes through one shared-memory segment.

This module holds the operations on an attached store: read, wait, write, checkpoint, count.
Making, finding and removing segments is ``_provision``'s job; the seqlock is ``_ring``'s, the
writer lock ``_writelock``'s, waiting ``_waiting``'s and the codec ``_codec``'s. Reads never block
and never take a lock; writes encode and validate outside the lock and hold it only for the
compare-and-set and one memcpy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Final, Generic, Literal, TypeVar, overload

from . import _provision
from ._checkpoint import write_checkpoint
from ._codec import ENCODE_ERRORS, VALIDATE_ERRORS, Codec
from ._errors import (
    CheckpointError,
    CorruptStoreError,
    SnapshotTooLargeError,
    StateStoreError,
    StateVersionError,
    StoreExistsError,
    StoreNotFoundError,
    StorePermissionError,
)
from ._growth import grow, next_capacity, open_generation
from ._layout import (
    APP_COUNTERS,
    FLAG_CRC,
    FLAG_REPLICA,
    FLAG_ROBUST_MUTEX,
    MIRROR_BUCKET_FIELD,
    MIRROR_CONNECTED,
    MIRROR_ORIGIN_FIELD,
    MIRROR_ROLE_MASK,
    MIRROR_ROLE_ORIGIN,
    MIRROR_ROLE_REPLICA,
    OFF_MIRROR_BUCKET,
    OFF_MIRROR_ORIGIN,
    OFF_MUTEX,
    W_EXCLUSIVE,
    W_GENERATION,
    W_HEAD,
    W_MIRROR_BEHIND,
    W_MIRROR_PID,
    W_MIRROR_STATE,
    W_MIRROR_SYNC,
    W_REG_HIGH,
    Geometry,
    app_counter_word,
    read_text_field,
    text_field,
)
from ._projection import Projection, check_projection
from ._provision import (
    DEFAULT_MAX_READERS,
    DEFAULT_SLOT_SIZE,
    DEFAULT_SLOTS,
    Attached,
    CreateOptions,
)
from ._registry import Registry, Waiter, pid_alive
from ._ring import DecodeFailed, Ring, RingMoved
from ._segment import Segment
from ._stats import MirrorStatus, StoreStatistics
from ._subscription import Subscription
from ._waiting import WaitGate
from ._writelock import FlockLock, ReadOnlyLock, RobustMutexLock, WriteLock

__all__ = ["AppCounters", "MirrorHooks", "Store", "remove"]

T = TypeVar("T")
P = TypeVar("P")
WriterLockKind = Literal["auto", "mutex", "flock"]

# A version the writer would not reach in centuries; past it the header is damaged, and the
# slot sequence 2v would no longer fit its u64.
MAX_VERSION: Final = 1 << 62
_OPEN_OR_CREATE_TRIES: Final = 5
_FOLLOW_TRIES: Final = 100
_CONTENDED_SLICE: Final = 0.05  # a contended writer looks for an exclusive writer this often
# What a timed or try lock may answer short of having the lock. EINTR: POSIX says a mutex lock
# never returns it (glibc restarts the wait; checked), so it is here only to mean "try again"
# should a C library ever pass it through.
_LOCK_NOT_YET: Final = frozenset({errno.EBUSY, errno.ETIMEDOUT, errno.EINTR})

_live_handles: weakref.WeakSet[Store[Any]] = weakref.WeakSet()


class AppCounters:
    """Four shared u64 counters in the store header for layers above the store (the FSM layer
    keeps its ``version_conflicts`` here): every process attached to the store sees the same
    values. ``counters[i]`` reads one; :meth:`increment` adds one under the writer lock."""

    __slots__ = ("_increment", "_read")

    def __init__(self, read: Callable[[int], int], increment: Callable[[int], int]) -> None:
        self._read = read
        self._increment = increment

    def __len__(self) -> int:
        return APP_COUNTERS

    def __getitem__(self, index: int) -> int:
        """Counter *index* (0-3); ``IndexError`` outside that range."""
        return self._read(index)

    def increment(self, index: int) -> int:
        """Add one to counter *index* for every process; returns the new value."""
        return self._increment(index)


class Store(Generic[T]):
    """A typed value in shared memory: one writer at a time, any number of lock-free readers.

    Make one with :meth:`create`, :meth:`open`, :meth:`open_or_create` or :meth:`private`;
    ``close()`` detaches this process, ``unlink()`` removes the store for everyone. A handle may
    be shared by the threads of one process.
    """

    # Slots, not a __dict__: past 30 attributes CPython stops sharing instance-dict keys and
    # every attribute load on the hot paths gets slower (~100 instructions per get()).
    __slots__ = (
        "__weakref__",
        "_app_counters",
        "_cache",
        "_checkpoint_lock",
        "_closed",
        "_codec",
        "_exclusive",
        "_fence",
        "_gate",
        "_gid",
        "_in_place",
        "_in_use",
        "_info",
        "_keeper",
        "_lock",
        "_max_value_size",
        "_mode",
        "_move_lock",
        "_pid",
        "_private",
        "_raw_decode",
        "_raw_encode",
        "_registry",
        "_retired",
        "_ring",
        "_ring_segment",
        "_segment",
        "_words",
        "_writable",
    )

    # ---------------------------------------------------------------- construction

    def __init__(self, attached: Attached) -> None:
        segment, info = attached.segment, attached.info
        self._segment = segment
        self._info = info
        self._codec: Codec[T] = attached.codec
        # A replica (shmstore.mirror) takes commits only from its follower: see the class end.
        self._writable = attached.writable and not info.flags & FLAG_REPLICA
        self._private = attached.private
        self._ring = Ring(
            segment.map,
            info.geometry,
            crc=bool(info.flags & FLAG_CRC),
            reuse_buffer=not self._codec.aliases_input,
        )
        # Rings the store grew out of (see _growth) stay mapped until close(): another thread of
        # this handle may be reading one. The current ring's own segment, unless generation 0.
        self._retired: list[tuple[Ring, Segment | None]] = []
        self._ring_segment: Segment | None = None
        self._move_lock = threading.Lock()
        self._mode = segment.mode()
        self._exclusive = False
        self._keeper: tuple[threading.Thread, threading.Event] | None = None
        self._fence = threading.Lock()
        self._gid = segment.group()  # grown rings get the store's mode and group
        self._raw_decode = self._codec.raw_decode
        self._raw_encode = self._codec.raw_encode
        self._max_value_size = info.max_value_size
        # Decode big payloads straight from the mapping (see Ring.read_newest_value).
        self._in_place = self._codec.decode_in_place and not info.flags & FLAG_CRC
        # The header words: HEAD is indexed here directly (get(), the wait gate's and the
        # projections' HEAD loads), a frame cheaper than a method of the ring.
        self._words = self._ring.words
        self._cache: tuple[int, T | None] = (0, None)
        self._lock: WriteLock
        if segment.readonly:  # a read-only mapping: the lock cannot be taken, only looked at
            mutex_at = OFF_MUTEX if info.flags & FLAG_ROBUST_MUTEX else None
            self._lock = ReadOnlyLock(segment.map, mutex_at, segment.fd, segment.name)
        elif info.flags & FLAG_ROBUST_MUTEX:
            self._lock = RobustMutexLock(segment.map, OFF_MUTEX, segment.name)
        else:
            self._lock = FlockLock(segment.fd)
        self._registry = Registry(
            self._words,
            info.geometry,
            segment.name,
            self._lock,
            created_ns=info.created_ns,
            fd=segment.fd,
            mode=segment.mode(),
            gid=segment.group(),
        )
        # A read-only handle cannot register (that writes the segment): it polls.
        self._gate = WaitGate(
            self._version_or_closed, self._registry, segment.name, poll=segment.readonly
        )
        self._closed = False
        # Held by set() from its lock to its notifications, by close() and by everything that
        # touches the mapping in more than one step: the writer mutex lives in the mapping, so
        # close() must not unmap it under a thread that is using it.
        self._in_use = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._pid = os.getpid()
        self._app_counters = AppCounters(self._app_counter, self._increment_app_counter)
        _live_handles.add(self)
        if self._ring.moved():
            try:
                self._follow_move()  # a store that grew before we opened it
            except BaseException:
                self.close()
                raise

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
        max_value_size: int | None = ...,
        group: int | str | None = ...,
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
        max_value_size: int | None = ...,
        group: int | str | None = ...,
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
        max_value_size: int | None = None,
        group: int | str | None = None,
    ) -> Store[Any]:
        """Create a new store named *name* holding values of *type* (any msgspec-supported type).

        *slots* is the ring depth (how many versions stay readable), *slot_size* the initial
        capacity of a slot in bytes: a larger value moves the store to a ring with larger slots
        (geometric growth; every handle follows), up to *max_value_size* (64 MiB by default, or
        *slot_size* if larger), past
        which ``set()`` raises :class:`SnapshotTooLargeError`. *max_readers* is the number of
        processes that may wait on the store at once. *crc* adds a CRC32 check to every read
        (default: on where the CPU reorders loads). *mode* is the permission bits of the
        segment. *writer_lock* picks how writers are serialized: ``"mutex"`` (a robust
        process-shared mutex, Linux), ``"flock"``, or ``"auto"`` (the mutex where the C library
        has robust mutexes); see ``_writelock``.
        *restore_from* starts the store from a :meth:`checkpoint` file: it holds the saved value
        at the saved version, and the next commit is that version + 1. *group* (a gid or group
        name) is the segment's group, set before anyone can open the store; by default the
        creator's. With ``mode=0o640`` the group's members may read (read-only), with ``0o660``
        also wait and write; see README "Permissions".

        Raises :class:`StoreExistsError` if the name is taken, ``ValueError`` for a bad name or
        geometry, :class:`StateStoreError` if shared memory cannot hold the store,
        :class:`CheckpointError` / :class:`SchemaMismatchError` for a checkpoint that cannot be
        restored (checked before anything is created), :class:`StorePermissionError` for a
        *group* this process may not give (``ValueError`` for an unknown group name).
        """
        options = CreateOptions(
            slots=slots,
            slot_size=slot_size,
            max_readers=max_readers,
            crc=crc,
            mode=mode,
            writer_lock=writer_lock,
            restore_from=restore_from,
            max_value_size=max_value_size,
            group=group,
        )
        return cls(_provision.create(name, type, options))

    @overload
    @classmethod
    def private(cls, type: type[T], **create_options: Any) -> Store[T]: ...

    @overload
    @classmethod
    def private(cls, type: Any = ..., **create_options: Any) -> Store[Any]: ...

    @classmethod
    def private(cls, type: Any = Any, **create_options: Any) -> Store[Any]:
        """A store that only this process (and its forked children) can open: an anonymous
        segment (``memfd`` on Linux) that has no name in ``/dev/shm``, ever, and is gone when
        the last handle closes. Takes :meth:`create`'s options but ``mode``."""
        options = CreateOptions(**{"max_readers": 1, **create_options})
        return cls(_provision.create_private(type, options))

    @overload
    @classmethod
    def open(
        cls,
        name: str,
        type: type[T],
        *,
        allow_other_owner: bool = ...,
        readonly: bool | None = ...,
    ) -> Store[T]: ...

    @overload
    @classmethod
    def open(
        cls,
        name: str,
        type: Any = ...,
        *,
        allow_other_owner: bool = ...,
        readonly: bool | None = ...,
    ) -> Store[Any]: ...

    @classmethod
    def open(
        cls,
        name: str,
        type: Any = None,
        *,
        allow_other_owner: bool = False,
        readonly: bool | None = None,
    ) -> Store[Any]:
        """Attach to the existing store *name*.

        With *type*, the store must have been created for a type of the same schema
        (:class:`SchemaMismatchError` otherwise). Without it, values decode to builtins
        (dict, list, ...) and the handle may write only if the store itself is untyped.

        A segment owned by another user is refused (:class:`StorePermissionError`) unless
        *allow_other_owner*: whoever owns it controls what this process reads.

        ``readonly=True`` maps the segment read-only: reads, :attr:`version`,
        :meth:`statistics` and waiting (by polling, see :attr:`wait_mode`) work; every write
        raises :class:`StorePermissionError`, and no byte of the segment can change through
        this handle. With the default ``None`` the handle is read-only only if the OS grants
        this user read access alone (:attr:`readonly` tells); ``False`` demands write access.

        Raises :class:`StoreNotFoundError` if there is no such store,
        :class:`StorePermissionError` if the OS refuses the access asked for, and
        :class:`CorruptStoreError` if the segment is not a valid store.
        """
        return cls(
            _provision.attach(name, type, allow_other_owner=allow_other_owner, readonly=readonly)
        )

    @overload
    @classmethod
    def open_or_create(
        cls, name: str, type: type[T], *, allow_other_owner: bool = ..., **create_options: Any
    ) -> Store[T]: ...

    @overload
    @classmethod
    def open_or_create(
        cls, name: str, type: Any = ..., *, allow_other_owner: bool = ..., **create_options: Any
    ) -> Store[Any]: ...

    @classmethod
    def open_or_create(
        cls, name: str, type: Any = Any, *, allow_other_owner: bool = False, **create_options: Any
    ) -> Store[Any]:
        """Open store *name*, creating it with *create_options* (those of :meth:`create`) if it
        does not exist. Race-free: of many processes starting at once exactly one creates the
        store, and the others open that store (waiting for its creation to finish). An existing
        store keeps its own geometry; its type must match (:class:`SchemaMismatchError`)."""
        last: StateStoreError | None = None
        for _ in range(_OPEN_OR_CREATE_TRIES):
            try:
                return cls.create(name, type, **create_options)
            except StoreExistsError as exc:
                last = exc
            try:
                return cls.open(name, type, allow_other_owner=allow_other_owner)
            except StoreNotFoundError as exc:
                last = exc  # removed between our create and our open: try again
        raise StateStoreError(f"could not create or open store {name!r}: {last}") from last

    # ---------------------------------------------------------------- reading

    @property
    def name(self) -> str:
        return self._segment.name

    @property
    def value_type(self) -> Any:
        """The value type this handle decodes to (``typing.Any`` for an untyped handle)."""
        return self._codec.type

    @property
    def type_name(self) -> str:
        """The name of the type the store was created for, as recorded in its header."""
        return self._info.type_name

    @property
    def writable(self) -> bool:
        """Whether this handle may write: ``False`` for an untyped handle of a typed store (it
        could publish values the store's readers cannot decode)."""
        return self._writable

    @property
    def readonly(self) -> bool:
        """Whether this handle maps the segment read-only (see :meth:`open`)."""
        return self._segment.readonly

    @property
    def wait_mode(self) -> str:
        """How :meth:`wait` sleeps: ``"semaphore"`` (a registry entry the writer posts) or
        ``"poll"`` (re-reading the version with back-off up to 5 ms: read-only handles, which
        cannot register, and platforms without timed semaphore waits)."""
        return self._gate.mode

    @property
    def geometry(self) -> Geometry:
        """The geometry the store was created with (its first ring)."""
        return self._info.geometry

    @property
    def capacity(self) -> int:
        """The largest encoded value the current ring holds without growing."""
        return self._ring.capacity

    @property
    def max_value_size(self) -> int:
        """The largest encoded value the store accepts (it grows up to this)."""
        return self._info.max_value_size

    @property
    def version(self) -> int:
        """The newest committed version: 0 while empty, +1 per commit. One shared-memory load."""
        return self._version_or_closed()

    def _version_or_closed(self) -> int:
        try:
            return self._words[W_HEAD]
        except ValueError:
            raise self._closed_error() from None

    def get(self) -> T | None:
        """The newest committed value, or ``None`` while the store is empty.

        Lock-free and never torn. While the version is unchanged this returns the same decoded
        object again without copying or decoding, so treat values as immutable.
        """
        version, value = self._cache
        try:
            head = self._words[W_HEAD]
        except ValueError:
            raise self._closed_error() from None
        if head == version:
            return value
        # _refresh() inlined: on the changed path a Python frame is a tenth of a small decode.
        try:
            value, version = self._ring.read_newest_value(self._raw_decode, self._in_place, head)
        except (RingMoved, DecodeFailed, ValueError):
            value, version = self._read_decoded(self._raw_decode)  # follows, or translates
        if version:
            self._cache = (version, value)
        return value  # type: ignore[no-any-return]  # the store's decoder returns a T

    def get_with_version(self) -> tuple[T | None, int]:
        """The newest value together with its version, read as one consistent pair."""
        cached = self._cache
        try:
            head = self._words[W_HEAD]
        except ValueError:
            raise self._closed_error() from None
        if head == cached[0]:
            return cached[1], head
        value, version = self._read_decoded(self._raw_decode)
        if version:
            self._cache = (version, value)
        return value, version

    def _read_newest(self) -> tuple[bytes | memoryview | None, int, int]:
        while True:
            try:
                return self._ring.read_newest()
            except RingMoved:
                self._follow_move()

    def _read_decoded(self, decode: Callable[[Any], Any]) -> tuple[Any, int]:
        """The newest value decoded by *decode* (the store's own decoder, or a projection's),
        following moves and translating a stable slot that does not decode."""
        while True:
            try:
                return self._ring.read_newest_value(decode, self._in_place)
            except RingMoved:
                self._follow_move()
                continue
            except ValueError:  # a released view: close() in another thread
                if not self._closed:
                    raise
                raise self._closed_error() from None
            except DecodeFailed as failed:
                # Not only msgspec.DecodeError: damaged bytes can also raise UnicodeDecodeError,
                # RecursionError (deep nesting) or ValueError; none may escape untranslated.
                raise CorruptStoreError(
                    f"store {self.name!r}: version {failed.version} does not decode as "
                    f"{self._codec.type_name}: {failed.cause}"
                ) from failed.cause

    def projection(self, projected: type[P]) -> Projection[P]:
        """A view of a few fields of this store's values: *projected* is a ``msgspec.Struct``
        whose fields are a subset of the store's type's (same names and types, checked now:
        :class:`SchemaMismatchError` otherwise). Its ``get()`` decodes only those fields --
        for a big value a fraction of a full ``get()`` -- and never returns a torn value."""
        self._check_open()
        check_projection(self._codec.type, projected)
        return Projection(projected, self._version_or_closed, self._read_decoded)

    def _decode(self, payload: bytes | memoryview, version: int) -> T:
        try:
            return self._codec.decode(payload)
        except Exception as exc:
            # Not only msgspec.DecodeError: damaged bytes can also raise UnicodeDecodeError,
            # RecursionError (deep nesting) or ValueError; none may escape untranslated.
            raise CorruptStoreError(
                f"store {self.name!r}: version {version} does not decode as "
                f"{self._codec.type_name}: {exc}"
            ) from exc

    def _read_version(self, version: int) -> tuple[T] | None:
        """Version *version* if the ring still holds it, as a 1-tuple; else ``None``."""
        cached = self._cache
        if cached[0] == version:
            return (cached[1],)  # type: ignore[return-value]
        try:
            got = self._ring.read(version)
            if got is None and self._ring.moved():
                self._follow_move()
                got = self._ring.read(version)
        except ValueError:  # closed in another thread, as in _read_decoded
            if not self._closed:
                raise
            raise self._closed_error() from None
        if got is None:
            return None
        return (self._decode(got[0], version),)

    # ---------------------------------------------------------------- growing

    def _follow_move(self) -> None:
        """Map the ring the store grew into (see ``_growth``)."""
        with self._move_lock:
            for _ in range(_FOLLOW_TRIES):
                generation = int(self._words[W_GENERATION])
                if generation == self._ring.generation:
                    return
                if self._private:
                    break  # only this handle can grow a private store: it never lags
                try:
                    ring, segment = open_generation(
                        self._segment.map,
                        self._info.geometry,
                        self.name,
                        generation,
                        crc=bool(self._info.flags & FLAG_CRC),
                        reuse_buffer=not self._codec.aliases_input,
                        readonly=self._segment.readonly,
                    )
                except StoreNotFoundError:
                    continue  # a newer move removed it meanwhile: read GENERATION again
                self._retire(ring, segment)
                return
        raise CorruptStoreError(
            f"store {self.name!r} moved to ring generation {int(self._words[W_GENERATION])}, "
            "which cannot be found"
        )

    def _retire(self, ring: Ring, segment: Segment) -> None:
        self._retired.append((self._ring, self._ring_segment))
        self._ring, self._ring_segment = ring, segment

    def _grow(self, needed: int) -> None:
        """Move to a larger ring. The caller holds the writer lock and ``_in_use``."""
        with self._move_lock:
            ring, segment = grow(
                self._segment.map,
                self._info.geometry,
                self._ring,
                name=self.name,
                capacity=next_capacity(self._ring.capacity, needed, self._info.max_value_size),
                mode=self._mode,
                group=self._gid,
                crc=bool(self._info.flags & FLAG_CRC),
                reuse_buffer=not self._codec.aliases_input,
                private=self._private,
            )
            self._retire(ring, segment)

    # ---------------------------------------------------------------- waiting

    def wait(self, after_version: int, timeout: float | None = None, *, spin: bool = True) -> int:
        """Block until the store's version is greater than *after_version*; return it.

        Sleeps on a semaphore the writer posts after each commit (no CPU while asleep).
        ``timeout`` is in seconds (``None`` or ``math.inf``: no limit; ``nan``:
        ``ValueError``): ``TimeoutError`` when it passes, and ``timeout=0`` is a non-blocking
        check. A timeout holds whatever writers do: registering never waits for the writer lock.
        While recent waits were short (< 0.1 ms), it first re-reads the version for up to
        0.1 ms before sleeping, which turns a ~16 us wake-up into ~4 us; ``spin=False`` never
        spins. The first blocking call registers this handle as a reader of the store (see
        ``max_readers``); the registration lasts until :meth:`close`. A read-only handle cannot
        register (that writes the segment): it polls instead, see :attr:`wait_mode`.
        """
        return self._gate.wait(after_version, timeout, spin=spin)

    async def wait_async(self, after_version: int, timeout: float | None = None) -> int:
        """:meth:`wait` for asyncio: never blocks the loop. This handle's coroutines and threads
        share its one registry entry; cancelling leaves nothing behind."""
        return await self._gate.wait_async(after_version, timeout)

    def register_waiter(self, deadline: float | None, *, share: Waiter | None = None) -> Waiter:
        """Claim a registry entry of this store for a waiter other than this handle's own
        :meth:`wait` (``shmstore.wait_any``, which sleeps on one semaphore for several stores):
        see ``Registry.register`` for *deadline* and *share*. The caller owns the entry and
        gives it back with ``Waiter.close()``; :meth:`close` gives it back first, and kicks it.
        Raises :class:`StateStoreError` if the handle is closed or waits by polling."""
        with self._in_use:  # the registry writes the mapping: not under close()
            self._check_open()
            if self._gate.mode != "semaphore":
                raise StateStoreError(f"store {self.name!r} waits by polling: it cannot register")
            return self._registry.register(deadline, share=share)

    def subscribe(
        self, after_version: int | None = None, *, timeout: float | None = None
    ) -> Subscription[T]:
        """Iterate over every committed ``(version, value)`` in order, blocking for the next.

        Starts with the current value (or, with *after_version* >= 0, just after that version).
        A subscriber that falls more than ``slots`` versions behind gets
        :class:`SubscriberLaggedError` with the exact number missed, and continues with the
        newest version when iterated again. *timeout* bounds each wait for the next version.
        """
        self._check_open()
        return Subscription(
            head=self._version_or_closed,
            read=self._read_version,
            newest=self.get_with_version,
            wait=self.wait,
            after_version=after_version,
            timeout=timeout,
        )

    # ---------------------------------------------------------------- writing

    def set(self, value: T, expected_version: int | None = None) -> int:
        """Commit *value* as the next version and return that version.

        With *expected_version*, commit only if the store is still at that version, else raise
        :class:`StateVersionError` (optimistic concurrency: read, compute, set, retry on
        conflict), counted in ``conflicts`` and not logged: the caller decides. Raises
        :class:`SnapshotTooLargeError` if the encoded value does not fit a slot and
        :class:`InvalidSnapshotError` if readers could not decode it; in every error case
        nothing is written.
        """
        return self._commit(value, expected_version, count_conflict=True)

    def try_set(self, value: T, expected_version: int) -> int | None:
        """Compare-and-set without an exception: commit *value* only if the store is at
        *expected_version* and return the new version, else return ``None`` (nothing written,
        nothing counted or logged). Other errors as :meth:`set`."""
        try:
            return self._commit(value, expected_version, count_conflict=False)
        except StateVersionError:
            return None

    def update(self, fn: Callable[[T | None], T], *, retries: int | None = None) -> int:
        """Read-modify-write: commit ``fn(current value)`` (``None`` while empty) if nobody
        committed in between, else call *fn* again on the newer value. Returns the new version.
        *fn* may run several times, so it must not have side effects. With *retries*, gives up
        after that many conflicts with the last :class:`StateVersionError`."""
        conflicts = 0
        while True:
            current, version = self.get_with_version()
            committed = self.try_set(fn(current), version)
            if committed is not None:
                return committed
            conflicts += 1
            if retries is not None and conflicts > retries:
                raise StateVersionError(
                    version,
                    self.version,
                    f"update gave up after {retries} retr{'y' if retries == 1 else 'ies'}: "
                    f"the store kept moving (last conflict at version {version})",
                )

    def _commit(self, value: T, expected_version: int | None, *, count_conflict: bool) -> int:
        """The commit; returns the new version. ``StateVersionError`` on a conflict."""
        if not self._writable:  # read-only handles are never writable: one check on the hot path
            self._check_open()
            if self._segment.readonly:
                raise self._readonly_error()
            if self._info.flags & FLAG_REPLICA:
                raise self._replica_error()
            raise StateStoreError(
                f"store {self.name!r} holds {self._info.type_name}; open it with that type "
                "to write (an untyped handle could publish values its readers cannot decode)"
            )
        # This is the hot path of set(): msgspec's own calls, no wrapper frames.
        try:
            data = self._raw_encode(value)
        except ENCODE_ERRORS as exc:
            raise self._codec.encode_failure(value, exc) from exc
        if len(data) > self._max_value_size:
            raise SnapshotTooLargeError(
                f"encoded value is {len(data)} bytes; store {self.name!r} holds at most "
                f"{self._max_value_size} bytes (its max_value_size)"
            )
        try:
            checked = self._raw_decode(data)
        except VALIDATE_ERRORS as exc:
            raise self._codec.validate_failure(exc) from exc
        lock = self._lock
        words = self._words
        with self._in_use:
            if self._closed:
                raise self._closed_error()
            if self._exclusive:
                return self._commit_exclusively(data, checked, expected_version, count_conflict)
            try:
                # Inside the try: an interrupt right after the lock call returns must still
                # release it (release() is a no-op for a lock this thread does not hold).
                rc = lock.try_acquire()
                if rc:
                    self._acquire_contended(rc)
                version = self._publish(data, expected_version, count_conflict)
            finally:
                lock.release()  # also the barrier between publishing HEAD and notify()
            self._cache = (version, checked)
            if words[W_REG_HIGH]:
                self._registry.notify()
            return version

    def _publish(self, data: bytes, expected_version: int | None, count_conflict: bool) -> int:
        """Steps of a commit after the writer lock is held: follow or make a move, check the
        version, write the slot, publish HEAD. Returns the new version."""
        words = self._words
        ring = self._ring
        if words[W_GENERATION] != ring.generation:
            self._follow_move()  # another process grew the store
            ring = self._ring
        head = words[W_HEAD]
        if head >= MAX_VERSION:
            raise CorruptStoreError(
                f"store {self.name!r}: header says version {head}: the header is damaged"
            )
        if expected_version is not None and head != expected_version:
            if count_conflict:
                ring.count_conflict()
            raise StateVersionError(expected_version, head)
        if len(data) > ring.capacity:
            self._grow(len(data))
            ring = self._ring
        return ring.commit(data, time.time_ns())

    def _commit_exclusively(
        self, data: bytes, checked: T, expected_version: int | None, count_conflict: bool
    ) -> int:
        """A commit of the exclusive writer: its keeper thread holds the writer lock already,
        and ``_in_use`` (held by the caller) serializes this handle's threads."""
        version = self._publish(data, expected_version, count_conflict)
        # The full barrier between publishing HEAD and reading the registry, which releasing
        # the writer lock gives other writers (see _registry): an uncontended lock round trip
        # is a locked read-modify-write.
        self._fence.acquire()
        self._fence.release()
        self._cache = (version, checked)
        if self._words[W_REG_HIGH]:
            self._registry.notify()
        return version

    def _acquire_contended(self, rc: int) -> None:
        """The writer lock was not free at once (``rc`` from ``try_acquire``): wait for it, or
        raise if an exclusive writer keeps it. Returns holding it."""
        lock = self._lock
        words = self._words
        while rc in _LOCK_NOT_YET:
            holder = int(words[W_EXCLUSIVE])
            if holder:
                rc = lock.try_acquire()  # free now only if that writer is gone
                if rc == errno.EBUSY:
                    raise StateStoreError(
                        f"store {self.name!r} has an exclusive writer (pid {holder}), which "
                        "keeps the writer lock for as long as it has the store open"
                    )
            else:
                rc = lock.acquire_for(_CONTENDED_SLICE)
        if rc:
            lock.recover(rc)
        if words[W_EXCLUSIVE]:
            words[W_EXCLUSIVE] = 0  # we hold the lock: the exclusive writer is gone

    @contextlib.contextmanager
    def _writer_locked(self) -> Iterator[None]:
        """The writer lock for the slow paths (counters); the exclusive writer has it."""
        if self._exclusive:
            yield
            return
        try:
            rc = self._lock.try_acquire()
            if rc:
                self._acquire_contended(rc)
            yield
        finally:
            self._lock.release()

    def keep_writer_lock(self) -> Store[T]:
        """Make this handle the store's exclusive writer: it takes the writer lock now and keeps
        it until :meth:`close`, so its commits skip the lock (the largest fixed cost of
        ``set()``). Other handles' ``set()`` then raise :class:`StateStoreError` naming this
        process; if it dies, even by SIGKILL, the kernel releases the lock and the next writer
        carries on. Raises :class:`StateStoreError` if another handle keeps the lock already.
        Returns the handle, for ``Store.open(...).keep_writer_lock()``.

        A keeper thread holds the lock, because the robust mutex belongs to the thread that
        locked it: the keeper lives as long as the handle, whichever thread opened it, and any
        thread of this handle may commit (``_in_use`` serializes them)."""
        with self._in_use:
            self._check_open()
            if self._segment.readonly:
                raise self._readonly_error()
            if not self._writable:
                raise StateStoreError(f"store {self.name!r}: this handle may not write")
            if self._keeper is None:
                self._start_keeper()
        return self

    @property
    def keeps_writer_lock(self) -> bool:
        """Whether this handle is the store's exclusive writer (:meth:`keep_writer_lock`)."""
        return self._exclusive

    def _start_keeper(self) -> None:
        taken = threading.Event()
        failure: list[BaseException] = []
        done = threading.Event()

        def keep() -> None:
            try:
                with self._writer_locked():
                    self._words[W_EXCLUSIVE] = os.getpid()
                    taken.set()
                    done.wait()
                    self._words[W_EXCLUSIVE] = 0
            except BaseException as exc:
                failure.append(exc)
                taken.set()

        keeper = threading.Thread(target=keep, name=f"shmstore-writer-{self.name}", daemon=True)
        keeper.start()
        taken.wait()
        if failure:
            keeper.join()
            raise failure[0]
        self._exclusive = True
        self._keeper = (keeper, done)

    def _let_go_of_writer_lock(self) -> None:
        if self._keeper is not None:
            keeper, done = self._keeper
            self._keeper = None
            self._exclusive = False
            done.set()
            keeper.join()

    # ---------------------------------------------------------------- checkpoints

    def checkpoint(self, path: str | os.PathLike[str]) -> int:
        """Save the newest value, its version and the schema fingerprint to *path*, atomically
        (temporary file, ``fsync``, rename). Returns the version saved. Raises
        :class:`StateStoreError` while the store is empty and :class:`CheckpointError` if the
        file cannot be written (missing directory, no permission, disk full)."""
        # Serialized per handle, with the value read inside: of two checkpoints racing to the
        # same path, the one renamed last is always the newer.
        with self._checkpoint_lock, self._in_use:
            self._check_open()
            payload, version, _ts = self._read_newest()
            if payload is None:
                raise StateStoreError(f"store {self.name!r} is empty: nothing to checkpoint")
            payload = bytes(payload)  # out of the mapping (and any shared buffer) before I/O
        try:
            write_checkpoint(
                path,
                fingerprint=self._info.fingerprint,
                type_name=self._info.type_name,
                version=version,
                payload=payload,
            )
        except OSError as exc:
            raise CheckpointError(
                f"cannot write checkpoint {str(path)!r}: {exc.strerror or exc}"
            ) from exc
        return version

    # ---------------------------------------------------------------- statistics

    def statistics(self) -> StoreStatistics:
        """A frozen snapshot of the store's counters and of this handle's, read at one moment:
        ``commits`` and ``last_update_ns`` belong to the same ``version``."""
        with self._in_use:
            self._check_open()
            entries = self._registry.entries()
            writer_lock_held = self._lock.held_elsewhere()
            geometry = self._info.geometry
            version, commits, last_update_ns = self._ring.consistent_counters()
            conflicts = self._ring.conflicts()
            growths = int(self._words[W_GENERATION])  # under _in_use: close() releases it
            removed = self._segment.removed()
            mirror = self._mirror_statistics()
        return StoreStatistics(
            name=self.name,
            type_name=self._info.type_name,
            fingerprint=self._info.fingerprint.hex(),
            version=version,
            commits=commits,
            conflicts=conflicts,
            last_update_ns=last_update_ns,
            created_ns=self._info.created_ns,
            slots=geometry.slots,
            slot_size=self._ring.capacity,
            max_readers=geometry.registry_capacity,
            readers_registered=len(entries),
            readers_alive=sum(alive for _i, _pid, alive in entries),
            writer_lock_held=writer_lock_held,
            lag=max(0, version - self._cache[0]),
            reads=self._ring.reads,
            retries=self._ring.retries,
            max_value_size=self._info.max_value_size,
            growths=growths,
            readonly=self._segment.readonly,
            wait_mode=self._gate.mode,
            removed=removed,
            **mirror,
            late_wakeups=self._gate.late_wakeups,
        )

    # ---------------------------------------------------------------- counters

    @property
    def commits(self) -> int:
        """Commits made by every process since the store was created."""
        with self._in_use:  # like every read of the mapping that could race close()
            self._check_open()
            return self._ring.commits()

    @property
    def conflicts(self) -> int:
        """``set(expected_version=...)`` calls refused, by every process."""
        with self._in_use:
            self._check_open()
            return self._ring.conflicts()

    @property
    def last_update_ns(self) -> int:
        """Wall-clock time of the newest commit (ns since the epoch), 0 while empty."""
        with self._in_use:
            self._check_open()
            return self._ring.last_update_ns()

    @property
    def created_ns(self) -> int:
        return self._info.created_ns

    @property
    def app_counters(self) -> AppCounters:
        """Shared counters for layers above the store; see :class:`AppCounters`."""
        return self._app_counters

    def _app_counter(self, index: int) -> int:
        word = app_counter_word(index)
        with self._in_use:
            self._check_open()
            return int(self._words[word])

    def _increment_app_counter(self, index: int) -> int:
        word = app_counter_word(index)
        with self._in_use:
            self._check_open()
            if self._segment.readonly:
                raise self._readonly_error()
            with self._writer_locked():  # a read-modify-write of a shared word
                self._words[word] += 1
                return int(self._words[word])

    def reclaim_dead_readers(self) -> int:
        """Free the registry entries (and semaphores) of readers whose process died; returns
        how many. Happens by itself on registrations and commits; this is for tools."""
        with self._in_use:
            self._check_open()
            if self._segment.readonly:
                raise self._readonly_error()
            return self._registry.sweep()

    # ---------------------------------------------------------------- lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Detach this process from the store. The store itself stays; see :meth:`unlink`.
        Threads and coroutines waiting on this handle get :class:`StateStoreError`."""
        if self._closed:
            return
        self._gate.close()  # wakes this handle's sleeping threads and its coroutines first
        with self._in_use:
            if self._closed:
                return
            self._let_go_of_writer_lock()
            self._closed = True
            _live_handles.discard(self)
            self._registry.close()
            self._lock.close()
            for ring, segment in [*self._retired, (self._ring, self._ring_segment)]:
                ring.release()
                if segment is not None:
                    segment.close()
            self._retired.clear()
            self._segment.close()

    def unlink(self) -> None:
        """Remove the store's names for everyone. Attached handles keep working until closed;
        no new handle can open it. Raises :class:`StorePermissionError` on a read-only handle
        (``shmstore.remove(name)`` removes what the OS lets this user remove)."""
        if self._segment.readonly:
            raise self._readonly_error()
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

    def _readonly_error(self) -> StorePermissionError:
        return StorePermissionError(
            errno.EACCES,
            f"store {self.name!r} is open read-only: this handle cannot write "
            "(open it with write access, which the store's mode must grant this user)",
        )

    def _closed_error(self) -> StateStoreError:
        return StateStoreError(f"store {self.name!r} is closed")

    def _after_fork_in_child(self) -> None:
        self._pid = os.getpid()
        # The keeper thread did not come along: the parent is still the exclusive writer.
        self._exclusive = False
        self._keeper = None
        self._fence = threading.Lock()
        self._in_use = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        try:
            self._segment.reopen()
            self._lock.after_fork_in_child(self._segment.fd)
            self._registry.after_fork_in_child(self._segment.fd)
            self._gate.after_fork_in_child()
        except StoreNotFoundError:
            # Unlinked before the fork: reads still work on the inherited mapping, but this child
            # must not write under the parent's lock, so it gets no writer lock at all.
            self._writable = False

    # ---------------------------------------------------------------- mirror (shmstore.mirror)
    #
    # Nothing above depends on the mirror except the replica refusal in _commit() and the mirror
    # fields of statistics(); the hooks the publisher and follower use are MirrorHooks, below.

    @property
    def mirror_status(self) -> MirrorStatus:
        """The header's mirror block: role (``"origin"``, ``"replica"`` or ``""``), whether the
        mirror is connected, its last sync, how far behind it is, its bucket and origin."""
        with self._in_use:  # it reads the mapping in several steps: not under close()
            return self._mirror_status_locked()

    def _mirror_status_locked(self) -> MirrorStatus:
        self._check_open()
        words = self._words
        state = int(words[W_MIRROR_STATE])
        pid = int(words[W_MIRROR_PID])
        if self._info.flags & FLAG_REPLICA:
            role = "replica"
        elif state & MIRROR_ROLE_MASK == MIRROR_ROLE_ORIGIN:
            role = "origin"
        else:
            role = ""
        m = self._segment.map
        return MirrorStatus(
            role=role,
            connected=bool(state & MIRROR_CONNECTED) and pid != 0 and pid_alive(pid),
            pid=pid,
            last_sync_ns=int(words[W_MIRROR_SYNC]),
            behind=int(words[W_MIRROR_BEHIND]),
            bucket=read_text_field(m, OFF_MIRROR_BUCKET, MIRROR_BUCKET_FIELD) if role else "",
            origin=read_text_field(m, OFF_MIRROR_ORIGIN, MIRROR_ORIGIN_FIELD) if role else "",
        )

    def _mirror_statistics(self) -> dict[str, Any]:
        status = self._mirror_status_locked()  # statistics() holds _in_use
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


class MirrorHooks:
    """What ``shmstore.mirror``'s publisher and follower do to a store beyond the public API:
    create a replica, read the newest value's encoded bytes, commit the origin's bytes at the
    origin's version, and keep the header's mirror block. One mirroring process per store
    writes the mirror block; commits to a replica are serialized by the writer lock as usual.
    Raises :class:`StateStoreError` on a closed handle."""

    __slots__ = ("store",)

    def __init__(self, store: Store[Any]) -> None:
        self.store = store

    @staticmethod
    def create_replica(
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
        max_value_size: int | None = None,
    ) -> Store[Any]:
        """Create the store *name* as a replica of the store *origin* mirrored through NATS
        bucket *bucket*. It records the origin's schema *fingerprint* and *type_name*, so that
        readers open it with the origin's type and the usual schema check, and it refuses
        ``set()`` in every process: only :meth:`commit_replicated` writes to it. The returned
        handle decodes to builtins. Raises like :meth:`Store.create`."""
        options = CreateOptions(
            slots, slot_size, max_readers, None, mode, "auto", None, max_value_size
        )
        return Store(
            _provision.create_replica(
                name,
                fingerprint=fingerprint,
                type_name=type_name,
                origin=origin,
                bucket=bucket,
                options=options,
            )
        )

    @property
    def fingerprint(self) -> bytes:
        """The 16-byte schema fingerprint recorded in the store's header."""
        return self.store._info.fingerprint

    def get_encoded(self) -> tuple[bytes, int, int]:
        """The newest value as the encoded bytes in the ring, with its version and commit time
        (ns since the epoch); ``(b"", 0, 0)`` while empty. Mirroring needs no decode and
        re-encode round trip."""
        store = self.store
        with store._in_use:
            store._check_open()
            payload, version, ts_ns = store._read_newest()
            if payload is None:
                return b"", 0, 0
            return bytes(payload), version, ts_ns

    def commit_replicated(self, payload: bytes, version: int, commit_ns: int) -> int:
        """Commit the origin's encoded *payload* as the origin's *version* (with the origin's
        commit time *commit_ns*) into this replica; return *version*.

        *version* must be greater than the replica's version; versions in between may be
        skipped (latest-value semantics): subscribers then get :class:`SubscriberLaggedError`
        with the exact number skipped, as for a lap of the ring, because the slots of skipped
        versions never held them. Raises :class:`StateStoreError` if the store is not a
        replica, :class:`StateVersionError` (nothing written) if *version* is not newer,
        ``ValueError`` for an impossible version, :class:`SnapshotTooLargeError` if the payload
        does not fit a slot and :class:`InvalidSnapshotError` if it does not decode.
        """
        store = self.store
        if not store._info.flags & FLAG_REPLICA:
            store._check_open()
            raise StateStoreError(f"store {store.name!r} is not a replica")
        if not 0 < version < MAX_VERSION:
            raise ValueError(f"a replicated version is between 1 and {MAX_VERSION}, got {version}")
        if len(payload) > store._max_value_size:
            raise SnapshotTooLargeError(
                f"replicated value is {len(payload)} bytes; replica {store.name!r} holds at "
                f"most {store._max_value_size} bytes (its max_value_size)"
            )
        data = bytes(payload)
        checked = store._codec.validate(data)
        lock = store._lock
        words = store._words
        with store._in_use:
            if store._closed:
                raise store._closed_error()
            try:
                # Inside the try, as in _commit: an interrupt right after the lock call returns
                # must still release it. (A replica has no exclusive writer: its handles may
                # not write, so none can keep the lock.)
                rc = lock.try_acquire()
                if rc:
                    store._acquire_contended(rc)
                ring = store._ring
                if words[W_GENERATION] != ring.generation:
                    store._follow_move()  # another process grew the replica
                    ring = store._ring
                head = int(words[W_HEAD])
                if version > head:
                    if len(data) > ring.capacity:
                        store._grow(len(data))  # the origin's values grew: so do the slots
                        ring = store._ring
                    ring.commit_at(version, data, commit_ns)
            finally:
                lock.release()  # also the barrier between publishing HEAD and notify()
            if version <= head:
                raise StateVersionError(
                    version - 1,
                    head,
                    f"replicated version {version} is not newer than replica {store.name!r} "
                    f"at version {head}",
                )
            store._cache = (version, checked)
            if store._words[W_REG_HIGH]:
                store._registry.notify()
            return version

    def claim(self, bucket: str) -> None:
        """Record this process as the store's mirroring process; on an origin, also mark the
        store as the origin mirrored through NATS bucket *bucket*. Starts "disconnected"."""
        store = self.store
        with store._in_use:
            store._check_open()
            m = store._segment.map
            if not store._info.flags & FLAG_REPLICA:
                m[OFF_MIRROR_BUCKET : OFF_MIRROR_BUCKET + MIRROR_BUCKET_FIELD] = text_field(
                    bucket, MIRROR_BUCKET_FIELD
                )
                m[OFF_MIRROR_ORIGIN : OFF_MIRROR_ORIGIN + MIRROR_ORIGIN_FIELD] = text_field(
                    store.name, MIRROR_ORIGIN_FIELD
                )
            store._words[W_MIRROR_PID] = os.getpid()
        self.set_status(connected=False)

    def set_status(
        self, *, connected: bool, last_sync_ns: int | None = None, behind: int | None = None
    ) -> None:
        """Record the mirror's state in the header; *last_sync_ns* and *behind* stay as they
        are when ``None``. Each word is one aligned store: readers never see half of one."""
        store = self.store
        with store._in_use:
            store._check_open()
            words = store._words
            replica = store._info.flags & FLAG_REPLICA
            role = MIRROR_ROLE_REPLICA if replica else MIRROR_ROLE_ORIGIN
            if last_sync_ns is not None:
                words[W_MIRROR_SYNC] = last_sync_ns
            if behind is not None:
                words[W_MIRROR_BEHIND] = max(0, behind)
            words[W_MIRROR_STATE] = role | (MIRROR_CONNECTED if connected else 0)


def remove(name: str) -> bool:
    """Remove every OS object of store *name* (segment and reader semaphores) for everyone.
    ``False`` if there was no segment. Attached handles keep working until they close.
    Raises :class:`StorePermissionError` for another user's store."""
    return _provision.remove(name)


def _after_fork_in_child() -> None:
    for handle in list(_live_handles):
        handle._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
