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

__all__ = ["ANY_FINGERPRINT", "Codec", "fingerprint_of", "type_name_of"]

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


def _may_alias_input(tp: Any) -> bool:
    """Whether values of *tp* can hold ``memoryview`` or ``msgspec.Raw`` objects, which msgspec
    decodes as views of its input. Unknown shapes count as aliasing (the safe answer)."""
    seen: set[int] = set()

    def walk(info: Any) -> bool:
        if id(info) in seen:
            return False
        seen.add(id(info))
        if isinstance(info, (msgspec.inspect.MemoryViewType, msgspec.inspect.RawType)):
            return True
        if isinstance(info, msgspec.inspect.CustomType):
            return True  # a dec_hook could keep anything
        for attr in ("item_type", "key_type", "value_type"):
            sub = getattr(info, attr, None)
            if sub is not None and walk(sub):
                return True
        for attr in ("types", "item_types"):
            if any(walk(sub) for sub in getattr(info, attr, ())):
                return True
        return any(walk(f.type) for f in getattr(info, "fields", ()))

    try:
        return walk(msgspec.inspect.type_info(tp))
    except (TypeError, ValueError):
        return True


class Codec(Generic[T]):
    """Encoder and typed decoder for one value type."""

    __slots__ = ("_decoder", "_encoder", "aliases_input", "fingerprint", "type", "type_name")

    def __init__(self, tp: Any) -> None:
        self.type = tp
        self.fingerprint = fingerprint_of(tp)
        self.type_name = type_name_of(tp)
        self._encoder = msgspec.msgpack.Encoder()
        try:
            self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(tp)
        except TypeError as exc:
            raise TypeError(f"msgspec cannot decode values of type {tp!r}: {exc}") from None
        self.aliases_input = _may_alias_input(tp)
        """Whether a decoded value may point into the decoded buffer (``memoryview`` and
        ``msgspec.Raw`` fields decode without copying): such values must be decoded from
        a buffer of their own, never from one that is reused."""

    def encode(self, value: T) -> bytes:
        try:
            return self._encoder.encode(value)
        except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
            raise InvalidSnapshotError(f"cannot encode {type(value).__name__}: {exc}") from exc

    def decode(self, data: bytes | memoryview) -> T:
        """Decode bytes read from the store; msgspec errors propagate to the caller to translate."""
        return self._decoder.decode(data)

    def validate(self, data: bytes) -> T:
        """Decode freshly encoded *data* as a reader would, refusing what readers could not read."""
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:
            raise InvalidSnapshotError(
                f"value would not decode as {self.type_name} for readers: {exc}"
            ) from exc
