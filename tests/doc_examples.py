"""Runs the documentation's examples: every ```python block of README.md and docs/, and README's
two-terminal quick start.

``tests/test_docs.py`` starts this file as a program, inside a private mount namespace with its
own empty tmpfs on /dev/shm (``unshare --mount``). That isolation is what lets the examples use
the names a reader would (``"greenhouse"``, ``"robot-pose"``) while other programs and other
copies of the suite run: nobody else can see or remove their stores, and the leak check is exact
-- after the examples ran, the private /dev/shm must be empty again.

Modes (one JSON line per failure on stdout, exit status 1 if there was one):

``examples FILE``
    Parse FILE with sybil and evaluate its Python blocks in order (hidden setup in
    ``<!-- invisible-code-block: python -->`` comments included), twice: each pass in a fresh
    namespace, each followed by the check that /dev/shm is empty. A failure names FILE:LINE.
``quickstart FILE``
    The blocks README marks ``<!-- quickstart: writer.py -->`` etc.: the writer and the reader as
    two processes, then the shell commands, as written.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")
HANG = 60.0  # bounds a hang, never a duration

FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
QUICKSTART = re.compile(r"<!-- quickstart: (\S+) -->\s*\n```\w+[^\n]*\n(.*?)^```", re.M | re.S)


def blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(line, source) of every fenced block of *language*, in order."""
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == language
    ]


def quickstart_files(text: str) -> dict[str, str]:
    """README's quick-start blocks by their marker: file name (or ``shell``) -> source."""
    return {m.group(1): m.group(2) for m in QUICKSTART.finditer(text)}


def _sybil() -> Any:
    from sybil import Sybil  # noqa: PLC0415
    from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser  # noqa: PLC0415

    return Sybil(parsers=[PythonCodeBlockParser(), SkipParser()], patterns=["*.md"])


def evaluated_lines(path: Path) -> list[int]:
    """The lines of the blocks sybil evaluates in *path* (visible and hidden)."""
    document = _sybil().parse(path)
    return [example.line for example in document]


def shm_left() -> list[str]:
    return sorted(p.name for p in SHM.iterdir())


def run_examples(path: Path) -> list[dict[str, Any]]:
    failures: list[dict[str, Any]] = []
    # A handle an example forgets to close warns in __del__, where an exception (-W error)
    # cannot propagate: Python reports it to this hook instead, and it fails the example.
    unraisable: list[str] = []
    sys.unraisablehook = lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
    for run in (1, 2):
        unraisable.clear()
        document = _sybil().parse(path)
        document.namespace["__name__"] = "__main__"
        for example in document:
            try:
                example.evaluate()
                gc.collect()
                if unraisable:
                    raise AssertionError("; ".join(unraisable))
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                traceback.print_exc()
                failures.append(
                    {"where": f"{path.name}:{example.line}", "run": run, "error": repr(exc)}
                )
                break  # later blocks may depend on this one: one failure per run is enough
        left = shm_left()
        if left:
            failures.append({"where": str(path.name), "run": run, "error": f"left {left}"})
            break
    return failures


def _shell_lines(source: str) -> list[str]:
    return [
        line.split("#", 1)[0].strip()
        for line in source.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def run_quickstart(path: Path) -> list[dict[str, Any]]:
    """The writer in one "terminal", the reader in another, then the shell commands."""
    files = quickstart_files(path.read_text())
    missing = {"writer.py", "reader.py", "shell"} - files.keys()
    if missing:
        return [{"where": path.name, "run": 1, "error": f"no quick-start block {missing}"}]
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    failures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="shmstore-quickstart-") as tmp:
        for name in ("writer.py", "reader.py"):
            (Path(tmp) / name).write_text(files[name])
        writer = subprocess.Popen(
            [sys.executable, "writer.py"],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout is not None
            said = writer.stdout.readline()  # printed once the store is open: go, terminal 2
            if not said:
                raise AssertionError("the writer ended before it began (its stderr follows)")
            reader = subprocess.run(
                [sys.executable, "reader.py"],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=HANG,
                check=False,
            )
            if reader.returncode != 0 or not reader.stdout.strip():
                failures.append({"where": "reader.py", "run": 1, "error": reader.stderr[-2000:]})
            for line in _shell_lines(files["shell"]):
                argv = shlex.split(line)
                if argv[0] == "shmstore" and argv[1] == "watch":
                    # Runs until Ctrl-C: take its first lines, then press Ctrl-C.
                    proc = subprocess.Popen(
                        argv, cwd=tmp, env=env, stdout=subprocess.PIPE, text=True
                    )
                    assert proc.stdout is not None
                    first = [proc.stdout.readline() for _ in range(3)]
                    proc.send_signal(signal.SIGINT)
                    proc.communicate(timeout=HANG)
                    ok = proc.returncode == 130 and all(json.loads(x) for x in first)
                    result = f"exit {proc.returncode}, first lines {first}"
                else:
                    done = subprocess.run(
                        argv,
                        cwd=tmp,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=HANG,
                        check=False,
                    )
                    ok = done.returncode == 0
                    result = f"exit {done.returncode}: {done.stdout[-500:]} {done.stderr[-500:]}"
                print(f"$ {line}\n{result}", file=sys.stderr)
                if not ok:
                    failures.append({"where": line, "run": 1, "error": result})
        finally:
            if writer.poll() is None:
                writer.send_signal(signal.SIGINT)  # the writer's own way to stop: Ctrl-C
            _out, err = writer.communicate(timeout=HANG)
            if writer.returncode != 0 or "Traceback" in err:
                failures.append(
                    {"where": "writer.py", "run": 1, "error": f"{writer.returncode}: {err}"}
                )
    left = shm_left()
    if left:
        failures.append({"where": "quick start", "run": 1, "error": f"left {left}"})
    return failures


def main(argv: list[str]) -> int:
    mode, path = argv[0], Path(argv[1])
    if shm_left():
        print(json.dumps({"where": "setup", "error": "/dev/shm is not private"}))
        return 1
    failures = run_examples(path) if mode == "examples" else run_quickstart(path)
    for failure in failures:
        print(json.dumps(failure))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
