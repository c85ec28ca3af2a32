"""The CLI as a new user meets it (issue 20, items 6 and 10-14): the console script, run for
real in subprocesses. Each test failed on the code before its fix, for the reason its docstring
gives."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest
from mirror_helpers import nats_servers, wait_until
from test_cli import SCRIPT, spawned, with_ctrl_c
from test_waiting import wait_for_registrations

import shmstore
from shmstore import Store
from shmstore._names import segment_name

JOIN = 60.0  # bounds a hang, never a duration


def run(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None, pythonpath: str = ""
) -> subprocess.CompletedProcess[str]:
    """The console script (not ``python -m``: its ``sys.path`` starts with its own directory)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [SCRIPT, *args], input=stdin, capture_output=True, timeout=JOIN, env=env, cwd=cwd,
        check=False,
    )  # fmt: skip
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "[Errno" not in lines[0], lines[0]
    assert lines[0].startswith("shmstore: ")
    return lines[0]


APP = """
import msgspec

class State(msgspec.Struct):
    mode: str
    level: int = 0
"""


# ---------------------------------------------------------------- item 10: --type from cwd


class State(msgspec.Struct):  # the schema of APP's State, for this process's side
    mode: str
    level: int = 0


def test_type_from_a_module_in_the_current_directory(store_name: str, tmp_path: Path) -> None:
    """The console script could not import ``myapp`` from the current directory
    (``No module named 'myapp'``) although ``python -m shmstore`` could."""
    (tmp_path / "myapp.py").write_text(textwrap.dedent(APP))
    with Store.create(store_name, State) as st:
        wrote = run("set", store_name, '{"mode": "on"}', "--type", "myapp:State", cwd=tmp_path)
        assert wrote.returncode == 0, wrote.stderr
        assert st.get() == State("on")
    created = run("create", store_name + "-b", "--type", "myapp:State", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["type"] == "myapp:State"
    assert "myapp" not in sys.modules  # nothing leaked into this process either
    shmstore.remove(store_name + "-b")


def test_an_import_failure_asks_about_pythonpath(store_name: str, tmp_path: Path) -> None:
    with Store.create(store_name, dict):
        for spec in ("nosuchapp:State", "nosuchapp.types.State"):
            failed = run("set", store_name, "{}", "--type", spec, cwd=tmp_path)
            assert failed.returncode == 1
            line = error_line(failed)
            assert "cannot import" in line
            assert "is its directory on PYTHONPATH?" in line


# ---------------------------------------------------------------- item 11: type expressions


class Point(msgspec.Struct):
    x: int
    y: int


GENERIC: list[tuple[Any, str, Any]] = [
    (dict[str, int], '{"a": 1}', {"a": 1}),
    (list[float], "[1.5, 2]", [1.5, 2.0]),
    (int | None, "null", None),
    (dict[str, list[int | None]], '{"a": [1, null]}', {"a": [1, None]}),
    (tuple[int, ...], "[1, 2, 3]", [1, 2, 3]),
]


@pytest.mark.parametrize(("tp", "text", "expected"), GENERIC, ids=str)
def test_a_generic_store_is_written_with_the_type_ls_prints(
    store_name: str, tp: Any, text: str, expected: Any
) -> None:
    """``ls`` shows ``dict[str, int]``, and ``--type 'dict[str, int]'`` was refused
    ("--type wants module:Name")."""
    with Store.create(store_name, tp) as st:
        listed = json.loads(run("ls", "--json").stdout)
        (row,) = [r for r in listed if r["name"] == store_name]
        wrote = run("set", store_name, text, "--type", row["type"])
        assert wrote.returncode == 0, wrote.stderr
        assert json.loads(run("get", store_name).stdout) == expected
        assert st.version == 1
        # Without --type the CLI checks the value against the store's recorded type (issue 21).
        again = run("set", store_name, text)
        assert again.returncode == 0, again.stderr
        assert st.version == 2


@pytest.mark.parametrize(
    "spec",
    ["typing.Optional[typing.List[int]]", "Optional[list[int]]", "list[int] | None"],
)
def test_typing_spellings_name_the_same_schema(store_name: str, spec: str) -> None:
    with Store.create(store_name, list[int] | None) as st:
        wrote = run("set", store_name, "[1, 2]", "--type", spec)
        assert wrote.returncode == 0, wrote.stderr
        assert st.get() == [1, 2]


def test_a_struct_nested_in_a_generic(store_name: str) -> None:
    with Store.create(store_name, dict[str, Point]) as st:
        spec = "dict[str, test_cli_round3.Point]"
        wrote = run("set", store_name, '{"p": {"x": 1, "y": 2}}', "--type", spec,
                    pythonpath=str(Path(__file__).parent))  # fmt: skip
        assert wrote.returncode == 0, wrote.stderr
        assert st.get() == {"p": Point(1, 2)}


def test_type_expressions_are_parsed_never_evaluated(store_name: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with Store.create(store_name, dict) as st:
        for spec, code in [
            (f"__import__('os').system('touch {marker}')", 2),
            (f"dict[str, exec('open({str(marker)!r}, \"w\")')]", 2),
            ("dict[str", 2),
            ("list[int]]", 2),
            ("", 2),
            ("int if True else str", 2),
            ("frobnicate", 1),
        ]:
            refused = run("set", store_name, "{}", "--type", spec, cwd=tmp_path)
            assert refused.returncode == code, (spec, refused.stderr)
            error_line(refused)
        assert not marker.exists()
        assert st.version == 0


# ---------------------------------------------------------------- item 12: create


def test_create_makes_a_store_with_the_options_given(store_name: str) -> None:
    """There was no ``create`` verb: a store could not be made from the CLI."""
    made = run(
        "create", store_name, "--type", "dict[str, int]", "--slots", "4",
        "--slot-size", "1k", "--max-value-size", "64k", "--mode", "0640", "--group", "0",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout) == {
        "name": store_name,
        "type": "dict[str, int]",
        "slots": 4,
        "slot_size": 1024,
        "max_value_size": 65536,
        "max_readers": 64,
        "mode": "0640",
    }
    path = Path("/dev/shm") / segment_name(store_name).lstrip("/")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_gid == 0
    with Store.open(store_name, dict[str, int]) as st:  # the schema check passes
        assert st.get_with_version() == (None, 0)
    assert run("set", store_name, '{"a": 1}', "--type", "dict[str, int]").returncode == 0
    again = run("create", store_name, "--type", "int")
    assert again.returncode == 1
    assert "already exists" in error_line(again)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--type", "int", "--slots", "0"), "must be at least 1"),
        (("--type", "int", "--mode", "999"), "octal like 0640"),
        (("--type", "int", "--slot-size", "lots"), "a size in bytes"),
        (("--type", "dict[str"), "expected ']'"),
        (("--type", "int", "--group", "no-such-group-h1"), "no group named"),
        ((), "--type"),
    ],
)
def test_create_refuses_bad_arguments_as_usage_errors(
    store_name: str, args: tuple[str, ...], message: str
) -> None:
    refused = run("create", store_name, *args)
    assert refused.returncode == 2
    assert message in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not shmstore.remove(store_name)  # nothing was created


# ---------------------------------------------------------------- item 13: watch


def test_watch_notices_its_store_removed_and_exits_1(store_name: str) -> None:
    """``watch`` stayed silent forever after its store was removed."""
    with Store.create(store_name, int) as st:
        st.set(1)
        with spawned([SCRIPT, "watch", store_name]) as proc:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()) == {"version": 1, "value": 1}
            wait_for_registrations(st, 1)
            st.unlink()
            _out, err = proc.communicate(timeout=JOIN)
            assert proc.returncode == 1
            assert f"store {store_name!r} was removed or replaced" in err
            assert "Traceback" not in err


def test_watch_notices_its_store_replaced_and_follows_with_follow(store_name: str) -> None:
    with Store.create(store_name, int) as old:
        old.set(1)
        with spawned([SCRIPT, "watch", store_name, "--follow"]) as proc:
            assert proc.stdout is not None
            assert proc.stderr is not None
            assert json.loads(proc.stdout.readline()) == {"version": 1, "value": 1}
            wait_for_registrations(old, 1)
            old.unlink()
            with Store.create(store_name, str) as new:
                new.set("first")
                assert "following the next store" in proc.stderr.readline()
                assert json.loads(proc.stdout.readline()) == {"version": 1, "value": "first"}
                wait_for_registrations(new, 1)
                new.set("second")
                assert json.loads(proc.stdout.readline()) == {"version": 2, "value": "second"}
                proc.send_signal(signal.SIGINT)
                proc.communicate(timeout=JOIN)


# ---------------------------------------------------------------- item 6 (plain set)


def test_deeply_nested_json_on_stdin_is_bad_input_not_an_internal_error(store_name: str) -> None:
    """``set NAME -`` with deeply nested JSON said "internal error: RecursionError"."""
    with Store.create(store_name) as st:
        st.set({"kept": True})
        deep = b"[" * 100_000 + b"]" * 100_000
        for args in (("-",), ("-", "--type", "typing:Any")):
            refused = run("set", store_name, *args, stdin=deep)
            assert refused.returncode == 1
            line = error_line(refused)
            assert "internal error" not in line
            assert "nested too deeply" in line
        assert st.get_with_version() == ({"kept": True}, 1)


# ---------------------------------------------------------------- item 14: exit codes


@pytest.mark.parametrize("name", ["a/b", "", "x" * 100, "tab\there"])
def test_a_bad_store_name_is_a_usage_error(name: str) -> None:
    """A bad store name exited 1, like a failed command; it is a usage error (2)."""
    for verb in (("get",), ("stat",), ("rm",), ("watch",), ("create", "--type", "int")):
        refused = run(verb[0], name, *verb[1:])
        assert refused.returncode == 2, (verb, refused.stderr)
        assert "store name" in error_line(refused)


def test_one_line_errors_carry_no_errno_prefix(store_name: str) -> None:
    """``shmstore get missing`` printed ``[Errno 2] no store named 'missing'``."""
    for args in (("get", store_name), ("stat", store_name), ("rm", store_name)):
        missing = run(*args)
        assert missing.returncode == 1
        assert error_line(missing) == f"shmstore: no store named {store_name!r}"


def replica_version(name: str) -> int:
    try:
        with Store.open(name, dict) as replica:
            return replica.version
    except shmstore.StateStoreError:
        return 0


def test_ctrl_c_on_mirror_publish_and_follow_exits_130(store_name: str) -> None:
    """Ctrl-C on ``mirror publish``/``follow`` exited 0, unlike ``watch`` (130)."""
    replica = store_name + "-r"
    server_and_origin = nats_servers(), Store.create(store_name, dict)
    with server_and_origin[0] as (server,), server_and_origin[1] as origin:
        origin.set({"a": 1})
        publish = with_ctrl_c(SCRIPT, "mirror", "publish", store_name, "--server", server.url)
        follow = with_ctrl_c(
            SCRIPT, "mirror", "follow", store_name, "--server", server.url, "--as", replica
        )
        try:
            with spawned(publish) as publisher, spawned(follow) as follower:
                assert publisher.stderr is not None
                # Running, its signal handlers in place: it says so (INFO, on stderr).
                assert "is active" in publisher.stderr.readline()
                wait_until(lambda: replica_version(replica) == 1, "the replica follows")
                for proc in (follower, publisher):
                    proc.send_signal(signal.SIGINT)
                    _out, err = proc.communicate(timeout=JOIN)
                    assert proc.returncode == 130, err
                    assert "Traceback" not in err
        finally:
            shmstore.remove(replica)


def test_mirror_type_resolves_like_set(store_name: str, tmp_path: Path) -> None:
    """README's recipe ``mirror publish NAME --type myapp.types:Position`` failed as written
    from the application's directory (``No module named 'myapp'``)."""
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "types.py").write_text(textwrap.dedent(APP))
    refused = run(
        "mirror", "publish", store_name, "--server", "nats://127.0.0.1:1",
        "--type", "myapp.types:Nope", cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "has no attribute 'Nope'" in error_line(refused)  # myapp.types was imported
