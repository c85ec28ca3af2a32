"""``Store[T]``: a typed, versioned value shared by processes through one shared-memory segment.

A store is a :class:`~shmstore._handle.Handle` -- reading, waiting, counting, closing -- plus
what this module adds: making, opening and removing stores (the work is ``_provision``'s), and
writing. The commit of ``set()`` is the write side's hot path and stays here in one frame;
how a handle takes the writer lock beyond the commit's own try (contention, the exclusive writer)
is ``_writer``'s. Writes encode and validate outside the lock and hold it only for the
compare-and-set and one memcpy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Final, Literal, TypeVar, overload

from . import _provision
from ._checkpoint import write_checkpoint
from ._codec import ENCODE_ERRORS, VALIDATE_ERRORS
from ._counters import AppCounters
from ._errors import (
    CheckpointError,
    CorruptStoreError,
    SchemaMismatchError,
    SnapshotTooLargeError,
    StateStoreError,
    StateVersionError,
    StoreExistsError,
    StoreNotFoundError,
)
from ._evolve import CheckedCodec, evolve_locked, follow_schema
from ._handle import Handle
from ._layout import W_GENERATION, W_HEAD, W_REG_HIGH, W_SCHEMA
from ._provision import (
    DEFAULT_MAX_READERS,
    DEFAULT_SLOT_SIZE,
    DEFAULT_SLOTS,
    Attached,
    CreateOptions,
)
from ._replication import MAX_VERSION, replica_error

__all__ = ["AppCounters", "Store", "remove"]

T = TypeVar("T")
WriterLockKind = Literal["auto", "mutex", "flock"]

_OPEN_OR_CREATE_TRIES: Final = 5


class Store(Handle[T]):
    """A typed value in shared memory: one writer at a time, any number of lock-free readers.

    Make one with :meth:`create`, :meth:`open`, :meth:`open_or_create` or :meth:`private`;
    ``close()`` detaches this process, ``unlink()`` removes the store for everyone. A handle may
    be shared by the threads of one process.
    """

    # What only writing uses; the rest is the Handle's (see there why slots).
    __slots__ = ("_lock", "_max_value_size", "_raw_encode", "_schema_gen", "_writer")

    def __init__(self, attached: Attached) -> None:
        super().__init__(attached)
        att = self._att
        self._lock = att.lock
        self._writer = att.writer
        self._raw_encode = self._codec.raw_encode
        self._max_value_size = att.info.max_value_size
        # The schema generation this handle writes as (see _evolve): a commit compares it with
        # the header's SCHEMA word under the writer lock.
        self._schema_gen = attached.schema_generation
        if isinstance(self._codec, CheckedCodec):
            self._raw_encode = self._checked_encode
        if attached.evolve:
            try:
                self._evolve()
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
        also wait and write; see docs/permissions.md.

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
        evolve: bool = ...,
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
        evolve: bool = ...,
    ) -> Store[Any]: ...

    @classmethod
    def open(
        cls,
        name: str,
        type: Any = None,
        *,
        allow_other_owner: bool = False,
        readonly: bool | None = None,
        evolve: bool = False,
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

        A *type* the store had before an evolution opens to read (its ``set()`` is refused).
        ``evolve=True`` records a different *type* as the store's new type if it is a compatible
        successor of every type the store has had (:class:`SchemaMismatchError` naming the
        field and the rule otherwise, and nothing changes); see the docs' "Changing a store's
        type". Without a *type*, writes to a typed store are checked against its recorded type.

        Raises :class:`StoreNotFoundError` if there is no such store,
        :class:`StorePermissionError` if the OS refuses the access asked for, and
        :class:`CorruptStoreError` if the segment is not a valid store.
        """
        return cls(
            _provision.attach(
                name, type, allow_other_owner=allow_other_owner, readonly=readonly, evolve=evolve
            )
        )

    @overload
    @classmethod
    def open_or_create(
        cls,
        name: str,
        type: type[T],
        *,
        allow_other_owner: bool = ...,
        evolve: bool = ...,
        **create_options: Any,
    ) -> Store[T]: ...

    @overload
    @classmethod
    def open_or_create(
        cls,
        name: str,
        type: Any = ...,
        *,
        allow_other_owner: bool = ...,
        evolve: bool = ...,
        **create_options: Any,
    ) -> Store[Any]: ...

    @classmethod
    def open_or_create(
        cls,
        name: str,
        type: Any = Any,
        *,
        allow_other_owner: bool = False,
        evolve: bool = False,
        **create_options: Any,
    ) -> Store[Any]:
        """Open store *name*, creating it with *create_options* (those of :meth:`create`) if it
        does not exist. Race-free: of many processes starting at once exactly one creates the
        store, and the others open that store (waiting for its creation to finish). An existing
        store keeps its own geometry; its type must match (:class:`SchemaMismatchError`), or,
        with *evolve*, be a compatible successor (see :meth:`open`)."""
        last: StateStoreError | None = None
        for _ in range(_OPEN_OR_CREATE_TRIES):
            try:
                return cls.create(name, type, **create_options)
            except StoreExistsError as exc:
                last = exc
            try:
                return cls.open(name, type, allow_other_owner=allow_other_owner, evolve=evolve)
            except StoreNotFoundError as exc:
                last = exc  # removed between our create and our open: try again
        raise StateStoreError(f"could not create or open store {name!r}: {last}") from last

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
            raise self._write_refusal()
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
            if self._att.closed:
                raise self._att.closed_error()
            if self._writer.exclusive:
                return self._commit_exclusively(data, checked, expected_version, count_conflict)
            try:
                # Inside the try: an interrupt right after the lock call returns must still
                # release it (release() is a no-op for a lock this thread does not hold).
                rc = lock.try_acquire()
                if rc:
                    self._writer.acquire_contended(rc)
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
            ring = self._follow_move()  # another process grew the store
        if words[W_SCHEMA] != self._schema_gen:
            self._follow_schema()  # the type evolved: refuses a writer of an older type
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
            ring = self._ring = self._att.grow(len(data))
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
        fence = self._writer.fence
        fence.acquire()
        fence.release()
        self._cache = (version, checked)
        if self._words[W_REG_HIGH]:
            self._registry.notify()
        return version

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
                raise self._att.readonly_error()
            if not self._writable:
                raise self._write_refusal()
            self._writer.keep()
        return self

    def _write_refusal(self) -> StateStoreError:
        """Why this handle may not write (closed, read-only, a replica, another container)."""
        self._check_open()
        att = self._att
        if self._segment.readonly:
            return att.readonly_error()
        if att.replica:
            return replica_error(att)
        if att.foreign_namespace:
            return att.foreign_namespace_error()
        return StateStoreError(
            f"store {self.name!r} holds {self._info.type_name}; open it with that type "
            "to write (an untyped handle could publish values its readers cannot decode)"
        )

    @property
    def keeps_writer_lock(self) -> bool:
        """Whether this handle is the store's exclusive writer (:meth:`keep_writer_lock`)."""
        return self._writer.exclusive

    # ---------------------------------------------------------------- evolution

    def _evolve(self) -> None:
        """Record this handle's type as the store's successor type (``_evolve``)."""
        record = self._att.adopt_schema(
            lambda current: evolve_locked(current, self._codec, self.name)
        )
        self._schema_gen = record.generation

    def _follow_schema(self) -> None:
        """A commit found the store at another schema generation: refuse this stale writer,
        or follow (see ``_evolve.follow_schema``). The caller holds the writer lock."""
        record = self._att.load_record()
        generation, codec = follow_schema(record, self._codec, self._schema_gen, self.name)
        self._schema_gen = generation
        if codec is not None:
            self._codec = codec
            raise SchemaMismatchError(
                f"store {self.name!r} evolved to {record.type_name} while this value was being "
                "written: nothing was written; set it again (it is now checked against the new "
                "type)"
            )

    def _checked_encode(self, value: Any) -> bytes:
        """``raw_encode`` of an untyped handle of a typed store: converts *value* to the
        store's current type (``_evolve.CheckedCodec``), rebuilt after an evolution."""
        if self._words[W_SCHEMA] != self._schema_gen:
            record = self._att.load_record()
            self._codec = CheckedCodec(record)
            self._schema_gen = record.generation
        return self._codec.raw_encode(value)

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
            payload, version, _ts = self._att.read_newest()
            if payload is None:
                raise StateStoreError(f"store {self.name!r} is empty: nothing to checkpoint")
            payload = bytes(payload)  # out of the mapping (and any shared buffer) before I/O
        try:
            record = self._att.current_record()
            write_checkpoint(
                path,
                fingerprint=record.fingerprint,
                type_name=record.type_name,
                version=version,
                payload=payload,
                schema_record=record.encode(),
            )
        except OSError as exc:
            raise CheckpointError(
                f"cannot write checkpoint {str(path)!r}: {exc.strerror or exc}"
            ) from exc
        return version


def remove(name: str) -> bool:
    """Remove every OS object of store *name* (segment and reader semaphores) for everyone.
    ``False`` if there was no segment. Attached handles keep working until they close.
    Raises :class:`StorePermissionError` for another user's store."""
    return _provision.remove(name)
