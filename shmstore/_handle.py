"""``Handle[T]``: a handle on a store -- reading, waiting, counting, and its life.

``Store`` (in ``_store``) is this plus making stores and writing to them. The split follows the
two roles of a process: everything here works on any handle, read-only ones included, and holds
the read side's hot path -- the unchanged and the changed ``get()``, each one frame deep.
What a handle holds underneath, and how it closes and survives a fork, is ``_attachment``'s; the
seqlock read is ``_ring``'s, waiting ``_waiting``'s, statistics ``_counters``'.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from . import _provision
from ._attachment import Attachment
from ._codec import Codec
from ._counters import AppCounters, collect_statistics
from ._errors import CorruptStoreError, StateStoreError
from ._layout import FLAG_CRC, W_HEAD, W_SCHEMA, Geometry
from ._projection import Projection, check_projection
from ._provision import Attached
from ._registry import Waiter
from ._replication import Replication, read_mirror_status
from ._ring import DecodeFailed, Ring, RingMoved
from ._stats import MirrorStatus, ReaderEntry, StoreStatistics
from ._subscription import Subscription

__all__ = ["Handle"]

T = TypeVar("T")
P = TypeVar("P")

_live_handles: weakref.WeakSet[Handle[Any]] = weakref.WeakSet()


class Handle(Generic[T]):
    """A handle on a store, for reading and waiting; :class:`shmstore.Store` adds making
    stores and writing. A handle may be shared by the threads of one process."""

    # Slots, not a __dict__: an attribute load on the hot paths is then one descriptor call
    # (a __dict__ past 30 keys stops sharing keys and costs ~100 instructions more per get()).
    # Most are references to the attachment's parts that the hot paths use: one load each.
    __slots__ = (
        "__weakref__",
        "_app_counters",
        "_att",
        "_cache",
        "_checkpoint_lock",
        "_codec",
        "_gate",
        "_in_place",
        "_in_use",
        "_info",
        "_pid",
        "_raw_decode",
        "_registry",
        "_ring",
        "_segment",
        "_words",
        "_writable",
    )

    # ---------------------------------------------------------------- construction

    def __init__(self, attached: Attached) -> None:
        att = self._att = Attachment(attached)
        self._segment = att.segment
        self._info = att.info
        self._codec: Codec[T] = att.codec
        self._writable = att.writable
        # The current ring, as get() and the commit use it; it may lag behind att.ring when
        # another layer (replication) followed a move first -- harmless, see _attachment.
        self._ring: Ring = att.ring
        self._words = att.words  # HEAD is indexed here directly: a frame cheaper than a method
        self._registry = att.registry
        self._gate = att.gate
        self._in_use = att.in_use
        self._raw_decode = self._codec.raw_decode
        # Decode big payloads straight from the mapping (see Ring.read_newest_value).
        self._in_place = self._codec.decode_in_place and not att.info.flags & FLAG_CRC
        self._cache: tuple[int, T | None] = (0, None)
        self._checkpoint_lock = threading.Lock()
        self._pid = os.getpid()
        self._app_counters = AppCounters(att)
        _live_handles.add(self)
        if self._ring.moved():
            try:
                self._follow_move()  # a store that grew before we opened it
            except BaseException:
                self.close()
                raise

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
        """The name of the store's current type (the one it was created for, or the newest it
        evolved to)."""
        return self._att.current_record().type_name

    @property
    def schema(self) -> dict[str, Any] | None:
        """The structure of the store's current type as JSON-able data (``None`` for a store
        whose type has none to record: custom types, or a replica); see the docs' "Changing a
        store's type"."""
        return self._att.current_record().schema

    @property
    def schema_generation(self) -> int:
        """How many times the store's type evolved: 0 at create, +1 per evolution."""
        with self._in_use:
            self._check_open()
            return int(self._words[W_SCHEMA])

    @property
    def writable(self) -> bool:
        """Whether this handle may write: ``False`` for a read-only handle, a replica (its one
        writer is the replication backend), a handle in another PID namespace than the creator
        of a robust-mutex store (see ``_writelock``), a forked child of a handle whose store was
        removed before the fork, and an untyped handle of a typed store whose type could not be
        recorded (nothing to check its values against: a type with a ``dec_hook``,
        ``msgspec.Raw``). An untyped handle of any other typed store writes, checked against
        the recorded type (see docs/evolution.md)."""
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
                if not self._att.closed:
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
            if not self._att.closed:
                raise
            raise self._closed_error() from None
        if got is None:
            return None
        return (self._decode(got[0], version),)

    # ---------------------------------------------------------------- growing

    def _follow_move(self) -> Ring:
        """Map the ring the store grew into (see ``_growth``); returns it."""
        ring = self._ring = self._att.follow_move()
        return ring

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
        :meth:`wait` (``shmstore.WaitSet`` and ``wait_any``, which sleep on one semaphore for
        several stores): see ``Registry.register`` for *deadline* and *share*. The caller owns
        the entry and gives it back with ``Waiter.close()``; :meth:`close` gives it back first,
        and kicks it. Raises :class:`StateStoreError` if the handle is closed or waits by
        polling."""
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

    # ---------------------------------------------------------------- statistics

    def statistics(self) -> StoreStatistics:
        """A frozen snapshot of the store's counters and of this handle's, read at one moment:
        ``commits`` and ``last_update_ns`` belong to the same ``version``."""
        return collect_statistics(self._att, self._cache[0])

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

    def reclaim_dead_readers(self) -> int:
        """Free the registry entries (and semaphores) of readers whose process died; returns
        how many. Happens by itself on registrations and commits; this is for tools."""
        with self._in_use:
            self._check_open()
            if self._segment.readonly:
                raise self._att.readonly_error()
            return self._registry.sweep()

    def readers(self) -> list[ReaderEntry]:
        """The registry's entries in use, read at one moment (for tools): whether each owner is
        alive comes from its liveness lock, which holds across PID namespaces; its ``pid`` is
        the one it had in its own namespace, a hint for people only."""
        with self._in_use:
            self._check_open()
            return [ReaderEntry(i, pid, alive) for i, pid, alive in self._registry.entries()]

    # ---------------------------------------------------------------- lifecycle

    @property
    def closed(self) -> bool:
        return self._att.closed

    def close(self) -> None:
        """Detach this process from the store. The store itself stays; see :meth:`unlink`.
        Threads and coroutines waiting on this handle get :class:`StateStoreError`."""
        self._att.close(before_unmap=lambda: _live_handles.discard(self))

    def unlink(self) -> None:
        """Remove the store's names for everyone. Attached handles keep working until closed;
        no new handle can open it. A handle whose store was removed already removes only what
        is provably its own, never a new store of the same name. Raises
        :class:`StorePermissionError` on a read-only handle (``shmstore.remove(name)`` removes
        what the OS lets this user remove)."""
        if self._segment.readonly:
            raise self._att.readonly_error()
        if not self._att.closed and self._segment.removed():  # orphaned: the name is another's
            _provision.remove_orphaned(self.name, self._segment.map, self._info)
        else:  # closed, or the name's: remove() leaves a store of another incarnation alone
            _provision.remove(self.name, incarnation=self._info.created_ns)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        att = getattr(self, "_att", None)
        if att is not None and not att.closed and getattr(self, "_pid", None) == os.getpid():
            warnings.warn(
                f"shmstore.Store {self.name!r} was never closed", ResourceWarning, stacklevel=1
            )

    def __repr__(self) -> str:
        state = "closed" if self._att.closed else f"version={self.version}"
        return f"<shmstore.Store {self.name!r} {self._info.type_name} {state}>"

    def _check_open(self) -> None:
        if self._att.closed:
            raise self._att.closed_error()

    def _closed_error(self) -> StateStoreError:
        return self._att.closed_error()

    def _after_fork_in_child(self) -> None:
        self._pid = os.getpid()
        att = self._att
        att.after_fork_in_child()
        self._in_use = att.in_use
        self._writable = att.writable
        self._checkpoint_lock = threading.Lock()

    # ---------------------------------------------------------------- replication

    @property
    def mirror_status(self) -> MirrorStatus:
        """The header's mirror block: role (``"origin"``, ``"replica"`` or ``""``), whether the
        mirror is connected, its last sync, how far behind it is, its bucket and origin."""
        with self._in_use:  # it reads the mapping in several steps: not under close()
            return read_mirror_status(self._att)

    @property
    def replication(self) -> Replication:
        """This handle's replication interface (see :mod:`shmstore.replication`): what a
        replication backend such as ``shmstore.mirror`` does to a store."""
        return Replication(self._att)


def _after_fork_in_child() -> None:
    for handle in list(_live_handles):
        handle._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
