"""Connecting to NATS: the options passed through to ``nats-py``, with secrets kept out of logs.

Credentials come from the options (``user``/``password``, ``token``, a ``.creds`` file, an nkey
seed file) or from a server URL (``nats://user:pass@host``); TLS from a CA file and an optional
client certificate. None of them is ever logged or put into an error message: servers appear in
messages as :func:`redact` leaves them, and errors of the NATS client are reduced to their class
and a scrubbed message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ._errors import MirrorError

__all__ = [
    "ConnectOptions",
    "check_server",
    "concurrently",
    "connect",
    "describe_error",
    "disconnect",
    "from_nats",
    "raise_if_cancelled",
    "redact",
    "require_nats",
]

log = logging.getLogger("shmstore.mirror")

T = TypeVar("T")

RECONNECT_WAIT: Final = 0.5  # between reconnect attempts; NATS itself is fast to come back
PING_INTERVAL: Final = 2  # a dead server is noticed within about three pings


def require_nats() -> Any:
    """The ``nats`` package; :class:`MirrorError` saying how to install it if it is missing."""
    return _nats()


def _nats() -> Any:
    try:
        import nats  # noqa: PLC0415 -- the mirror is optional: import its client on use only
    except ImportError:
        raise MirrorError(
            "the mirror needs the NATS client: pip install 'shmstore[mirror]'"
        ) from None
    return nats


@dataclass(frozen=True, repr=False)
class ConnectOptions:
    """How to reach NATS. *servers* are URLs (``nats://host:4222``, ``tls://...``); the other
    fields are passed to the client as they are. Secrets are excluded from ``repr``."""

    servers: Sequence[str] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_hostname: str | None = None
    name: str | None = None  # the connection's name in NATS monitoring
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        # Checked here, not by the client: with no server nats-py's connect retries in a
        # loop that never awaits (the process spun at 100% CPU, deaf to SIGTERM and Ctrl-C).
        if isinstance(self.servers, str) or not self.servers:
            raise MirrorError("servers: give one NATS server URL at least, in a list")
        for server in self.servers:
            check_server(server)

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca_file or self.tls_cert_file):
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls_ca_file)
            if self.tls_cert_file:
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise MirrorError(f"cannot load the TLS files: {exc.__class__.__name__}") from None
        return context

    def client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "servers": list(self.servers),
            "connect_timeout": self.connect_timeout,
            "name": self.name,
            "dont_randomize": True,  # the first server is the preferred one; the rest fail over
        }
        for key, value in (
            ("user", self.user),
            ("password", self.password),
            ("token", self.token),
            ("user_credentials", self.creds_file),
            ("nkeys_seed", self.nkey_seed_file),
            ("tls_hostname", self.tls_hostname),
        ):
            if value is not None:
                kwargs[key] = value
        tls = self.tls_context()
        if tls is not None:
            kwargs["tls"] = tls
        return kwargs

    def __repr__(self) -> str:
        return (
            f"ConnectOptions(servers={self.shown()!r}, user={self.user!r}, "
            f"password={'***' if self.password else None}, token={'***' if self.token else None}, "
            f"creds_file={self.creds_file!r}, tls_ca_file={self.tls_ca_file!r})"
        )

    def shown(self) -> str:
        """The servers, with any user information removed: safe for logs."""
        return ",".join(redact(s) for s in self.servers)


def check_server(url: str) -> str:
    """Return the server URL *url* if a client can try it, else raise :class:`MirrorError`
    (the message shows it without user information)."""
    if not isinstance(url, str) or not url.strip():
        raise MirrorError(f"a NATS server URL is a non-empty string, got {url!r}")
    try:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        port = parts.port  # ValueError if out of range or not a number
    except ValueError:
        raise MirrorError(f"not a NATS server URL: {redact(url)!r}") from None
    if not parts.hostname or (port is not None and port == 0):
        raise MirrorError(f"not a NATS server URL (host:port): {redact(url)!r}")
    return url


def redact(url: str) -> str:
    """*url* without its user information (``nats://u:p@h:4222`` -> ``nats://***@h:4222``)."""
    try:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
    except ValueError:
        return "<unparsable server URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def describe_error(exc: BaseException, options: ConnectOptions) -> str:
    """A one-line description of a NATS client error with every secret of *options* removed."""
    text = str(exc).strip() or exc.__class__.__name__
    for secret in (options.password, options.token):
        if secret:
            text = text.replace(secret, "***")
    for server in options.servers:
        text = text.replace(server, redact(server))
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:200]}"


async def connect(
    options: ConnectOptions,
    *,
    on_connected: Callable[[bool], None] | None = None,
    stop: asyncio.Event | None = None,
) -> Any:
    """A connected NATS client.

    With *stop* (the long-running publisher and follower), the client retries the first
    connection and every reconnection forever, until *stop* is set (then ``None`` is returned);
    *on_connected* hears ``True``/``False`` as the connection comes and goes. Without it (a
    remote ``set``), a server that cannot be reached raises :class:`MirrorError` after a couple
    of attempts.
    """
    nats = _nats()
    kwargs = options.client_kwargs()
    notify = on_connected or (lambda _up: None)
    last_logged: dict[str, float] = {}

    async def disconnected() -> None:
        notify(False)
        if stop is not None and not stop.is_set():  # not when closing on purpose
            log.warning("disconnected from NATS (%s); reconnecting", options.shown())

    async def reconnected() -> None:
        notify(True)
        if stop is not None:
            log.warning("reconnected to NATS")

    async def error(exc: Exception) -> None:
        # The client reports every failed attempt; say each kind of failure every 30 s at most.
        text = describe_error(exc, options)
        now = time.monotonic()
        if stop is not None and now - last_logged.get(text, -60.0) >= 30:
            last_logged[text] = now
            log.warning("NATS: %s", text)

    # Each attempt is bounded: nats-py (2.16) connect() never returns after a failed TLS handshake
    # (an untrusted certificate), so a bounded attempt is the only way to report or retry it.
    budget = 3 * options.connect_timeout + 2
    last_error: list[BaseException] = []

    hopeless = asyncio.Event()  # a one-shot caller need not wait out a bad certificate

    async def error_and_remember(exc: Exception) -> None:
        last_error[:] = [exc]
        if isinstance(exc, ssl.SSLError) or "Authorization" in exc.__class__.__name__:
            hopeless.set()
        await error(exc)

    while True:
        raise_if_cancelled()
        nc = nats.NATS()
        connecting = asyncio.ensure_future(
            nc.connect(
                **kwargs,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error_and_remember,
                allow_reconnect=True,
                max_reconnect_attempts=-1 if stop is not None else 2,
                reconnect_time_wait=RECONNECT_WAIT,
                ping_interval=PING_INTERVAL,
                max_outstanding_pings=3,
            )
        )
        waiting = {connecting}
        if stop is None:
            stopping = asyncio.ensure_future(hopeless.wait())
        else:
            stopping = asyncio.ensure_future(stop.wait())
        waiting.add(stopping)
        try:
            await asyncio.wait(waiting, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: the attempt must not go on (and connect) unowned
            stopping.cancel()
            connecting.cancel()
            # Bounded: nats-py's reconnecting loop may swallow a cancellation; closing the
            # client ends it.
            await asyncio.wait({connecting}, timeout=options.connect_timeout)
            await disconnect(nc, options)
            raise
        stopping.cancel()
        if connecting.done() and connecting.exception() is None:
            break
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting
        await disconnect(nc, options)
        if stop is not None and not stop.is_set():
            # The long-running caller waits for NATS as long as it takes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONNECT_WAIT):
                    await stop.wait()
            continue
        if stop is not None:
            return None
        failure = connecting.exception() if not connecting.cancelled() else None
        cause = last_error[0] if last_error else (failure or TimeoutError("no answer"))
        raise MirrorError(
            f"cannot connect to NATS at {options.shown()}: {describe_error(cause, options)}"
        ) from None
    notify(True)
    return nc


async def disconnect(nc: Any, options: ConnectOptions) -> None:
    """Close *nc*, waiting at most ``connect_timeout`` for it: closing flushes what is
    pending, and a server that takes nothing (stopped, or its host gone) would hold it for
    good. Never raises, unless the caller itself is cancelled."""
    try:
        async with asyncio.timeout(options.connect_timeout):
            await nc.close()
    except asyncio.CancelledError:
        if not from_nats():  # (a stalled server: measured) the connection is gone either way
            raise
    except Exception:  # closing: the connection is gone either way
        pass


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if the running task was asked to stop and a wait swallowed
    it. Python 3.11's ``asyncio.wait_for`` returns a result that came at the moment of the
    cancellation and drops the cancellation (python/cpython#86296, fixed in 3.12); nats-py
    waits that way inside its calls, and an embedding application's ``task.cancel()`` of a
    publisher's ``run()`` was lost in 14 of 15 tries. The task still says it is cancelling,
    so each long-running loop looks once per turn. (Our own waits use ``asyncio.timeout``.)"""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def from_nats() -> bool:
    """Whether the ``CancelledError`` being handled is nats-py's own, not a cancellation of
    the running task. nats-py lets one out of ``flush()`` and ``close()`` when a future or a
    transport it waits for is torn down under it (nats-io/nats.py#469; a stalled server's
    connection did it to ``close()`` here): a failure of that call, to be handled as any other,
    while a real cancellation must go on."""
    task = asyncio.current_task()
    return task is None or not task.cancelling()


async def concurrently(*calls: Awaitable[T]) -> list[T]:
    """Await NATS *calls* at once; their results, in order. When one fails, the others are
    cancelled and awaited before its exception goes on: none is left running, or failing
    with nobody to hear it (``asyncio.gather`` alone leaves them: a chunked put that met a
    stalled server left puts that timed out after the publisher stopped)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
