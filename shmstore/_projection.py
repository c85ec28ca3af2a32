"""Projections: read a few fields of a big value without building the rest.

A reader that needs the state of a 10 KB FSM snapshot should not pay for decoding its history.
msgspec decodes a ``Struct`` from a map by field name and skips the keys the type does not
have without building objects for them, so decoding the stored bytes as a smaller ``Struct``
whose fields are a subset of the stored type's costs a fraction of the full decode (the FSM
snapshot with 100 history entries: about a quarter).

A projection is only sound if every field it asks for is there, with the same wire type, in
every value the store can hold. :func:`check_projection` proves that from the two types' msgspec
descriptions before any read: each projected field must exist in the stored type under the same
encoded name with an equal type; a field the projection requires must be one the encoder always
writes (a required field, or one of a type that does not omit defaults). Array-like Structs and
types that are not Structs are refused: their wire form is positional.

Reads go through the store's seqlock read (so never torn), and the projected value is cached
per version like ``get()``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec
import msgspec.inspect as mi

from ._errors import SchemaMismatchError

__all__ = ["Projection", "check_projection"]

P = TypeVar("P")


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
        if field.required and not source.required and stored.__struct_config__.omit_defaults:
            raise SchemaMismatchError(
                f"{projected.__qualname__}.{field.name} is required, but "
                f"{stored.__qualname__} omits it when it holds its default: give it a default"
            )


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
        decode = msgspec.msgpack.Decoder(projected).decode
        self._read: Callable[[], tuple[P | None, int]] = lambda: read(decode)
        self._cache: tuple[int, P | None] = (0, None)

    def get(self) -> P | None:
        """The projected fields of the newest value; ``None`` while the store is empty."""
        return self.get_with_version()[0]

    def get_with_version(self) -> tuple[P | None, int]:
        version, value = self._cache
        if self._head() == version:
            return value, version
        value, version = self._read()
        self._cache = (version, value)
        return value, version
