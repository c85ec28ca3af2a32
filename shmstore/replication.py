"""Replication as a public interface of the core: what a replication backend does to a store.

``shmstore.mirror`` (NATS JetStream) is built on this module and on the public ``Store`` API
alone; another backend would implement against the same names:

- :func:`create_replica` makes the local copy: a store that records the origin's schema and
  refuses ``set()`` in every process;
- :func:`validate_name` checks a store name as ``Store.create`` would (for names that arrive
  from the network);
- ``store.replication`` (a :class:`Replication`) reads the newest value as encoded bytes
  (:meth:`~Replication.read_encoded`), commits the origin's bytes at the origin's version
  (:meth:`~Replication.commit_at`) and keeps the header's mirror block
  (:meth:`~Replication.claim`, :meth:`~Replication.set_status`), which ``Store.mirror_status``,
  ``statistics()``, ``shmstore stat`` and the Prometheus text show.

The guarantees a backend inherits: a replica's versions only increase, and a commit that skips
versions shows to subscribers as an exact lag; a replica's value always decodes as the origin's
type (``commit_at`` validates it, unless the caller passes ``validated=True`` to vouch for bytes
the origin validated under the same fingerprint: then a false vouch shows to readers as
``CorruptStoreError`` on that version, never as a torn or wrong value); a replica refuses every
local write with an error that names the origin.
"""

from __future__ import annotations

from typing import Any

from . import _provision
from ._names import validate_name
from ._provision import DEFAULT_MAX_READERS, DEFAULT_SLOT_SIZE, DEFAULT_SLOTS, CreateOptions
from ._replication import MAX_VERSION, Replication
from ._stats import MirrorStatus
from ._store import Store

__all__ = ["MAX_VERSION", "MirrorStatus", "Replication", "create_replica", "validate_name"]


def create_replica(
    name: str,
    *,
    fingerprint: bytes,
    type_name: str,
    origin: str,
    bucket: str,
    slots: int = DEFAULT_SLOTS,
    slot_size: int = DEFAULT_SLOT_SIZE,
    max_readers: int = DEFAULT_MAX_READERS,
    mode: int = 0o600,
    max_value_size: int | None = None,
    schema_record: bytes = b"",
) -> Store[Any]:
    """Create the store *name* as a replica of the store *origin* mirrored through *bucket*
    (the backend's name for where the origin's values travel). It records the origin's schema
    *fingerprint* and *type_name*, so that readers open it with the origin's type and the usual
    schema check, and it refuses ``set()`` in every process: only
    ``store.replication.commit_at`` writes to it. The returned handle decodes to builtins.
    *schema_record* (the origin's ``store.replication.schema_record``) records the origin's
    types as well, so readers of older types keep reading and
    ``store.replication.follow_schema`` can follow the origin's evolutions. Raises like
    :meth:`Store.create`, and :class:`SchemaMismatchError` (nothing created) if
    *schema_record* does not decode."""
    options = CreateOptions(
        slots=slots,
        slot_size=slot_size,
        max_readers=max_readers,
        mode=mode,
        max_value_size=max_value_size,
    )
    return Store(
        _provision.create_replica(
            name,
            fingerprint=fingerprint,
            type_name=type_name,
            origin=origin,
            bucket=bucket,
            options=options,
            schema_record=schema_record,
        )
    )
