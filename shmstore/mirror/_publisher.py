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

Two paths
---------
A thread blocks in ``Store.wait()`` on the local store (``_commits``). Woken by a commit,
it sends the newest version on the **live** subject itself, through a plain blocking NATS
connection (``_live``; in parts when the record is above ``max_payload``). The event loop makes
the **durable** put into the bucket as above. Only an active publisher that knows the bucket's
revision sends live copies, so a standby never does, and a version goes out on the live path
once per publisher (``_mark_sent``; twice at most, when the loop's put meets the thread still
sending it: a follower drops the second copy).

When the durable put happens is ``_commits``'s business: at once if a commit's live copy could
not go out; otherwise once the writer **pauses** for ``durable_quiet`` (20 ms), and for a writer
that never pauses at most ``durable_most`` (250 ms) after the first commit the bucket lacks. The
put carries the newest version (latest value): a fast writer costs one put per pause, or per
``durable_most``, not one per commit. Why: a put costs the publisher's loop, the server's
JetStream and every follower's watch a few hundred microseconds of CPU, and a live copy that
meets one waits for it. Measured on 2 vCPUs with a paced writer (a commit every ~150 us,
FSM-size values, ``--pin 0,1``, interleaved in one run, three runs): a put every 50 ms (this
publisher's rule until then) made the live path's p99 1.3-1.7x Redis's; no put at all during
the run 0.84-1.01x; puts at pauses and every 250 ms 0.85-1.07x, the same as every 1 s or 9 s
within the machine's noise. The bucket therefore trails a replica by ``durable_quiet`` after a
writer pauses, and by up to ``durable_most`` while it writes without pause; it never goes back
and never gets another origin's version. A publisher killed inside that window leaves the bucket
at an older version until it (or a successor of the same origin) restarts and puts the newest.

Stopping against a server that takes nothing (stopped, or its host gone, the connection still
open): a live send gives up after ``SEND_TIMEOUT`` (1 s) without progress, the live connection
is closed before the commit thread is joined (a send still under way fails at once), the final
put waits at most 10 s, reopening the live connection and closing the client each at most
``connect_timeout``. Such a stop takes 10-20 s (measured: 7-16 s with 8 MB to 32 MB of live
copies held by a SIGSTOPped server), never forever; nats-py's own ``CancelledError`` out of a
close or a flush (see ``_connect.from_nats``) is a failure of that call, not a traceback.

Chunks
------
A record above the server's ``max_payload`` is put as chunks under ``chunk.<version>.<i>`` (all
at once; each waits for its own acknowledgement), then its manifest into ``state`` with the
compare-and-set as usual (see ``_wire``). After a put, every chunk message older than the
manifest's first chunk -- chunks of older versions, and those of a publisher killed between its
chunks and its manifest -- is purged with one stream purge by subject and sequence; after an
ordinary record, all chunks are. Open question: a second publisher of the same origin putting
chunks of a newer version at that moment keeps them (they are newer), but its purge after an
ordinary record could remove chunks the other's manifest is about to name; followers then
refuse that manifest (missing chunks) and take the next version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import threading
import time
from typing import Any, Final

import msgspec

from .. import StateStoreError, Store, __version__
from ._commits import DURABLE_MOST, DURABLE_QUIET, LOCAL_WAIT, Commits
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
from ._live import LiveConnection, open_live
from ._requests import apply_request
from ._wire import (
    HEADROOM,
    KEY,
    Record,
    SetReply,
    chunk_key,
    chunk_subjects,
    decode_record,
    default_bucket,
    encode_record,
    live_parts,
    live_parts_subject,
    live_subject,
    manifest,
    set_subject,
    split,
    validate_bucket,
)

__all__ = ["Publisher"]

log = logging.getLogger("shmstore.mirror")

STANDBY_CHECK: Final = 1.0
RETRY_WAIT: Final = 0.25
HEARTBEAT: Final = 1.0  # a quiet, connected publisher refreshes its "last sync" this often
FLUSH_PATIENCE: Final = 30  # nats-py's timeout of a heartbeat's flush (see _heartbeat)
QUEUE_GROUP: Final = "shmstore-publishers"


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
        live: bool = True,
        durable_quiet: float = DURABLE_QUIET,
        durable_most: float = DURABLE_MOST,
    ) -> None:
        self.name = name
        self.bucket = validate_bucket(bucket) if bucket else default_bucket(name)
        self.options = options or ConnectOptions()
        self.value_type = value_type
        if not 1 <= replicas <= 5:
            raise ValueError(f"replicas must be between 1 and 5, got {replicas}")
        self.replicas = replicas
        for what, seconds in (("durable_quiet", durable_quiet), ("durable_most", durable_most)):
            if not 0 < seconds < math.inf:
                raise ValueError(f"{what} must be a positive number of seconds, got {seconds}")
        self.durable_quiet = durable_quiet
        self.durable_most = durable_most
        self.live = live
        """Also send each record on the live subject (False: the bucket only)."""
        self.active = False
        """True while this publisher owns the bucket (False while it is a standby)."""
        self.published = 0
        """The newest version this publisher knows to be in the bucket."""
        self._stop = asyncio.Event()
        self._ran = False  # run() runs once: its stop, its replica or store are not reset
        self._store: Store[Any] | None = None
        self._revision: int | None = None  # the key's revision, None when unknown
        self._origin = ""
        self._connected = False
        self._serving = False
        self._warned_behind = False
        self._old_chunks = True  # chunks may be in the bucket that no manifest names
        self._live_conn: LiveConnection | None = None
        self._sent_live = 0  # the newest version sent on the live path (see _mark_sent)
        self._sent_lock = threading.Lock()
        self._nc: Any = None
        self._flushing: asyncio.Future[None] | None = None  # the heartbeat's flush
        self._flush_started = 0.0

    def stop(self) -> None:
        """Make :meth:`run` return (from the event loop's thread)."""
        self._stop.set()

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Publish the store until :meth:`stop` or a cancellation. Once per instance: a
        second call raises :class:`MirrorError`."""
        if self._ran:
            raise MirrorError("Publisher.run() runs once: make a new Publisher to run again")
        self._ran = True
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
        store.replication.claim(self.bucket)
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
            if self._flushing is not None:
                self._flushing.cancel()
            with contextlib.suppress(StateStoreError):
                store.replication.set_status(connected=False)
            try:
                if nc is not None:
                    await disconnect(nc, self.options)
            finally:  # also when this task is cancelled while closing
                store.close()
                self._store = None

    def _on_connected(self, up: bool) -> None:
        self._connected = up
        store = self._store
        if store is not None and not store.closed:
            store.replication.set_status(connected=self._live())
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
            raise_if_cancelled()
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
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def _loop(self, nc: Any, kv: Any, store: Store[Any]) -> None:
        if self.live:
            self._live_conn = await asyncio.to_thread(open_live, self.options)
        try:
            with Commits(store, self._send_live, self.durable_quiet, self.durable_most) as commits:
                try:
                    await self._serve(nc, kv, store, commits)
                finally:
                    # Closed before the commit thread is joined: a send of that thread that a
                    # stalled server holds fails at once, instead of holding the stop.
                    await self._close_live()
            # A clean stop leaves the bucket at the newest version, as the live copies did
            # the replicas (the durable put may have been waiting for the writer to pause).
            if self.active and self._connected and store.version > self._done():
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(10.0):
                        await self._publish_newest(kv, store, final=True)
        finally:
            await self._close_live()

    def _heartbeat(self, nc: Any, store: Store[Any], now: float) -> None:
        """A round trip to the server, so that "last sync" is a confirmation, not a hope: a
        flush, in a task of its own that is never cancelled. (nats-py answers a PONG by
        setting the result of the flush's future; one cancelled by a timeout raised
        InvalidStateError in its read loop when a stalled server answered late: a traceback
        and a reconnection. Its own timeout, FLUSH_PATIENCE, is past the ~6 s in which its
        pings find a stalled server and reconnect, which forgets the future.)"""
        flush = self._flushing
        if flush is not None and not flush.done():
            if now - self._flush_started >= HEARTBEAT * 2:
                store.replication.set_status(connected=False)  # no answer for 2 s
            return

        def flushed(task: asyncio.Future[None]) -> None:
            if store.closed:
                return
            with contextlib.suppress(StateStoreError):  # (a callback: nobody would hear it)
                if task.cancelled() or task.exception() is not None:
                    store.replication.set_status(connected=False)
                else:
                    store.replication.set_status(
                        connected=self._live(),
                        last_sync_ns=time.time_ns(),
                        behind=store.version - self.published,
                    )

        self._flush_started = now
        self._flushing = asyncio.ensure_future(nc.flush(FLUSH_PATIENCE))
        self._flushing.add_done_callback(flushed)

    async def _close_live(self) -> None:
        live, self._live_conn = self._live_conn, None
        if live is not None:
            await asyncio.to_thread(live.close)

    async def _serve(self, nc: Any, kv: Any, store: Store[Any], commits: Commits) -> None:
        last_heartbeat = last_live = 0.0
        requests = None  # the remote-write subscription: held only while active
        self._serving = False
        due = True  # a put of the newest version, unless the bucket has it
        while not self._stop.is_set():
            raise_if_cancelled()  # a cancellation that a wait inside nats-py lost
            head = store.version
            if (due and head > self._done()) or not self.active:
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
                    store.replication.set_status(connected=self._live())
                except MirrorError:
                    raise
                except (Exception, asyncio.CancelledError) as exc:  # NATS down, elections, ...
                    if isinstance(exc, asyncio.CancelledError) and not from_nats():
                        raise
                    self._revision = None
                    store.replication.set_status(connected=False, behind=head - self.published)
                    log.debug("put failed: %s", describe_error(exc, self.options))
                    await self._pause(RETRY_WAIT)
                    continue
                if not self.active:
                    await self._pause(STANDBY_CHECK)
                    continue
            now = time.monotonic()
            live = self._live_conn
            if (
                self.live
                and (live is None or not live.alive)
                and self._connected
                and now - last_live >= 1.0
            ):
                last_live = now  # (re)open the live connection, once a second at most
                self._live_conn = await asyncio.to_thread(open_live, self.options)
                if live is not None:
                    await asyncio.to_thread(live.close)
            if now - last_heartbeat >= HEARTBEAT and self._connected:
                last_heartbeat = now
                if self._live_conn is not None:  # one gone quiet for good is given up (reopened)
                    self._live_conn.probe()
                self._heartbeat(nc, store, now)
            due = await commits.wait_due(self._done(), LOCAL_WAIT)

    async def _publish_newest(self, kv: Any, store: Store[Any], *, final: bool = False) -> None:
        """Put the store's newest version unless the bucket already has it (or a newer one, or
        belongs to another origin); compare-and-set, retried on a lost race. *final*: while
        stopping (the caller bounds it)."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError  # noqa: PLC0415

        while final or not self._stop.is_set():
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
            value, version, commit_ns = store.replication.read_encoded()
            if version <= self.published:
                return  # already in the bucket: never put a version twice, never go back
            # The durable record carries the schema record: a follower creates its replica
            # from it and follows an evolution with it (the live copy leaves it out).
            record = self._record(store, value, version, commit_ns, with_schema=True)
            data = encode_record(record)
            limit = self._max_payload()
            first_seq = 0
            if limit and len(data) + HEADROOM > limit:
                put = await self._put_chunks(kv, record, data, limit)
                first_seq = put.first_seq
                data = encode_record(put)
            # The live copy first (unless the commit thread sent it): followers apply whichever
            # copy comes first, and this one skips JetStream's storage and acknowledgement.
            if self.live and self._mark_sent(version):
                live = self._live_conn
                if live is None or not live.publish(live_subject(self.bucket), data):
                    await self._nc.publish(live_subject(self.bucket), data)
            try:
                self._revision = await kv.update(KEY, data, last=self._revision)
            except KeyWrongLastSequenceError:
                self._revision = None  # someone else put: look at what is there now
                continue
            self.published = version
            store.replication.set_status(
                connected=self._live(), last_sync_ns=time.time_ns(), behind=store.version - version
            )
            if first_seq or self._old_chunks:
                # Older chunks are unreachable now: the manifest in ``state`` names only these.
                await self._purge_chunks(first_seq)
            self._old_chunks = bool(first_seq)
            return

    def _record(
        self,
        store: Store[Any],
        value: bytes,
        version: int,
        commit_ns: int,
        *,
        with_schema: bool = False,
    ) -> Record:
        return Record(
            shmstore=__version__,
            origin=self._origin,
            store=self.name,
            version=version,
            commit_ns=commit_ns,
            fingerprint=store.replication.fingerprint,
            type_name=store.type_name,
            slots=store.geometry.slots,
            slot_size=store.geometry.slot_size,
            value=value,
            max_value_size=store.max_value_size,
            schema=store.replication.schema_record if with_schema else b"",
        )

    def _send_live(self) -> bool:
        """In the commit thread, right after a local commit: send the newest version on the
        live path, if this publisher owns the bucket. ``True`` if that version is out (now or
        before); else the event loop's durable put sends it, at once (see ``_commits``)."""
        live, store = self._live_conn, self._store
        if live is None or store is None or not self.active or self._revision is None:
            return False
        try:
            value, version, commit_ns = store.replication.read_encoded()
        except StateStoreError:  # closing
            return False
        if version <= max(self._sent_live, self.published):
            return True
        data = encode_record(self._record(store, value, version, commit_ns))
        if len(data) + HEADROOM <= live.max_payload:
            sent = live.publish(live_subject(self.bucket), data)
        else:  # in parts, which the follower reassembles and checks (the bucket gets chunks)
            subject = live_parts_subject(self.bucket)
            sent = all(
                live.publish(subject, piece, prefix=header)
                for header, piece in live_parts(data, version, live.max_payload)
            )
        if sent:
            self._mark_sent(version)
        return sent

    def _mark_sent(self, version: int) -> bool:
        """Record *version* as sent on the live path; ``False`` if it or a newer one was.
        From both threads: under a lock, so that the mark never goes back (a version the
        commit thread is still sending may go out twice, which a follower drops)."""
        with self._sent_lock:
            if version <= self._sent_live:
                return False
            self._sent_live = version
            return True

    async def _put_chunks(self, kv: Any, record: Record, data: bytes, limit: int) -> Record:
        """Put *data* (the encoded *record*) as chunks; the manifest to put into ``state``."""
        parts = split(data, limit)
        self._old_chunks = True  # until the manifest is in place, these may be orphans
        # All at once: each put waits for its acknowledgement, not for the one before.
        seqs = await concurrently(
            *(kv.put(chunk_key(record.version, i), part) for i, part in enumerate(parts))
        )
        return manifest(record, data, len(parts), min(seqs))

    async def _purge_chunks(self, before: int) -> None:
        """Remove the chunk messages older than stream sequence *before* (all of them if 0):
        those of versions the manifest in ``state`` no longer names, and any that a publisher
        killed between its chunks and its manifest left behind."""
        js = self._nc.jetstream(timeout=10.0)
        try:
            await js.purge_stream(
                f"KV_{self.bucket}", seq=before or None, subject=chunk_subjects(self.bucket)
            )
        except Exception as exc:  # only space is lost for now; the next put purges again
            self._old_chunks = True
            log.debug("purging old chunks failed: %s", describe_error(exc, self.options))

    def _done(self) -> int:
        """The newest version put into the bucket."""
        return self.published

    def _max_payload(self) -> int:
        """The server's largest message (``max_payload``, 1 MiB by default); 0 if unknown."""
        nc = self._nc
        return int(getattr(nc, "max_payload", 0) or 0) if nc is not None else 0

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
            store.replication.set_status(connected=self._live())

    # ------------------------------------------------------------------ remote writes

    async def _on_request(self, msg: Any) -> None:
        try:
            reply = await apply_request(
                msg.data, self._store, name=self.name, bucket=self.bucket, active=self.active
            )
        except Exception as exc:  # whatever failed, the writer hears a refusal, not silence
            log.exception("remote set of %r failed", self.name)
            reply = SetReply(error=f"the publisher failed to apply it: {type(exc).__name__}")
        with contextlib.suppress(Exception):
            await msg.respond(msgspec.json.encode(reply))
