"""The deployment files of ``docs/deployment/`` cannot rot: the Compose file and the pod spec are
parsed and checked for what makes a store shared (one ``/dev/shm`` for both containers), and the
worker program they run is run, with a reader in another PID namespace.

PyYAML is not a dependency: the files use a small block subset of YAML, read by :func:`parse_yaml`
below; where PyYAML happens to be installed, its reading is compared with ours.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_containers import WAIT, WHY_NO_NAMESPACES, run_contained

from shmstore import Store, StoreNotFoundError
from shmstore.fsm import FsmSnapshotDTO, FsmState

DEPLOYMENT = Path(__file__).resolve().parent.parent / "docs" / "deployment"
_KEY = re.compile(r"^[A-Za-z_][\w.-]*:(\s|$)")


def _strip_comment(line: str) -> str:
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _scalar(text: str) -> Any:
    if text.startswith(("[", '"')):
        return json.loads(text)  # the files' flow lists and quoted strings are JSON
    return {"true": True, "false": False}.get(text, text)


def _map(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
        key, _, rest = lines[i][1].partition(":")
        rest = rest.strip()
        i += 1
        if rest:
            out[key] = _scalar(rest)
        elif i < len(lines) and (
            lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("- "))
        ):
            out[key], i = _block(lines, i, lines[i][0])
        else:
            out[key] = None
    return out, i


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if not lines[i][1].startswith("- "):
        return _map(lines, i, indent)
    items: list[Any] = []
    while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
        content = lines[i][1][2:]
        if _KEY.match(content):  # "- key: value" opens a mapping, indented past the dash
            lines[i] = (indent + 2, content)
            item, i = _map(lines, i, indent + 2)
        else:
            item, i = _scalar(content), i + 1
        items.append(item)
    return items, i


def parse_yaml(text: str) -> Any:
    """Block mappings, block sequences, plain and JSON scalars: the subset our files use."""
    lines = []
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        if line.strip():
            lines.append((len(line) - len(line.lstrip(" ")), line.strip()))
    value, end = _block(lines, 0, lines[0][0])
    assert end == len(lines), f"unparsed from line {end}: {lines[end]}"
    return value


def load(name: str) -> Any:
    text = (DEPLOYMENT / name).read_text()
    ours = parse_yaml(text)
    try:
        import yaml  # noqa: PLC0415
    except ImportError:
        return ours
    assert ours == yaml.safe_load(text)
    return ours


def test_the_compose_file_shares_one_dev_shm_between_worker_and_reader() -> None:
    services = load("docker-compose.yml")["services"]
    worker, reader = services["worker"], services["reader"]
    assert worker["ipc"] == "shareable"
    assert reader["ipc"] == "service:worker"  # joins the worker's IPC namespace and /dev/shm
    assert re.fullmatch(r"\d+[kmg]", worker["shm_size"])
    assert worker["command"] == ["python", "/app/worker.py"]
    assert "./worker.py:/app/worker.py:ro" in worker["volumes"]
    store = worker["environment"]["STORE_NAME"]
    assert reader["command"] == ["shmstore", "watch", store]
    assert reader["depends_on"] == ["worker"]


def test_the_pod_mounts_one_memory_backed_volume_at_dev_shm_in_both_containers() -> None:
    pod = load("pod.yaml")
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (shm,) = [name for name, v in volumes.items() if "emptyDir" in v]
    assert volumes[shm]["emptyDir"]["medium"] == "Memory"
    assert re.fullmatch(r"\d+[KMG]i", volumes[shm]["emptyDir"]["sizeLimit"])
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"worker", "reader"}
    for c in containers.values():
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/dev/shm"] == shm
    worker, reader = containers["worker"], containers["reader"]
    store = {e["name"]: e["value"] for e in worker["env"]}["STORE_NAME"]
    assert worker["command"] == ["python", "/app/worker.py"]
    assert reader["command"] == ["shmstore", "watch", store]
    app = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}["/app"]
    assert "configMap" in volumes[app]


def blocks(language: str) -> list[str]:
    text = (DEPLOYMENT.parent / "deployment.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)


def test_the_page_shows_the_files_as_they_are() -> None:
    shown = blocks("yaml")
    assert shown == [(DEPLOYMENT / f).read_text() for f in ("docker-compose.yml", "pod.yaml")]


def test_the_page_python_runs_twice() -> None:
    (script,) = blocks("python")
    for _ in range(2):  # it cleans up after itself
        run = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("segment ")


def test_the_parser_reads_what_it_claims() -> None:
    text = 'a:\n  b: 1  # note\n  c:\n    - x\n    - k: "y:z"\n      m: [1, "2"]\n  d: true\n'
    assert parse_yaml(text) == {"a": {"b": "1", "c": ["x", {"k": "y:z", "m": [1, "2"]}], "d": True}}


@pytest.mark.skipif(WHY_NO_NAMESPACES is not None, reason=WHY_NO_NAMESPACES or "")
def test_the_worker_runs_and_a_reader_in_another_namespace_follows_it(store_name: str) -> None:
    """The deployment's worker program as the Compose file runs it, pid 1 of its own PID
    namespace; a reader in another one (``shmstore get``) sees its state."""
    env = {**os.environ, "STORE_NAME": store_name, "PERIOD": "0.05"}
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    worker = subprocess.Popen(
        [*argv, sys.executable, str(DEPLOYMENT / "worker.py")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + WAIT
        while True:  # the store appears when the worker created it: there is no event for that
            try:
                st = Store.open(store_name, FsmSnapshotDTO)
                break
            except StoreNotFoundError:
                assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
                assert time.monotonic() < deadline, "the worker never created its store"
                time.sleep(0.01)
        with st:
            st.wait(3, WAIT)  # it commits a transition every PERIOD
            got = run_contained("shmstore", "get", store_name, "--version")
            assert got.returncode == 0, got.stderr
            seen = json.loads(got.stdout)
            assert seen["version"] >= 4
            assert seen["value"]["state"] in (FsmState.IDLE, FsmState.ACTIVE)
    finally:
        worker.kill()
        worker.wait(WAIT)
        if worker.stderr is not None:
            worker.stderr.close()
