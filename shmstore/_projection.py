"""Projections: read a few fields of a big value without building -- or parsing -- the rest.

A reader that needs the state of a 10 KB FSM snapshot should not pay for decoding its history.
A projection is a smaller ``Struct`` whose fields are a subset of the stored type's.

Why msgspec alone is not enough
-------------------------------
msgspec decodes a ``Struct`` from a map by key and skips the keys the type does not have
without building objects for them -- but it still *parses* them: decoding the 100-entry FSM
snapshot (10.7 KB) as its four head fields costs 0.28x the full decode, and as an empty Struct
0.27x. Skipping ``history`` byte by byte is the floor, so no choice of type goes below it.

The prefix walk
---------------
A Struct that is not array-like is encoded as a map whose entries follow the definition order,
and the fields a reader wants (version, state, reason, timestamps) come before the bulky ones.
So :func:`projection_decoder` walks the map's entries from the front, in Python, only until it
has met the key of every projected field, then hands msgspec a map of just the entries it
walked (a new map header + those bytes): msgspec never sees the rest. The walk needs only each
entry's *size*, and a MessagePack value's first byte gives it (``_SIZE``: a table of 256
entries -- fixint, nil, bool, floats, (u)int8-64, fixstr, fixext -- plus length-prefixed
str/bin/ext and small containers in ``_skip``). On the 10.7 KB FSM snapshot the head fields
then cost 0.10x the full decode instead of 0.30x (``benchmarks/projection.py``). The walk is
Python, a microsecond or two whatever the size, so payloads under ``_WALK_MIN`` (4 KB) are left
to msgspec's skip, which is cheaper there.

The walk learns the layout from the payload instead of assuming the stored type's: it compares
each key, as bytes, with the projection's encoded field names. So it needs no stored type, and
it stays exact for a stored type that omits defaults, for renamed fields, for a tag (one more
key), and for a value written by another type of the same schema in another field order. The
keys it took become a *plan* for the next payload -- values of one type have one layout -- which
is confirmed key by key (a slice compare: cheaper than a lookup) before it is used; a payload
that refutes it is walked afresh.

Why it is exact: the keys of a map that msgspec writes are unique, so once every projected key
has been met the rest of the map holds none of them, and the plain decode (msgspec's decode of
the whole payload as the projection) would have skipped all of it. (A foreign map with a
duplicate projected key after the walked entries would decode differently; no msgspec encoder
writes one.) Whenever the walk is not sure, it gives up and returns the plain decode, so the
result -- value or error -- is that decode's: when a projected key is absent (its field takes
its default), when a big container comes first (more than ``_SKIP_BUDGET`` values: walking it
in Python would cost more than msgspec's skip), when the payload is not a map, and when it ends
early. A layout that made the walk give up is not walked again for the next
``_PAUSE_AFTER_GIVING_UP`` decodes, so it costs little more than the plain decode. Projection
types that a shorter map could decode differently always take the plain decode: tagged ones,
and ``forbid_unknown_fields`` (the plain decode fails on an unknown key anywhere in the map, a
shorter map only on one among the entries walked).

Torn bytes
----------
The decode runs inside the store's seqlock read, possibly straight from the live mapping; the
read re-checks the slot's seq after it and throws away any result it does not confirm, and
every exception is caught and judged by that check. So a torn payload may make the walk raise
anything, learn a garbage plan (confirmed, hence harmless, on the next payload), or compute a
wrong end. What must hold is that it stays bounded: every value it steps over, key or not,
moves the offset forward by at least one byte and the next read of a byte past the buffer
raises ``IndexError`` (which gives up), so the walk ends within one pass over the buffer; a
skip reads at most ``_SKIP_BUDGET`` values; a length field of up to 4 GB only moves the offset,
which is checked against the buffer before the copy; and msgspec is handed a private copy of at
most the payload.

The store decides whether its read may decode in place from its own type. A projection type
whose decoding runs user code (a ``__post_init__``) must never see torn bytes even so: its
:class:`Projection` reads a private copy and decodes it after the read has confirmed it.

Soundness before any read
-------------------------
A projection is only sound if every field it asks for is there, with the same wire type, in
every value the store can hold. :func:`check_projection` proves that from the two types' msgspec
descriptions: each projected field must exist in the stored type under the same encoded name
with an equal type; a field the projection requires must be one the encoder always writes (a
required field, or one of a type that does not omit defaults), and where the encoder may omit a
field, the projection's default for it must be the stored type's (else it would report its own
default for a value holding the stored one: issue 20). A ``forbid_unknown_fields`` projection
must name every key the stored type may write (its fields and its tag): a strict subset would
fail every read of a value holding one of the others. Array-like Structs and types that are not
Structs are refused: their wire form is positional.

The projected value is cached per version like ``get()``'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import msgspec
import msgspec.inspect as mi

from ._codec import Codec
from ._errors import CorruptStoreError, SchemaMismatchError

__all__ = ["Projection", "check_projection", "projection_decoder"]

P = TypeVar("P")
Buffer = bytes | memoryview


def _size_table() -> tuple[int, ...]:
    """For each first byte of a MessagePack value: its whole size in bytes when the byte alone
    tells it, else 0 (length-prefixed or container: see ``_LONG``; 0xc1: never used)."""
    size = [0] * 256
    for b in range(0x80):
        size[b] = 1  # positive fixint
    for b in range(0xE0, 0x100):
        size[b] = 1  # negative fixint
    for b in range(0xA0, 0xC0):
        size[b] = 1 + (b - 0xA0)  # fixstr
    size[0xC0] = size[0xC2] = size[0xC3] = 1  # nil, false, true
    for b, n in {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}.items():
        size[b] = n  # float32/64, uint8-64
    for b, n in {0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}.items():
        size[b] = n  # int8-64
    for b, n in {0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}.items():
        size[b] = n  # fixext1-16: type byte + data
    return tuple(size)


def _long_table() -> dict[int, tuple[int, int, int]]:
    """First byte -> ``(width, head, per_item)``: the length (or item count) is the big-endian
    number in the *width* bytes after it (width 0: the low nibble of the byte itself), the value
    starts with *head* bytes, and then holds *length* bytes (``per_item`` 0: str, bin, ext) or
    ``per_item * count`` further values (1: array, 2: map)."""
    long = {}
    for b in range(0x80, 0x90):
        long[b] = (0, 1, 2)  # fixmap
    for b in range(0x90, 0xA0):
        long[b] = (0, 1, 1)  # fixarray
    long.update({0xD9: (1, 2, 0), 0xDA: (2, 3, 0), 0xDB: (4, 5, 0)})  # str8/16/32
    long.update({0xC4: (1, 2, 0), 0xC5: (2, 3, 0), 0xC6: (4, 5, 0)})  # bin8/16/32
    long.update({0xC7: (1, 3, 0), 0xC8: (2, 4, 0), 0xC9: (4, 6, 0)})  # ext8/16/32 (+ type byte)
    long.update({0xDC: (2, 3, 1), 0xDD: (4, 5, 1), 0xDE: (2, 3, 2), 0xDF: (4, 5, 2)})
    return long


_SIZE: Final = _size_table()
_LONG: Final = _long_table()
# The most values one skip may walk (a container counts each of its items). Past it, msgspec's
# own skip of the whole payload is cheaper than walking on in Python.
_SKIP_BUDGET: Final = 64
# After a walk that gave up on a well-formed payload (a big container or an absent key before
# the last projected key), this many decodes go straight to the plain decode: a layout that
# defeats the walk would otherwise pay for a useless walk on every read. It is tried again
# after them, since another writer's layout may suit it.
_PAUSE_AFTER_GIVING_UP: Final = 64
# Payloads shorter than this take the plain decode. The walk costs about 1.5-2.5 us of Python
# whatever the size, while msgspec skips about 1.5 KB a microsecond: on the 1.2 KB FSM snapshot
# the walk took 2.0 us against 0.9 us for the plain decode, on the 10.7 KB one 1.9 against 6.9.
_WALK_MIN: Final = 4096


def _skip(buf: Buffer, pos: int) -> int:
    """The offset just past the value that starts at *pos*; -1 to give up (more than
    ``_SKIP_BUDGET`` values, or the never-used byte 0xc1). Raises ``IndexError`` past the end."""
    pending = 1
    for _ in range(_SKIP_BUDGET):
        b = buf[pos]
        size = _SIZE[b]
        if size:
            pos += size
        else:
            shape = _LONG.get(b)
            if shape is None:
                return -1
            width, head, per_item = shape
            if width == 0:
                n = b & 0x0F
            elif width == 1:
                n = buf[pos + 1]
            else:
                n = int.from_bytes(buf[pos + 1 : pos + 1 + width], "big")
            pos += head
            if per_item:
                pending += per_item * n
            else:
                pos += n
        pending -= 1
        if not pending:
            return pos
    return -1


def _map_header(entries: int) -> bytes:
    if entries < 16:
        return bytes((0x80 | entries,))
    if entries < 1 << 16:
        return b"\xde" + entries.to_bytes(2, "big")
    return b"\xdf" + entries.to_bytes(4, "big")


def projection_decoder(projected: Any, walk_min: int = _WALK_MIN) -> Callable[[Buffer], Any]:
    """A decode of MessagePack bytes as the Struct type *projected* that gives exactly what
    ``msgspec.msgpack.Decoder(projected).decode`` gives (value or error) on every payload whose
    map keys are unique, but reads only the entries up to the last projected key (the prefix
    walk above) of payloads of at least *walk_min* bytes. Raises whatever that decode raises;
    on torn bytes, anything."""
    plain = msgspec.msgpack.Decoder(projected).decode
    info = mi.type_info(projected)
    if not isinstance(info, mi.StructType) or info.array_like:
        return plain  # not a map on the wire (check_projection refuses these anyway)
    if info.tag_field is not None or info.forbid_unknown_fields:
        return plain  # a shorter map could decode differently (above)
    needed = frozenset(msgspec.msgpack.encode(f.encode_name) for f in info.fields)
    size_of = _SIZE
    skip = _skip
    # The keys of the entries the last walk took, in order, and the header of a map of that
    # many: a guess at the next payload's layout, confirmed key by key before it is used. One
    # tuple, so threads sharing the decoder swap it whole.
    plan: tuple[tuple[tuple[bytes, int], ...], bytes] | None = None
    pause = 0

    def walk(buf: Buffer, count: int, pos: int) -> tuple[int, bytes]:
        """Walk the entries from *pos* until every projected key was met, and learn their
        keys as the plan: the end of the entries walked and the header of a map of them, or
        ``(-1, b"")`` to decode the whole payload."""
        nonlocal plan, pause
        missing = set(needed)
        keys: list[tuple[bytes, int]] = []
        while missing:
            if len(keys) == count:  # a projected key is absent: the plain decode decides
                pause = _PAUSE_AFTER_GIVING_UP
                return -1, b""
            key = pos
            size = size_of[buf[pos]]
            pos = pos + size if size else skip(buf, pos)
            if pos < 0:
                pause = _PAUSE_AFTER_GIVING_UP
                return -1, b""
            name = bytes(buf[key:pos])
            missing.discard(name)
            keys.append((name, pos - key))
            size = size_of[buf[pos]]
            pos = pos + size if size else skip(buf, pos)
            if pos < 0:
                pause = _PAUSE_AFTER_GIVING_UP
                return -1, b""
        header = _map_header(len(keys))
        plan = (tuple(keys), header)
        return pos, header

    def decode(buf: Buffer) -> Any:
        nonlocal pause
        if len(buf) < walk_min:
            return plain(buf)
        if pause:
            pause -= 1
            return plain(buf)
        try:
            b = buf[0]
            if 0x80 <= b <= 0x8F:
                count, pos = b & 0x0F, 1
            elif b == 0xDE:
                count, pos = (buf[1] << 8) | buf[2], 3
            else:  # not a map a Struct encoder writes (map32 would take 65536 fields)
                return plain(buf)
            body = pos
            guess = plan
            if guess is not None and len(guess[0]) <= count:
                for key, n in guess[0]:
                    end = pos + n
                    if buf[pos:end] != key:
                        break
                    size = size_of[buf[end]]
                    pos = end + size if size else skip(buf, end)
                    if pos < 0:
                        return plain(buf)
                else:
                    if pos > len(buf):
                        return plain(buf)
                    return plain(guess[1] + buf[body:pos])
            pos, header = walk(buf, count, body)
            if pos < 0 or pos > len(buf):
                return plain(buf)
        except IndexError:  # the payload ends early: the plain decode says how
            return plain(buf)
        return plain(header + buf[body:pos])

    return decode


def _struct_info(tp: Any, role: str) -> mi.StructType:
    info = mi.type_info(tp)
    if not isinstance(info, mi.StructType):
        raise SchemaMismatchError(f"a projection needs msgspec Structs; the {role} is {tp!r}")
    if info.array_like:
        raise SchemaMismatchError(f"the {role} {tp!r} is array_like: its fields are positional")
    return info


def check_projection(stored: Any, projected: Any) -> None:
    """Raise :class:`SchemaMismatchError` unless values of *stored* always decode as
    *projected* (a subset of its fields, same names and types)."""
    full = _struct_info(stored, "stored type")
    part = _struct_info(projected, "projection")
    fields = {f.encode_name: f for f in full.fields}
    for field in part.fields:
        source = fields.get(field.encode_name)
        if source is None:
            raise SchemaMismatchError(
                f"{projected.__qualname__}.{field.name}: the stored type "
                f"{stored.__qualname__} has no field {field.encode_name!r}"
            )
        if source.type != field.type:
            raise SchemaMismatchError(
                f"{projected.__qualname__}.{field.name} is {field.type}, but "
                f"{stored.__qualname__}.{source.name} is {source.type}"
            )
        if source.required or not stored.__struct_config__.omit_defaults:
            continue  # always on the wire: the projection's default is never used
        if field.required:
            raise SchemaMismatchError(
                f"{projected.__qualname__}.{field.name} is required, but "
                f"{stored.__qualname__} omits it when it holds its default: give it a default"
            )
        mine, theirs = _default_of(field), _default_of(source)
        if type(mine) is not type(theirs) or mine != theirs:
            raise SchemaMismatchError(
                f"{projected.__qualname__}.{field.name} defaults to {mine!r}, but "
                f"{stored.__qualname__} omits {source.name} when it holds {theirs!r}: "
                f"the projection would report {mine!r} for it; give it the default {theirs!r}"
            )
    if part.forbid_unknown_fields:
        mine_keys = {f.encode_name for f in part.fields} | _tag_keys(part)
        unknown = sorted(({f.encode_name for f in full.fields} | _tag_keys(full)) - mine_keys)
        if unknown:
            raise SchemaMismatchError(
                f"{projected.__qualname__} has forbid_unknown_fields, but values of "
                f"{stored.__qualname__} hold {', '.join(map(repr, unknown))}, which it does "
                "not have: reads would fail; drop forbid_unknown_fields from the projection"
            )


def _default_of(field: mi.Field) -> Any:
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return field.default


def _tag_keys(info: mi.StructType) -> set[str]:
    return set() if info.tag_field is None else {info.tag_field}


def _decode_confirmed(
    read: Callable[[Callable[[Any], Any]], tuple[Any, int]],
    decode: Callable[[Buffer], Any],
    projected: Any,
) -> tuple[Any, int]:
    """Read a private copy of the newest payload, then decode it: raises
    :class:`CorruptStoreError` for a (confirmed) payload that does not decode."""
    data, version = read(bytes)
    if not version:
        return None, 0
    try:
        return decode(data), version
    except Exception as exc:  # as the store's read: never a raw msgspec or Python error
        raise CorruptStoreError(
            f"version {version} does not decode as {projected.__qualname__}: {exc}"
        ) from exc


class Projection(Generic[P]):
    """Some fields of a store's newest value, decoded alone: ``get()`` and
    ``get_with_version()`` as on the store. Made by ``Store.projection``."""

    __slots__ = ("_cache", "_head", "_read", "type")

    def __init__(
        self,
        projected: type[P],
        head: Callable[[], int],
        read: Callable[[Callable[[Any], Any]], tuple[Any, int]],
    ) -> None:
        self.type = projected
        self._head = head
        decode = projection_decoder(projected)
        self._read: Callable[[], tuple[P | None, int]] = functools.partial(read, decode)
        if not Codec(projected).decode_in_place:
            # The read may decode straight from the mapping and judge the decode afterwards,
            # which the store allows for its own type; a projection type whose decoding runs
            # user code (``__post_init__``) must never see torn bytes, so its read takes a
            # private copy and the decode runs only once the seqlock has confirmed it.
            self._read = functools.partial(_decode_confirmed, read, decode, projected)
        self._cache: tuple[int, P | None] = (0, None)

    def get(self) -> P | None:
        """The projected fields of the newest value; ``None`` while the store is empty.
        Raises :class:`CorruptStoreError` for a value that does not decode as the projection
        and :class:`~shmstore.StateStoreError` once the store is closed."""
        version, value = self._cache  # get_with_version's, inline: one frame less
        if self._head() == version:
            return value
        value, version = self._read()
        self._cache = (version, value)
        return value

    def get_with_version(self) -> tuple[P | None, int]:
        """``(projected fields, version)`` of the newest value; ``(None, 0)`` while the store
        is empty. Raises as :meth:`get`."""
        version, value = self._cache
        if self._head() == version:
            return value, version
        value, version = self._read()
        self._cache = (version, value)
        return value, version
