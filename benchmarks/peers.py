"""The systems the harness measures, behind one small interface.

Each peer holds one value that a writer replaces and readers read. ``open_writer()`` and
``open_reader()`` return handles with ``write(value)`` / ``read()``; both may live in one process
(the read and write scenarios) because every peer's reader goes through its real cross-process
path (shared memory, a socket, a manager process). Byte-oriented peers (Redis, LMDB) get the value
encoded with msgspec's MessagePack, the same codec shmstore uses, so the difference measured is the
transport; the Python-object peers (Manager, UltraDict, shared_memory + pickle) use pickle, as their
users would.

``unavailable()`` returns the reason a peer cannot run here (a missing package or binary), and the
harness prints it and skips the peer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing as mp
import os
import pickle
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from typing import Any, Protocol

import msgspec

import shmstore

_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.decode


class Handle(Protocol):
    def write(self, value: Any) -> None: ...
    def read(self) -> Any: ...
    def close(self) -> None: ...


class Peer:
    name = "?"

    def after_attach(self) -> None:
        """Re-create per-process resources after ``AttachSpec.attach``."""

    @staticmethod
    def unavailable() -> str | None:
        return None

    def __init__(self, value_type: Any, capacity: int) -> None:
        self.value_type = value_type
        self.capacity = capacity

    def open_writer(self) -> Handle:
        raise NotImplementedError

    def open_reader(self) -> Handle:
        raise NotImplementedError

    def attach_spec(self) -> AttachSpec:
        """A picklable way for another process to reach the same value (not owning it)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class AttachSpec:
    """Carried to a worker process; ``attach()`` there returns a non-owning peer."""

    def __init__(self, cls: type[Peer], value_type: Any, capacity: int, **state: Any) -> None:
        self.cls, self.value_type, self.capacity, self.state = cls, value_type, capacity, state

    def attach(self) -> Peer:
        peer = self.cls.__new__(self.cls)
        Peer.__init__(peer, self.value_type, self.capacity)
        peer.__dict__.update(self.state)
        peer._attached_only = True  # type: ignore[attr-defined]
        peer.after_attach()
        return peer


def _owns(peer: Peer) -> bool:
    return not getattr(peer, "_attached_only", False)


def _missing(*modules: str) -> str | None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"python package {module!r} is not installed (pip install -e '.[bench]')"
    return None


# ------------------------------------------------------------ shmstore


class ShmstorePeer(Peer):
    name = "shmstore"

    def __init__(self, value_type: Any, capacity: int) -> None:
        super().__init__(value_type, capacity)
        self.store_name = f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._owner = shmstore.Store.create(
            self.store_name, value_type, slots=8, slot_size=capacity
        )

    def open_writer(self) -> Handle:
        return _ShmstoreHandle(shmstore.Store.open(self.store_name, self.value_type))

    open_reader = open_writer

    def attach_spec(self) -> AttachSpec:
        return AttachSpec(type(self), self.value_type, self.capacity, store_name=self.store_name)

    def close(self) -> None:
        if _owns(self):
            self._owner.close()
            shmstore.remove(self.store_name)


class _ShmstoreHandle:
    def __init__(self, store: shmstore.Store[Any]) -> None:
        self.store = store
        self.write = store.set
        self.read = store.get
        self.close = store.close


# ------------------------------------------------------------ shared_memory + pickle


class SharedMemoryPicklePeer(Peer):
    """The naive baseline: pickle into a ``multiprocessing.shared_memory`` block behind a length
    prefix. No lock and no seqlock: readers can see torn values; that is the point of it."""

    name = "shared_memory+pickle"

    def __init__(self, value_type: Any, capacity: int) -> None:
        super().__init__(value_type, capacity)
        from multiprocessing import shared_memory  # noqa: PLC0415

        self._shm = shared_memory.SharedMemory(create=True, size=capacity * 2 + 8)
        self._shm_name = self._shm.name

    def after_attach(self) -> None:
        from multiprocessing import resource_tracker, shared_memory  # noqa: PLC0415

        self._shm = shared_memory.SharedMemory(name=self._shm_name)
        # Attaching registers the block with the resource tracker, which would unlink it when
        # this process exits (the stdlib behaviour shmstore avoids): undo that.
        resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]

    def open_writer(self) -> Handle:
        return _ShmPickleHandle(self._shm)

    open_reader = open_writer

    def attach_spec(self) -> AttachSpec:
        return AttachSpec(type(self), self.value_type, self.capacity, _shm_name=self._shm_name)

    def close(self) -> None:
        self._shm.close()
        if _owns(self):
            self._shm.unlink()


class _ShmPickleHandle:
    _LEN = struct.Struct("<Q")

    def __init__(self, shm: Any) -> None:
        self._buf = shm.buf

    def write(self, value: Any) -> None:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        self._buf[8 : 8 + len(data)] = data
        self._LEN.pack_into(self._buf, 0, len(data))

    def read(self) -> Any:
        (n,) = self._LEN.unpack_from(self._buf, 0)
        return pickle.loads(bytes(self._buf[8 : 8 + n]))

    def close(self) -> None:
        self._buf = None  # type: ignore[assignment]


# ------------------------------------------------------------ Manager dict


class ManagerPeer(Peer):
    name = "Manager().dict"

    def __init__(self, value_type: Any, capacity: int) -> None:
        super().__init__(value_type, capacity)
        self._manager = mp.get_context("spawn").Manager()
        self._dict = self._manager.dict()
        self._lock = self._manager.Lock()

    def open_writer(self) -> Handle:
        return _DictHandle(self._dict, self._lock)

    open_reader = open_writer

    def attach_spec(self) -> AttachSpec:
        return AttachSpec(
            type(self), self.value_type, self.capacity, _dict=self._dict, _lock=self._lock
        )

    def close(self) -> None:
        if _owns(self):
            self._manager.shutdown()


class _DictHandle:
    def __init__(self, d: Any, lock: Any) -> None:
        self._d = d
        self.lock = lock

    def write(self, value: Any) -> None:
        self._d["state"] = value

    def read(self) -> Any:
        return self._d["state"]

    def close(self) -> None:
        pass


# ------------------------------------------------------------ UltraDict


class UltraDictPeer(Peer):
    name = "UltraDict"

    @staticmethod
    def unavailable() -> str | None:
        return _missing("UltraDict")

    def __init__(self, value_type: Any, capacity: int) -> None:
        super().__init__(value_type, capacity)
        from UltraDict import UltraDict  # noqa: PLC0415

        self._name = f"bench{os.getpid()}{uuid.uuid4().hex[:6]}"
        self._dict = UltraDict(
            name=self._name,
            buffer_size=max(capacity * 4, 1 << 16),
            full_dump_size=capacity * 8,
            shared_lock=importlib.util.find_spec("atomics") is not None,
        )
        self._attached: list[Any] = []

    def after_attach(self) -> None:
        self._dict = None
        self._attached = []

    def open_writer(self) -> Handle:
        if self._dict is None:  # attached in a worker: its own instance
            return self.open_reader()
        return _DictHandle(self._dict, self._dict.lock)

    def open_reader(self) -> Handle:
        # A second instance attached by name, as another process would: reading the creator's
        # own instance would only read its local dict and never cross processes.
        from UltraDict import UltraDict  # noqa: PLC0415

        reader = UltraDict(name=self._name)
        self._attached.append(reader)
        return _DictHandle(reader, reader.lock)

    def attach_spec(self) -> AttachSpec:
        return AttachSpec(type(self), self.value_type, self.capacity, _name=self._name)

    def close(self) -> None:
        for d in self._attached:
            with contextlib.suppress(Exception):
                d.close()
        if _owns(self) and self._dict is not None:
            with contextlib.suppress(Exception):
                self._dict.unlink()


# ------------------------------------------------------------ LMDB


class LmdbPeer(Peer):
    name = "LMDB (tmpfs)"

    @staticmethod
    def unavailable() -> str | None:
        return _missing("lmdb")

    def __init__(self, value_type: Any, capacity: int) -> None:
        super().__init__(value_type, capacity)
        self._dir = tempfile.mkdtemp(prefix="bench-lmdb-", dir="/dev/shm")
        self.after_attach()

    def after_attach(self) -> None:
        import lmdb  # noqa: PLC0415

        self._env = lmdb.open(self._dir, map_size=max(64 << 20, self.capacity * 64), sync=False)

    def open_writer(self) -> Handle:
        return _LmdbHandle(self._env, self.value_type)

    open_reader = open_writer

    def attach_spec(self) -> AttachSpec:
        return AttachSpec(type(self), self.value_type, self.capacity, _dir=self._dir)

    def close(self) -> None:
        self._env.close()
        if _owns(self):
            shutil.rmtree(self._dir, ignore_errors=True)


class _LmdbHandle:
    def __init__(self, env: Any, value_type: Any) -> None:
        self.env = env
        self.decoder = msgspec.msgpack.Decoder(value_type)

    def write(self, value: Any) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(b"state", _encode(value))

    def read(self) -> Any:
        with self.env.begin() as txn:
            return self.decoder.decode(txn.get(b"state"))

    def close(self) -> None:
        pass


# ------------------------------------------------------------ Redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisPeer(Peer):
    """redis-py with hiredis against a throwaway ``redis-server`` on loopback."""

    name = "Redis"

    @staticmethod
    def unavailable() -> str | None:
        if shutil.which("redis-server") is None:
            return "no redis-server binary (Debian: apt-get install redis-server)"
        return _missing("redis", "hiredis")

    def __init__(self, value_type: Any, capacity: int) -> None:
        super().__init__(value_type, capacity)
        import redis  # noqa: PLC0415

        self._port = _free_port()
        self._server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self._port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self._port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def open_writer(self) -> Handle:
        import redis  # noqa: PLC0415

        return _RedisHandle(redis.Redis(port=self._port), self.value_type)

    open_reader = open_writer

    def attach_spec(self) -> AttachSpec:
        return AttachSpec(type(self), self.value_type, self.capacity, _port=self._port)

    def close(self) -> None:
        if _owns(self):
            self._server.terminate()
            self._server.wait(10)


class _RedisHandle:
    def __init__(self, client: Any, value_type: Any) -> None:
        self.client = client
        self.decoder = msgspec.msgpack.Decoder(value_type)

    def write(self, value: Any) -> None:
        self.client.set("state", _encode(value))

    def read(self) -> Any:
        return self.decoder.decode(self.client.get("state"))

    def close(self) -> None:
        self.client.close()


PEERS: dict[str, type[Peer]] = {
    p.name: p
    for p in (
        ShmstorePeer,
        RedisPeer,
        ManagerPeer,
        SharedMemoryPicklePeer,
        LmdbPeer,
        UltraDictPeer,
    )
}
