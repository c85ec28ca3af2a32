"""``shmstore mirror publish | follow | set``: the mirror's verbs of the ``shmstore`` command.

``shmstore._cli.build_parser`` calls :func:`add_mirror_parser`; this module imports no NATS code
until a verb runs, so the command works without the ``[mirror]`` extra. Exit status as the rest
of the command: 0 ok, 1 error (one line on stderr), 2 usage, 3 ``set --expect`` conflict, 130
``publish``/``follow`` stopped by Ctrl-C (a ``SIGTERM`` stop is a clean one: 0).

Secrets: ``--password`` and ``--token`` are visible to other users in the process list; prefer
the environment variables ``SHMSTORE_NATS_PASSWORD`` / ``SHMSTORE_NATS_TOKEN``, a ``--creds``
file, or TLS client certificates. No secret is ever printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from typing import Any

import msgspec

from .. import StateVersionError
from .._cli_args import number, version
from .._typeexpr import TypeExpressionError, resolve_type
from ..replication import validate_name
from ._commits import DURABLE_MOST, DURABLE_QUIET
from ._connect import ConnectOptions, check_server
from ._errors import MirrorError
from ._wire import validate_bucket

__all__ = ["add_mirror_parser"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_INTERRUPTED = 130


def _options(args: argparse.Namespace) -> ConnectOptions:
    # asyncio's own chatter about TLS connections closing is no news to an operator.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    return ConnectOptions(
        servers=tuple(server for servers in args.server for server in servers),
        user=args.user,
        password=args.password or os.environ.get("SHMSTORE_NATS_PASSWORD") or None,
        token=args.token or os.environ.get("SHMSTORE_NATS_TOKEN") or None,
        creds_file=args.creds,
        nkey_seed_file=args.nkey,
        tls_ca_file=args.tls_ca,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        name=f"shmstore-{args.mirror_verb}-{args.name}",
    )


def _import_type(spec: str | None) -> Any:
    if spec is None:
        return None
    # The same resolution as `shmstore set --type` (the current directory searched as
    # `python -m` does, and any type expression `shmstore ls` prints).
    try:
        return resolve_type(spec)
    except TypeExpressionError as exc:
        if exc.syntax:
            print(f"shmstore: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        raise


def _run_until_signalled(worker: Any) -> int:
    """Run ``worker.run()`` until SIGINT or SIGTERM, then stop it cleanly. Exit status: 130
    after Ctrl-C, like ``watch`` and every interrupted command; 0 after SIGTERM, the way a
    service manager stops a worker it runs (a clean stop, not a failure)."""

    logging.getLogger("shmstore.mirror").setLevel(logging.INFO)  # state changes, for operators
    stopped_by: list[int] = []

    def stop(sig: int) -> None:
        stopped_by.append(sig)
        worker.stop()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        await worker.run()

    asyncio.run(main())
    return EXIT_INTERRUPTED if stopped_by[:1] == [signal.SIGINT] else EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    from ._publisher import Publisher  # noqa: PLC0415

    publisher = Publisher(
        args.name,
        options=_options(args),
        bucket=args.bucket,
        value_type=_import_type(args.type),
        replicas=args.replicas,
        live=args.live,
        durable_quiet=args.durable_quiet,
        durable_most=args.durable_most,
    )
    return _run_until_signalled(publisher)


def cmd_follow(args: argparse.Namespace) -> int:
    from ._follower import Follower  # noqa: PLC0415

    follower = Follower(
        args.name,
        options=_options(args),
        bucket=args.bucket,
        local_name=args.local,
        max_readers=args.max_readers,
        live=args.live,
        validate=args.validate,
    )
    return _run_until_signalled(follower)


def cmd_set(args: argparse.Namespace) -> int:
    from ._remote import AsyncRemoteStore  # noqa: PLC0415

    # Bytes, not text: msgspec checks that they are UTF-8, and a non-UTF-8 input is bad input
    # with the usual one-line error (text would carry surrogates that cannot be encoded).
    data = sys.stdin.buffer.read() if args.value == "-" else os.fsencode(args.value)
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        print(f"shmstore: value is not valid JSON: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except RecursionError:
        print("shmstore: value is nested too deeply", file=sys.stderr)
        return EXIT_ERROR

    async def write() -> int:
        async with AsyncRemoteStore(
            args.name, options=_options(args), bucket=args.bucket, timeout=args.timeout
        ) as remote:
            return await remote.set(value, args.expect)

    try:
        version = asyncio.run(write())
    except StateVersionError as exc:
        print(f"shmstore: {exc}", file=sys.stderr)
        return EXIT_CONFLICT
    sys.stdout.write(msgspec.json.encode({"version": version}).decode() + "\n")
    return EXIT_OK


def _within(text: str, low: int, high: int) -> int:
    value: int = number(text, int, "a whole number")
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
    return value


def _replicas(text: str) -> int:
    return _within(text, 1, 5)


def _readers(text: str) -> int:
    return _within(text, 1, 4096)


def _positive(text: str) -> float:
    value: float = number(text, float, "a number of seconds")
    if not 0 < value < math.inf:  # nan fails too
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _bucket(text: str) -> str:
    try:
        return validate_bucket(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _store_name(text: str) -> str:
    try:
        return validate_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _servers(text: str) -> list[str]:
    servers = [s.strip() for s in text.split(",") if s.strip()]
    if not servers:
        raise argparse.ArgumentTypeError(f"no server URL in {text!r}")
    try:
        return [check_server(server) for server in servers]
    except MirrorError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        action="append",
        type=_servers,
        required=True,
        metavar="URL",
        help="NATS server URL (repeat, or comma-separate, for a cluster)",
    )
    p.add_argument("--bucket", type=_bucket, help="the KV bucket (default: shmstore_NAME)")
    p.add_argument("--user", help="NATS user")
    p.add_argument("--password", help="NATS password (prefer $SHMSTORE_NATS_PASSWORD)")
    p.add_argument("--token", help="NATS token (prefer $SHMSTORE_NATS_TOKEN)")
    p.add_argument("--creds", metavar="FILE", help="NATS .creds file (JWT + nkey)")
    p.add_argument("--nkey", metavar="FILE", help="NATS nkey seed file")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificates to verify the server")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="FILE", help="client certificate's key")


def add_mirror_parser(subparsers: Any) -> None:
    """Add the ``mirror`` verb and its ``publish``, ``follow`` and ``set`` sub-verbs to the
    ``shmstore`` command's sub-parsers."""
    help_ = "mirror a store to other hosts through NATS JetStream (needs shmstore[mirror])"
    mirror = subparsers.add_parser("mirror", help=help_, description=help_)
    verbs = mirror.add_subparsers(dest="mirror_verb", required=True, metavar="VERB")

    text = "put every committed version of local store NAME into NATS, until SIGINT/SIGTERM"
    p = verbs.add_parser("publish", help=text, description=text)
    p.set_defaults(run=cmd_publish)
    p.add_argument("name")
    _connection_arguments(p)
    p.add_argument(
        "--type",
        metavar="MODULE:CLASS",
        help="the store's type: needed to accept remote writes to a typed store",
    )
    p.add_argument(
        "--replicas",
        type=_replicas,
        default=1,
        help="bucket replicas when the bucket is created (3 on a 3-node cluster)",
    )
    p.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="put records into the bucket only, not also on the live subject",
    )
    p.add_argument(
        "--durable-quiet",
        type=_positive,
        default=DURABLE_QUIET,
        metavar="SECONDS",
        help="once a commit's live copy is out, put it into the bucket when the writer has "
        f"paused this long ({DURABLE_QUIET:g})",
    )
    p.add_argument(
        "--durable-most",
        type=_positive,
        default=DURABLE_MOST,
        metavar="SECONDS",
        help="... or this long after the first commit the bucket lacks, for a writer that "
        f"never pauses ({DURABLE_MOST:g})",
    )

    text = "keep a local replica of store NAME from NATS, until SIGINT/SIGTERM"
    p = verbs.add_parser("follow", help=text, description=text)
    p.set_defaults(run=cmd_follow)
    p.add_argument("name")
    _connection_arguments(p)
    p.add_argument(
        "--as", dest="local", type=_store_name, metavar="LOCAL", help="local replica name (NAME)"
    )
    p.add_argument(
        "--max-readers",
        type=_readers,
        default=64,
        help="processes that may wait on the replica at once, when it is created (64)",
    )
    p.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="take records from the bucket only, not from the publisher's live subject",
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="decode every value again before committing it (for publishers you do not trust; "
        "by default a value the origin validated under the replica's schema is not re-checked)",
    )

    text = "commit a JSON value on the origin store NAME through its publisher"
    p = verbs.add_parser("set", help=text, description=text)
    p.set_defaults(run=cmd_set)
    p.add_argument("name")
    p.add_argument("value", help="the value as JSON, or - for standard input")
    _connection_arguments(p)
    p.add_argument("--expect", type=version, metavar="VERSION", help="commit only at this version")
    p.add_argument("--timeout", type=_positive, default=10.0, help="seconds to wait (10)")
