"""One process's attachment to one store: the mapping and everything built on it, and its life.

``Store`` is the API; this is what a handle holds underneath, shared by the layers beside the
store's own operations (replication, statistics) through the public names below:

- the segment, the header it was validated against (``info``) and the codec;
- the **rings**: the current one, the rings the store grew out of (kept mapped until close:
  another thread of this handle may still be reading one), following a move made by another
  handle (:meth:`follow_move`) and making one (:meth:`grow`); the protocol is ``_growth``'s;
- the writer lock and how this handle takes it (``writer``, a :class:`WriterSide`);
- the reader registry and the wait gate;
- the store's recorded types (``record``, see ``_schemarecord``), re-read after an evolution,
  and adopting a new one under the writer lock;
- ``in_use``, held by whatever touches the mapping in more than one step (a commit from its lock
  to its notifications, statistics, close): the writer mutex lives in the mapping, so
  :meth:`close` must not unmap it under a thread that is using it;
- closing, and what a forked child must redo.

``Store`` keeps its own references to the objects its hot paths use (the header words, the
current ring, the lock): one attribute load fewer per call. Its ring may then lag behind
``ring`` here when another layer followed a move first; that is harmless by the growth protocol
itself (a read of an old ring fails its seqlock check and follows, and every commit compares
GENERATION with its ring under the writer lock).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any, Final

from . import _schemarecord
from ._codec import Codec
from ._errors import CorruptStoreError, StateStoreError, StoreNotFoundError, StorePermissionError
from ._growth import grow, next_capacity, open_generation
from ._layout import (
    FLAG_CRC,
    FLAG_REPLICA,
    FLAG_ROBUST_MUTEX,
    OFF_MUTEX,
    W_CREATOR_PIDNS,
    W_GENERATION,
    W_HEAD,
    W_SCHEMA,
)
from ._provision import Attached
from ._registry import Registry
from ._ring import Ring, RingMoved
from ._segment import Segment
from ._waiting import WaitGate
from ._writelock import (
    FlockLock,
    ForeignLock,
    ReadOnlyLock,
    RobustMutexLock,
    WriteLock,
    foreign_namespace_message,
    pid_namespace,
)
from ._writer import WriterSide

__all__ = ["Attachment"]

_FOLLOW_TRIES: Final = 100


class Attachment:
    """What one handle holds of one store (see module)."""

    __slots__ = (
        "closed",
        "codec",
        "foreign_namespace",
        "gate",
        "gid",
        "in_use",
        "info",
        "lock",
        "mirror_claimed",
        "mode",
        "move_lock",
        "name",
        "private",
        "record",
        "registry",
        "retired",
        "ring",
        "ring_segment",
        "segment",
        "words",
        "writable",
        "writer",
    )

    def __init__(self, attached: Attached) -> None:
        segment, info = attached.segment, attached.info
        self.segment = segment
        self.info = info
        self.name = segment.name
        self.codec: Codec[Any] = attached.codec
        # A replica (shmstore.mirror) takes commits only from its follower.
        self.writable = attached.writable and not info.flags & FLAG_REPLICA
        self.private = attached.private
        self.ring = Ring(
            segment.map,
            info.geometry,
            crc=bool(info.flags & FLAG_CRC),
            reuse_buffer=not self.codec.aliases_input,
        )
        self.retired: list[tuple[Ring, Segment | None]] = []
        self.ring_segment: Segment | None = None  # the current ring's own segment (not gen 0)
        self.move_lock = threading.Lock()
        self.mode = segment.mode()
        self.gid = segment.group()  # grown rings get the store's mode and group
        self.words = self.ring.words
        self.lock: WriteLock
        #: Set when this process may not write because it is in another PID namespace than
        #: the creator of a robust-mutex store (see _writelock, "ForeignLock").
        self.foreign_namespace = False
        if segment.readonly:  # a read-only mapping: the lock cannot be taken, only looked at
            mutex_at = OFF_MUTEX if info.flags & FLAG_ROBUST_MUTEX else None
            self.lock = ReadOnlyLock(segment.map, mutex_at, segment.fd, segment.name)
        elif info.flags & FLAG_ROBUST_MUTEX:
            creator, here = int(self.words[W_CREATOR_PIDNS]), pid_namespace()
            if creator and here and creator != here:
                self.foreign_namespace = True
                self.writable = False
                self.lock = ForeignLock(segment.map, OFF_MUTEX, segment.fd, segment.name)
            else:
                self.lock = RobustMutexLock(segment.map, OFF_MUTEX, segment.name)
        else:
            self.lock = FlockLock(segment.fd)
        self.writer = WriterSide(self.lock, self.words, segment.name)
        self.registry = Registry(
            self.words,
            info.geometry,
            segment.name,
            self.lock,
            created_ns=info.created_ns,
            fd=segment.fd,
            mode=self.mode,
            gid=self.gid,
        )
        # A read-only handle cannot register (that writes the segment): it polls.
        self.gate = WaitGate(
            self.version_or_closed, self.registry, segment.name, poll=segment.readonly
        )
        self.closed = False
        self.in_use = threading.Lock()
        #: Whether this handle holds the mirror's liveness lock (``_replication``'s claim).
        self.mirror_claimed = False
        self.record: _schemarecord.SchemaRecord | None = attached.record

    # ---------------------------------------------------------------- state and errors

    def version_or_closed(self) -> int:
        """HEAD, or :class:`StateStoreError` once this handle is closed."""
        try:
            return self.words[W_HEAD]
        except ValueError:
            raise self.closed_error() from None

    def check_open(self) -> None:
        if self.closed:
            raise self.closed_error()

    def closed_error(self) -> StateStoreError:
        return StateStoreError(f"store {self.name!r} is closed")

    def foreign_namespace_error(self) -> StorePermissionError:
        return StorePermissionError(errno.EPERM, foreign_namespace_message(self.name))

    def readonly_error(self) -> StorePermissionError:
        return StorePermissionError(
            errno.EACCES,
            f"store {self.name!r} is open read-only: this handle cannot write "
            "(open it with write access, which the store's mode must grant this user)",
        )

    @property
    def replica(self) -> bool:
        """Whether the store is a replica (``shmstore.mirror``): only its follower commits."""
        return bool(self.info.flags & FLAG_REPLICA)

    # ---------------------------------------------------------------- rings

    def follow_move(self) -> Ring:
        """Map the ring the store grew into (see ``_growth``); returns the current ring."""
        with self.move_lock:
            for _ in range(_FOLLOW_TRIES):
                generation = int(self.words[W_GENERATION])
                if generation == self.ring.generation:
                    return self.ring
                if self.private:
                    break  # only this handle can grow a private store: it never lags
                try:
                    ring, segment = open_generation(
                        self.segment.map,
                        self.info.geometry,
                        self.name,
                        self.info.created_ns,
                        generation,
                        crc=bool(self.info.flags & FLAG_CRC),
                        reuse_buffer=not self.codec.aliases_input,
                        readonly=self.segment.readonly,
                    )
                except StoreNotFoundError:
                    continue  # a newer move removed it meanwhile: read GENERATION again
                self._retire(ring, segment)
                return ring
        raise CorruptStoreError(
            f"store {self.name!r} moved to ring generation {int(self.words[W_GENERATION])}, "
            "which cannot be found"
        )

    def grow(self, needed: int) -> Ring:
        """Move the store to a ring whose slots hold *needed* bytes; returns it. The caller holds
        the writer lock and ``in_use``."""
        with self.move_lock:
            ring, segment = grow(
                self.segment.map,
                self.info.geometry,
                self.ring,
                name=self.name,
                created_ns=self.info.created_ns,
                capacity=next_capacity(self.ring.capacity, needed, self.info.max_value_size),
                mode=self.mode,
                group=self.gid,
                crc=bool(self.info.flags & FLAG_CRC),
                reuse_buffer=not self.codec.aliases_input,
                private=self.private,
            )
            self._retire(ring, segment)
            return ring

    def _retire(self, ring: Ring, segment: Segment) -> None:
        self.retired.append((self.ring, self.ring_segment))
        self.ring, self.ring_segment = ring, segment

    def read_newest(self) -> tuple[bytes | memoryview | None, int, int]:
        """The newest slot's payload (a view into the mapping or a reused buffer: copy it before
        the next read), its version and commit time, following moves."""
        while True:
            try:
                return self.ring.read_newest()
            except RingMoved:
                self.follow_move()

    # ---------------------------------------------------------------- recorded types

    def current_record(self) -> _schemarecord.SchemaRecord:
        """The store's recorded types, re-read when an evolution happened since (a closed
        handle answers with the last it read)."""
        with self.in_use:
            if self.closed and self.record is not None:
                return self.record
            self.check_open()
            record = self.record
            if record is None or (
                not self.private and record.generation != int(self.words[W_SCHEMA])
            ):
                record = _schemarecord.load(self.words, self.name, self.info)
                self.record = record
            return record

    def load_record(self) -> _schemarecord.SchemaRecord:
        """The record in force now, read from shared memory (the caller holds the writer
        lock, so no evolution can race it)."""
        record = self.record = _schemarecord.load(self.words, self.name, self.info)
        return record

    def adopt_schema(
        self,
        successor: Callable[[_schemarecord.SchemaRecord], _schemarecord.SchemaRecord | None],
    ) -> _schemarecord.SchemaRecord:
        """Under the writer lock, make ``successor(current record)`` the store's record (publish
        it, then store SCHEMA, then remove the old one; see ``_schemarecord``); ``None`` keeps
        the current one. Returns the record in force."""
        with self.in_use:
            self.check_open()
            if self.segment.removed():  # records are named after the store: not ours now
                raise StateStoreError(
                    f"store {self.name!r} was removed: this handle's store is orphaned, and "
                    "cannot record a new type under its old name"
                )
            with self.writer.locked():
                current = _schemarecord.load(self.words, self.name, self.info)
                record = successor(current)
                if record is None:
                    record = current
                else:
                    _schemarecord.publish(
                        self.name, self.info.created_ns, record, mode=self.mode, group=self.gid
                    )
                    self.words[W_SCHEMA] = record.generation  # published: now it is current
                    _schemarecord.retire(self.name, self.info.created_ns, current.generation)
                self.record = record
                return record

    # ---------------------------------------------------------------- life

    def close(self, before_unmap: Callable[[], None]) -> bool:
        """Detach: wake this handle's waiters, then (under ``in_use``) run *before_unmap* and
        release the registry, the lock and every mapping. ``False`` if already closed."""
        if self.closed:
            return False
        self.gate.close()  # wakes this handle's sleeping threads and its coroutines first
        with self.in_use:
            if self.closed:
                return False
            self.writer.let_go()
            self.closed = True
            before_unmap()
            self.registry.close()
            self.lock.close()
            for ring, segment in [*self.retired, (self.ring, self.ring_segment)]:
                ring.release()
                if segment is not None:
                    segment.close()
            self.retired.clear()
            self.segment.close()
        return True

    def after_fork_in_child(self) -> None:
        """Redo, in a forked child, what the fork did not bring along: the locks other threads
        may have held, the descriptors the kernel's locks hang on, the keeper thread."""
        self.writer.after_fork_in_child()
        self.in_use = threading.Lock()
        self.mirror_claimed = False  # the lock stays with the parent's open file description
        try:
            self.segment.reopen()
            self.lock.after_fork_in_child(self.segment.fd)
            self.registry.after_fork_in_child(self.segment.fd)
            self.gate.after_fork_in_child()
        except StoreNotFoundError:
            # Unlinked before the fork: reads still work on the inherited mapping, but this child
            # must not write under the parent's lock, so it gets no writer lock at all.
            self.writable = False
