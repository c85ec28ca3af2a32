"""The package's structure, checked: no module reaches into another's private names, no import
cycles, one wait engine, and an asyncio veneer that cannot drift from the store."""

from __future__ import annotations

import ast
import asyncio
import threading
from pathlib import Path

import pytest
from test_waiting import wait_for_registrations

import shmstore
from shmstore import AsyncStore, Store, _aio

PACKAGE = Path(shmstore.__file__).resolve().parent

# Private names that one module may use of another, each with its reason. Keep this short.
ALLOWED_REACH_INS: dict[str, str] = {}


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _own_private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, attributes it assigns, slots."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_reaches_into_another_modules_private_names() -> None:
    modules = _modules()
    offences = []
    for path, tree in modules.items():
        own = _own_private_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if node.attr in own:
                    continue  # the same module's own name, on another instance of its class
                where = f"{path}:{node.lineno} .{node.attr}"
                if where not in ALLOWED_REACH_INS:
                    offences.append(where)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if _is_private(alias.name) and not (PACKAGE / f"{alias.name}.py").exists():
                        where = f"{path}:{node.lineno} import {alias.name}"
                        if where not in ALLOWED_REACH_INS:
                            offences.append(where)
    assert offences == []


def test_the_checker_catches_a_reach_in() -> None:
    tree = ast.parse("def f(store):\n    return store._registry.sweep()\n")
    own = _own_private_names(tree)
    found = [
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and _is_private(n.attr) and n.attr not in own
    ]
    assert found == ["_registry"]


def _imports_of(path: str, tree: ast.Module) -> set[str]:
    """Package-internal modules *path* imports, anywhere in the file (lazy imports count)."""
    package = ["shmstore", *Path(path).parent.parts]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module:
                out.add(".".join([*base, *node.module.split(".")]))
            else:
                out.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shmstore"):
            out.add(node.module or "")
    return out


def _module_name(path: str) -> str:
    parts = ["shmstore", *Path(path).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_import_cycles() -> None:
    graph = {
        _module_name(path): {m for m in _imports_of(path, tree) if m != _module_name(path)}
        for path, tree in _modules().items()
    }
    # A package's __init__ re-exports its modules; importing the package is not a cycle.
    packages = {m for m in graph if (PACKAGE / Path(*m.split(".")[1:]) / "__init__.py").exists()}
    for pkg in packages:
        graph[pkg] = set()
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


# The core's public face for outer packages: the façade and the replication interface.
PUBLIC_CORE = {"shmstore", "shmstore.replication"}
# Exceptions, each with its reason. The mirror's verbs are verbs of the `shmstore` command: they
# resolve --type and read numbers and versions as its other verbs do.
MIRROR_MAY_ALSO_IMPORT = {
    ("mirror/_cli.py", "shmstore._typeexpr"),
    ("mirror/_cli.py", "shmstore._cli_args"),
}


def test_the_mirror_uses_the_core_through_public_names_only() -> None:
    """shmstore.mirror is what another replication backend would be: it may import the core's
    façade and ``shmstore.replication``, never a private core module."""
    offences = []
    for path, tree in _modules().items():
        if not path.startswith("mirror/"):
            continue
        for imported in _imports_of(path, tree):
            # `from .. import Store` names an attribute of the package, not a module
            module = imported if _is_module(imported) else imported.rsplit(".", 1)[0]
            if module.startswith("shmstore.mirror") or module in PUBLIC_CORE:
                continue
            if (path, module) not in MIRROR_MAY_ALSO_IMPORT:
                offences.append(f"{path} imports {module}")
    assert offences == []


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative).is_dir()


def test_no_module_or_class_holds_everything() -> None:
    """One concept per module: no module past ~600 lines, no class past ~500."""
    too_big = []
    for path, tree in _modules().items():
        lines = len((PACKAGE / path).read_text().splitlines())
        if lines > 600:
            too_big.append(f"{path}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > 500:
                    too_big.append(f"{path}: class {node.name}: {size} lines")
    assert too_big == []


def test_async_store_declares_every_store_member() -> None:
    public = {name for name in dir(Store) if not name.startswith("_")}
    passed_through = set(_aio.SYNC_METHODS) | set(_aio.SYNC_PROPERTIES)
    own = {name for name in vars(AsyncStore) if not name.startswith("_")}
    # wait_async is what AsyncStore.wait is; subscribe/set/update/close and the constructors
    # have AsyncStore forms of their own; register_waiter is wait_any's plumbing (wait_any and
    # wait_any_async take AsyncStore handles themselves).
    missing = public - passed_through - own - {"wait_async", "register_waiter"}
    assert missing == set()
    for name in passed_through:
        assert hasattr(Store, name), f"{name} is passed through but Store has no such member"


def test_sync_and_async_waiters_of_one_handle_share_one_registry_entry(store_name: str) -> None:
    with Store.create(store_name, int) as writer:
        reader = AsyncStore.open(store_name, int)
        try:
            got_sync: list[int] = []
            thread = threading.Thread(target=lambda: got_sync.append(reader.store.wait(0, 60)))
            thread.start()

            async def main() -> int:
                task = asyncio.create_task(reader.wait(0, timeout=60))
                await asyncio.to_thread(wait_for_registrations, writer, 1)
                await asyncio.sleep(0.05)  # give the async server time to (wrongly) register
                assert len(reader.store._registry.entries()) == 1
                writer.set(7)
                return await task

            assert asyncio.run(main()) == 1
            thread.join(60)
            assert got_sync == [1]
            assert len(writer._registry.entries()) == 1  # the sync wait keeps its entry
        finally:
            reader.close()
        assert writer._registry.entries() == []
