"""Replication as an interface of the core: what a replication backend does to a store.

``shmstore.mirror`` keeps replicas on other hosts current through NATS JetStream; another
backend would need exactly the same five things from a store, and this module is that contract
(public as :mod:`shmstore.replication`, per handle as ``Store.replication``):

1. **Create a replica** (``shmstore.replication.create_replica``): a store that records the
   origin's schema and refuses ``set()`` in every process, so its only writer is the backend.
2. **Read the newest value encoded** (:meth:`Replication.read_encoded`): the bytes in the ring,
   with their version and commit time -- no decode and re-encode round trip.
3. **Commit at the origin's version** (:meth:`Replication.commit_at`): the origin's bytes, its
   version and its commit time, into a replica; versions only increase, and skipped versions
   show to subscribers as an exact lag, as a lap of the ring does.
4. **The recorded types** (:attr:`Replication.schema_record`,
   :meth:`Replication.follow_schema`): a replica records its origin's types, and follows its
   origin's evolutions, so readers of every type the origin had keep reading the replica.
5. **The mirror block** of the header (:meth:`Replication.claim`, :meth:`Replication.set_status`,
   :func:`read_mirror_status`): role, bucket, origin, the mirroring process, connected, last
   sync, versions behind -- what ``statistics()``, ``shmstore stat`` and Prometheus show.

The commit at a version is the store's commit protocol (writer lock, follow or make a move,
slot, HEAD, notify) with the version taken from the origin instead of HEAD + 1; it is kept
beside the backend interface rather than in ``Store`` because no other caller needs it, and it is
off every hot path.

Validated commits
-----------------
``commit_at`` decodes the payload before committing it, as ``set()`` does, so that a replica's
readers never find a value they cannot decode. For a mirror that check is a second one: the
origin's ``set()`` decoded the same bytes against the same schema before committing them, and
the record carries the origin's fingerprint. On the FSM snapshot (~10.5 KB) the replica's decode
was ~40 us of a ~270 us commit -> replica-visible path, the largest step a backend controls. So
``commit_at(..., validated=True)`` skips it: the caller vouches that the payload decodes as the
replica's *current* type -- in ``shmstore.mirror``, only for a record whose fingerprint equals
the replica's (``Replication.fingerprint``), i.e. bytes that an origin of that very schema
validated; anything else (another fingerprint, bytes from elsewhere) goes through the check.

What a caller that lies (a buggy or hostile publisher, a damaged message that still parses as a
record) can do then: commit bytes that do not decode. It cannot tear a value -- the slot is
written under the seqlock as always, so readers see the whole payload or retry -- nor break the
store's header, versions or other slots; readers of that version get
:class:`CorruptStoreError` (never a wrong or partial value), and the next good commit replaces
it. Size limits, the version order and the replica flag are checked either way. Who can publish
on the mirror's subjects is NATS's business (accounts, permissions); a deployment that does not
trust its publishers passes ``validated=False`` (``Follower(validate=True)``).
"""

from __future__ import annotations

import fcntl
import os
from typing import Final

from ._attachment import Attachment
from ._errors import SnapshotTooLargeError, StateStoreError, StateVersionError
from ._evolve import replica_successor
from ._layout import (
    MIRROR_BUCKET_FIELD,
    MIRROR_CONNECTED,
    MIRROR_ORIGIN_FIELD,
    MIRROR_ROLE_MASK,
    MIRROR_ROLE_ORIGIN,
    MIRROR_ROLE_REPLICA,
    OFF_MIRROR_BUCKET,
    OFF_MIRROR_ORIGIN,
    W_GENERATION,
    W_HEAD,
    W_MIRROR_BEHIND,
    W_MIRROR_PID,
    W_MIRROR_STATE,
    W_MIRROR_SYNC,
    W_REG_HIGH,
    read_text_field,
    text_field,
)
from ._ofd import MIRROR_BYTE, OFD_SUPPORTED, byte_lock, byte_locked
from ._registry import pid_alive
from ._stats import MirrorStatus

__all__ = ["MAX_VERSION", "Replication", "read_mirror_status"]

# A version the writer would not reach in centuries; past it the header is damaged, and the
# slot sequence 2v would no longer fit its u64.
MAX_VERSION: Final = 1 << 62


class Replication:
    """One handle's replication interface (``Store.replication``): see the module. One
    mirroring process per store writes the mirror block; commits to a replica are serialized
    by the writer lock as usual. Every method raises :class:`StateStoreError` on a closed
    handle."""

    __slots__ = ("_att",)

    def __init__(self, attachment: Attachment) -> None:
        self._att = attachment

    @property
    def fingerprint(self) -> bytes:
        """The 16-byte schema fingerprint of the store's current type."""
        return self._att.current_record().fingerprint

    @property
    def type_name(self) -> str:
        """The name of the store's current type."""
        return self._att.current_record().type_name

    @property
    def schema_record(self) -> bytes:
        """Every type the store has had, encoded (``_schemarecord``): what a replica needs to
        follow the store's evolutions (:meth:`follow_schema`)."""
        return self._att.current_record().encode()

    def follow_schema(self, schema_record: bytes) -> None:
        """Record the origin's *schema_record* in this replica, whose types must be the first of
        its types: the replica then holds the origin's newest type, and readers of every older
        type keep reading. Raises :class:`SchemaMismatchError` (nothing changed) otherwise."""
        att = self._att
        if not att.replica:
            raise StateStoreError(f"store {att.name!r} is not a replica")
        att.adopt_schema(lambda current: replica_successor(current, schema_record, att.name))

    @property
    def is_replica(self) -> bool:
        """Whether the store is a replica (refuses ``set()``; only :meth:`commit_at` writes)."""
        return self._att.replica

    def read_encoded(self) -> tuple[bytes, int, int]:
        """The newest value as the encoded bytes in the ring, with its version and commit time
        (ns since the epoch); ``(b"", 0, 0)`` while empty."""
        att = self._att
        with att.in_use:
            att.check_open()
            payload, version, ts_ns = att.read_newest()
            if payload is None:
                return b"", 0, 0
            return bytes(payload), version, ts_ns

    def commit_at(
        self, payload: bytes | memoryview, version: int, commit_ns: int, *, validated: bool = False
    ) -> int:
        """Commit the origin's encoded *payload* as the origin's *version* (with the origin's
        commit time *commit_ns*) into this replica; return *version*.

        *version* must be greater than the replica's version; versions in between may be
        skipped (latest-value semantics): subscribers then get :class:`SubscriberLaggedError`
        with the exact number skipped, as for a lap of the ring, because the slots of skipped
        versions never held them. Raises :class:`StateStoreError` if the store is not a
        replica, :class:`StateVersionError` (nothing written) if *version* is not newer,
        ``ValueError`` for an impossible version or commit time,
        :class:`SnapshotTooLargeError` if the payload is larger than the store's
        ``max_value_size`` and :class:`InvalidSnapshotError` if it does not decode.

        *validated*: the caller vouches that *payload* decodes as the replica's current type
        (the origin's ``set()`` validated it, and the origin's fingerprint equals this
        replica's :attr:`fingerprint`), and the decode is skipped (~40 us for a 10 KB value).
        If the vouch is false, nothing is torn and nothing else is harmed, but readers of that
        version get :class:`CorruptStoreError` until the next commit replaces it; see the
        module's "Validated commits". A validated *payload* that is a ``memoryview`` is
        written into the slot from its own memory (no copy first), so it must not change
        during the call; an unvalidated one is copied, then checked, then written.
        """
        att = self._att
        if not att.replica:
            att.check_open()
            raise StateStoreError(f"store {att.name!r} is not a replica")
        # Both checked before anything is written: the slot's words are u64s, and a failure
        # half-way through the slot would leave its seq odd (readers retrying forever).
        if not isinstance(version, int) or not 0 < version < MAX_VERSION:
            raise ValueError(
                f"a replicated version is an int between 1 and {MAX_VERSION}, got {version!r}"
            )
        if not isinstance(commit_ns, int) or not 0 <= commit_ns < 1 << 64:
            raise ValueError(f"a replicated commit time is a u64 of nanoseconds, got {commit_ns!r}")
        limit = att.info.max_value_size
        if len(payload) > limit:
            raise SnapshotTooLargeError(
                f"replicated value is {len(payload)} bytes; replica {att.name!r} holds at "
                f"most {limit} bytes (its max_value_size)"
            )
        data = payload
        if not validated:
            data = bytes(payload)  # what is checked is what is written
            att.codec.validate(data)
        lock = att.lock
        words = att.words
        with att.in_use:
            att.check_open()
            try:
                # Inside the try, as in Store's commit: an interrupt right after the lock call
                # returns must still release it. (A replica has no exclusive writer: its handles
                # may not write, so none can keep the lock.)
                rc = lock.try_acquire()
                if rc:
                    att.writer.acquire_contended(rc)
                ring = att.ring
                if words[W_GENERATION] != ring.generation:
                    ring = att.follow_move()  # another process grew the replica
                head = int(words[W_HEAD])
                if version > head:
                    if len(data) > ring.capacity:
                        ring = att.grow(len(data))  # the origin's values grew: so do the slots
                    ring.commit_at(version, data, commit_ns)
            finally:
                lock.release()  # also the barrier between publishing HEAD and notify()
            if version <= head:
                raise StateVersionError(
                    version - 1,
                    head,
                    f"replicated version {version} is not newer than replica {att.name!r} "
                    f"at version {head}",
                )
            if words[W_REG_HIGH]:
                att.registry.notify()
            return version

    def claim(self, bucket: str) -> None:
        """Record this process as the store's mirroring process; on an origin, also mark the
        store as the origin mirrored through NATS bucket *bucket*. Starts "disconnected"."""
        att = self._att
        with att.in_use:
            att.check_open()
            m = att.segment.map
            if not att.replica:
                m[OFF_MIRROR_BUCKET : OFF_MIRROR_BUCKET + MIRROR_BUCKET_FIELD] = text_field(
                    bucket, MIRROR_BUCKET_FIELD
                )
                m[OFF_MIRROR_ORIGIN : OFF_MIRROR_ORIGIN + MIRROR_ORIGIN_FIELD] = text_field(
                    att.name, MIRROR_ORIGIN_FIELD
                )
            att.words[W_MIRROR_PID] = os.getpid()
            # Liveness that holds across PID namespaces: the pid above is a number of this
            # process's namespace, meaningless in another container (see _ofd). Held until
            # this handle closes; if another live mirroring process holds it, status relies on
            # that one's.
            if OFD_SUPPORTED and not att.mirror_claimed:
                att.mirror_claimed = byte_lock(att.segment.fd, MIRROR_BYTE, fcntl.F_WRLCK)
        self.set_status(connected=False)

    def set_status(
        self, *, connected: bool, last_sync_ns: int | None = None, behind: int | None = None
    ) -> None:
        """Record the mirror's state in the header; *last_sync_ns* and *behind* stay as they
        are when ``None``. Each word is one aligned store: readers never see half of one."""
        att = self._att
        with att.in_use:
            att.check_open()
            words = att.words
            role = MIRROR_ROLE_REPLICA if att.replica else MIRROR_ROLE_ORIGIN
            if last_sync_ns is not None:
                words[W_MIRROR_SYNC] = last_sync_ns
            if behind is not None:
                words[W_MIRROR_BEHIND] = max(0, behind)
            words[W_MIRROR_STATE] = role | (MIRROR_CONNECTED if connected else 0)


def read_mirror_status(att: Attachment) -> MirrorStatus:
    """The header's mirror block. The caller holds ``att.in_use`` (several loads of the
    mapping: not under ``close()``)."""
    att.check_open()
    words = att.words
    state = int(words[W_MIRROR_STATE])
    pid = int(words[W_MIRROR_PID])
    if att.replica:
        role = "replica"
    elif state & MIRROR_ROLE_MASK == MIRROR_ROLE_ORIGIN:
        role = "origin"
    else:
        role = ""
    m = att.segment.map
    return MirrorStatus(
        role=role,
        connected=bool(state & MIRROR_CONNECTED) and pid != 0 and _mirror_alive(att, pid),
        pid=pid,
        last_sync_ns=int(words[W_MIRROR_SYNC]),
        behind=int(words[W_MIRROR_BEHIND]),
        bucket=read_text_field(m, OFF_MIRROR_BUCKET, MIRROR_BUCKET_FIELD) if role else "",
        origin=read_text_field(m, OFF_MIRROR_ORIGIN, MIRROR_ORIGIN_FIELD) if role else "",
    )


def _mirror_alive(att: Attachment, pid: int) -> bool:
    """Whether the process that claimed the mirror block is alive: its liveness lock (any PID
    namespace), or, where OFD locks do not exist, its pid."""
    if not OFD_SUPPORTED:
        return pid_alive(pid)
    return att.mirror_claimed or byte_locked(att.segment.fd, MIRROR_BYTE)


def replica_error(att: Attachment) -> StateStoreError:
    """The error a local ``set()`` on a replica raises: where to write instead."""
    with att.in_use:
        status = read_mirror_status(att)
    return StateStoreError(
        f"store {att.name!r} is a replica of store {status.origin!r} (NATS bucket "
        f"{status.bucket!r}) and refuses local writes; write to the origin instead: "
        f"`shmstore mirror set {status.origin} VALUE --server URL --bucket {status.bucket}` "
        "or shmstore.mirror.RemoteStore"
    )
