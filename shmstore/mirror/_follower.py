"""The follower: keeps a local replica store at the origin's versions and values.

The replica is an ordinary store with two differences recorded in its header: the replica flag
(every process's ``set()`` refuses, naming the origin) and the mirror block (origin, bucket,
connection, last sync, lag). Local readers open it with the origin's type and get the usual
schema check, because the replica records the origin's fingerprint and type name.

Following is latest-value: the follower watches the bucket's key (JetStream delivers the newest
entry first, then each new one) and commits each record's value bytes at the record's version
(``store.replication.commit_at``), skipping any version it already has, so restarts and
re-deliveries never regress or duplicate. Versions the follower never saw (it was slow, or
away) are jumped over; subscribers of the replica get ``SubscriberLaggedError`` with the exact
number. A watch can go quiet without an error when the server restarts under it, so the
follower also reads the key every ``RESYNC`` seconds of silence, and re-creates the watch after
any failure or reconnection; each confirmation refreshes the "last sync" time.

Each value is committed with ``validated=True`` -- not decoded once more -- when the record's
fingerprint equals the replica's: the origin's ``set()`` decoded those very bytes against that
very schema (see "Validated commits" in ``shmstore._replication``; on the FSM snapshot that is
~40 us of ~270 us). A record of any other fingerprint is never committed unvalidated, and
``validate=True`` (``--validate``) checks every value, for publishers one does not trust: a
publisher that lies can then make readers of that version get ``CorruptStoreError``, never a
torn or wrong value.

A record the replica cannot take -- another schema (the origin was re-created with a new type),
a value larger than the replica's slots, an impossible version (>= 2**62) -- is refused with an
error in the log and shows as "behind"; the replica keeps serving its last value and goes on
with the next record.

Two paths, one replica
----------------------
Besides the watch, the follower subscribes to the publisher's live subject (``_live``: a
blocking connection read by its own thread, or ``nats-py`` when the options need TLS or
credentials files). That thread commits a record the replica can take directly; a manifest, or
a record to refuse, goes to the event loop. The replica is created from the bucket's first
record, never from a live copy: only the durable copy carries the origin's schema record.
Both paths end in ``Replication.commit_at``, which compares the version with the replica's HEAD
under the writer lock: whichever copy of a version comes first is applied, the other is
refused there as not newer, and versions only grow. So the guarantees of the watch alone hold
for both together: no version applied twice, none applied out of order, and convergence to the
bucket's newest after any crash (the live path only ever adds versions the bucket gets too,
and the watch and ``RESYNC`` reads catch up whatever the live path lost).

Chunks
------
A manifest (see ``_wire``) is first checked against what the replica can hold
(``check_manifest``: a manifest no publisher makes, say a million chunks in 200 bytes, is
refused before a chunk is read), then fetched -- ``FETCH_AT_ONCE`` chunks at a time -- and
checked (count, size, digest) before anything is decoded; missing or foreign chunks make the
follower refuse that version (said once, "behind" in the header) and wait: the next manifest or
the next ``RESYNC`` read tries again, so the replica catches up from the newest complete
version and is never torn. Live parts of a large record are reassembled in the reading thread
and checked the same way; parts that do not add up are dropped, and the bucket's copy follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

from .. import (
    SchemaMismatchError,
    StateStoreError,
    StateVersionError,
    Store,
    StoreExistsError,
    StoreNotFoundError,
)
from ..replication import create_replica
from ._connect import (
    ConnectOptions,
    concurrently,
    connect,
    describe_error,
    disconnect,
    from_nats,
    raise_if_cancelled,
)
from ._errors import MirrorError
from ._live import open_live
from ._wire import (
    DURABLE_OVERHEAD,
    KEY,
    MAX_STORE_VALUE,
    RECORD_OVERHEAD,
    Reassembly,
    Record,
    assemble,
    check_manifest,
    chunk_key,
    decode_record,
    default_bucket,
    live_parts_subject,
    live_subject,
    validate_bucket,
)

__all__ = ["Follower"]

log = logging.getLogger("shmstore.mirror")

RESYNC: Final = 1.0
RETRY_WAIT: Final = 0.5
FETCH_AT_ONCE: Final = 32  # chunk reads in flight for one record


class Follower:
    """Keep the local replica *local_name* (default *name*) of the origin store *name*, mirrored
    through NATS bucket *bucket* (default ``default_bucket(name)``), until :meth:`stop`.

    The replica is created from the first record (with the origin's geometry, and
    *max_readers*), or re-opened if it exists; it stays after the follower stops, serving its
    last value. :meth:`run` raises :class:`StateStoreError` if *local_name* exists and is not a
    replica of *name*.
    """

    def __init__(
        self,
        name: str,
        *,
        options: ConnectOptions | None = None,
        bucket: str | None = None,
        local_name: str | None = None,
        max_readers: int = 64,
        mode: int = 0o600,
        live: bool = True,
        validate: bool = False,
    ) -> None:
        self.name = name
        self.local_name = local_name or name
        self.bucket = validate_bucket(bucket) if bucket else default_bucket(name)
        self.options = options or ConnectOptions()
        self.max_readers = max_readers
        self.mode = mode
        self.live = live
        """Also take records from the publisher's live subject (False: only the bucket)."""
        self.validate = validate
        """Decode every value before committing it, even one the origin validated under the
        replica's schema (False: trust the origin's check; see the module)."""
        self.applied = 0
        """Versions committed into the replica by this follower."""
        self._stop = asyncio.Event()
        self._ran = False  # run() runs once: its stop, its replica or store are not reset
        self._replica: Store[Any] | None = None
        self._connected = False
        self._refused: tuple[int, str] | None = None
        self._reconnected = asyncio.Event()
        self._said_no_bucket = False
        self._kv: Any = None
        self._fetching: set[int] = set()  # versions whose chunks are being fetched
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reassembly = Reassembly()  # live parts, in the reading thread only
        self._tasks: set[asyncio.Task[None]] = set()  # live records handed to the loop

    def stop(self) -> None:
        """Make :meth:`run` return (from the event loop's thread)."""
        self._stop.set()

    async def run(self) -> None:
        """Follow the origin into the replica until :meth:`stop` or a cancellation. Once per
        instance: a second call raises :class:`MirrorError`."""
        if self._ran:
            raise MirrorError("Follower.run() runs once: make a new Follower to run again")
        self._ran = True
        self._replica = self._open_existing()
        nc = None
        try:
            nc = await connect(self.options, on_connected=self._on_connected, stop=self._stop)
            if nc is None:
                return
            js = nc.jetstream(timeout=5.0)
            while not self._stop.is_set():
                raise_if_cancelled()
                try:
                    await self._follow(nc, js)
                except StateStoreError:
                    raise
                except (Exception, asyncio.CancelledError) as exc:  # NATS down, no bucket, ...
                    if isinstance(exc, asyncio.CancelledError) and not from_nats():
                        raise
                    self._status(connected=False)
                    text = describe_error(exc, self.options)
                    if "BucketNotFound" in text and not self._said_no_bucket:
                        self._said_no_bucket = True
                        log.warning(
                            "bucket %r does not exist yet: waiting for the publisher of %r",
                            self.bucket,
                            self.name,
                        )
                    log.debug("follow: %s", text)
                    await self._pause(RETRY_WAIT)
        finally:
            self._stop.set()  # closing on purpose: the client's disconnect is no news
            try:
                await self._end_live_tasks()
                if nc is not None:
                    await disconnect(nc, self.options)
            finally:  # also when this task is cancelled while closing
                if self._replica is not None:
                    with contextlib.suppress(StateStoreError):
                        self._replica.replication.set_status(connected=False)
                    self._replica.close()
                    self._replica = None

    def _open_existing(self) -> Store[Any] | None:
        try:
            replica = Store.open(self.local_name)
        except StoreNotFoundError:
            return None
        status = replica.mirror_status
        if status.role != "replica" or status.origin != self.name:
            replica.close()
            raise StateStoreError(
                f"store {self.local_name!r} exists and is not a replica of {self.name!r}; "
                "remove it or follow into another local name (--as)"
            )
        replica.replication.claim(self.bucket)
        return replica

    def _on_connected(self, up: bool) -> None:
        self._connected = up
        if up:
            self._reconnected.set()
        self._status(connected=up)

    def _status(self, *, connected: bool, sync: bool = False, behind: int | None = None) -> None:
        replica = self._replica
        if replica is not None and not replica.closed:
            replica.replication.set_status(
                connected=connected, last_sync_ns=time.time_ns() if sync else None, behind=behind
            )

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def _follow(self, nc: Any, js: Any) -> None:
        """One watch of the key (and one subscription to the live subject), until it fails, the
        connection comes back, or stop."""
        from nats.errors import TimeoutError as NatsTimeout  # noqa: PLC0415
        from nats.js.errors import KeyNotFoundError  # noqa: PLC0415

        kv = self._kv = await js.key_value(self.bucket)
        self._reconnected.clear()
        # Subscribed before the watch starts: a record published in between comes one way or
        # the other (the watch begins with the newest entry).
        live = raw = None
        if self.live:
            self._loop = asyncio.get_running_loop()
            self._reassembly = Reassembly()
            subjects = (live_subject(self.bucket), live_parts_subject(self.bucket))
            raw = await asyncio.to_thread(open_live, self.options, subjects, self._on_live_thread)
            if raw is None:  # the options need nats-py (TLS, creds): the same records, slower
                live = await nc.subscribe(live_subject(self.bucket), cb=self._on_live)
        opened = probed = time.monotonic()
        watcher = await kv.watch(KEY)
        try:
            while not self._stop.is_set() and not self._reconnected.is_set():
                raise_if_cancelled()  # a cancellation that a wait inside nats-py lost
                now = time.monotonic()
                if raw is not None and now - probed >= RESYNC:
                    probed = now
                    raw.probe()  # a connection gone quiet for good is given up
                if raw is not None and not raw.alive and now - opened >= RESYNC:
                    # Looked at on every update, not only when the watch is quiet: a busy
                    # watch would otherwise keep a broken live path broken for good.
                    return  # the next watch opens a new connection (once a RESYNC at most)
                try:
                    entry = await watcher.updates(timeout=RESYNC)
                except NatsTimeout:
                    # Quiet: confirm with a direct read (a watch can stall silently when the
                    # server restarts under it).
                    try:
                        entry = await kv.get(KEY)
                    except KeyNotFoundError:
                        self._status(connected=True, sync=True)
                        continue
                if entry is None:  # "no more pending": the watch is current
                    self._status(connected=True, sync=True)
                    continue
                if entry.operation is not None or not entry.value:
                    continue  # a delete or purge by an operator: keep serving the last value
                await self._receive(entry.value)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
            if live is not None:
                with contextlib.suppress(Exception):
                    await live.unsubscribe()
            if raw is not None:
                await asyncio.to_thread(raw.close)

    def _on_live_thread(self, subject: str, message: bytes) -> None:
        """The live connection's reading thread: commit a record the replica can take at once;
        anything else (a manifest, a refusal to say) goes to the event loop."""
        replica = self._replica
        if replica is None:
            return  # the bucket's first record creates it: that copy carries the schema
        try:  # (StateStoreError also if the replica was closed under us: we are stopping)
            if subject.endswith(".part"):  # see _wire.live_parts_subject
                whole = self._reassembly.add(
                    message,
                    newer_than=replica.version,
                    limit=replica.max_value_size + RECORD_OVERHEAD,
                )
                if whole is None:
                    return
                data: bytes | bytearray = whole
            else:
                data = message
            record = decode_record(data, view=True)  # its value is committed from data itself
        except StateStoreError:
            return  # said by the durable path, when this record arrives there
        if not record.chunked:
            hooks = replica.replication
            try:
                if record.version <= replica.version:
                    return
                if record.fingerprint == hooks.fingerprint:
                    hooks.commit_at(
                        record.value,
                        record.version,
                        record.commit_ns,
                        validated=not self.validate,
                    )
                    self.applied += 1
                    return
                if not record.schema:
                    return  # the origin evolved: its durable copy carries the schema to follow
            except StateVersionError:
                return  # the bucket's copy came first
            except (StateStoreError, ValueError):
                pass  # refused: the loop says so
        loop = self._loop
        if loop is not None and not self._stop.is_set():
            with contextlib.suppress(RuntimeError):  # the loop closed: we are stopping
                loop.call_soon_threadsafe(self._spawn, data)

    def _spawn(self, data: bytes | bytearray) -> None:
        if self._stop.is_set():
            return
        task = asyncio.ensure_future(self._receive_live(data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_live(self, msg: Any) -> None:
        await self._receive_live(msg.data)

    async def _receive_live(self, data: bytes | bytearray) -> None:
        """A live record that the loop applies: whatever fails (a chunk read that timed out, a
        connection closing), the bucket's copy of this version follows; never unheard."""
        if self._replica is None:
            return  # the bucket's first record creates it: that copy carries the schema
        try:
            await self._receive(data)
        except Exception as exc:
            log.debug("live record not applied: %s", describe_error(exc, self.options))

    async def _end_live_tasks(self) -> None:
        """Cancel and await the live records still being applied: none may outlive run() (one
        that ended after the replica was closed would open it again, and leak it)."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a wait inside nats-py may swallow a cancellation (see _connect)
            await asyncio.wait(tasks, timeout=self.options.connect_timeout)

    async def _receive(self, data: bytes | bytearray) -> None:
        """Apply the record in *data* (from either path) unless the replica has its version."""
        try:
            record = decode_record(data)
        except StateStoreError as exc:
            self._refuse(0, str(exc))
            return
        if record.chunked:
            replica = self._replica
            if record.version in self._fetching or (
                replica is not None and record.version <= replica.version
            ):
                return
            # What the replica can hold (the one this record would create, if none yet).
            most = replica.max_value_size if replica is not None else record.max_value_size
            try:
                check_manifest(record, (most or MAX_STORE_VALUE) + DURABLE_OVERHEAD)
            except StateStoreError as exc:
                self._refuse(record.version, f"{exc}; waiting for a newer complete version")
                return
            self._fetching.add(record.version)
            try:
                full = await self._assemble(record)
            finally:
                self._fetching.discard(record.version)
            if full is None:
                return
            record = full
        self._apply(record)

    async def _assemble(self, manifest: Record) -> Record | None:
        """The full record of a chunked *manifest*, or ``None`` (refused, and said) if its
        chunks are not all there or not the manifest's."""
        from nats.js.errors import KeyNotFoundError  # noqa: PLC0415

        kv = self._kv
        parts: list[bytes] = []
        try:
            # FETCH_AT_ONCE reads at a time: a record of many small chunks costs a few round
            # trips more, never a read in flight per chunk; the first one missing ends it.
            for first in range(0, manifest.chunks, FETCH_AT_ONCE):
                last = min(first + FETCH_AT_ONCE, manifest.chunks)
                entries = await concurrently(
                    *(kv.get(chunk_key(manifest.version, i)) for i in range(first, last))
                )
                parts.extend(entry.value or b"" for entry in entries)
            return assemble(manifest, parts)
        except (KeyNotFoundError, StateStoreError) as exc:
            self._refuse(
                manifest.version,
                f"its chunks are not all in bucket {self.bucket!r} ({exc.__class__.__name__}: "
                f"{str(exc)[:200]}); waiting for a newer complete version",
            )
            return None

    def _apply(self, record: Record) -> None:
        replica = self._replica
        if replica is None:
            if self._stop.is_set():
                return  # stopping: a replica created now would be left open
            try:
                replica = self._replica = self._create(record)
            except (SchemaMismatchError, ValueError) as exc:  # the record's own claims
                self._refuse(record.version, f"no replica can be created from it: {exc}")
                return
        if record.fingerprint != replica.replication.fingerprint:
            reason = "remove the replica to follow the new schema"
            if record.schema:  # the origin evolved: follow it (issue 21)
                try:
                    replica.replication.follow_schema(record.schema)
                except StateStoreError as exc:
                    reason = str(exc)
            if record.fingerprint != replica.replication.fingerprint:
                self._refuse(
                    record.version,
                    f"origin {self.name!r} now holds {record.type_name}, which does not match "
                    f"replica {self.local_name!r}; {reason}",
                )
                return
        if record.version > replica.version:
            try:
                # The fingerprints are equal here (checked above): the origin validated these
                # bytes against the replica's type.
                replica.replication.commit_at(
                    record.value,
                    record.version,
                    record.commit_ns,
                    validated=not self.validate
                    and record.fingerprint == replica.replication.fingerprint,
                )
            except StateVersionError:
                return  # the other path's copy of this version came first
            except (StateStoreError, ValueError) as exc:  # ValueError: an impossible version
                self._refuse(record.version, str(exc))
                return
            self.applied += 1
        self._refused = None
        self._status(connected=True, sync=True, behind=0)

    def _refuse(self, version: int, reason: str) -> None:
        if self._refused != (version, reason):
            self._refused = (version, reason)
            log.error("replica %r refused version %d: %s", self.local_name, version, reason)
        replica = self._replica
        if replica is not None and version:
            self._status(connected=self._connected, behind=version - replica.version)

    def _create(self, record: Record) -> Store[Any]:
        try:
            replica = create_replica(
                self.local_name,
                fingerprint=record.fingerprint,
                type_name=record.type_name,
                origin=self.name,
                bucket=self.bucket,
                slots=record.slots,
                slot_size=record.slot_size,
                max_readers=self.max_readers,
                mode=self.mode,
                max_value_size=record.max_value_size or None,
                schema_record=record.schema,
            )
        except StoreExistsError:  # another follower of the same replica created it first
            existing = self._open_existing()
            assert existing is not None
            return existing
        replica.replication.claim(self.bucket)
        return replica
