"""The live path's NATS connection: plain publish and subscribe, blocking, in threads.

Why not the asyncio client
--------------------------
Commit -> replica-visible is a chain of process wake-ups, and each asyncio hop on it costs a
loop iteration on a cold CPU. Measured on loopback (2 vCPUs, the machine shared): from a commit
to the publisher's event loop 130-200 us (a thread woken by the store's semaphore, then the
loop through ``call_soon_threadsafe``), and one way through ``nats-py`` (publish, its flusher
task, the server, the subscriber's read loop, its per-subscription task, the callback) about
200 us -- together two to three times Redis's SET + PUBLISH + subscriber GET. On this path the
publisher's thread that the store's semaphore wakes sends the record itself, and the
follower's thread that reads the socket commits it into the replica: no event loop on either
side. The durable path (KV put, watch) stays on ``nats-py``.

What it speaks: the core NATS text protocol (INFO, CONNECT, PUB, SUB, MSG, PING/PONG, -ERR),
with user/password or token. A ``.creds`` file or an nkey needs a signature of the server's
nonce, and over TLS one thread would read an OpenSSL connection while others write it, which
OpenSSL does not allow: :func:`open_live` returns ``None`` for those (and whenever no server
accepts), and the caller sends and receives the live copy through ``nats-py`` instead --
slower, the same records.

Correctness does not rest on this connection: it carries no acknowledgement, and a record lost
here (a broken connection, a slow consumer cut off by the server) is applied from the bucket.
Speed does: so a broken connection is given up and opened again -- one that fails a send, one
whose send makes no progress for ``SEND_TIMEOUT`` (a stalled server), and one that answers no
PING for ``PROBE_PATIENCE`` (its far end gone without a reset: a lost host, a firewall's dropped
state; the owner's loop calls :meth:`LiveConnection.probe` every second).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, Final
from urllib.parse import urlsplit

from .. import __version__
from ._connect import ConnectOptions

__all__ = ["LiveConnection", "open_live"]

log = logging.getLogger("shmstore.mirror")

_CRLF: Final = b"\r\n"
MAX_LINE: Final = 64 * 1024  # INFO lines carry cluster URLs; nothing legitimate is longer
SEND_TIMEOUT: Final = 1  # seconds a send may make no progress before the connection is given up
PROBE_PATIENCE: Final = 10.0  # seconds a PING may go unanswered: then it is given up too


class LiveConnection:
    """One connected, authenticated socket; a thread reads it (answers the server's PINGs,
    hands each MSG's payload to *on_message*) until :meth:`close` or the connection breaks."""

    def __init__(
        self,
        sock: socket.socket,
        reader: BinaryIO,
        info: dict[str, Any],
        on_message: Callable[[str, bytes], None] | None,
    ) -> None:
        self.max_payload = int(info.get("max_payload", 1 << 20))
        self._sock = sock
        self._reader = reader
        self._on_message = on_message
        self._lock = threading.Lock()  # one writer at a time: the reader's PONG, publishers
        self._closed = False
        self._asked: float | None = None  # when the PING awaiting its PONG went out
        self.alive = True
        self._thread = threading.Thread(target=self._read, name="shmstore-live", daemon=True)
        self._thread.start()

    def publish(self, subject: str, data: bytes | memoryview, prefix: bytes = b"") -> bool:
        """Send *prefix* + *data* on *subject*; ``False`` if the connection is gone."""
        if not self.alive:
            return False
        head = b"PUB %s %d\r\n%s" % (subject.encode(), len(prefix) + len(data), prefix)
        try:
            with self._lock:
                if len(data) < 65536:
                    self._sock.sendall(head + data + _CRLF)
                else:  # no copy of a large payload
                    self._sock.sendall(head)
                    self._sock.sendall(data)
                    self._sock.sendall(_CRLF)
        except OSError:  # broken, or no progress for SEND_TIMEOUT (a stalled server)
            self._abandon()  # part of a message may be out: nothing more can follow it
            return False
        return True

    def subscribe(self, *subjects: str) -> None:
        for sid, subject in enumerate(subjects, 1):
            self._send(b"SUB %s %d\r\n" % (subject.encode(), sid))

    def _send(self, data: bytes) -> None:
        try:
            with self._lock:
                self._sock.sendall(data)
        except OSError:
            self._abandon()

    def probe(self) -> None:
        """Ask the server for a PONG, unless one is awaited; give the connection up when the
        one awaited is ``PROBE_PATIENCE`` late. For the owner's loop, every second or so: a
        connection whose far end went away without a reset (its host lost, a firewall's state
        dropped) shows no error for minutes, and meanwhile the records it should carry come
        by the bucket only, tens of milliseconds late."""
        if not self.alive:
            return
        now = time.monotonic()
        asked = self._asked
        if asked is not None:
            if now - asked >= PROBE_PATIENCE:
                log.warning("live path: no answer from the server for %.0f s", now - asked)
                self._abandon()
            return
        if not self._lock.acquire(blocking=False):
            return  # a send under way, which SEND_TIMEOUT watches; never wait for it here
        try:
            self._asked = now
            # 6 bytes; only a server that takes nothing makes this wait (SEND_TIMEOUT, once).
            self._sock.sendall(b"PING\r\n")
        except OSError:
            self._abandon()
        finally:
            self._lock.release()

    def _abandon(self) -> None:
        """Stop using the connection: the server drops it, the reading thread ends, and any
        send under way fails at once."""
        self.alive = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _read(self) -> None:
        reader = self._reader
        try:
            while True:
                line = reader.readline(MAX_LINE)
                if not line.endswith(_CRLF):
                    break  # closed, or a line no server sends
                if line.startswith(b"MSG "):
                    fields = line.split()
                    size = int(fields[-1])
                    # The payload and its CRLF apart: no copy of the payload to cut it off.
                    payload = reader.read(size)
                    if len(payload) != size or reader.read(2) != _CRLF:
                        break
                    if self._on_message is not None:
                        self._on_message(fields[1].decode(), payload)
                elif line.startswith(b"PING"):
                    self._send(b"PONG\r\n")
                elif line.startswith(b"PONG"):
                    self._asked = None
                elif line.startswith(b"-ERR"):
                    log.warning(
                        "live path: the server said %s", line.decode(errors="replace")[:200]
                    )
        except (OSError, ValueError):
            pass
        finally:
            self.alive = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._abandon()
        self._thread.join()
        with self._lock:  # a sender of another thread is out (its send failed at once)
            self._reader.close()
            self._sock.close()


def open_live(
    options: ConnectOptions,
    subscribe: tuple[str, ...] = (),
    on_message: Callable[[str, bytes], None] | None = None,
) -> LiveConnection | None:
    """A live connection to the first server of *options* that accepts one (subscribed to the
    subjects *subscribe*, with ``on_message(subject, payload)`` called in the reading thread);
    ``None`` if the options need what this connection does not speak, or no server accepts."""
    if options.creds_file or options.nkey_seed_file or options.tls_ca_file or options.tls_cert_file:
        return None
    for server in options.servers:
        try:
            live = _open(server, options, on_message)
        except (OSError, ValueError) as exc:
            log.debug("live path: %s: %s", exc.__class__.__name__, str(exc)[:200])
            continue
        if live is not None:
            if subscribe:
                live.subscribe(*subscribe)
                if not live.alive:
                    live.close()
                    continue
            return live
    return None


def _open(
    server: str, options: ConnectOptions, on_message: Callable[[str, bytes], None] | None
) -> LiveConnection | None:
    parts = urlsplit(server if "://" in server else f"nats://{server}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 4222
    sock = socket.create_connection((host, port), timeout=options.connect_timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        info = _info(reader.readline(MAX_LINE))
        if parts.scheme == "tls" or info.get("tls_required"):
            # One thread reads while others write, which an OpenSSL connection does not
            # allow: over TLS the live copy goes through nats-py.
            sock.close()
            return None
        user = options.user or parts.username
        password = options.password or parts.password
        connect: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "lang": "python-shmstore",
            "version": __version__,
            "protocol": 1,
            "name": f"{options.name or 'shmstore'}-live",
        }
        if options.token:
            connect["auth_token"] = options.token
        elif user:
            connect["user"] = user
            connect["pass"] = password or ""
        sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        while True:  # the answer to our PING says the CONNECT was accepted
            line = reader.readline(MAX_LINE)
            if line.startswith(b"PONG"):
                break
            if not line or line.startswith(b"-ERR"):
                raise ValueError(line.decode(errors="replace").strip()[:200] or "closed")
        sock.settimeout(None)
        # Blocking sends, but none waits for a server that takes nothing for SEND_TIMEOUT
        # seconds (stopped, or its host gone): the send fails, the connection is abandoned,
        # and the record goes by the bucket.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
    except BaseException:
        sock.close()
        raise
    return LiveConnection(sock, reader, info, on_message)


def _info(line: bytes) -> dict[str, Any]:
    if not line.startswith(b"INFO "):
        raise ValueError("not a NATS server")
    info: dict[str, Any] = json.loads(line[5:])
    return info
