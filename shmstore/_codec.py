"""Encoding, validation and the schema fingerprint of a store's value type.

Values travel as MessagePack (msgspec's fastest format and compact). A value is encoded and then
decoded again with the store's typed decoder before it is published: msgspec does not validate
``Struct`` fields at construction, so an ``IntEnum`` field can hold ``999`` and encode fine, and
only the readers would fail. Decoding at ``set()`` refuses such a value while the previous state
is untouched, and the decoded copy doubles as the writer's read cache.

The fingerprint is a 128-bit BLAKE2b of the type's JSON schema with documentation keys removed,
so that editing a docstring does not make old readers incompatible, while changing a field, its
type or default does.
"""

from __future__ import annotations

import hashlib
from typing import Any, Generic, TypeVar

import msgspec

from ._errors import InvalidSnapshotError

__all__ = [
    "ANY_FINGERPRINT",
    "ENCODE_ERRORS",
    "VALIDATE_ERRORS",
    "Codec",
    "fingerprint_of",
    "type_name_of",
]

T = TypeVar("T")

_DOC_KEYS = frozenset({"title", "description", "examples"})


def _strip_docs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_docs(v) for k, v in node.items() if k not in _DOC_KEYS}
    if isinstance(node, list):
        return [_strip_docs(v) for v in node]
    return node


def fingerprint_of(tp: Any) -> bytes:
    """16 bytes that differ whenever the wire schema of *tp* differs."""
    try:
        schema = _strip_docs(msgspec.json.schema(tp))
        canonical = msgspec.json.encode(schema, order="sorted")
    except (TypeError, ValueError):
        # Types msgspec can decode but not describe in JSON Schema: fall back to their identity.
        canonical = repr(tp).encode("utf-8")
    return hashlib.blake2b(canonical, digest_size=16).digest()


def type_name_of(tp: Any) -> str:
    if isinstance(tp, type):
        return f"{tp.__module__}:{tp.__qualname__}"
    return repr(tp)


ANY_FINGERPRINT = fingerprint_of(Any)
ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError)
VALIDATE_ERRORS = (msgspec.DecodeError, ValueError, RecursionError)


def _decode_traits(tp: Any) -> tuple[bool, bool]:
    """``(aliases_input, runs_user_code)`` for values of *tp*: whether they can hold
    ``memoryview`` or ``msgspec.Raw`` objects, which msgspec decodes as views of its input, and
    whether decoding them calls code of the user's (a ``__post_init__`` of a Struct or a
    dataclass). Unknown shapes count as both (the safe answer)."""
    seen: set[int] = set()
    aliases = user_code = False

    def walk(info: Any) -> None:
        nonlocal aliases, user_code
        if id(info) in seen:
            return
        seen.add(id(info))
        if isinstance(info, (msgspec.inspect.MemoryViewType, msgspec.inspect.RawType)):
            aliases = True
        if isinstance(info, msgspec.inspect.CustomType):
            aliases = user_code = True  # a dec_hook could keep or do anything
        cls = getattr(info, "cls", None)
        if cls is not None and (
            hasattr(cls, "__post_init__") or hasattr(cls, "__attrs_post_init__")
        ):
            user_code = True
        for attr in ("item_type", "key_type", "value_type"):
            sub = getattr(info, attr, None)
            if sub is not None:
                walk(sub)
        for attr in ("types", "item_types"):
            for sub in getattr(info, attr, ()):
                walk(sub)
        for f in getattr(info, "fields", ()):
            walk(f.type)

    try:
        walk(msgspec.inspect.type_info(tp))
    except (TypeError, ValueError):
        return True, True
    return aliases, user_code


class Codec(Generic[T]):
    """Encoder and typed decoder for one value type."""

    __slots__ = (
        "_decoder",
        "_encoder",
        "aliases_input",
        "decode_in_place",
        "fingerprint",
        "raw_decode",
        "raw_encode",
        "type",
        "type_name",
    )

    def __init__(self, tp: Any) -> None:
        self.type = tp
        self.fingerprint = fingerprint_of(tp)
        self.type_name = type_name_of(tp)
        self._encoder = msgspec.msgpack.Encoder()
        try:
            self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(tp)
        except TypeError as exc:
            raise TypeError(f"msgspec cannot decode values of type {tp!r}: {exc}") from None
        self.aliases_input, runs_user_code = _decode_traits(tp)
        """Whether a decoded value may point into the decoded buffer (``memoryview`` and
        ``msgspec.Raw`` fields decode without copying): such values must be decoded from
        a buffer of their own, never from one that is reused."""
        self.decode_in_place = not (self.aliases_input or runs_user_code)
        """Whether values may be decoded straight from shared memory and the decode thrown
        away if the writer raced it (see ``Ring.read_newest_value``): not for types that alias
        their input, nor for types whose decoding runs user code (``__post_init__``), which
        must never see torn bytes."""
        self.raw_encode = self._encoder.encode
        """msgspec's encode itself (``encode_failure`` translates its errors)."""
        self.raw_decode = self._decoder.decode
        """msgspec's decode itself: raises msgspec's (and Python's) errors untranslated."""

    def encode(self, value: T) -> bytes:
        try:
            return self._encoder.encode(value)
        except ENCODE_ERRORS as exc:
            raise self.encode_failure(value, exc) from exc

    def encode_failure(self, value: object, exc: BaseException) -> InvalidSnapshotError:
        """The error for a value that does not encode (for callers of ``raw_encode``)."""
        return InvalidSnapshotError(f"cannot encode {type(value).__name__}: {exc}")

    def decode(self, data: bytes | memoryview) -> T:
        """Decode bytes read from the store; msgspec errors propagate to the caller to translate."""
        return self._decoder.decode(data)

    def validate(self, data: bytes) -> T:
        """Decode freshly encoded *data* as a reader would, refusing what readers could not read."""
        try:
            return self._decoder.decode(data)
        except VALIDATE_ERRORS as exc:
            raise self.validate_failure(exc) from exc

    def validate_failure(self, exc: BaseException) -> InvalidSnapshotError:
        """The error for encoded bytes readers could not decode (for ``raw_decode`` callers)."""
        return InvalidSnapshotError(
            f"value would not decode as {self.type_name} for readers: {exc}"
        )
