"""The seqlock ring: one writer publishes, many readers copy, and no reader sees a torn value.

Algorithm
---------
The segment holds N slots and a header word HEAD, the version of the newest complete message
(0 while the store is empty). Message *m* lives in slot ``m % N``, and the slot's ``seq`` word
encodes both its state and which message it holds:

* ``2m - 1`` (odd) while message *m* is being written,
* ``2m`` (even) once message *m* is complete.

Writer (callers serialize writers; see ``_writelock``)::

    m = HEAD + 1
    slot.seq = 2m - 1; slot.payload = bytes; slot.length, crc, ts = ...; slot.seq = 2m
    HEAD = m                                  # publish

Reader of a given message *m* (a subscriber's next one, which may not be published yet)::

    s1 = slot(m).seq; s1 != 2m  -> not written yet, being written, or lapped
    copy length, crc, ts and payload OUT of the mapping
    s2 = slot(m).seq; s2 != s1  -> the writer came round while we copied: retry or give up
    (CRC on) crc32(copy) != crc -> treat like a moved seq
    decode the private copy

Because ``seq`` names the message and only ever grows, there is no ABA: a reader that sees ``2m``
twice saw message *m* and nothing else.

Reading the newest. ``get()`` wants message ``h = HEAD``, and for it the first seq load is
redundant: HEAD = h is stored only after ``slot(h).seq = 2h``, so loading HEAD is as good as
having loaded ``2h`` from the slot at that moment. The reader loads HEAD, copies, and loads seq
once: if it still reads ``2h``, no write to the slot had begun by then (the writer's first store
to a slot is its odd seq, seqs only grow, and neither stores with stores nor loads with loads are
reordered: see below), so every byte copied before that load is message *h*'s. Otherwise it
loads HEAD again. One load fewer on the hottest path (about 2 % of a changed ``get()`` of a small
value); the first load stays wherever the version does not come from HEAD.

Because HEAD is stored only after the slot is even, HEAD always names a complete slot, so a
writer killed at any instruction leaves at worst one odd slot that HEAD does not name; the next
writer overwrites it. There is no repair step and readers never
wait for a dead writer. Two slots are the minimum: with one, the slot being rewritten would be
the one HEAD names.

What CPython can and cannot promise
-----------------------------------
Python cannot emit fences or atomics. The protocol relies only on this:

* Each counter store is ``memoryview.cast("Q")[i] = v``: one aligned 8-byte store, so a reader
  never sees half of it. ``struct.pack_into`` must never be used for these words: CPython's
  ``s_pack_internal`` zero-fills the target before writing, so a concurrent reader can see
  ``seq == 0`` -- even, "stable" -- and copy a torn payload. That was measured (about one torn read
  in six million) and is why ``tests/test_ring.py`` keeps ``pack_into`` out of the package.
* Every access is its own opaque C call, so the compiler cannot reorder them across each other,
  and x86-64 (TSO) keeps store->store and load->load order in hardware. Those are exactly the
  orders a seqlock needs.
* On weakly ordered CPUs (aarch64) loads may pass loads; there the writer stores a CRC32 of the
  payload and readers verify it after the copy (on by default off x86-64). A reorder then shows as
  a CRC mismatch and is retried like a moved seq.

Decoding in place. The first design never decoded out of the live mapping: a torn buffer can
make a decoder raise or build garbage, and a memoryview into the mapping would pin it
(``BufferError`` at close) and alias memory the writer is about to overwrite. For payloads of at
least ``IN_PLACE_MIN`` bytes the copy is now skipped under four conditions, each measured or
enforced (``read_newest_value``): the seq re-check runs *after* the decode and a decode it does
not confirm is thrown away (97 % of torn decodes "succeed" with garbage, so the re-check is what
makes it safe); every exception of the decode is caught and judged by the same re-check
(``UnicodeDecodeError``, ``RecursionError`` are not ``msgspec.DecodeError``); the view is
released before anything else (so it never pins the mapping); and the store allows it only for
types whose values never alias their input (``memoryview``, ``msgspec.Raw``), whose decoding runs
no user code (``__post_init__`` must never see torn bytes), and never with CRC on. msgspec bounds
every read by its buffer and pre-allocates at most 16 items per container, so a torn decode
cannot crash or allocate wildly (3 million torn/mutated buffers and 2 million live-racing decodes
were tried while designing this).

References: the Linux kernel's ``include/linux/seqlock.h`` (the same even/odd protocol, with
the fences C can emit and Python cannot); H.-J. Boehm, "Can Seqlocks Get Along with Programming
Language Memory Models?" (MSPC 2012) on why the data reads must not be reordered past the second
seq load -- here each load is an opaque C call, which the interpreter cannot reorder.

Open questions: weakly ordered CPUs rely on the CRC, which also disables in-place decoding
there; a futex on HEAD could replace the semaphores for waking (measured slower so far).

Bounds
------
A reader retries while HEAD or seq moves. A healthy writer holds a slot for one memcpy, so a
reader that still cannot get a consistent copy after ``READ_DEADLINE`` seconds is looking at a
damaged segment and raises :class:`CorruptStoreError` instead of spinning forever. Lengths are
checked against the slot capacity before anything is copied.
"""

from __future__ import annotations

import mmap
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, Final

from ._errors import CorruptStoreError
from ._layout import (
    SLOT_CRC_I,
    SLOT_HEADER_SIZE,
    SLOT_LEN_I,
    SLOT_TS_Q,
    W_BASE_VERSION,
    W_CONFLICTS,
    W_GENERATION,
    W_HEAD,
    Geometry,
    slot_stride,
)

__all__ = ["IN_PLACE_MIN", "READ_DEADLINE", "DecodeFailed", "Ring", "RingMoved"]

READ_DEADLINE: Final = 0.5
LARGE_PAYLOAD: Final = 256 * 1024  # copies at least this big go to a reusable per-thread buffer
IN_PLACE_MIN: Final = 4096  # payloads at least this big may be decoded in place (see below)
_scratch = threading.local()
_SPINS_BEFORE_YIELD: Final = 64

_HEAD: Final = W_HEAD
_BASE: Final = W_BASE_VERSION
_CONFLICTS: Final = W_CONFLICTS


class RingMoved(Exception):
    """Internal: the store grew into a newer ring than this one (see ``_growth``)."""


class DecodeFailed(Exception):
    """Internal: a slot that stayed stable across the read does not decode (``cause``)."""

    def __init__(self, cause: Exception, version: int) -> None:
        super().__init__(cause)
        self.cause = cause
        self.version = version


class Ring:
    """The seqlock ring over any writable buffer (a shared mapping, or a ``bytearray`` in tests).

    The ring does no locking of its own: callers of :meth:`commit` must be serialized.
    """

    __slots__ = (
        "_buf",
        "_bytes",
        "_capacity",
        "_crc",
        "_i",
        "_nslots",
        "_plain_max",
        "_q",
        "_reuse",
        "_s",
        "_slot_at",
        "_slots_at",
        "_stride",
        "capacity",
        "generation",
        "reads",
        "retries",
        "verify",
    )

    def __init__(
        self,
        buf: bytearray | mmap.mmap,
        geometry: Geometry,
        *,
        crc: bool,
        reuse_buffer: bool = True,
        generation: int = 0,
        slots: tuple[bytearray | mmap.mmap, int, int] | None = None,
    ) -> None:
        """*buf* holds the header words (HEAD, ...) and, unless *slots* says otherwise, the
        slots. A ring the store grew into passes ``slots=(buffer, offset of slot 0,
        slot payload capacity)`` and its *generation*."""
        self._q = memoryview(buf).cast("Q")
        slots_buf, slots_at, capacity = (
            (buf, geometry.slots_at, geometry.slot_size) if slots is None else slots
        )
        view = memoryview(slots_buf)
        self._buf = slots_buf
        self._s = view.cast("Q") if slots is not None else self._q
        self._i = view.cast("I")
        self._bytes = view
        self._crc = crc
        # False for value types that decode as views of their input (see _copy_large).
        self._reuse = reuse_buffer
        self.generation = generation
        # Plain ints: the hot paths compute a slot offset per call, and properties cost ~250 ns.
        self._slots_at = slots_at
        self._stride = slot_stride(capacity)
        self._nslots = geometry.slots
        self._capacity = capacity
        self.capacity = capacity
        """The largest payload a slot of this ring holds."""
        # Per slot, precomputed for the one-frame read: seq's u64 index, the u32 index of the
        # payload length (the crc follows it) and where the payload starts.
        bases = [slots_at + i * self._stride for i in range(geometry.slots)]
        self._slot_at = [
            (base >> 3, (base >> 2) + SLOT_LEN_I, base + SLOT_HEADER_SIZE) for base in bases
        ]
        # The longest payload the plain path of read_newest_value takes: a slice copy, no CRC,
        # below the in-place and reusable-buffer sizes, within the slot.
        self._plain_max = -1 if crc else min(capacity, IN_PLACE_MIN - 1, LARGE_PAYLOAD - 1)
        # Only the negative-control test turns this off, to show the torture test detects tearing.
        self.verify = True
        # This handle's slot copies and the attempts it had to repeat (cached reads not counted).
        self.reads = 0
        self.retries = 0

    @property
    def words(self) -> memoryview:
        """The buffer as u64 words, for callers that read HEAD on a hot path."""
        return self._q

    def head(self) -> int:
        return int(self._q[_HEAD])

    def take_over(self) -> None:
        """Make this ring the one that accepts commits (the last step of a move, under the
        writer lock; see ``_growth``)."""
        self._q[W_GENERATION] = self.generation

    def moved(self) -> bool:
        """Whether the store now commits into a newer ring (it grew)."""
        return bool(self._q[W_GENERATION] != self.generation)

    def commits(self) -> int:
        # Derived, not counted: a counter bumped after publishing HEAD would fall behind when a
        # writer is killed between the two stores (the chaos soak caught exactly that).
        return int(self._q[_HEAD] - self._q[_BASE])

    def conflicts(self) -> int:
        return int(self._q[_CONFLICTS])

    def last_update_ns(self) -> int:
        """Commit time of the newest version: its slot's timestamp, written before HEAD was
        published, so it is never out of step with HEAD. 0 while empty."""
        for _ in range(_SPINS_BEFORE_YIELD):
            version = self.head()
            if version == 0:
                return 0
            seq = (self._slots_at + (version % self._nslots) * self._stride) >> 3
            ts_ns = self._s[seq + SLOT_TS_Q]
            if self._s[seq] == 2 * version:
                return int(ts_ns)
        return 0  # lapped every time: a writer far faster than us; the time is moot

    def consistent_counters(self) -> tuple[int, int, int]:
        """``(version, commits, last_update_ns)`` belonging to one version of the store (each
        read separately could mix two versions while a writer is busy)."""
        for _ in range(_SPINS_BEFORE_YIELD):
            version = self.head()
            commits = int(version - self._q[_BASE])
            if version == 0:
                return 0, commits, 0
            seq = (self._slots_at + (version % self._nslots) * self._stride) >> 3
            ts_ns = self._s[seq + SLOT_TS_Q]
            if self._s[seq] == 2 * version and self.head() == version:
                return version, commits, int(ts_ns)
        return version, commits, 0  # lapped every time: the time is moot

    def count_conflict(self) -> None:
        """Count a refused compare-and-set. Callers hold the writer lock."""
        self._q[_CONFLICTS] += 1

    def commit(self, payload: bytes, ts_ns: int) -> int:
        """Write *payload* as message HEAD+1 and publish it. Returns the new version.

        The caller holds the writer lock and has checked ``len(payload)`` against the slot size.
        """
        version = self._q[_HEAD] + 1
        self.write_slot(version, payload, ts_ns)
        self._q[_HEAD] = version
        return version

    def write_slot(self, version: int, payload: bytes | memoryview, ts_ns: int) -> None:
        """Write message *version* into its slot (seq odd, payload, length, crc, ts, seq even)
        without publishing it. The caller holds the writer lock."""
        q = self._s
        base = self._slots_at + (version % self._nslots) * self._stride
        seq = base >> 3
        q[seq] = 2 * version - 1
        start = base + SLOT_HEADER_SIZE
        self._buf[start : start + len(payload)] = payload
        word = base >> 2
        self._i[word + SLOT_LEN_I] = len(payload)
        if self._crc:
            self._i[word + SLOT_CRC_I] = zlib.crc32(payload)
        q[seq + SLOT_TS_Q] = ts_ns
        q[seq] = 2 * version

    def restore(self, version: int, payload: bytes, ts_ns: int) -> None:
        """Make a fresh ring hold *payload* as message *version* (a checkpoint restore), so that
        the next commit is *version* + 1. Only before the segment is published."""
        self._q[_HEAD] = version - 1
        self.commit(payload, ts_ns)
        self._q[_BASE] = version

    def _check_oversized(self, version: int, seq: int, length: int) -> None:
        """A slot of *version* claims *length* bytes, more than it holds. A writer never stores
        such a length: if the slot's seq still holds, the slot is damaged (raise); otherwise a
        writer raced the read, and the caller retries."""
        if self._s[seq] == version << 1:
            raise CorruptStoreError(
                f"slot of version {version} claims {length} bytes, "
                f"more than the slot size {self._capacity}"
            )

    def read(self, version: int) -> tuple[bytes | memoryview, int] | None:
        """Copy message *version* out of its slot: ``(payload, ts_ns)``, or ``None`` if the slot no
        longer (or not yet) holds it consistently, in which case the caller re-reads HEAD."""
        q = self._s
        base = self._slots_at + (version % self._nslots) * self._stride
        seq = base >> 3
        stable = 2 * version
        if q[seq] != stable:
            return None
        word = base >> 2
        length = self._i[word + SLOT_LEN_I]
        if length > self._capacity:
            self._check_oversized(version, seq, length)
            return None
        crc = self._i[word + SLOT_CRC_I]
        ts_ns = q[seq + SLOT_TS_Q]
        start = base + SLOT_HEADER_SIZE
        if length < LARGE_PAYLOAD or not self._reuse:
            data: bytes | memoryview = bytes(self._buf[start : start + length])
        else:
            data = self._copy_large(start, length)
        if self.verify and q[seq] != stable:
            return None
        if self._crc and zlib.crc32(data) != crc:
            return None
        return data, ts_ns

    def read_newest_value(
        self,
        decode: Callable[[bytes | bytearray | memoryview], Any],
        in_place: bool,
        version: int | None = None,
    ) -> tuple[Any, int]:
        """The newest message, decoded: ``(value, version)``, ``(None, 0)`` while empty.
        *version* is HEAD if the caller has just loaded it (saves a load).

        The hot path of a changed ``get()``: one frame, the slot's offsets looked up in one
        tuple, and a payload of at most :attr:`_plain_max` bytes (the common case) copied by one
        slice of the mapping and decoded after the seq re-check, with no other branch taken.
        With *in_place*, a payload of at least :data:`IN_PLACE_MIN` bytes is decoded straight
        from the mapping and the slot's seq re-checked afterwards, which saves the copy. That is
        sound only because the decode is thrown away unless seq held across it: a torn buffer
        "decodes" into garbage most of the time (measured: 97 % of torn decodes succeed), and
        msgspec bounds every read by the buffer and pre-allocates at most 16 items, so a torn
        decode cannot crash or allocate wildly; every exception is caught, and the view is
        released before anything else. Callers pass *in_place* only for types whose decoded
        values never point into the buffer and whose decoding runs no user code, and never
        with CRC on (the CRC must be checked on a private copy). Raises :class:`RingMoved`
        when the store grew past this ring and :class:`DecodeFailed` for a stable slot that
        does not decode.
        """
        deadline = 0.0
        spins = 0
        if version is None:
            version = self._q[_HEAD]
        while True:
            if version == 0:
                return None, 0
            slot = self._slot_at[version % self._nslots]
            seq, length_at, start = slot
            # No seq load before the copy: HEAD was that load (see "Reading the newest").
            length = self._i[length_at]
            if length <= self._plain_max:
                data = self._buf[start : start + length]  # a private copy (bytes of a mmap)
                if self._s[seq] == version << 1 or not self.verify:
                    try:
                        value = decode(data)
                    except Exception as exc:
                        raise DecodeFailed(exc, version) from exc
                    self.reads += 1
                    return value, version
            else:
                got = self._read_big(decode, in_place, version, slot, length)
                if got is not None:
                    return got
            if self._q[W_GENERATION] != self.generation:
                raise RingMoved  # this ring stopped at the growth; the caller follows
            spins += 1
            deadline = self._retry(spins, deadline, version)
            version = self._q[_HEAD]

    def _read_big(
        self,
        decode: Callable[[bytes | bytearray | memoryview], Any],
        in_place: bool,
        version: int,
        slot: tuple[int, int, int],
        length: int,
    ) -> tuple[Any, int] | None:
        """One attempt of :meth:`read_newest_value` at a payload the plain path does not take:
        in place, into the reusable buffer, CRC-checked, or a length the slot cannot hold.
        ``None`` if the writer raced it."""
        seq, length_at, start = slot
        stable = version << 1
        s = self._s
        if length > self._capacity:
            self._check_oversized(version, seq, length)
            return None
        if in_place and length >= IN_PLACE_MIN:
            failure: Exception | None = None
            view = self._bytes[start : start + length]
            try:
                value = decode(view)
            except Exception as exc:  # torn bytes may raise anything; judged below
                failure, value = exc, None
            finally:
                view.release()
            if self.verify and s[seq] != stable:
                return None
            if failure is not None:
                raise DecodeFailed(failure, version)
            self.reads += 1
            return value, version
        if length < LARGE_PAYLOAD or not self._reuse:
            data: bytes | bytearray | memoryview = self._buf[start : start + length]
        else:
            data = self._copy_large(start, length)
        crc = self._i[length_at + (SLOT_CRC_I - SLOT_LEN_I)] if self._crc else 0
        if self.verify and s[seq] != stable:
            return None
        if self._crc and zlib.crc32(data) != crc:
            return None
        try:
            value = decode(data)
        except Exception as exc:
            raise DecodeFailed(exc, version) from exc
        self.reads += 1
        return value, version

    def _retry(self, spins: int, deadline: float, version: int) -> float:
        """Bookkeeping of a failed read attempt: spin a little, then yield the CPU, and give
        up at the deadline (a slot that never settles is damaged). Returns the deadline."""
        self.retries += 1
        if spins < _SPINS_BEFORE_YIELD:
            return deadline
        now = time.monotonic()
        if deadline == 0.0:
            return now + READ_DEADLINE
        if now > deadline:
            raise CorruptStoreError(
                f"could not read a consistent copy of version {version} "
                f"within {READ_DEADLINE} s: the slot is damaged"
            )
        time.sleep(0)
        return deadline

    def _copy_large(self, start: int, length: int) -> memoryview:
        """Copy a large payload into this thread's reusable buffer.

        A fresh ``bytes`` per read of a 1 MB value made glibc grow and trim its heap on every
        read while the previous decoded value was still cached: ~230 page faults, ~390 us per
        read. The copy is still private to this thread, and callers decode it before their
        next read on this thread. That is safe only for value types whose decoded objects
        never point into the buffer: ``memoryview`` and ``msgspec.Raw`` fields do (msgspec
        decodes them without copying), so stores of such types pass ``reuse_buffer=False``
        and every read gets fresh bytes -- a value once returned never changes.
        """
        scratch: bytearray | None = getattr(_scratch, "buf", None)
        if scratch is None or len(scratch) < length:
            scratch = bytearray(max(length, self._capacity))
            _scratch.buf = scratch
        view = memoryview(scratch)[:length]
        view[:] = self._bytes[start : start + length]
        return view

    def read_newest(self) -> tuple[bytes | memoryview | None, int, int]:
        """``(payload, version, ts_ns)`` of the newest message; ``(None, 0, 0)`` while empty.
        A large payload is a view of this thread's reusable buffer: use it before the next read.

        Retries while the writer races us; raises :class:`CorruptStoreError` past the deadline.
        """
        q = self._q
        deadline = 0.0
        spins = 0
        while True:
            version = int(q[_HEAD])
            if version == 0:
                return None, 0, 0
            got = self.read(version)
            if got is not None:
                self.reads += 1
                return got[0], version, got[1]
            if q[W_GENERATION] != self.generation:
                raise RingMoved  # this ring stopped at the growth; the caller follows
            spins += 1
            deadline = self._retry(spins, deadline, version)

    def release(self) -> None:
        """Drop the views into the buffer so that a mapping can be closed."""
        self._q.release()
        self._s.release()
        self._i.release()
        self._bytes.release()

    # ------------------------------------------------------------ replicas (shmstore.mirror)

    def commit_at(self, version: int, payload: bytes | memoryview, ts_ns: int) -> int:
        """Write *payload* as message *version* (> HEAD) and publish it: a replica taking the
        origin's version. The caller holds the writer lock and has checked the length.

        Skipping versions keeps the protocol intact: a slot's ``seq`` names the message it
        holds, and the slots of the skipped versions never held them, so a subscriber that
        wants a skipped version finds another ``seq`` there and reports the exact number it
        missed (``SubscriberLaggedError``), exactly as if it had been lapped.
        """
        head = int(self._q[_HEAD])
        if version <= head:
            raise ValueError(f"version {version} is not newer than HEAD {head}")
        # As commit(): the slot first, then HEAD, which never names a slot that lacks it.
        self.write_slot(version, payload, ts_ns)
        self._q[_HEAD] = version
        return version
