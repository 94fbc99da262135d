"""Vector collections: exact search on both backends, int8 recall, durability, the actions, CLI."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from conftest import ROOT, clean_env, frys
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from frys_edge.actions import BUILTIN_ACTIONS
from frys_edge.metrics import Metrics
from frys_edge.storage import Storage
from frys_edge.vectors import (
    HAVE_NUMPY,
    INT8_CHUNK_BYTES,
    VECTOR_ACTIONS,
    Hit,
    VectorError,
    VectorStore,
    embed_text,
)
from frys_edge.workflow import parse_workflow

BACKENDS = [pytest.param(True, id="numpy"), pytest.param(False, id="python")]
if not HAVE_NUMPY:
    BACKENDS = [pytest.param(False, id="python")]
INT8_RECALL_BOUND = 0.95  # measured 0.986-0.994 on 64-d Gaussian data, every metric


@pytest.fixture
def storage(data_dir: Path) -> Iterator[Storage]:
    with Storage(data_dir) as s:
        yield s


def upsert(store: VectorStore, name: str, items: Sequence[dict[str, Any]]) -> int:
    async def main() -> int:
        return await store.upsert(name, items)

    return anyio.run(main)


def delete(store: VectorStore, name: str, ids: list[str]) -> int:
    async def main() -> int:
        return await store.delete(name, ids)

    return anyio.run(main)


def gaussian(rng: random.Random, n: int, dim: int) -> list[list[float]]:
    return [[rng.gauss(0.0, 1.0) for _ in range(dim)] for _ in range(n)]


def reference_keys(
    vectors: Sequence[Sequence[float]], query: Sequence[float], metric: str
) -> list[float]:
    """Brute force in float64: a key per vector, higher is nearer."""
    if metric == "cosine":
        vectors = [[v / math.hypot(*row) for v in row] for row in vectors]
        query = [v / math.hypot(*query) for v in query]
    if metric == "l2":
        return [
            -math.fsum((a - b) ** 2 for a, b in zip(row, query, strict=True)) for row in vectors
        ]
    return [math.fsum(a * b for a, b in zip(row, query, strict=True)) for row in vectors]


def key_of(hit: Hit, metric: str) -> float:
    return -(hit.score**2) if metric == "l2" else hit.score


def assert_exact(hits: list[Hit], keys: dict[str, float], k: int, metric: str, tol: float) -> None:
    """Hits are the k best by the reference, up to ties within tol, nearest first."""
    ranked = sorted(keys.values(), reverse=True)
    assert len(hits) == min(k, len(keys))
    assert len({h.id for h in hits}) == len(hits)
    for position, hit in enumerate(hits):
        assert key_of(hit, metric) == pytest.approx(keys[hit.id], abs=tol)
        assert keys[hit.id] == pytest.approx(ranked[position], abs=tol)


# -- exact search --------------------------------------------------------------------------

_names = itertools.count()


@pytest.mark.parametrize("use_numpy", BACKENDS)
def test_exact_search_agrees_with_brute_force(tmp_path: Path, use_numpy: bool) -> None:
    with Storage(tmp_path / "data") as storage:
        store = VectorStore(storage, use_numpy=use_numpy)

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            metric=st.sampled_from(["cosine", "dot", "l2"]),
            dim=st.integers(1, 6),
            data=st.data(),
            k=st.integers(1, 12),
        )
        def check(metric: str, dim: int, data: st.DataObject, k: int) -> None:
            element = st.floats(-10, 10, allow_nan=False, width=32)
            row = st.lists(element, min_size=dim, max_size=dim)
            vectors = data.draw(st.lists(row, min_size=1, max_size=25))
            query = data.draw(row)
            if metric == "cosine":
                assume(all(any(v != 0 for v in r) for r in [*vectors, query]))
            name = f"c{next(_names)}"
            store.create(name, dim, metric)
            items = [{"id": f"v{i}", "vector": v} for i, v in enumerate(vectors)]
            upsert(store, name, items)
            ids = [item["id"] for item in items]
            keys = dict(zip(ids, reference_keys(vectors, query, metric), strict=True))
            tol = 1e-5 * (1 + 100 * dim)
            assert_exact(store.search(name, vector=query, k=k), keys, k, metric, tol)
            store.drop(name)

        check()


@pytest.mark.skipif(not HAVE_NUMPY, reason="needs numpy for the comparison")
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_numpy_and_pure_python_give_the_same_answers(
    storage: Storage, metric: str, dtype: str
) -> None:
    rng = random.Random(7)
    writer = VectorStore(storage, use_numpy=True)
    writer.create("c", 32, metric, dtype)
    upsert(
        writer, "c", [{"id": f"v{i}", "vector": v} for i, v in enumerate(gaussian(rng, 400, 32))]
    )
    fast, slow = VectorStore(storage, use_numpy=True), VectorStore(storage, use_numpy=False)
    assert (fast.stats("c").backend, slow.stats("c").backend) == ("numpy", "python")
    for query in gaussian(rng, 20, 32):
        a, b = fast.search("c", vector=query, k=10), slow.search("c", vector=query, k=10)
        assert [h.id for h in a] == [h.id for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-4, abs=1e-4)


@pytest.mark.skipif(not HAVE_NUMPY, reason="the pure-Python encoder is checked against numpy's")
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_both_encoders_store_the_same_vectors(storage: Storage, dtype: str) -> None:
    rng = random.Random(3)
    items = [{"id": f"v{i}", "vector": v} for i, v in enumerate(gaussian(rng, 50, 16))]
    for use_numpy in (True, False):
        store = VectorStore(storage, use_numpy=use_numpy)
        store.create(f"c{use_numpy}", 16, "cosine", dtype)
        upsert(store, f"c{use_numpy}", items)
    a, b = storage.vectors("cTrue"), storage.vectors("cFalse")
    assert [r.vector for r in a] == [r.vector for r in b]
    assert [r.scale for r in a] == pytest.approx([r.scale for r in b])


@pytest.mark.parametrize("use_numpy", BACKENDS)
def test_int8_recall_at_10_against_float32(storage: Storage, use_numpy: bool) -> None:
    rng = random.Random(11)
    vectors = gaussian(rng, 2000 if use_numpy else 500, 64)
    store = VectorStore(storage, use_numpy=use_numpy)
    items = [{"id": f"v{i}", "vector": v} for i, v in enumerate(vectors)]
    for dtype in ("float32", "int8"):
        store.create(dtype, 64, "cosine", dtype)
        upsert(store, dtype, items)
    found = 0
    queries = gaussian(rng, 50, 64)
    for query in queries:
        exact = {h.id for h in store.search("float32", vector=query, k=10)}
        found += len(exact & {h.id for h in store.search("int8", vector=query, k=10)})
    recall = found / (10 * len(queries))
    assert recall >= INT8_RECALL_BOUND, recall
    f32, i8 = store.stats("float32"), store.stats("int8")
    if use_numpy:  # 4x smaller, plus 8 bytes a row (scale, norm) and the widening block
        assert i8.memory_bytes <= f32.memory_bytes / 4 + 8 * 2000 + INT8_CHUNK_BYTES


# -- writes, filters, durability -----------------------------------------------------------


@pytest.mark.parametrize("use_numpy", BACKENDS)
def test_upsert_is_visible_to_the_next_search(storage: Storage, use_numpy: bool) -> None:
    store = VectorStore(storage, use_numpy=use_numpy)
    store.create("c", 3, "l2")
    upsert(store, "c", [{"id": "a", "vector": [0, 0, 0]}, {"id": "b", "vector": [5, 5, 5]}])
    assert store.search("c", vector=[4, 4, 4], k=1)[0].id == "b"
    upsert(store, "c", [{"id": "n", "vector": [4, 4, 4], "metadata": {"new": True}}])
    hit = store.search("c", vector=[4, 4, 4], k=1)[0]
    assert (hit.id, hit.score, hit.metadata) == ("n", 0.0, {"new": True})
    # Replacing an item moves it and replaces its metadata.
    upsert(store, "c", [{"id": "a", "vector": [4, 4, 4.1], "metadata": {"moved": 1}}])
    assert [h.id for h in store.search("c", vector=[4, 4, 4.1], k=2)] == ["a", "n"]
    assert store.search("c", vector=[4, 4, 4.1], k=1)[0].metadata == {"moved": 1}
    assert store.info("c").count == 3


@pytest.mark.parametrize("use_numpy", BACKENDS)
def test_delete_removes_items_from_search_and_storage(storage: Storage, use_numpy: bool) -> None:
    store = VectorStore(storage, use_numpy=use_numpy)
    store.create("c", 2, "dot")
    upsert(store, "c", [{"id": str(i), "vector": [i, 1]} for i in range(10)])
    assert [h.id for h in store.search("c", vector=[1, 0], k=3)] == ["9", "8", "7"]
    assert delete(store, "c", ["9", "0", "missing"]) == 2
    assert [h.id for h in store.search("c", vector=[1, 0], k=3)] == ["8", "7", "6"]
    assert store.info("c").count == 8
    assert storage.vector_count("c") == 8
    assert "0" not in {h.id for h in store.search("c", vector=[-1, 0], k=10)}


@pytest.mark.parametrize("use_numpy", BACKENDS)
def test_filter_keeps_items_whose_metadata_fields_are_equal(
    storage: Storage, use_numpy: bool
) -> None:
    store = VectorStore(storage, use_numpy=use_numpy)
    store.create("c", 2, "cosine")
    items = [
        {"id": "pump-hot", "vector": [1, 0.1], "metadata": {"kind": "fault", "site": 1}},
        {"id": "pump-ok", "vector": [1, 0], "metadata": {"kind": "ok", "site": 1}},
        {"id": "valve", "vector": [0, 1], "metadata": {"kind": "fault", "site": 2}},
    ]
    upsert(store, "c", items)
    assert store.search("c", vector=[1, 0], k=3)[0].id == "pump-ok"
    faults = store.search("c", vector=[1, 0], k=3, filter={"kind": "fault"})
    assert [h.id for h in faults] == ["pump-hot", "valve"]
    assert [
        h.id for h in store.search("c", vector=[1, 0], filter={"kind": "fault", "site": 2})
    ] == ["valve"]
    assert store.search("c", vector=[1, 0], filter={"kind": "none"}) == []
    assert store.search("c", vector=[1, 0], filter={"missing": None}) == []


@pytest.mark.parametrize("use_numpy", BACKENDS)
def test_items_survive_reopening_the_data_dir(data_dir: Path, use_numpy: bool) -> None:
    rng = random.Random(5)
    items = [
        {"id": f"v{i}", "vector": v, "metadata": {"i": i}}
        for i, v in enumerate(gaussian(rng, 300, 8))
    ]
    query = gaussian(rng, 1, 8)[0]
    with Storage(data_dir) as storage:
        store = VectorStore(storage, use_numpy=use_numpy)
        store.create("c", 8, "l2", "int8")
        upsert(store, "c", items)
        delete(store, "c", ["v1", "v2"])
        before = store.search("c", vector=query, k=10)
    with Storage(data_dir) as storage:
        store = VectorStore(storage, use_numpy=use_numpy)
        assert store.info("c").count == 298
        assert store.search("c", vector=query, k=10) == before


def test_acknowledged_upserts_survive_sigkill(data_dir: Path) -> None:
    script = """
import os, signal, sys, anyio
from frys_edge.storage import Storage
from frys_edge.vectors import VectorStore

store = VectorStore(Storage(sys.argv[1]))
store.create("c", 2, "dot")
anyio.run(store.upsert, "c", [{"id": "a", "vector": [1, 2], "metadata": {"x": 1}}])
print("acknowledged", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == -9, result.stderr
    assert result.stdout.strip() == "acknowledged"
    with Storage(data_dir) as storage:
        hits = VectorStore(storage).search("c", vector=[1, 1])
    assert [(h.id, h.score, h.metadata) for h in hits] == [("a", 3.0, {"x": 1})]


# -- errors write nothing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"id": "bad", "vector": [1.0, 2.0]}, "dim is 3"),
        ({"id": "bad", "vector": [1, "x", 3]}, "Expected `float`, got `str`"),
        ({"id": "bad", "vector": [1, math.nan, 3]}, "finite numbers"),
        ({"id": "bad", "vector": [1, 1e39, 3]}, "float32 range"),
        ({"id": "bad", "vector": [0, 0, 0]}, "all zeros"),
        ({"id": "bad", "vector": [1, 2, 3], "text": "both"}, "exactly one of vector or text"),
        ({"id": "bad"}, "exactly one of vector or text"),
        ({"id": "bad", "vec": [1, 2, 3]}, "unknown field `vec`"),
        ({"id": "bad", "vector": [1, 2, 3], "metadata": [1]}, "Expected `object"),
        ({"vector": [1, 2, 3]}, "missing required field `id`"),
    ],
)
@pytest.mark.parametrize("use_numpy", BACKENDS)
def test_a_bad_item_is_named_and_nothing_is_written(
    storage: Storage, bad: dict[str, Any], message: str, use_numpy: bool
) -> None:
    store = VectorStore(storage, use_numpy=use_numpy)
    store.create("c", 3, "cosine")
    good = {"id": "good", "vector": [1, 2, 3]}
    with pytest.raises(VectorError, match="item 1") as caught:
        upsert(store, "c", [good, bad])
    assert message in str(caught.value)
    assert caught.value.item == 1
    assert "nothing was written" in str(caught.value)
    assert storage.vector_count("c") == 0
    assert store.search("c", vector=[1, 2, 3]) == []


def test_unknown_collection_and_bad_settings_are_clear_errors(storage: Storage) -> None:
    store = VectorStore(storage)
    with pytest.raises(VectorError, match=r"no vector collection 'nope'.*frys vector create"):
        upsert(store, "nope", [{"id": "a", "vector": [1]}])
    with pytest.raises(VectorError, match="no vector collection"):
        store.search("nope", query="x")
    with pytest.raises(VectorError, match="no vector collection"):
        store.drop("nope")
    with pytest.raises(VectorError, match="metric must be one of"):
        store.create("c", 3, "hamming")
    with pytest.raises(VectorError, match="dim must be"):
        store.create("c", 0)
    with pytest.raises(VectorError, match="bad collection name"):
        store.create("no spaces", 3)
    store.create("c", 3)
    with pytest.raises(VectorError, match="already exists"):
        store.create("c", 4)
    with pytest.raises(VectorError, match="dim is 3"):
        store.search("c", vector=[1, 2])
    with pytest.raises(VectorError, match="exactly one of vector or query"):
        store.search("c")
    with pytest.raises(VectorError, match="k must be"):
        store.search("c", query="x", k=0)
    assert [c.name for c in store.collections()] == ["c"]


# -- text ----------------------------------------------------------------------------------


def test_embed_text_is_deterministic_normalised_and_lexical() -> None:
    vector = embed_text("Pump overheating at station 4", 128)
    assert len(vector) == 128
    assert math.fsum(v * v for v in vector) == pytest.approx(1.0)
    # The same in another process, whatever its hash seed.
    code = (
        "import json; from frys_edge.vectors import embed_text; "
        "print(json.dumps(embed_text('Pump overheating at station 4', 128)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=clean_env(PYTHONHASHSEED="123"),
        cwd=ROOT,
        check=True,
    ).stdout
    assert json.loads(out) == vector

    def cos(a: str, b: str) -> float:
        return sum(x * y for x, y in zip(embed_text(a, 256), embed_text(b, 256), strict=True))

    assert cos("pump overheating", "the pump is overheating") > cos(
        "pump overheating", "valve closed"
    )
    with pytest.raises(VectorError, match="no words"):
        embed_text("  ...  ", 64)


# -- workflow actions ----------------------------------------------------------------------

DESIGN_EXAMPLE = {
    "name": "test_workflow",
    "steps": [{"name": "step1", "action": "vector_search", "params": {"query": "test query"}}],
}


def ctx_with(store: VectorStore) -> Any:
    return SimpleNamespace(rt=SimpleNamespace(vectors=store, metrics=Metrics()))


def test_design_example_workflow_validates_and_finds_the_nearest_item(storage: Storage) -> None:
    workflow = parse_workflow(DESIGN_EXAMPLE, {**BUILTIN_ACTIONS, **VECTOR_ACTIONS})
    step = workflow.steps["step1"]
    action = VECTOR_ACTIONS[step.action]
    store = VectorStore(storage)
    ctx = ctx_with(store)

    with pytest.raises(VectorError, match=r"frys vector create default --dim 256"):
        anyio.run(action, ctx, dict(step.params))

    store.create("default", 256)
    items = [
        {"id": "doc-test", "text": "a test query about testing", "metadata": {"n": 1}},
        {"id": "doc-pump", "text": "pump overheating alarm", "metadata": {"n": 2}},
        {"id": "doc-valve", "text": "valve stuck closed", "metadata": {"n": 3}},
    ]
    upserted = anyio.run(VECTOR_ACTIONS["vector.upsert"], ctx, {"items": items})
    assert upserted == {"upserted": 3}
    output = anyio.run(action, ctx, dict(step.params))
    assert json.loads(json.dumps(output)) == output
    assert output["hits"][0]["id"] == "doc-test"
    assert output["hits"][0]["metadata"] == {"n": 1}
    assert set(output["hits"][0]) == {"id", "score", "metadata"}

    params = {"query": "pump", "k": 1, "filter": {"n": 3}}
    assert [h["id"] for h in anyio.run(action, ctx, params)["hits"]] == ["doc-valve"]
    deleted = anyio.run(VECTOR_ACTIONS["vector.delete"], ctx, {"ids": ["doc-test"]})
    assert deleted == {"deleted": 1}
    assert "doc-test" not in {h["id"] for h in anyio.run(action, ctx, dict(step.params))["hits"]}


def test_actions_without_a_vector_store_say_so() -> None:
    ctx = SimpleNamespace(rt=SimpleNamespace())
    with pytest.raises(VectorError, match="no vector store"):
        anyio.run(VECTOR_ACTIONS["vector_search"], ctx, {"query": "x"})


# -- embedders -----------------------------------------------------------------------------

TOY_EMBEDDER = """
WARM = {"hot", "warm", "overheating"}
COLD = {"cold", "chilly", "frozen"}


def toy(text, dim):
    words = set(text.lower().split())
    return [float(len(words & WARM)) + 0.01, float(len(words & COLD)) + 0.01] + [0.0] * (dim - 2)


def init(rt):
    rt.vectors.register_embedder("toy", toy)
"""


def toy_store(storage: Storage) -> VectorStore:
    namespace: dict[str, Any] = {}
    exec(TOY_EMBEDDER, namespace)
    store = VectorStore(storage)
    store.register_embedder("toy", namespace["toy"])
    return store


def test_a_registered_embedder_embeds_items_and_queries(storage: Storage) -> None:
    store = toy_store(storage)
    info = store.create("temps", 4, embedder="toy")
    assert info.embedder == "toy"
    upsert(
        store,
        "temps",
        [{"id": "a", "text": "boiler overheating"}, {"id": "b", "text": "pipe frozen"}],
    )
    # the lexical embedder shares no word between "warm" and "boiler overheating"
    hit = store.search("temps", query="warm", k=1)[0]
    assert (hit.id, hit.score) == ("a", pytest.approx(1.0))  # the toy vectors are parallel
    assert store.search("temps", query="chilly", k=1)[0].id == "b"
    assert store.info("temps").embedder == "toy"


def test_an_unregistered_or_broken_embedder_is_a_clear_error(storage: Storage) -> None:
    store = toy_store(storage)
    store.create("temps", 4, embedder="toy")
    plain = VectorStore(storage)  # no plugin registered "toy" here
    with pytest.raises(VectorError, match=r"embeds texts with 'toy'.*registered: lexical"):
        upsert(plain, "temps", [{"id": "a", "text": "hot"}])
    with pytest.raises(VectorError, match="registered: lexical"):
        plain.search("temps", query="hot")
    assert storage.vector_count("temps") == 0
    store.register_embedder("toy", lambda text, dim: [1.0] * (dim + 1))
    with pytest.raises(
        VectorError, match=r"item 0 .*returned 5 numbers for collection temps of dim 4"
    ):
        upsert(store, "temps", [{"id": "a", "text": "hot"}])
    store.register_embedder("toy", lambda text, dim: 1 / 0)
    with pytest.raises(VectorError, match=r"embedder toy failed on 'hot': ZeroDivisionError"):
        store.search("temps", query="hot")
    with pytest.raises(VectorError, match="bad embedder name"):
        store.register_embedder("lexical", lambda text, dim: [0.0] * dim)
    with pytest.raises(VectorError, match="bad embedder name"):
        store.create("x", 4, embedder="no spaces")


def test_a_native_plugin_registers_an_embedder_for_workflows(tmp_path: Path) -> None:
    from frys_edge.config import load_config
    from frys_edge.runtime import Runtime

    plugin = tmp_path / "toy_embedder.py"
    plugin.write_text(TOY_EMBEDDER)
    config = load_config(
        None,
        env={},
        overrides={
            "system.data_dir": str(tmp_path / "data"),
            "plugins.native": str(plugin),
        },
    )

    async def main() -> list[str]:
        rt = Runtime(config)
        await rt.start()
        try:
            assert rt.vectors is not None
            rt.vectors.create("temps", 4, embedder="toy")
            ctx = SimpleNamespace(rt=rt)
            items = [{"id": "a", "text": "hot boiler"}, {"id": "b", "text": "cold pipe"}]
            await VECTOR_ACTIONS["vector.upsert"](ctx, {"collection": "temps", "items": items})
            found = await VECTOR_ACTIONS["vector_search"](
                ctx, {"collection": "temps", "query": "frozen", "k": 1}
            )
            return [hit["id"] for hit in found["hits"]]
        finally:
            await rt.stop()

    assert anyio.run(main) == ["b"]


# -- CLI -----------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_cli_round_trip(tmp_path: Path) -> None:
    d = ["--data-dir", str(tmp_path / "data")]
    result = frys("vector", "create", "docs", "--dim", "64", "--dtype", "int8", *d)
    assert result.returncode == 0, result.stderr
    lines = [
        json.dumps({"id": "pump", "text": "pump overheating alarm", "metadata": {"kind": "fault"}}),
        "",
        json.dumps({"id": "valve", "text": "valve stuck closed", "metadata": {"kind": "fault"}}),
        json.dumps({"id": "ok", "vector": [0.5] * 64}),
    ]
    result = frys("vector", "add", "docs", str(write_lines(tmp_path / "a.jsonl", lines)), *d)
    assert result.returncode == 0, result.stderr
    assert "added 3" in result.stdout

    result = frys(
        "vector", "search", "docs", "--query", "pump overheating", "-k", "2", "--json", *d
    )
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)["hits"]
    assert hits[0]["id"] == "pump"
    assert hits[0]["metadata"] == {"kind": "fault"}

    result = frys("vector", "search", "docs", "--vector", json.dumps([0.5] * 64), "-k", "1", *d)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1] == "ok"

    result = frys("vector", "list", "--json", *d)
    assert json.loads(result.stdout) == [
        {
            "name": "docs",
            "dim": 64,
            "metric": "cosine",
            "dtype": "int8",
            "count": 3,
            "created_at": pytest.approx(json.loads(result.stdout)[0]["created_at"]),
            "index": {"kind": "exact", "m": 16, "ef_construction": 100, "ef_search": 64},
            "embedder": "lexical",
        }
    ]
    result = frys("vector", "stats", "docs", "--json", *d)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["count"] == 3

    result = frys("vector", "drop", "docs", *d)
    assert result.returncode == 0, result.stderr
    assert frys("vector", "list", *d).stdout == ""


@pytest.mark.parametrize(
    "bad_line",
    ['{"id": "c", "text": "oops"', '{"id": "c", "vector": [1, 2]}', '["not", "an", "object"]'],
)
def test_cli_add_reports_the_bad_line_and_writes_nothing(tmp_path: Path, bad_line: str) -> None:
    d = ["--data-dir", str(tmp_path / "data")]
    assert frys("vector", "create", "docs", "--dim", "8", *d).returncode == 0
    good = [json.dumps({"id": "a", "text": "alpha"}), json.dumps({"id": "b", "text": "beta"})]
    path = write_lines(
        tmp_path / "bad.jsonl", [*good, bad_line, json.dumps({"id": "d", "text": "x"})]
    )
    result = frys("vector", "add", "docs", str(path), *d)
    assert result.returncode == 2
    assert "line 3" in result.stderr
    assert "nothing from the file was written" in result.stderr
    assert "0 items" in frys("vector", "list", *d).stdout


def test_cli_failures_exit_1_with_the_fix(tmp_path: Path) -> None:
    d = ["--data-dir", str(tmp_path / "data")]
    path = write_lines(tmp_path / "a.jsonl", [json.dumps({"id": "a", "text": "alpha"})])
    result = frys("vector", "add", "nope", str(path), *d)
    assert result.returncode == 1
    assert "frys vector create nope" in result.stderr
    assert frys("vector", "create", "docs", "--dim", "8", *d).returncode == 0
    result = frys("vector", "search", "docs", "--vector", "[1, 2", *d)
    assert result.returncode == 2
    assert "--vector is not JSON" in result.stderr
    # A running runtime holds the data dir: writes fail and say so; reads still work.
    with Storage(tmp_path / "data"):
        result = frys("vector", "add", "docs", str(path), *d)
        assert result.returncode == 1
        assert "in use" in result.stderr
        assert frys("vector", "list", *d).returncode == 0


def test_every_vector_command_has_help_with_an_example() -> None:
    for action in ("create", "tune", "index", "add", "search", "list", "stats", "drop"):
        result = frys("vector", action, "--help")
        assert result.returncode == 0, action
        assert "example:" in result.stdout, action
        assert "--data-dir" in result.stdout, action


def test_a_cancelled_upsert_never_leaves_search_out_of_step_with_storage(tmp_path: Path) -> None:
    import anyio

    from frys_edge.storage import Storage
    from frys_edge.vectors import VectorStore

    async def main() -> None:
        with Storage(tmp_path / "data") as storage:
            store = VectorStore(storage)
            store.create("c", 2, metric="dot")
            await store.upsert("c", [{"id": "a", "vector": [1.0, 0.0]}])
            assert [h.id for h in store.search("c", vector=[1.0, 0.0])] == ["a"]
            with anyio.move_on_after(0):  # cancelled while its write commits anyway
                await store.upsert("c", [{"id": "b", "vector": [0.0, 1.0]}])
            stored = {r.id for r in storage.vectors("c")}
            found = {h.id for h in store.search("c", vector=[1.0, 1.0])}
            assert found == stored

    anyio.run(main)
