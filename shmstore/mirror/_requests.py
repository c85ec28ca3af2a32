"""Remote writes on the origin's side: a compare-and-set request from another host
(``shmstore mirror set``, ``RemoteStore.set``), applied to the local store by its active
publisher, and the reply that says what came of it.

Every request gets a reply, never silence: the version committed, a conflict with the version
the store is at (the store's own compare-and-set decides, so two publishers of one origin
sharing the requests stay correct), or a refusal that says why -- a standby, a publisher
started without the store's type, a value that does not decode as that type or is nested too
deeply, a store error.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from .. import StateStoreError, StateVersionError, Store
from ._wire import SetReply, SetRequest

__all__ = ["apply_request"]


async def apply_request(
    data: bytes, store: Store[Any] | None, *, name: str, bucket: str, active: bool
) -> SetReply:
    """Apply the request *data* to *store* (the publisher's, ``None`` once it stopped), as the
    publisher of *name* on *bucket* (*active*, or a standby); the reply to send."""
    if store is None or store.closed:
        return SetReply(error="the publisher is stopping")
    if not active:
        return SetReply(error=f"this publisher is a standby for bucket {bucket!r}")
    if not store.writable:
        return SetReply(
            error=f"the publisher of {name!r} was started without the store's type "
            f"({store.type_name}): start it with --type to accept remote writes"
        )
    try:
        request = msgspec.json.decode(data, type=SetRequest)
        value = msgspec.json.decode(request.value, type=store.value_type)
    except msgspec.DecodeError as exc:
        return SetReply(error=f"value is not valid for {store.type_name}: {exc}")
    except RecursionError:
        return SetReply(error="value is nested too deeply")
    try:
        version = await asyncio.to_thread(store.set, value, request.expect)
    except StateVersionError as exc:
        return SetReply(conflict=True, actual=exc.actual)
    except StateStoreError as exc:
        return SetReply(error=str(exc))
    except RecursionError:
        return SetReply(error="value is nested too deeply")
    return SetReply(version=version)
