"""The projection's prefix walk (``projection_decoder``) against the plain projected decode.

The walk must give exactly what ``msgspec.msgpack.Decoder(projected).decode`` gives -- the same
value, or the same error -- on every payload a writer can leave, must really stop at the last
projected key (else it saves nothing), and must stay bounded on garbage. One decoder per
projection is shared by all examples, so the plan it learns from one payload is tried, and
refuted, on the next: the guess path and the relearning path are both exercised.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmstore import Store
from shmstore._projection import _SKIP_BUDGET, projection_decoder


class Wide(msgspec.Struct, frozen=True):
    """A stored type with every scalar wire form before a bulky tail."""

    version: int
    state: int
    note: str
    ratio: float
    missing: int | None
    flag: bool
    blob: bytes
    when: dt.datetime
    tags: list[str]
    meta: dict[str, int]
    after: str
    history: list[dict[str, int]]


class HeadOnly(msgspec.Struct, frozen=True):
    version: int
    state: int


class ThroughNote(msgspec.Struct, frozen=True):
    note: str
    version: int


class ThroughDatetime(msgspec.Struct, frozen=True):
    when: dt.datetime
    flag: bool = False


class PastContainers(msgspec.Struct, frozen=True):
    after: str
    ratio: float = 0.0


class WithDefaults(msgspec.Struct, frozen=True):
    missing: int | None = None
    blob: bytes = b""


class NoFields(msgspec.Struct, frozen=True):
    pass


class Everything(msgspec.Struct, frozen=True):
    history: list[dict[str, int]]
    version: int


PROJECTIONS: list[type[msgspec.Struct]] = [
    HeadOnly,
    ThroughNote,
    ThroughDatetime,
    PastContainers,
    WithDefaults,
    NoFields,
    Everything,
]
FAST = {tp: projection_decoder(tp, walk_min=0) for tp in PROJECTIONS}  # walk small ones too
PLAIN = {tp: msgspec.msgpack.Decoder(tp).decode for tp in PROJECTIONS}
FIELDS = Wide.__struct_fields__

ints = st.one_of(
    st.integers(-32, 127),  # fixints
    st.integers(-(2**63), 2**64 - 1),  # (u)int8-64
    st.sampled_from([128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -33, -(2**63)]),
)
long_text = st.sampled_from(["", "x" * 31, "y" * 32, "é" * 200, "z" * 65536, "ü" * 40000])
texts = st.one_of(st.text(max_size=40), long_text)
blobs = st.one_of(st.binary(max_size=40), st.sampled_from([b"\0" * 256, b"\1" * 70000]))
floats = st.floats(allow_nan=True, allow_infinity=True)
datetimes = st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)).map(
    lambda d: d.replace(tzinfo=dt.UTC)
)
histories = st.one_of(
    st.lists(st.dictionaries(st.text(max_size=5), ints, max_size=3), max_size=3),
    st.integers(0, 300).map(lambda n: [{"k": i} for i in range(n)]),
)
wides = st.builds(
    Wide,
    version=ints,
    state=ints,
    note=texts,
    ratio=floats,
    missing=st.none() | ints,
    flag=st.booleans(),
    blob=blobs,
    when=datetimes,
    tags=st.one_of(st.lists(st.text(max_size=8), max_size=4), st.just(["t"] * 100)),
    meta=st.dictionaries(st.text(max_size=8), ints, max_size=4),
    after=texts,
    history=histories,
)


WHEN = dt.datetime(2026, 11, 28, 14, 0, tzinfo=dt.UTC)


def wide(**changes: Any) -> Wide:
    base = Wide(1, 2, "n", 0.5, None, True, b"b", WHEN, [], {}, "", [])
    return msgspec.structs.replace(base, **changes)


def outcome(decode: Callable[[Any], Any], payload: bytes | memoryview) -> tuple[str, Any]:
    """What a decode gave, comparably: NaN != NaN, so values are compared as their encoding."""
    try:
        return "value", msgspec.msgpack.encode(decode(payload))
    except Exception as exc:
        return "error", (type(exc), str(exc))


def assert_same(payload: bytes) -> None:
    for tp in PROJECTIONS:
        expected = outcome(PLAIN[tp], payload)
        assert outcome(FAST[tp], payload) == expected, tp
        assert outcome(FAST[tp], memoryview(bytearray(payload))) == expected, tp


_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(wides)
def test_the_walk_decodes_what_the_plain_decode_does(value: Wide) -> None:
    assert_same(msgspec.msgpack.encode(value))


@_SETTINGS
@given(
    st.permutations(FIELDS),
    st.lists(st.sampled_from(FIELDS), unique=True, max_size=4),
    st.dictionaries(st.text(max_size=8), ints, max_size=3),
    wides,
)
def test_foreign_layouts_decode_as_the_plain_decode_says(
    order: list[str], dropped: list[str], extra: dict[str, int], value: Wide
) -> None:
    """Another writer's field order, fields left out (defaults, or a required one missing),
    unknown keys: the walk either confirms what it needs or defers to the plain decode."""
    fields = msgspec.to_builtins(value)
    mapping = {**extra, **{name: fields[name] for name in order if name not in dropped}}
    assert_same(msgspec.msgpack.encode(mapping))


@_SETTINGS
@given(st.binary(max_size=300) | wides.map(msgspec.msgpack.encode), st.data())
def test_garbage_is_bounded(payload: bytes, data: st.DataObject) -> None:
    """Torn bytes: anything may be raised (the read catches and judges it), nothing may hang
    or allocate past the payload, and an undamaged prefix still decodes right."""
    if payload:
        at = data.draw(st.integers(0, len(payload) - 1))
        payload = payload[:at] + bytes([data.draw(st.integers(0, 255))]) + payload[at + 1 :]
        payload = payload[: data.draw(st.integers(0, len(payload)))]
    for tp in PROJECTIONS:
        outcome(FAST[tp], payload)
        outcome(FAST[tp], memoryview(bytearray(payload)))


def test_the_walk_never_reads_past_the_last_projected_key() -> None:
    """The point of the walk: a tail msgspec cannot even parse does not matter to it, while the
    plain decode fails on it (so the bytes after the head were really not read)."""
    value = wide()
    payload = msgspec.msgpack.encode(value)
    cut = payload.index(msgspec.msgpack.encode("tags"))
    damaged = payload[:cut] + b"\xc1" * 50  # 0xc1: never used in MessagePack
    # Fresh decoders: the shared ones may be pausing after another test's garbage.
    head, through = (projection_decoder(tp, walk_min=0) for tp in (HeadOnly, ThroughDatetime))
    for _ in range(2):  # the first read learns the layout, the second uses it
        assert head(damaged) == HeadOnly(1, 2)
        assert through(memoryview(damaged)) == ThroughDatetime(value.when, True)
    with pytest.raises(msgspec.DecodeError):
        PLAIN[HeadOnly](damaged)


class Renamed(msgspec.Struct, frozen=True, rename="camel", tag="v1"):
    first_field: int
    second_field: str
    long_tail: list[int]


class RenamedHead(msgspec.Struct, frozen=True, rename="camel"):
    second_field: str


class Strict(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True):
    first_field: int


class Tagged(msgspec.Struct, frozen=True, rename="camel", tag="v1"):
    first_field: int


def test_renamed_and_tagged_stored_types_are_walked() -> None:
    payload = msgspec.msgpack.encode(Renamed(7, "s", [1, 2, 3]))
    damaged = payload[: payload.index(msgspec.msgpack.encode("longTail"))] + b"\xc1"
    decode = projection_decoder(RenamedHead, walk_min=0)
    assert decode(damaged) == decode(payload) == RenamedHead("s")


@pytest.mark.parametrize(
    ("projected", "value"),
    [
        # its key first and unknown ones after: a map of the first entry alone would decode
        (Strict, {"firstField": 7, "secondField": "s", "longTail": [1, 2, 3]}),
        (Tagged, Renamed(7, "s", [1, 2, 3])),
    ],
)
def test_projections_a_shorter_map_could_fool_take_the_plain_decode(
    projected: type, value: Any
) -> None:
    """forbid_unknown_fields rejects the tail's keys; a tagged type checks the tag: both must
    see the whole map, so they give what the plain decode gives, and a damaged tail fails."""
    payload = msgspec.msgpack.encode(value)
    damaged = payload[: payload.index(msgspec.msgpack.encode("longTail"))] + b"\xc1"
    decode = projection_decoder(projected, walk_min=0)
    plain = msgspec.msgpack.Decoder(projected).decode
    assert outcome(decode, payload) == outcome(plain, payload)
    with pytest.raises(msgspec.DecodeError):
        decode(damaged)


def test_a_layout_the_walk_cannot_use_still_decodes_right() -> None:
    """A big container before the last projected key makes the walk give up (and pause): every
    read, the paused ones and the retries after them, gives the plain decode's value."""
    decode = projection_decoder(PastContainers, walk_min=0)
    slow = wide(tags=["t"] * 500, after="after")
    quick = msgspec.structs.replace(slow, tags=[], after="quick")
    for i in range(300):
        value = quick if i % 7 == 0 else slow
        assert decode(msgspec.msgpack.encode(value)) == PastContainers(value.after, 0.5)


def test_a_projected_store_read_uses_the_walk(store_name: str) -> None:
    """Through the store, in place from the mapping (payloads of 4 KB and more) and copied."""
    with Store.create(store_name, Wide) as st:
        view = st.projection(ThroughNote)
        for size in (0, 1000):
            value = wide(version=size, note="é" * 40, history=[{"k": i} for i in range(size)])
            st.set(value)
            assert view.get() == ThroughNote("é" * 40, size)


def test_only_payloads_of_4_kb_and_more_are_walked() -> None:
    """Below 4 KB msgspec's own skip is cheaper than the walk: a small payload takes the plain
    decode (a damaged tail fails it), a big one the walk (the same damage does not matter)."""
    decode = projection_decoder(HeadOnly)
    for size, walked in ((100, False), (5000, True)):
        value = wide(note="n" * size)
        payload = msgspec.msgpack.encode(value)
        damaged = payload[: payload.index(msgspec.msgpack.encode("tags"))] + b"\xc1"
        assert decode(payload) == HeadOnly(1, 2)
        if walked:
            assert decode(damaged) == HeadOnly(1, 2)
        else:
            with pytest.raises(msgspec.DecodeError):
                decode(damaged)


class Tearing:
    """A buffer that a writer rewrites while the walk reads it: after *reads* accesses it
    answers from *later* (another payload, or garbage) -- the torn read at every point."""

    def __init__(self, first: bytes, later: bytes, reads: int) -> None:
        self.first, self.later, self.reads = first, later, reads

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, at: int | slice) -> Any:
        self.reads -= 1
        data = self.first if self.reads >= 0 else self.later
        return data[at]


@pytest.mark.parametrize("projected", [HeadOnly, ThroughDatetime, PastContainers])
def test_a_walk_torn_at_any_point_ends(projected: type) -> None:
    """Whatever the bytes turn into mid-walk, the decode ends (a value or an exception, which
    the store's read judges by the seq re-check), and reads no further than one pass."""
    values = [wide(note="é" * 70000, blob=b"\1" * 300), wide(version=2**40, tags=["x"] * 9)]
    payloads = [msgspec.msgpack.encode(v) for v in values]
    garbage = bytes(range(256)) * 300
    for first in payloads:
        for later in [*payloads, garbage, b"\xdb\xff\xff\xff\xff" * 100, b"\xdc" * 70000, b""]:
            decode = projection_decoder(projected, walk_min=0)
            decode(first)  # learn its plan: the torn read then goes the guessing way too
            for reads in range(60):
                buf = Tearing(first, later, reads)
                outcome(decode, buf)  # type: ignore[arg-type]
                # Bounded: two values an entry, of the 13 the map claims; a value is at most
                # _SKIP_BUDGET items of two accesses each (the guess loop adds one pass).
                assert reads - buf.reads <= 3 * 13 * 2 * (2 * _SKIP_BUDGET + 1)
