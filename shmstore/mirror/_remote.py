"""Remote compare-and-set: a write to the origin store from another host.

A remote ``set`` is a NATS request to the origin's active publisher (on ``set_subject(bucket)``),
which applies ``set(value, expected_version=...)`` to the origin store and answers with the new
version or the conflict. Writes therefore go through the origin's own compare-and-set: there is
one writer of record, and a replica never diverges from it. The value travels as JSON and is
decoded with the origin's type by the publisher, so a value the origin's readers could not
decode is refused there, with nothing written.

:class:`AsyncRemoteStore` is the asyncio client; :class:`RemoteStore` is the same for threads
(it runs the asyncio client on a private event loop thread).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Final, TypeVar

import msgspec

from .. import StateVersionError
from ._connect import ConnectOptions, connect, describe_error, disconnect, require_nats
from ._errors import MirrorError, NoPublisherError
from ._wire import SetReply, default_bucket, set_subject, validate_bucket

__all__ = ["AsyncRemoteStore", "RemoteStore"]

R = TypeVar("R")
DEFAULT_TIMEOUT: Final = 10.0


class AsyncRemoteStore:
    """Writes to the origin store *name* through its publisher; use ``async with``.

    ``await set(value, expected_version=None)`` returns the new version; raises
    :class:`StateVersionError` on a conflict, :class:`NoPublisherError` when no publisher
    answers within *timeout* seconds, :class:`MirrorError` for any other failure (bad value,
    NATS unreachable).
    """

    def __init__(
        self,
        name: str,
        *,
        options: ConnectOptions | None = None,
        bucket: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.name = name
        self.bucket = validate_bucket(bucket) if bucket else default_bucket(name)
        self.options = options or ConnectOptions()
        self.timeout = timeout
        self._nc: Any = None

    async def __aenter__(self) -> AsyncRemoteStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await disconnect(nc, self.options)

    async def set(self, value: Any, expected_version: int | None = None) -> int:
        """Commit *value* on the origin (only at *expected_version*, if given); the new version."""
        nats = require_nats()

        try:
            payload = b'{"value":%s,"expect":%s}' % (
                msgspec.json.encode(value),
                b"null" if expected_version is None else str(int(expected_version)).encode(),
            )
        except (TypeError, msgspec.EncodeError) as exc:
            raise MirrorError(f"cannot encode {type(value).__name__} as JSON: {exc}") from None
        except RecursionError:  # a recursive value, or one nested deeper than JSON can go
            raise MirrorError(
                f"cannot encode {type(value).__name__} as JSON: it is recursive or nested too "
                "deeply"
            ) from None
        if self._nc is None or self._nc.is_closed:
            self._nc = await connect(self.options)
        subject = set_subject(self.bucket)
        try:
            msg = await self._nc.request(subject, payload, timeout=self.timeout)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            raise NoPublisherError(
                f"no publisher of {self.name!r} answers on bucket {self.bucket!r} (is "
                "`shmstore mirror publish` running on the origin's host?)"
            ) from None
        except Exception as exc:
            raise MirrorError(
                f"remote set of {self.name!r} failed: {describe_error(exc, self.options)}"
            ) from None
        try:
            reply = msgspec.json.decode(msg.data, type=SetReply)
        except msgspec.DecodeError:
            raise MirrorError(f"the publisher of {self.name!r} sent an unreadable reply") from None
        if reply.conflict:
            assert expected_version is not None
            raise StateVersionError(expected_version, reply.actual)
        if reply.error:
            raise MirrorError(f"the publisher of {self.name!r} refused: {reply.error}")
        return reply.version


class RemoteStore:
    """The thread-friendly :class:`AsyncRemoteStore`: ``set()`` blocks. Use ``with``, or call
    :meth:`close`. Raises as :class:`AsyncRemoteStore`."""

    def __init__(
        self,
        name: str,
        *,
        options: ConnectOptions | None = None,
        bucket: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._remote = AsyncRemoteStore(name, options=options, bucket=bucket, timeout=timeout)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"shmstore-remote-{name}", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def name(self) -> str:
        return self._remote.name

    @property
    def bucket(self) -> str:
        return self._remote.bucket

    def _call(self, coro: Coroutine[Any, Any, R]) -> R:
        if self._closed:
            coro.close()
            raise MirrorError(f"remote store {self.name!r} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def set(self, value: Any, expected_version: int | None = None) -> int:
        """Commit *value* on the origin (only at *expected_version*, if given); the new version."""
        return self._call(self._remote.set(value, expected_version))

    def close(self) -> None:
        if self._closed:
            return
        self._call(self._remote.close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
