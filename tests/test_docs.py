"""The documentation runs: the site builds with ``mkdocs build --strict``, every ```python block
of README.md and docs/ is executed (twice, leaving /dev/shm as it found it), README's quick start
runs as written, and the CLI synopsis in the docs matches ``--help``.

The examples run in ``tests/doc_examples.py``, started inside a private mount namespace with its
own /dev/shm (see that file for why). Blocks that need a ``nats-server`` find the suite's
throwaway server in ``$SHMSTORE_NATS_URL``.

Why sybil: it parses Markdown fenced blocks and hidden setup (``invisible-code-block``) and can
be driven from a test like this one, so the examples run where fixtures can start servers and
isolate /dev/shm. pytest-markdown-docs and pytest-codeblocks collect ``.md`` files as test items
themselves, which would mean collecting outside ``testpaths = ["tests"]``, and give us no hook to
run a whole page twice in an isolated namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from doc_examples import ROOT, blocks, evaluated_lines, quickstart_files

HANG = 300  # bounds a hang, never a duration: a document's examples run twice
DOCS = sorted(p.relative_to(ROOT) for p in (ROOT / "docs").rglob("*.md"))
DOCUMENTS = [Path("README.md"), *DOCS]
NATS_VARIABLE = "SHMSTORE_NATS_URL"
RUNNER = ROOT / "tests" / "doc_examples.py"


def _isolation_prefix() -> list[str] | None:
    """A command prefix that gives the child its own mount namespace and an empty /dev/shm."""
    unshare = shutil.which("unshare")
    if unshare is None or sys.platform != "linux":
        return None
    flags = ["--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        flags.append("--map-root-user")  # an unprivileged user namespace, where allowed
    prefix = [unshare, *flags, "sh", "-c", 'mount -t tmpfs -o mode=1777 shm /dev/shm && exec "$@"']
    probe = subprocess.run([*prefix, "sh", "true"], capture_output=True, check=False, timeout=60)
    return [*prefix, "sh"] if probe.returncode == 0 else None


ISOLATION = _isolation_prefix()
needs_isolation = pytest.mark.skipif(
    ISOLATION is None, reason="needs `unshare --mount` (Linux; root or user namespaces)"
)


@contextlib.contextmanager
def nats_url_if_needed(text: str) -> Iterator[dict[str, str]]:
    """``{SHMSTORE_NATS_URL: url}`` of a throwaway server when *text* asks for one."""
    if NATS_VARIABLE not in text:
        yield {}
        return
    from mirror_helpers import nats_servers  # noqa: PLC0415

    with nats_servers() as (server,):
        yield {NATS_VARIABLE: server.url}


def run_isolated(mode: str, document: Path) -> subprocess.CompletedProcess[str]:
    assert ISOLATION is not None
    text = (ROOT / document).read_text()
    with nats_url_if_needed(text) as extra:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), **extra}
        return subprocess.run(
            [*ISOLATION, sys.executable, "-W", "error", str(RUNNER), mode, str(ROOT / document)],
            capture_output=True,
            text=True,
            timeout=HANG,
            env=env,
            cwd=ROOT,
            check=False,
        )


def _report(result: subprocess.CompletedProcess[str]) -> str:
    failures = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return json.dumps(failures, indent=1) + "\n" + result.stderr[-6000:]


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a broken link, a missing page, a docstring the API reference
    cannot render or a missing snippet is a failure."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    reference = {
        page: (tmp_path / "reference" / page / "index.html").read_text()
        for page in ("shmstore", "fsm", "mirror", "metrics")
    }
    assert 'id="shmstore.Store.wait"' in reference["shmstore"]  # generated from the docstrings
    assert 'id="shmstore.fsm.AsyncStateStore"' in reference["fsm"]
    for page, html in reference.items():
        # docs/_ext/sphinx_roles.py: Sphinx roles and doctests render as code, not as text
        assert not re.search(r":(class|meth|attr|func|exc):", html), page
        assert '<h1 id="help' not in html, page


@needs_isolation
@pytest.mark.parametrize("document", DOCUMENTS, ids=str)
def test_examples_run_twice_and_leave_nothing(document: Path) -> None:
    result = run_isolated("examples", document)
    assert result.returncode == 0, _report(result)


@needs_isolation
def test_readme_quick_start_runs_as_written() -> None:
    """A writer and a reader in two terminals, then ``shmstore get`` and ``shmstore watch``."""
    result = run_isolated("quickstart", Path("README.md"))
    assert result.returncode == 0, _report(result)


def test_every_python_block_is_executed() -> None:
    """No block escapes: each ```python block is either evaluated by sybil or is one of README's
    quick-start files (run by the test above)."""
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        quick = set(quickstart_files(text).values()) if document.name == "README.md" else set()
        evaluated = set(evaluated_lines(ROOT / document))
        escaped = [
            line
            for line, source in blocks(text, "python")
            if line not in evaluated and source not in quick
        ]
        assert escaped == [], f"{document}: blocks at lines {escaped} are never run"
        # sybil's skip directive would hide a block: only the quick-start files may use it.
        skips = text.count("<!-- skip:")
        assert skips == len(quick - {quickstart_files(text).get("shell")}), document


@needs_isolation
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import shmstore\nshmstore.Store.open('no-such-store')\n", "StoreNotFoundError"),
        (
            "import shmstore\nshmstore.Store.create('leaked', int).close()\n",
            "left ['shmstore.",
        ),
        (
            "import shmstore\nst = shmstore.Store.create('unclosed', int)\n"
            "shmstore.remove('unclosed')\ndel st\n",
            "was never closed",
        ),
    ],
    ids=["raises", "leaks", "unclosed"],
)
def test_a_broken_example_fails_the_suite(tmp_path: Path, source: str, expected: str) -> None:
    """The negative control: a failing block, a block that leaves a store behind and one that
    drops a handle without closing it are reported (so a green run above means the blocks
    really ran)."""
    page = tmp_path / "broken.md"
    page.write_text(f"# Broken\n\nText.\n\n```python\n{source}```\n")
    result = run_isolated("examples", page)
    assert result.returncode == 1
    assert expected in result.stdout, _report(result)
    if expected == "StoreNotFoundError":
        assert "broken.md:5" in result.stdout


MIRROR_PAGE = """# Mirror

```python
import asyncio
import os

import shmstore
from shmstore import Store
from shmstore.mirror import ConnectOptions, Follower, Publisher

options = ConnectOptions(servers=[os.environ["SHMSTORE_NATS_URL"]])


async def main() -> None:
    with Store.create("pose", dict[str, float]) as origin:
        publisher = Publisher("pose", options=options, value_type=dict[str, float])
        follower = Follower("pose", options=options, local_name="pose-replica")
        tasks = [asyncio.create_task(publisher.run()), asyncio.create_task(follower.run())]
        try:
            origin.set({"x": 1.0})
            while follower.applied < 1:
                await asyncio.sleep(0.01)
            with Store.open("pose-replica") as replica:
                assert replica.get() == {"x": 1.0}
        finally:
            publisher.stop()
            follower.stop()
            await asyncio.gather(*tasks)
            origin.unlink()
            shmstore.remove("pose-replica")


asyncio.run(main())
```
"""


@needs_isolation
def test_a_page_that_names_the_nats_variable_gets_a_server(tmp_path: Path) -> None:
    """A page that mentions ``SHMSTORE_NATS_URL`` runs with a throwaway ``nats-server`` there:
    a publisher and a follower, in the examples' private /dev/shm, twice on one server."""
    page = tmp_path / "mirror.md"
    page.write_text(MIRROR_PAGE)
    result = run_isolated("examples", page)
    assert result.returncode == 0, _report(result)


def _documented_command_lines() -> list[str]:
    lines = []
    for document in DOCUMENTS:
        for _line, source in blocks((ROOT / document).read_text(), "sh"):
            for line in source.splitlines():
                code = line.split("  #", 1)[0].strip()
                if code.startswith("shmstore "):
                    lines.append(code)
    return lines


def test_documented_cli_lines_match_help() -> None:
    """Every ``shmstore VERB --option`` in a ```sh block names a verb and options that
    ``shmstore VERB --help`` lists."""
    script = str(Path(sys.executable).parent / "shmstore")
    helps: dict[tuple[str, ...], str] = {}
    checked = 0
    for line in _documented_command_lines():
        words = shlex.split(line, comments=False)[1:]
        verb = tuple(words[:2] if words[:1] == ["mirror"] else words[:1])
        verb = tuple(w for w in verb if re.fullmatch(r"[a-z]+", w))
        if verb not in helps:
            result = subprocess.run(
                [script, *verb, "--help"], capture_output=True, text=True, timeout=60, check=False
            )
            assert result.returncode == 0, f"no such command: {line}\n{result.stderr}"
            helps[verb] = result.stdout
        options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line))
        unknown = {o for o in options if o not in helps[verb]}
        assert not unknown, f"{line}: {sorted(unknown)} not in `shmstore {' '.join(verb)} --help`"
        checked += 1
    assert checked >= 10, "the docs lost their CLI synopsis"


def _named_tests(table: str) -> list[tuple[str, str | None]]:
    """(file, test or None) for every test the Guarantees table names. A row names a file
    (``test_x.py::test_y`` or ``test_x.py``) and then more tests of the same file, some
    abbreviated ``..._suffix``."""
    named: list[tuple[str, str | None]] = []
    for row in table.splitlines():
        if not row.startswith("| ") or row.lower().startswith("| promise"):
            continue
        current = ""
        for token in re.findall(r"`([^`]+)`", row.rsplit(" | ", 1)[-1]):
            if m := re.fullmatch(r"(?:tests/)?((?:test_\w+|conftest)\.py)(?:::(\w+))?", token):
                current = m.group(1)
                named.append((current, m.group(2)))
            elif re.fullmatch(r"(test_\w+|\.\.\._\w+)", token) and current:
                named.append((current, token))
    return named


@pytest.mark.parametrize(
    ("page", "at_least"), [("guarantees.md", 50), ("mirror.md", 20), ("wait-any.md", 5)]
)
def test_guarantees_name_tests_that_exist(page: str, at_least: int) -> None:
    """A promise is only as good as its proof: every test a Guarantees table names exists."""
    named = _named_tests((ROOT / "docs" / page).read_text())
    assert len(named) >= at_least
    missing = []
    for file, test in named:
        path = ROOT / "tests" / file
        if not path.exists():
            missing.append(file)
        elif test is not None:
            pattern = (
                rf"def test_\w*{re.escape(test[3:])}\b"
                if test.startswith("...")
                else rf"def {test}\b"
            )
            if not re.search(pattern, path.read_text()):
                missing.append(f"{file}::{test}")
    assert missing == []
