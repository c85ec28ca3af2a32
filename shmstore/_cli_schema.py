"""``shmstore schema NAME``: the type a store records, readable or as JSON.

A verb of its own module (the CLI's other verbs are in ``_cli``), registered by
:func:`add_schema_parser`. The store describes itself (``Store.schema``, see
docs/evolution.md), so no ``--type`` is needed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from ._schema import render
from ._store import Store

__all__ = ["add_schema_parser", "cmd_schema"]


def cmd_schema(args: argparse.Namespace) -> int:
    with Store.open(args.name, allow_other_owner=True) as st:
        schema, generation, type_name = st.schema, st.schema_generation, st.type_name
    if args.json:
        data = {"type_name": type_name, "schema_generation": generation, "schema": schema}
        sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
        return 0
    sys.stdout.write(f"# store {args.name!r}: {type_name}, schema generation {generation}\n")
    if schema is None:
        sys.stdout.write(
            "# no structure recorded (a replica, or a type shmstore cannot describe)\n"
        )
    else:
        sys.stdout.write(render(schema) + "\n")
    sys.stdout.flush()
    return 0


def add_schema_parser(verbs: Any) -> None:
    """Register ``schema`` on the CLI's subparsers."""
    help_ = "print the type a store records (its fields, defaults, options), no --type needed"
    p = verbs.add_parser("schema", help=help_, description=help_)
    p.set_defaults(run=cmd_schema)
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="the description as one JSON object")
