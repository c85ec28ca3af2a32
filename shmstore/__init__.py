"""shmstore: the newest value of a typed state, shared between processes in microseconds.

One writer at a time commits msgspec-encoded snapshots into a seqlock-guarded ring in POSIX shared
memory; readers in any process get the newest committed snapshot lock-free and never a torn one.
"""

from ._aio import AsyncStore as AsyncStore
from ._aio import AsyncSubscription as AsyncSubscription
from ._errors import CheckpointError as CheckpointError
from ._errors import CorruptStoreError as CorruptStoreError
from ._errors import InvalidSnapshotError as InvalidSnapshotError
from ._errors import RegistryFullError as RegistryFullError
from ._errors import SchemaMismatchError as SchemaMismatchError
from ._errors import SnapshotTooLargeError as SnapshotTooLargeError
from ._errors import StateStoreError as StateStoreError
from ._errors import StateVersionError as StateVersionError
from ._errors import StoreExistsError as StoreExistsError
from ._errors import StoreNotFoundError as StoreNotFoundError
from ._errors import StorePermissionError as StorePermissionError
from ._errors import SubscriberLaggedError as SubscriberLaggedError
from ._projection import Projection as Projection
from ._stats import StoreStatistics as StoreStatistics
from ._store import Store as Store
from ._store import remove as remove
from ._subscription import Subscription as Subscription
from ._wait_any import WaitSet as WaitSet
from ._wait_any import wait_any as wait_any
from ._wait_any import wait_any_async as wait_any_async

__all__ = [
    # the store
    "Store",
    "StoreStatistics",
    "Projection",
    "Subscription",
    "remove",
    "WaitSet",
    "wait_any",
    # asyncio
    "AsyncStore",
    "AsyncSubscription",
    "wait_any_async",
    # errors
    "CheckpointError",
    "CorruptStoreError",
    "InvalidSnapshotError",
    "RegistryFullError",
    "SchemaMismatchError",
    "SnapshotTooLargeError",
    "StateStoreError",
    "StateVersionError",
    "StoreExistsError",
    "StoreNotFoundError",
    "StorePermissionError",
    "SubscriberLaggedError",
]

__version__ = "0.1.0"

# Public names show as shmstore.X in tracebacks and reprs, not as the private module they live in.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
