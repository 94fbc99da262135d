"""HNSW collections: approximate search through a saved graph that is checked on load,
rebuilt when missing, stale or corrupt, kept in step with writes, and tunable."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import frys
from test_vectors import delete, upsert

from frys_edge import hnsw
from frys_edge.hnsw import IndexOptions
from frys_edge.storage import Storage
from frys_edge.vectors import VectorError, VectorStore

pytestmark = pytest.mark.skipif(not hnsw.HAVE_HNSWLIB, reason="needs the hnsw extra")

HNSW = IndexOptions(kind="hnsw", m=12, ef_construction=100, ef_search=64)
RECALL_BOUND = 0.95  # measured 1.0 at 3,000 x 32 with these settings


@pytest.fixture
def storage(data_dir: Path) -> Iterator[Storage]:
    with Storage(data_dir) as s:
        yield s


def items(rng: random.Random, n: int, dim: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"v{i}", "vector": [rng.gauss(0.0, 1.0) for _ in range(dim)], "metadata": {"i": i}}
        for i in range(start, start + n)
    ]


def filled(storage: Storage, metric: str = "cosine", dtype: str = "float32") -> VectorStore:
    store = VectorStore(storage)
    store.create("big", 32, metric, dtype, HNSW)
    upsert(store, "big", items(random.Random(7), 3000, 32))
    return store


def recall(store: VectorStore, queries: list[list[float]], k: int = 10) -> float:
    found = 0
    for query in queries:
        approx = {h.id for h in store.search("big", vector=query, k=k)}
        exact = {h.id for h in store.search("big", vector=query, k=k, exact=True)}
        found += len(approx & exact)
    return found / (k * len(queries))


def queries(n: int = 40) -> list[list[float]]:
    rng = random.Random(11)
    return [[rng.gauss(0.0, 1.0) for _ in range(32)] for _ in range(n)]


def wait_ready(store: VectorStore, name: str = "big", timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while store.stats(name).index_state != "ready":
        assert time.monotonic() < deadline, store.stats(name)
        time.sleep(0.02)


@pytest.mark.parametrize(("metric", "dtype"), [("cosine", "float32"), ("l2", "int8")])
def test_hnsw_search_matches_exact_search_closely(
    storage: Storage, metric: str, dtype: str
) -> None:
    store = filled(storage, metric, dtype)
    assert store.stats("big").index_state == "not built"
    assert store.stats("big").backend == "numpy"
    stats = store.build_index("big")
    assert (stats.backend, stats.index_state, stats.index_builds) == ("hnsw", "ready", 1)
    assert recall(store, queries()) >= RECALL_BOUND
    query = queries(1)[0]
    top = store.search("big", vector=query, k=1)[0]
    exact = store.search("big", vector=query, k=1, exact=True)[0]
    assert top.id == exact.id
    assert top.score == pytest.approx(exact.score, rel=1e-3, abs=1e-3)
    assert top.metadata == exact.metadata


def test_saved_graph_is_loaded_after_a_restart_not_rebuilt(data_dir: Path) -> None:
    with Storage(data_dir) as storage:
        store = filled(storage)
        store.build_index("big")
        before = [h.id for h in store.search("big", vector=queries(1)[0], k=10)]
        store.close()
    assert (data_dir / "vectors" / "big.hnsw").is_file()
    with Storage(data_dir) as storage:
        store = VectorStore(storage)
        stats = store.stats("big")
        assert (stats.index_state, stats.index_builds) == ("ready", 0)
        assert [h.id for h in store.search("big", vector=queries(1)[0], k=10)] == before


def test_a_corrupt_graph_is_refused_searched_exactly_and_rebuilt(data_dir: Path) -> None:
    with Storage(data_dir) as storage:
        filled(storage).build_index("big")
    graph = data_dir / "vectors" / "big.hnsw"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with Storage(data_dir) as storage:
        store = VectorStore(storage)
        assert store.stats("big").index_state == "not built"
        query = queries(1)[0]
        assert store.search("big", vector=query, k=3) == store.search(
            "big", vector=query, k=3, exact=True
        )
        builder = VectorStore(storage, background=True)
        wait_ready(builder)
        assert builder.stats("big").index_builds == 1
        builder.close()
    with Storage(data_dir) as storage:
        assert VectorStore(storage).stats("big").index_state == "ready"


def test_writes_after_the_save_make_the_graph_stale_until_rebuilt(data_dir: Path) -> None:
    with Storage(data_dir) as storage:
        store = filled(storage)
        store.build_index("big")
        # another process writes, as after a crash that lost the unsaved graph
        other = VectorStore(storage)
        upsert(other, "big", [{"id": "late", "vector": [5.0] + [0.0] * 31}])
    with Storage(data_dir) as storage:
        store = VectorStore(storage, background=True)
        wait_ready(store)
        assert store.stats("big").index_builds == 1
        assert store.search("big", vector=[1.0] + [0.0] * 31, k=1)[0].id == "late"
        store.close()


def test_upserts_and_deletes_reach_the_graph_at_once(storage: Storage) -> None:
    store = filled(storage)
    store.build_index("big")
    target = [0.0] * 31 + [9.0]
    upsert(store, "big", [{"id": "new", "vector": target, "metadata": {"fresh": True}}])
    hit = store.search("big", vector=target, k=1)[0]
    assert (hit.id, hit.metadata) == ("new", {"fresh": True})
    assert store.stats("big").backend == "hnsw"
    upsert(store, "big", [{"id": "new", "vector": [9.0] + [0.0] * 31}])
    assert store.search("big", vector=target, k=1)[0].id != "new"
    delete(store, "big", ["new"])
    assert "new" not in {h.id for h in store.search("big", vector=[1.0] + [0.0] * 31, k=10)}
    assert store.stats("big").count == 3000


class PausedBuilds:
    """hnsw.build held at its start until release(), so a test acts while a build runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()
        real = hnsw.build

        def build(*args: Any, **kwargs: Any) -> Any:
            self.started.set()
            assert self.gate.wait(30), "the test never released the build"
            return real(*args, **kwargs)

        monkeypatch.setattr(hnsw, "build", build)

    def wait_started(self) -> None:
        assert self.started.wait(30)
        self.started.clear()

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def paused(monkeypatch: pytest.MonkeyPatch) -> Iterator[PausedBuilds]:
    builds = PausedBuilds(monkeypatch)
    yield builds
    builds.release()


def test_writes_during_a_background_build_are_not_lost(
    storage: Storage, paused: PausedBuilds
) -> None:
    store = filled(storage)
    builder = VectorStore(storage, background=True)
    builder.stats("big")  # loads it and starts the build
    paused.wait_started()
    assert builder.stats("big").index_state == "building"
    upsert(builder, "big", [{"id": "mid-build", "vector": [0.0] * 30 + [7.0, 0.0]}])
    delete(builder, "big", ["v0"])
    paused.release()
    wait_ready(builder)
    ids = {h.id for h in builder.search("big", vector=[0.0] * 30 + [1.0, 0.0], k=5)}
    assert "mid-build" in ids
    assert store.search("big", vector=[0.0] * 30 + [1.0, 0.0], k=1, exact=True)[0].id == (
        "mid-build"
    )
    v0 = items(random.Random(7), 1, 32)[0]["vector"]
    assert builder.search("big", vector=v0, k=1)[0].id != "v0"
    assert builder.stats("big").count == 3000
    builder.close()


def test_filtered_searches_stay_exact(storage: Storage) -> None:
    store = filled(storage)
    store.build_index("big")
    hits = store.search("big", vector=queries(1)[0], k=5, filter={"i": 42})
    assert [h.id for h in hits] == ["v42"]


def test_tuning_ef_applies_at_once_and_new_graph_settings_rebuild(storage: Storage) -> None:
    store = filled(storage)
    store.build_index("big")
    options = store.tune("big", ef_search=200)
    assert options.ef_search == 200
    assert store.stats("big").index_state == "ready"
    assert store.info("big").index.ef_search == 200
    store.tune("big", m=24)
    assert store.stats("big").index_state == "not built"
    store.build_index("big")
    assert store.stats("big").index.m == 24
    with pytest.raises(VectorError, match="bad index options"):
        store.tune("big", ef_search=0)
    store.tune("big", kind="exact")
    assert store.stats("big").backend == "numpy"
    with pytest.raises(VectorError, match="tune big --index hnsw"):
        store.build_index("big")


def test_without_hnswlib_an_hnsw_collection_is_searched_exactly(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    import frys_edge.vectors as vectors

    monkeypatch.setattr(vectors, "HAVE_HNSWLIB", False)
    store = filled(storage)
    assert store.stats("big").index_state.startswith("unavailable: install the hnsw extra")
    assert len(store.search("big", vector=queries(1)[0], k=3)) == 3
    with pytest.raises(VectorError, match=r"pip install 'frys-edge\[hnsw\]'"):
        store.build_index("big")


def test_runtime_builds_in_the_background_and_saves_at_stop(data_dir: Path) -> None:
    from frys_edge.config import load_config
    from frys_edge.runtime import Runtime

    with Storage(data_dir) as storage:
        filled(storage)
    config = load_config(None, env={}, overrides={"system.data_dir": str(data_dir)})

    async def run_once() -> tuple[str, int]:
        rt = Runtime(config)
        await rt.start()
        try:
            assert rt.vectors is not None
            deadline = time.monotonic() + 60
            while rt.vectors.stats("big").index_state != "ready":
                assert time.monotonic() < deadline
                await anyio.sleep(0.02)
            snapshot = rt.metrics.snapshot()
            assert snapshot["vector_index_builds_total"] == rt.vectors.index_builds
            assert snapshot['vector_items{collection="big"}'] == 3000
            return rt.vectors.stats("big").backend, rt.vectors.index_builds
        finally:
            await rt.stop()

    assert anyio.run(run_once) == ("hnsw", 1)
    assert anyio.run(run_once) == ("hnsw", 0)  # loaded from the file saved at stop


def test_cli_creates_indexes_tunes_and_searches(tmp_path: Path) -> None:
    d = ("--data-dir", str(tmp_path / "data"))
    made = frys("vector", "create", "big", "--dim", "32", "--index", "hnsw", "--m", "12", *d)
    assert made.returncode == 0, made.stderr
    assert "hnsw m=12 ef_construction=100 ef_search=64" in made.stdout
    lines = [json.dumps(item) for item in items(random.Random(3), 500, 32)]
    (tmp_path / "v.jsonl").write_text("\n".join(lines))
    assert frys("vector", "add", "big", str(tmp_path / "v.jsonl"), *d).returncode == 0
    built = frys("vector", "index", "big", *d)
    assert built.returncode == 0, built.stderr
    assert "indexing big: 500/500 items" in built.stderr
    assert "indexed 500 items of big" in built.stdout
    stats = json.loads(frys("vector", "stats", "big", "--json", *d).stdout)
    assert (stats["backend"], stats["index_state"]) == ("hnsw", "ready")
    query = json.dumps(items(random.Random(4), 1, 32)[0]["vector"])
    approx = frys("vector", "search", "big", "--vector", query, "-k", "1", "--json", *d)
    exact = frys("vector", "search", "big", "--vector", query, "-k", "1", "--exact", "--json", *d)
    assert json.loads(approx.stdout)["hits"][0]["id"] == json.loads(exact.stdout)["hits"][0]["id"]
    tuned = frys("vector", "tune", "big", "--ef-search", "128", *d)
    assert tuned.returncode == 0 and "ef_search=128" in tuned.stdout
    assert frys("vector", "tune", "big", *d).returncode == 2
    bad = frys("vector", "create", "x", "--dim", "4", "--index", "hnsw", "--m", "1", *d)
    assert bad.returncode == 1 and "Expected `int` >= 4 - at `$.m`" in bad.stderr, bad.stderr
    exact_only = frys("vector", "create", "plain", "--dim", "4", *d)
    assert exact_only.returncode == 0
    refused = frys("vector", "index", "plain", *d)
    assert refused.returncode == 1 and "--index hnsw" in refused.stderr


def test_updates_after_deletes_leave_no_stale_copy_in_the_graph(data_dir: Path) -> None:
    far = [0.0] * 31 + [1.0]
    with Storage(data_dir) as storage:
        store = filled(storage)
        store.build_index("big")
        capacity = store.stats("big").memory_bytes
        v1 = items(random.Random(7), 2, 32)[1]["vector"]
        for _ in range(40):  # churn: a free slot exists each time v1 moves
            delete(store, "big", ["v0"])
            upsert(store, "big", [{"id": "v1", "vector": far}, {"id": "v0", "vector": v1}])
            upsert(store, "big", [{"id": "v1", "vector": v1}, {"id": "v1", "vector": far}])
        approx = [h.id for h in store.search("big", vector=v1, k=5)]
        assert approx == [h.id for h in store.search("big", vector=v1, k=5, exact=True)]
        assert store.search("big", vector=far, k=1)[0].id == "v1"
        assert store.stats("big").memory_bytes == capacity  # slots are reused, not added
        delete(store, "big", ["v1"])
        assert "v1" not in {h.id for h in store.search("big", vector=far, k=10)}
        store.close()
    with Storage(data_dir) as storage:
        store = VectorStore(storage)
        assert store.stats("big").index_state == "ready"
        assert "v1" not in {h.id for h in store.search("big", vector=far, k=10)}


def test_an_update_made_after_the_save_is_caught_by_the_write_counter(data_dir: Path) -> None:
    moved = [0.0] * 31 + [5.0]
    with Storage(data_dir) as storage:
        filled(storage).build_index("big")
        upsert(VectorStore(storage), "big", [{"id": "v3", "vector": moved}])  # same ids
    with Storage(data_dir) as storage:
        store = VectorStore(storage)
        assert store.stats("big").index_state == "not built"
        store.build_index("big")
        assert store.search("big", vector=moved, k=1)[0].id == "v3"


def test_a_write_racing_the_first_load_reaches_memory_and_the_graph(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    filled(storage).build_index("big")
    store = VectorStore(storage)
    real = storage.put_vectors

    async def load_then_write(name: str, records: Any) -> int:
        store.search("big", vector=queries(1)[0], k=1)  # loads the collection mid-write
        return await real(name, records)

    monkeypatch.setattr(storage, "put_vectors", load_then_write)
    target = [0.0] * 30 + [3.0, 0.0]
    upsert(store, "big", [{"id": "raced", "vector": target}])
    # loaded with a write in flight, the saved graph cannot be trusted: exact until rebuilt
    assert store.stats("big").index_state == "not built"
    assert store.search("big", vector=target, k=1)[0].id == "raced"
    store.build_index("big")
    assert store.search("big", vector=target, k=1)[0].id == "raced"


def test_tuning_during_a_build(storage: Storage, paused: PausedBuilds) -> None:
    filled(storage)
    store = VectorStore(storage, background=True)
    store.stats("big")
    paused.wait_started()
    with pytest.raises(VectorError, match="being built already"):
        store.build_index("big")
    store.tune("big", ef_search=100)  # the build under way still serves
    paused.release()
    wait_ready(store)
    assert (store.stats("big").index_builds, store.stats("big").index.ef_search) == (1, 100)
    paused.gate.clear()
    store.tune("big", m=8)  # a new graph: this build starts over
    paused.wait_started()
    store.tune("big", m=10)  # and again, cancelling the one held at the gate
    paused.release()
    wait_ready(store)
    assert store.stats("big").index.m == 10
    assert recall(store, queries(10)) >= RECALL_BOUND
    store.close()
    assert not store._builders


def test_close_stops_a_build_and_the_next_start_builds_again(
    data_dir: Path, paused: PausedBuilds
) -> None:
    with Storage(data_dir) as storage:
        filled(storage)
        store = VectorStore(storage, background=True)
        store.stats("big")
        paused.wait_started()
        closer = threading.Thread(target=store.close)
        closer.start()
        paused.release()
        closer.join(30)
        assert not closer.is_alive() and not store._builders
        assert store.stats("big").index_state == "not built"
    assert not (data_dir / "vectors" / "big.hnsw").exists()


def test_drop_removes_the_saved_graph(storage: Storage) -> None:
    store = filled(storage)
    store.build_index("big")
    files = sorted(p.name for p in (storage.data_dir / "vectors").iterdir())
    assert files == ["big.hnsw", "big.hnsw.json"]
    store.tune("big", kind="exact")
    assert not any((storage.data_dir / "vectors").iterdir())
    store.tune("big", kind="hnsw")
    store.build_index("big")
    store.drop("big")
    assert not any((storage.data_dir / "vectors").iterdir())


def test_a_collection_that_cannot_load_degrades_health_not_start(data_dir: Path) -> None:
    from frys_edge.config import load_config
    from frys_edge.runtime import Runtime

    with Storage(data_dir) as storage:
        filled(storage)
        VectorStore(storage).create("fine", 4)
        # as a newer frys might write it: an unknown field is ignored, a bad value is not
        storage.set_vector_options("big", {"index": {"kind": "hnsw", "m": 1}, "new": True})
    config = load_config(None, env={}, overrides={"system.data_dir": str(data_dir)})

    async def main() -> tuple[str, str, int]:
        rt = Runtime(config)
        await rt.start()
        try:
            assert rt.vectors is not None
            vectors = rt.health.components["vectors"]
            return vectors.status, vectors.reason, rt.vectors.stats("fine").count
        finally:
            await rt.stop()

    status, reason, count = anyio.run(main)
    assert (status, count) == ("degraded", 0)
    assert "collection big: " in reason and "bad index options" in reason


def test_a_large_write_reaches_the_graph_off_the_event_loop(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frys_edge.hnsw import Graph

    filled(storage).build_index("big")
    store = VectorStore(storage, background=True)
    assert store.stats("big").index_state == "ready"
    entered, gate = threading.Event(), threading.Event()
    real_add = Graph.add

    def held_add(graph: Graph, ids: Any, rows: Any, threads: int = 1) -> None:
        if len(ids) >= 1000:  # the large write waits here, in its worker thread
            entered.set()
            assert gate.wait(30)
        real_add(graph, ids, rows, threads)

    monkeypatch.setattr(Graph, "add", held_add)
    batch = items(random.Random(5), 1000, 32, start=5000)
    small = [0.0] * 29 + [4.0, 0.0, 0.0]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.upsert, "big", batch)
            await anyio.to_thread.run_sync(entered.wait, 30)
            # the event loop still serves: searches answer (exactly) and see the new rows
            assert store.search("big", vector=batch[0]["vector"], k=1)[0].id == "v5000"
            await store.upsert("big", [{"id": "small", "vector": small}])  # does not wait
            assert store.search("big", vector=small, k=1)[0].id == "small"
            gate.set()

    anyio.run(main)
    index = store._indexes["big"]
    assert not index.graph_queue and index.graph is not None
    import numpy as np

    for vector, expected in ((small, "small"), (batch[0]["vector"], "v5000")):
        near = index.graph.search(np.asarray(vector, dtype=np.float32), 1)
        assert near is not None and near[0][0] == expected  # in the graph itself
    store.close()


def test_saving_a_graph_blocks_no_search_and_no_write(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frys_edge.hnsw import Graph

    store = filled(storage)
    entered, gate = threading.Event(), threading.Event()
    real_save = Graph.save

    def held_save(graph: Graph, directory: Path, stamp: Any) -> None:
        entered.set()
        assert gate.wait(30)
        real_save(graph, directory, stamp)

    monkeypatch.setattr(Graph, "save", held_save)
    builder = threading.Thread(target=store.build_index, args=("big",))
    builder.start()
    assert entered.wait(60)
    target = [0.0] * 28 + [6.0, 0.0, 0.0, 0.0]
    upsert(store, "big", [{"id": "during-save", "vector": target}])  # does not wait
    assert store.search("big", vector=target, k=1)[0].id == "during-save"  # exact, at once
    gate.set()
    builder.join(30)
    assert not builder.is_alive()
    index = store._indexes["big"]
    assert not index.graph_queue  # the saver applied the write queued meanwhile
    assert store.search("big", vector=target, k=1)[0].id == "during-save"
    assert store.stats("big").backend == "hnsw"
