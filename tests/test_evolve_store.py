"""Self-describing stores and evolution through the Store API (issue 21): the recorded type,
evolve=True, refusals that change nothing, stale writers, untyped writers, old versions as the
new type (ring, checkpoints, replicas), the CLI and the statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import objects_of
from evolve_workers import V1, V2, V3
from test_schema import big_type

from shmstore import (
    CheckpointError,
    InvalidSnapshotError,
    SchemaMismatchError,
    StateStoreError,
    Store,
    remove,
)
from shmstore.metrics import prometheus_text
from shmstore.mirror._follower import Follower
from shmstore.mirror._wire import Record, decode_record, encode_record
from shmstore.replication import create_replica


class Retyped(msgspec.Struct):
    name: str
    count: str = ""


class NewRequired(msgspec.Struct, kw_only=True):
    name: str
    count: int = 0
    label: str = ""
    owner: str


class A1(msgspec.Struct, array_like=True):
    x: int
    y: int = 0


class A2(msgspec.Struct, array_like=True):
    y: int = 0
    x: int = 0


class T1(msgspec.Struct, tag="one"):
    a: int


class T2(msgspec.Struct, tag="two"):
    a: int


class Unrelated(msgspec.Struct):
    z: float


def test_a_store_records_its_type_at_create(store_name: str) -> None:
    with Store.create(store_name, V1) as st, Store.open(store_name) as untyped:
        assert st.schema_generation == 0
        assert untyped.schema == st.schema
        fields = st.schema["defs"]["V1"]["fields"]  # type: ignore[index]
        assert [f["name"] for f in fields] == ["name", "count", "label"]
        assert untyped.type_name == "evolve_workers:V1"


def test_a_schema_larger_than_a_header_slot_is_recorded(store_name: str) -> None:
    big = big_type()
    with Store.create(store_name, big) as st, Store.open(store_name) as untyped:
        assert len(json.dumps(untyped.schema)) > 10_000
        st.set(big())
        # The untyped handle checks writes against the rebuilt 100-field type.
        assert untyped.set({"field_number_99": {"a": 5}}) == 2
        assert st.get().field_number_99.a == 5  # type: ignore[union-attr]
        with pytest.raises(InvalidSnapshotError, match=r"field_number_3.a"):
            untyped.set({"field_number_3": {"a": "five"}})


def test_a_different_type_without_evolve_is_refused_as_before(store_name: str) -> None:
    with Store.create(store_name, V1):
        with pytest.raises(SchemaMismatchError, match="pass evolve=True"):
            Store.open(store_name, V2)
        with pytest.raises(SchemaMismatchError):
            Store.open_or_create(store_name, V2)


@pytest.mark.parametrize(
    ("old", "new", "value", "message"),
    [
        (V1, Retyped, V1("a", 1), r"field 'count': type changed from int to str"),
        (V1, NewRequired, V1("a", 1), r"field 'owner': added without a default"),
        (A1, A2, A1(1, 2), r"field 'x': .*array_like structs only append"),
        (T1, T2, T1(1), r"tags and tag fields are unchanged"),
        (V1, Unrelated, V1("a"), r"field 'z': added without a default"),
    ],
)
def test_incompatible_evolutions_are_refused_and_change_nothing(
    store_name: str, old: Any, new: Any, value: Any, message: str
) -> None:
    with Store.create(store_name, old) as st:
        st.set(value)
        before = (st.schema, st.schema_generation, st.version, st.get(), objects_of(store_name))
        with pytest.raises(SchemaMismatchError, match=message):
            Store.open(store_name, new, evolve=True)
        after = (st.schema, st.schema_generation, st.version, st.get(), objects_of(store_name))
        assert after == before
        assert st.set(value) == 2  # its writer is not affected


def test_evolution_keeps_readers_and_refuses_stale_writers(store_name: str) -> None:
    with Store.create(store_name, V1, slots=16) as w1, Store.open(store_name, V1) as r1:
        w1.set(V1("a", 1, "x"))
        projection = r1.projection(V1)
        with Store.open(store_name, V2, evolve=True) as w2:
            assert (w2.schema_generation, r1.schema_generation) == (1, 1)
            assert w2.type_name == r1.type_name == "evolve_workers:V2"
            w2.set(V2("b", 2, "y", "note"))
            assert r1.get() == V1("b", 2, "y")
            assert projection.get() == V1("b", 2, "y")
            with pytest.raises(SchemaMismatchError, match=r"would drop 'note'"):
                w1.set(V1("c", 3))
            assert w2.get_with_version() == (V2("b", 2, "y", "note"), 2)  # nothing lost
            # The versions from before the evolution read as the new type.
            with w2.subscribe(after_version=0, timeout=30) as sub:
                assert [next(sub), next(sub)] == [(1, V2("a", 1, "x")), (2, w2.get())]
            with Store.open(store_name, V1) as late:  # an older type still opens to read
                assert late.get() == V1("b", 2, "y")
                with pytest.raises(SchemaMismatchError):
                    late.set(V1("d"))
            with Store.open(store_name, V3, evolve=True) as w3:
                w3.set(V3("e", 5, "n3"))
                assert (r1.get(), w2.get()) == (V1("e", 5, ""), V2("e", 5, "", "n3"))
                # Back to a type recorded before: the old writer is current again.
            with Store.open(store_name, V2, evolve=True):
                pass
            with Store.open(store_name, V1, evolve=True):
                pass
            assert w1.schema_generation == 4
            assert w1.set(V1("f", 6)) == 4


def test_evolution_is_checked_against_every_recorded_type(store_name: str) -> None:
    class NoteAsInt(msgspec.Struct):
        name: str
        count: int = 0
        note: int = 0

    with Store.create(store_name, V2), Store.open(store_name, V3, evolve=True):
        # V3 dropped `label`; bringing back a field of another type breaks V2's readers.
        class LabelAsInt(msgspec.Struct):
            name: str
            count: int = 0
            note: str = "n/a"
            label: int = 0

        with pytest.raises(SchemaMismatchError, match="generation 0, whose readers may still"):
            Store.open(store_name, LabelAsInt, evolve=True)
        with pytest.raises(SchemaMismatchError, match=r"field 'note'"):
            Store.open(store_name, NoteAsInt, evolve=True)


def test_open_or_create_evolves(store_name: str) -> None:
    with Store.open_or_create(store_name, V1, evolve=True) as st:
        assert st.schema_generation == 0
        with Store.open_or_create(store_name, V2, evolve=True) as evolved:
            assert evolved.schema_generation == 1


def test_untyped_writers_follow_the_evolution(store_name: str) -> None:
    with Store.create(store_name, V1) as st, Store.open(store_name) as untyped:
        untyped.set({"name": "a"})
        with Store.open(store_name, V2, evolve=True) as w2:
            untyped.set({"name": "b", "note": "kept"})
            assert w2.get() == V2("b", note="kept")
            with pytest.raises(InvalidSnapshotError, match="would not decode as evolve_workers:V2"):
                untyped.set({"name": "c", "note": 5})
            assert st.version == 2


def test_an_evolution_racing_an_untyped_write_writes_nothing(store_name: str) -> None:
    with Store.create(store_name, V1) as st, Store.open(store_name) as untyped:
        converted_as_v1 = untyped._raw_encode

        def evolve_meanwhile(value: Any) -> bytes:
            data = converted_as_v1(value)  # converted to V1: "note" is gone
            Store.open(store_name, V2, evolve=True).close()
            return data

        untyped._raw_encode = evolve_meanwhile
        with pytest.raises(SchemaMismatchError, match="nothing was written; set it again"):
            untyped.set({"name": "b", "note": "kept"})
        untyped._raw_encode = converted_as_v1
        assert st.version == 0
        untyped.set({"name": "b", "note": "kept"})
        with Store.open(store_name, V2) as v2:
            assert v2.get() == V2("b", note="kept")


def test_a_checkpoint_from_before_an_evolution_restores_as_the_new_type(
    store_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "v1.ckpt"
    with Store.create(store_name, V1) as st:
        st.set(V1("a", 7, "x"))
        st.checkpoint(path)
    remove(store_name)
    with Store.create(store_name, V2, restore_from=path) as restored:
        assert restored.get_with_version() == (V2("a", 7, "x"), 1)
    remove(store_name)
    with pytest.raises(SchemaMismatchError, match=r"field 'count'"):
        Store.create(store_name, Retyped, restore_from=path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC"):
        Store.create(store_name, V1, restore_from=path)


def test_statistics_and_prometheus_show_the_generation(store_name: str) -> None:
    with Store.create(store_name, V1) as st, Store.open(store_name, V2, evolve=True):
        stats = st.statistics()
        assert stats.schema_generation == 1
        assert stats.type_name == "evolve_workers:V2"
        assert f'shmstore_schema_generation{{store="{store_name}"' in prometheus_text([stats])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmstore", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )


def test_cli_schema_and_set_without_type(store_name: str) -> None:
    with Store.create(store_name, V1) as st, Store.open(store_name, V2, evolve=True):
        shown = _cli("schema", store_name)
        assert shown.returncode == 0, shown.stderr
        assert "schema generation 1" in shown.stdout
        assert "    note: str = 'n/a'" in shown.stdout
        data = json.loads(_cli("schema", store_name, "--json").stdout)
        assert data["schema_generation"] == 1
        assert data["schema"] == st.schema
        refused = _cli("set", store_name, '{"name": 1}')
        assert refused.returncode == 1
        assert "would not decode as evolve_workers:V2 for readers" in refused.stderr
        assert st.version == 0
        ok = _cli("set", store_name, '{"name": "x", "note": "y"}')
        assert ok.returncode == 0, ok.stderr
        assert st.get() == V1("x")
        listed = json.loads(_cli("ls", "--json").stdout)
        (row,) = [r for r in listed if r["name"] == store_name]
        assert row["schema_generation"] == 1
        stat = json.loads(_cli("stat", store_name, "--json").stdout)
        assert stat["schema_generation"] == 1


def _record(origin: Store[Any], version: int) -> Record:
    """The durable record the publisher would put, as the follower decodes it."""
    value, version, commit_ns = origin.replication.read_encoded()
    return decode_record(
        encode_record(
            Record(
                shmstore="test",
                origin="host/origin",
                store=origin.name,
                version=version,
                commit_ns=commit_ns,
                fingerprint=origin.replication.fingerprint,
                type_name=origin.type_name,
                slots=origin.geometry.slots,
                slot_size=origin.geometry.slot_size,
                value=value,
                schema=origin.replication.schema_record,
            )
        )
    )


def test_a_replica_follows_its_origins_evolution(store_name: str) -> None:
    replica_name = store_name + "-replica"
    follower = Follower(store_name, local_name=replica_name)
    try:
        with Store.create(store_name, V1) as origin:
            origin.set(V1("a", 1))
            follower._apply(_record(origin, 1))
            with Store.open(replica_name, V1) as v1_reader:
                assert v1_reader.get() == V1("a", 1)
                with Store.open(store_name, V2, evolve=True) as w2:
                    w2.set(V2("b", 2, note="n"))
                    follower._apply(_record(origin, 2))
                    assert follower._refused is None
                    assert v1_reader.get() == V1("b", 2)  # an old reader of the replica
                    with Store.open(replica_name, V2) as v2_reader:
                        assert v2_reader.get() == V2("b", 2, note="n")
                        assert v2_reader.schema_generation == 1
    finally:
        if follower._replica is not None:
            follower._replica.close()
        remove(replica_name)


def test_an_orphaned_replica_never_touches_the_type_records_of_its_names_new_store(
    store_name: str,
) -> None:
    """Type records are named after the store (``.s<g>``), as rings are: a handle whose store was
    removed, and whose name now belongs to a new store, must not record a type under it -- before
    this, an orphaned replica that followed an evolution removed the new store's record ``s0``
    (its ``schema`` became ``None``) and left a stray ``s1`` of its own."""
    replica_name = store_name + "-r"
    with Store.create(store_name, V1) as origin:
        fingerprint, types = origin.replication.fingerprint, origin.replication.schema_record
        with Store.open(store_name, V2, evolve=True) as evolved:
            evolved_types = evolved.replication.schema_record

    def replica() -> Store[Any]:
        return create_replica(
            replica_name,
            fingerprint=fingerprint,
            type_name="evolve_workers:V1",
            origin=store_name,
            bucket="b",
            schema_record=types,
        )

    orphan = replica()
    try:
        remove(replica_name)
        with replica() as fresh:
            described = fresh.schema
            assert described is not None
            with pytest.raises(StateStoreError, match="orphaned"):
                orphan.replication.follow_schema(evolved_types)
            assert fresh.schema == described  # its record s0 is still there
            assert fresh.schema_generation == 0
            assert not any(n.endswith(".s1") for n in objects_of(replica_name))
            with Store.open(replica_name, V1) as reader:
                assert reader.schema == described
    finally:
        orphan.close()
        remove(replica_name)
