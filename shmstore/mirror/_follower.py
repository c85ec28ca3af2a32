"""The follower: keeps a local replica store at the origin's versions and values.

The replica is an ordinary store with two differences recorded in its header: the replica flag
(every process's ``set()`` refuses, naming the origin) and the mirror block (origin, bucket,
connection, last sync, lag). Local readers open it with the origin's type and get the usual
schema check, because the replica records the origin's fingerprint and type name.

Following is latest-value: the follower watches the bucket's key (JetStream delivers the newest
entry first, then each new one) and commits each record's value bytes at the record's version
(``MirrorHooks.commit_replicated``), skipping any version it already has, so restarts and
re-deliveries never regress or duplicate. Versions the follower never saw (it was slow, or
away) are jumped over; subscribers of the replica get ``SubscriberLaggedError`` with the exact
number. A watch can go quiet without an error when the server restarts under it, so the
follower also reads the key every ``RESYNC`` seconds of silence, and re-creates the watch after
any failure or reconnection; each confirmation refreshes the "last sync" time.

A record the replica cannot take -- another schema (the origin was re-created with a new type),
a value larger than the replica's slots -- is refused with an error in the log and shows as
"behind"; the replica keeps serving its last value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

from .._errors import StateStoreError, StoreExistsError, StoreNotFoundError
from .._store import MirrorHooks, Store
from ._connect import ConnectOptions, connect, describe_error
from ._wire import KEY, Record, decode_record, default_bucket, validate_bucket

__all__ = ["Follower"]

log = logging.getLogger("shmstore.mirror")

RESYNC: Final = 1.0
RETRY_WAIT: Final = 0.5


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
    ) -> None:
        self.name = name
        self.local_name = local_name or name
        self.bucket = validate_bucket(bucket) if bucket else default_bucket(name)
        self.options = options or ConnectOptions()
        self.max_readers = max_readers
        self.mode = mode
        self.applied = 0
        """Versions committed into the replica by this follower."""
        self._stop = asyncio.Event()
        self._replica: Store[Any] | None = None
        self._connected = False
        self._refused: tuple[int, str] | None = None
        self._reconnected = asyncio.Event()
        self._said_no_bucket = False

    def stop(self) -> None:
        """Make :meth:`run` return (from the event loop's thread)."""
        self._stop.set()

    async def run(self) -> None:
        self._replica = self._open_existing()
        nc = None
        try:
            nc = await connect(self.options, on_connected=self._on_connected, stop=self._stop)
            if nc is None:
                return
            js = nc.jetstream(timeout=5.0)
            while not self._stop.is_set():
                try:
                    await self._follow(js)
                except StateStoreError:
                    raise
                except Exception as exc:  # NATS down, bucket missing, leader election: retry
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
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            if self._replica is not None:
                with contextlib.suppress(StateStoreError):
                    MirrorHooks(self._replica).set_status(connected=False)
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
        MirrorHooks(replica).claim(self.bucket)
        return replica

    def _on_connected(self, up: bool) -> None:
        self._connected = up
        if up:
            self._reconnected.set()
        self._status(connected=up)

    def _status(self, *, connected: bool, sync: bool = False, behind: int | None = None) -> None:
        replica = self._replica
        if replica is not None and not replica.closed:
            MirrorHooks(replica).set_status(
                connected=connected, last_sync_ns=time.time_ns() if sync else None, behind=behind
            )

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _follow(self, js: Any) -> None:
        """One watch of the key, until it fails, the connection comes back, or stop."""
        from nats.errors import TimeoutError as NatsTimeout  # noqa: PLC0415
        from nats.js.errors import KeyNotFoundError  # noqa: PLC0415

        kv = await js.key_value(self.bucket)
        self._reconnected.clear()
        watcher = await kv.watch(KEY)
        try:
            while not self._stop.is_set() and not self._reconnected.is_set():
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
                self._apply(entry.value)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _apply(self, data: bytes) -> None:
        try:
            record = decode_record(data)
        except StateStoreError as exc:
            self._refuse(0, str(exc))
            return
        replica = self._replica
        if replica is None:
            replica = self._replica = self._create(record)
        if record.fingerprint != MirrorHooks(replica).fingerprint:
            reason = "remove the replica to follow the new schema"
            if record.schema:  # the origin evolved: follow it (issue 21)
                try:
                    MirrorHooks(replica).follow_schema(record.schema)
                except StateStoreError as exc:
                    reason = str(exc)
            if record.fingerprint != MirrorHooks(replica).fingerprint:
                self._refuse(
                    record.version,
                    f"origin {self.name!r} now holds {record.type_name}, which does not match "
                    f"replica {self.local_name!r}; {reason}",
                )
                return
        if record.version > replica.version:
            try:
                MirrorHooks(replica).commit_replicated(
                    record.value, record.version, record.commit_ns
                )
            except StateStoreError as exc:
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
            replica = MirrorHooks.create_replica(
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
        MirrorHooks(replica).claim(self.bucket)
        return replica
