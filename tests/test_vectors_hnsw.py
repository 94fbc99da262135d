"""HNSW collections: approximate search through a saved graph that is checked on load,
rebuilt when missing, stale or corrupt, kept in step with writes, and tunable."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import frys

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


def upsert(store: VectorStore, name: str, batch: list[dict[str, Any]]) -> int:
    async def main() -> int:
        return await store.upsert(name, batch)

    return anyio.run(main)


def delete(store: VectorStore, name: str, ids: list[str]) -> int:
    async def main() -> int:
        return await store.delete(name, ids)

    return anyio.run(main)


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
        builder = VectorStore(storage, build=True)
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
        store = VectorStore(storage, build=True)
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


def test_writes_during_a_background_build_are_not_lost(storage: Storage) -> None:
    store = filled(storage)
    builder = VectorStore(storage, build=True)
    builder.stats("big")  # loads it and starts the build
    upsert(builder, "big", [{"id": "mid-build", "vector": [0.0] * 30 + [7.0, 0.0]}])
    delete(builder, "big", ["v0"])
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
            return rt.vectors.stats("big").backend, rt.vectors.index_builds
        finally:
            await rt.stop()

    assert anyio.run(run_once) == ("hnsw", 1)
    assert anyio.run(run_once) == ("hnsw", 0)  # loaded from the file saved at stop


def test_cli_creates_indexes_tunes_and_searches(tmp_path: Path) -> None:
    d = ("--data-dir", str(tmp_path / "data"))
    made = frys("vector", "create", "big", "--dim", "32", "--index", "hnsw", "--m", "12", *d)
    assert made.returncode == 0, made.stderr
    assert "hnsw m=12 ef_construction=200 ef_search=64" in made.stdout
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
    assert bad.returncode == 1 and "m" in bad.stderr
    exact_only = frys("vector", "create", "plain", "--dim", "4", *d)
    assert exact_only.returncode == 0
    refused = frys("vector", "index", "plain", *d)
    assert refused.returncode == 1 and "--index hnsw" in refused.stderr
