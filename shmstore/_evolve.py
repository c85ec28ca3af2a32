"""Evolving a store's type under running readers, and writing to a typed store without its type.

Three pieces the store handle (``_store``) calls, each off the hot paths:

* :func:`evolve_locked` -- ``Store.open(name, NewType, evolve=True)``: with the writer lock held,
  re-read the recorded types, check ``NewType`` against every one of them
  (``_evolution.check_history``), publish the new record and bump the header's SCHEMA word
  (``_schemarecord``). The lock makes the check and the bump one step with respect to commits
  and to other evolutions; a refused evolution changes nothing.
* :func:`follow_schema` -- after an evolution, a handle opened with an older type must
  not commit: newer readers would lose the fields its values lack. The commit compares SCHEMA
  with the handle's own generation under the writer lock (one load, already on HEAD's cache
  line); on a difference it lands here, which raises :class:`SchemaMismatchError` naming the
  fields the write would drop -- or lets the write through when the handle's type *is* the
  current one again (V1 -> V2 -> V1).
* :class:`CheckedCodec` -- an untyped handle (``Store.open(name)``) of a typed store decodes
  to builtins as before, and its ``set()`` converts the value to a type rebuilt from the
  record (``_schema.rebuild``) and publishes that value's encoding: what a typed ``set()``
  refuses, it refuses with the same message; what it accepts, every reader can decode. The
  conversion drops keys the type does not know, so it must use the current type: the handle
  looks at SCHEMA before converting (and rebuilds after an evolution); an evolution that lands
  between the conversion and the commit makes the commit fail with nothing written (the value
  may carry a field only the new type knows, which the conversion dropped) -- set it again.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ._codec import Codec
from ._errors import InvalidSnapshotError, SchemaMismatchError
from ._evolution import check_history, dropped_fields
from ._schema import describe, rebuild
from ._schemarecord import SchemaRecord

__all__ = [
    "CheckedCodec",
    "check_checkpoint_successor",
    "describe_or_none",
    "evolve_locked",
    "follow_schema",
    "replica_successor",
]


def describe_or_none(tp: Any) -> dict[str, Any] | None:
    """The description of *tp*, or ``None`` for a type that has none (``_schema``)."""
    try:
        return describe(tp)
    except TypeError:
        return None


class _Refused(ValueError):
    """A value the rebuilt type refuses (raised inside ``raw_encode``)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class CheckedCodec(Codec[Any]):
    """The codec of an untyped handle of a typed store: reads decode to builtins; writes are
    converted to the recorded type (rebuilt) and re-encoded, or refused as ``set()`` would."""

    __slots__ = ("checked_type", "generation")

    def __init__(self, record: SchemaRecord) -> None:
        super().__init__(Any)
        schema = record.schema
        if schema is None:
            raise ValueError("no recorded structure to check values against")
        self.checked_type: Any = None  # rebuilt at the first write: most untyped handles read
        self.generation = record.generation
        self.type_name = record.type_name
        self.fingerprint = record.fingerprint
        encode = msgspec.msgpack.Encoder().encode

        def raw_encode(value: Any) -> bytes:
            checked_type = self.checked_type
            if checked_type is None:
                checked_type = self.checked_type = rebuild(schema)
            try:
                converted = msgspec.convert(value, checked_type)
            except msgspec.ValidationError as exc:
                raise _Refused(exc) from exc
            return encode(converted)

        self.raw_encode = raw_encode

    def encode(self, value: Any) -> bytes:
        try:
            return self.raw_encode(value)
        except _Refused as exc:
            raise self.validate_failure(exc.cause) from exc.cause

    def encode_failure(self, value: object, exc: BaseException) -> InvalidSnapshotError:
        if isinstance(exc, _Refused):
            return self.validate_failure(exc.cause)
        return super().encode_failure(value, exc)


def check_checkpoint_successor(schema_record: bytes, codec: Codec[Any]) -> None:
    """Whether a checkpoint whose store had the types of *schema_record* (``b""``: a checkpoint
    from before records) restores into a store of *codec*'s type; :class:`SchemaMismatchError`
    if not."""
    if not schema_record:
        raise SchemaMismatchError("it records no schema to check a successor against")
    try:
        record = SchemaRecord.decode(schema_record)
    except ValueError as exc:
        raise SchemaMismatchError(f"its schema record does not decode: {exc}") from None
    new_schema = describe_or_none(codec.type)
    if new_schema is None or any(schema is None for schema in record.schemas):
        raise SchemaMismatchError("a type without recorded structure cannot be checked")
    check_history([schema for schema in record.schemas if schema is not None], new_schema)


def replica_successor(
    current: SchemaRecord, schema_record: bytes, name: str
) -> SchemaRecord | None:
    """The origin's record (*schema_record*) a replica whose record is *current* should adopt,
    or ``None`` when it has it already. :class:`SchemaMismatchError` if the origin's types do
    not begin with the replica's (another origin, or an origin that was re-created)."""
    try:
        record = SchemaRecord.decode(schema_record)
    except ValueError as exc:
        raise SchemaMismatchError(f"the origin's schema record does not decode: {exc}") from None
    if record.fingerprints == current.fingerprints:
        return None
    known = current.fingerprints
    if record.fingerprints[: len(known)] != known:
        raise SchemaMismatchError(
            f"replica {name!r} holds {current.type_name}, and the origin's types "
            f"({record.type_name}, generation {record.generation}) do not continue the "
            "replica's: remove the replica to follow the origin"
        )
    return record


def evolve_locked(record: SchemaRecord, codec: Codec[Any], name: str) -> SchemaRecord | None:
    """The record that makes *codec*'s type the successor of *record* (the current one, read
    under the writer lock), or ``None`` if it is the current type already; the caller publishes
    it. Raises :class:`SchemaMismatchError` if it is not a compatible successor of every
    recorded type."""
    if codec.fingerprint == record.fingerprint:
        return None  # already the current type: nothing to evolve
    new_schema = describe_or_none(codec.type)
    if new_schema is None:
        raise SchemaMismatchError(
            f"store {name!r}: {codec.type_name} has no structure shmstore can record "
            "(custom types, Raw, Ext), so it cannot be checked as a successor"
        )
    if any(schema is None for schema in record.schemas):
        raise SchemaMismatchError(
            f"store {name!r} holds {record.type_name}, whose structure was not recorded "
            "(created by an older shmstore, a replica, or a type without one): it cannot evolve"
        )
    history = [schema for schema in record.schemas if schema is not None]
    try:
        check_history(history, new_schema)
    except SchemaMismatchError as exc:
        raise SchemaMismatchError(
            f"store {name!r}: {codec.type_name} is not a compatible successor of "
            f"{record.type_name}: {exc}"
        ) from None
    return record.evolved(codec.type_name, codec.fingerprint, new_schema)


def follow_schema(
    record: SchemaRecord, codec: Codec[Any], own_generation: int, name: str
) -> tuple[int, CheckedCodec | None]:
    """A commit found the store at ``record.generation``, not at the handle's
    *own_generation*. Returns the generation to write as from now on, and for an untyped handle
    its new checked codec; raises :class:`SchemaMismatchError` for a handle of an older type."""
    if isinstance(codec, CheckedCodec):
        return record.generation, CheckedCodec(record)
    if codec.fingerprint == record.fingerprint:
        return record.generation, None  # the store came back to this handle's type
    own = describe_or_none(codec.type)
    dropped = dropped_fields(own, record.schema) if own is not None and record.schema else []
    lost = f"; its values would drop {', '.join(dropped)}" if dropped else ""
    raise SchemaMismatchError(
        f"store {name!r} evolved to {record.type_name} (schema generation "
        f"{record.generation}) after this handle opened it with {codec.type_name} "
        f"(generation {own_generation}): it may read but not write{lost}, which newer readers "
        "would lose. Open the store with the current type to write."
    )
