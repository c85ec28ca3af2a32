"""The publisher: puts every committed version of a local store into its NATS KV bucket, and
applies remote compare-and-set requests to the store.

Ordering and ownership
----------------------
Every put is a compare-and-set on the key's revision (``update(key, value, last=revision)``),
and a put happens only if the bucket's newest record is older than the version being put. So the
bucket's versions only grow, whatever restarts, and a version is put at most once.

A bucket belongs to one origin, the store whose record is in it, named ``host/store-name``. A
publisher that finds another origin's record in the bucket is a **standby**: it puts nothing and
answers no remote writes; it checks again every ``STANDBY_CHECK`` seconds and becomes active only
when the key is gone (an operator deleted it, to move the origin). Two publishers of the *same*
origin (a restart overlapping the old process, or a duplicate by mistake) are both active: the
compare-and-set lets only one of them put each version, and they share the remote writes (a
NATS queue group), which the store's own compare-and-set keeps correct.

The identity is the host and the name, not the store's creation time, so that a store
re-created on the same host -- after a reboot, from a checkpoint -- carries on with the same
bucket. If it restarts *below* the bucket's version, nothing is put until it passes that
version (the bucket never goes back); a warning says so.

While NATS is away the local store is untouched: commits go on, the header's mirror block says
"disconnected" and how many versions are not yet in the bucket, and on reconnection the newest
version is put (latest value, not a log: the versions in between are skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any, Final

import msgspec

from .. import __version__
from .._errors import StateStoreError, StateVersionError
from .._store import MirrorHooks, Store
from ._connect import ConnectOptions, connect, describe_error
from ._errors import MirrorError
from ._wire import (
    KEY,
    Record,
    SetReply,
    SetRequest,
    decode_record,
    default_bucket,
    encode_record,
    set_subject,
    validate_bucket,
)

__all__ = ["Publisher"]

log = logging.getLogger("shmstore.mirror")

STANDBY_CHECK: Final = 1.0
LOCAL_WAIT: Final = 0.5  # bounds each wait for a local commit, so that stop is prompt
RETRY_WAIT: Final = 0.25
HEARTBEAT: Final = 1.0  # a quiet, connected publisher refreshes its "last sync" this often
QUEUE_GROUP: Final = "shmstore-publishers"
HEADROOM: Final = 512  # the compare-and-set header and the subject travel with the record


class Publisher:
    """Mirror the local store *name* into NATS bucket *bucket* (default
    ``default_bucket(name)``) until :meth:`stop`.

    *value_type* is the store's type: needed only to apply remote writes to a typed store (an
    untyped handle cannot write it); without it, remote writes to a typed store are answered
    with an error. *replicas* is the bucket's replication factor when this publisher creates
    the bucket (1..5; 3 on a three-node cluster survives the loss of one node).

    :meth:`run` raises :class:`StoreNotFoundError` if the store does not exist and
    :class:`MirrorError` if the bucket cannot be used; NATS outages are waited out.
    """

    def __init__(
        self,
        name: str,
        *,
        options: ConnectOptions | None = None,
        bucket: str | None = None,
        value_type: Any = None,
        replicas: int = 1,
    ) -> None:
        self.name = name
        self.bucket = validate_bucket(bucket) if bucket else default_bucket(name)
        self.options = options or ConnectOptions()
        self.value_type = value_type
        if not 1 <= replicas <= 5:
            raise ValueError(f"replicas must be between 1 and 5, got {replicas}")
        self.replicas = replicas
        self.active = False
        """True while this publisher owns the bucket (False while it is a standby)."""
        self.published = 0
        """The newest version this publisher knows to be in the bucket."""
        self._stop = asyncio.Event()
        self._store: Store[Any] | None = None
        self._revision: int | None = None  # the key's revision, None when unknown
        self._origin = ""
        self._connected = False
        self._serving = False
        self._warned_behind = False
        self._too_large_version = 0
        self._nc: Any = None

    def stop(self) -> None:
        """Make :meth:`run` return (from the event loop's thread)."""
        self._stop.set()

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        store = Store.open(self.name, self.value_type)
        status = store.mirror_status
        if status.role == "replica":
            store.close()
            raise MirrorError(
                f"store {self.name!r} is a replica of {status.origin!r}: publish the origin on "
                "its own host instead"
            )
        self._store = store
        self._origin = f"{socket.gethostname()}/{self.name}"
        MirrorHooks(store).claim(self.bucket)
        nc = None
        try:
            nc = await connect(self.options, on_connected=self._on_connected, stop=self._stop)
            if nc is None:
                return
            self._nc = nc
            js = nc.jetstream(timeout=5.0)
            kv = await self._bucket(js, store)
            if kv is None:
                return
            await self._loop(nc, kv, store)
        finally:
            self._stop.set()  # closing on purpose: the client's disconnect is no news
            with contextlib.suppress(StateStoreError):
                MirrorHooks(store).set_status(connected=False)
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            store.close()
            self._store = None

    def _on_connected(self, up: bool) -> None:
        self._connected = up
        store = self._store
        if store is not None and not store.closed:
            MirrorHooks(store).set_status(connected=self._live())
        if not up:
            self._revision = None  # a put may have landed or not: ask the bucket again

    async def _bucket(self, js: Any, store: Store[Any]) -> Any:
        """The bucket, created (history 1) if absent; retried while NATS is unavailable."""
        from nats.js.errors import (  # noqa: PLC0415
            APIError,
            BucketNotFoundError,
            ServiceUnavailableError,
        )

        logged = -60.0
        while not self._stop.is_set():
            try:
                try:
                    return await js.key_value(self.bucket)
                except BucketNotFoundError:
                    return await js.create_key_value(
                        bucket=self.bucket,
                        history=1,
                        replicas=self.replicas,
                        description=f"shmstore mirror of {self.name}",
                    )
            except ServiceUnavailableError as exc:  # no JetStream yet, or electing a leader
                error: Exception = exc
            except APIError as exc:  # the server refuses the bucket: retrying cannot help
                raise MirrorError(
                    f"cannot use bucket {self.bucket!r}: {describe_error(exc, self.options)}"
                ) from None
            except Exception as exc:  # timeouts, reconnections
                error = exc
            now = time.monotonic()
            if now - logged >= 30:
                logged = now
                log.warning(
                    "bucket %r not available yet: %s",
                    self.bucket,
                    describe_error(error, self.options),
                )
            await self._pause(RETRY_WAIT * 4)
        return None

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _loop(self, nc: Any, kv: Any, store: Store[Any]) -> None:
        last_heartbeat = 0.0
        requests = None  # the remote-write subscription: held only while active
        self._serving = False
        while not self._stop.is_set():
            head = store.version
            if head > self._done() or not self.active:
                try:
                    await self._publish_newest(kv, store)
                    if self.active and requests is None:
                        requests = await nc.subscribe(
                            set_subject(self.bucket), queue=QUEUE_GROUP, cb=self._on_request
                        )
                        await nc.flush()  # the server has the subscription: we can answer
                    elif not self.active and requests is not None:
                        await requests.unsubscribe()
                        requests = None
                    self._serving = requests is not None
                    MirrorHooks(store).set_status(connected=self._live())
                except MirrorError:
                    raise
                except Exception as exc:  # NATS down, leader election, timeouts: retry
                    self._revision = None
                    MirrorHooks(store).set_status(connected=False, behind=head - self.published)
                    log.debug("put failed: %s", describe_error(exc, self.options))
                    await self._pause(RETRY_WAIT)
                    continue
                if not self.active:
                    await self._pause(STANDBY_CHECK)
                    continue
            now = time.monotonic()
            if now - last_heartbeat >= HEARTBEAT and self._connected:
                last_heartbeat = now
                try:  # a round trip to the server: "last sync" is a confirmation, not a hope
                    await asyncio.wait_for(nc.flush(), HEARTBEAT * 2)
                except Exception:
                    MirrorHooks(store).set_status(connected=False)
                else:
                    MirrorHooks(store).set_status(
                        connected=self._live(),
                        last_sync_ns=time.time_ns(),
                        behind=store.version - self.published,
                    )
            with contextlib.suppress(TimeoutError):
                await store.wait_async(self._done(), LOCAL_WAIT)

    async def _publish_newest(self, kv: Any, store: Store[Any]) -> None:
        """Put the store's newest version unless the bucket already has it (or a newer one, or
        belongs to another origin); compare-and-set, retried on a lost race."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError  # noqa: PLC0415

        while not self._stop.is_set():
            if self._revision is None:
                try:
                    entry = await kv.get(KEY)
                except KeyNotFoundError:  # absent, or deleted by an operator
                    self._revision = 0
                    self._set_active(True, None)
                else:
                    self._revision = entry.revision
                    try:
                        current = decode_record(entry.value)
                    except StateStoreError as exc:
                        raise MirrorError(
                            f"bucket {self.bucket!r} holds something else ({exc}); "
                            "mirror into another --bucket"
                        ) from None
                    if current.origin != self._origin:
                        self._set_active(False, current)
                        self._revision = None
                        return
                    self._set_active(True, None)
                    self.published = max(self.published, current.version)
                    if store.version < current.version and not self._warned_behind:
                        self._warned_behind = True
                        log.warning(
                            "store %r is at version %d, behind bucket %r at %d: nothing is put "
                            "until it passes that version (delete the key to start over)",
                            self.name,
                            store.version,
                            self.bucket,
                            current.version,
                        )
            value, version, commit_ns = MirrorHooks(store).get_encoded()
            if version <= self.published:
                return  # already in the bucket: never put a version twice, never go back
            record = Record(
                shmstore=__version__,
                origin=self._origin,
                store=self.name,
                version=version,
                commit_ns=commit_ns,
                fingerprint=MirrorHooks(store).fingerprint,
                type_name=store.type_name,
                slots=store.geometry.slots,
                slot_size=store.geometry.slot_size,
                value=value,
                max_value_size=store.max_value_size,
                schema=MirrorHooks(store).schema_record,
            )
            data = encode_record(record)
            limit = self._max_payload()
            if limit and len(data) + HEADROOM > limit:
                self._too_large(version, len(data), limit)
                return
            try:
                self._revision = await kv.update(KEY, data, last=self._revision)
            except KeyWrongLastSequenceError:
                self._revision = None  # someone else put: look at what is there now
                continue
            self.published = version
            MirrorHooks(store).set_status(
                connected=self._live(), last_sync_ns=time.time_ns(), behind=store.version - version
            )
            return

    def _done(self) -> int:
        """The newest version dealt with: put, or found too large to put."""
        return max(self.published, self._too_large_version)

    def _max_payload(self) -> int:
        """The server's largest message (``max_payload``, 1 MiB by default); 0 if unknown."""
        nc = self._nc
        return int(getattr(nc, "max_payload", 0) or 0) if nc is not None else 0

    def _too_large(self, version: int, size: int, limit: int) -> None:
        """A version NATS cannot carry: skipped (the next smaller one goes out), said once."""
        if version != self._too_large_version:
            self._too_large_version = version
            log.error(
                "version %d of %r is %d bytes as a record, more than the NATS server's "
                "max_payload (%d): not mirrored; raise max_payload in the server configuration",
                version,
                self.name,
                size,
                limit,
            )
        store = self._store
        if store is not None and not store.closed:
            MirrorHooks(store).set_status(
                connected=self._live(), behind=store.version - self.published
            )

    def _live(self) -> bool:
        """What the header's "connected" bit says: connected, active, and answering remote
        writes (so that a client that sees it can write at once)."""
        return self._connected and self.active and self._serving

    def _set_active(self, active: bool, owner: Record | None) -> None:
        if active != self.active:
            if active:
                log.info("publisher of %r is active on bucket %r", self.name, self.bucket)
            else:
                assert owner is not None
                log.warning(
                    "bucket %r belongs to another origin (%s at version %d): standing by",
                    self.bucket,
                    owner.origin,
                    owner.version,
                )
        self.active = active
        store = self._store
        if store is not None and not store.closed:
            MirrorHooks(store).set_status(connected=self._live())

    # ------------------------------------------------------------------ remote writes

    async def _on_request(self, msg: Any) -> None:
        reply = await self._apply_request(msg.data)
        with contextlib.suppress(Exception):
            await msg.respond(msgspec.json.encode(reply))

    async def _apply_request(self, data: bytes) -> SetReply:
        store = self._store
        if store is None or store.closed:
            return SetReply(error="the publisher is stopping")
        if not self.active:
            return SetReply(error=f"this publisher is a standby for bucket {self.bucket!r}")
        if not store.writable:
            return SetReply(
                error=f"the publisher of {self.name!r} was started without the store's type "
                f"({store.type_name}): start it with --type to accept remote writes"
            )
        try:
            request = msgspec.json.decode(data, type=SetRequest)
            value = msgspec.json.decode(request.value, type=store.value_type)
        except msgspec.DecodeError as exc:
            return SetReply(error=f"value is not valid for {store.type_name}: {exc}")
        try:
            version = await asyncio.to_thread(self._set, store, value, request.expect)
        except StateVersionError as exc:
            return SetReply(conflict=True, actual=exc.actual)
        except StateStoreError as exc:
            return SetReply(error=str(exc))
        return SetReply(version=version)

    @staticmethod
    def _set(store: Store[Any], value: Any, expect: int | None) -> int:
        return store.set(value, expect)
