"""Vector benchmarks: exact search, int8, upsert-to-visible, memory, the pure-Python path,
and HNSW search at 1M.

Every figure sits beside a floor measured in the same run on the same data: a bare numpy
`matrix @ q` + `argpartition` top-10 + sort, a bare sqlite3 commit, the raw bytes of the
vectors, or a bare hnswlib `knn_query` on the same graph. Collections are filled through
`VectorStore.upsert` in batches of 10,000 into a temporary data dir. Run with
`frys bench --vectors [--quick] [--json FILE]`; the HNSW part (1M rows, 100K with --quick)
needs the hnsw extra and takes minutes, most of it building the graph.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from frys_edge.bench import Result, floor_sqlite_commit, format_table, median_per_op
from frys_edge.hnsw import HAVE_HNSWLIB, IndexOptions
from frys_edge.storage import Storage
from frys_edge.vectors import VectorStore

DIM = 128
K = 10
BATCH = 10_000
SEED = 7


def _unit_rows(rng: Any, n: int) -> Any:
    """n random L2-normalised float32 rows of DIM."""
    import numpy as np

    rows = rng.standard_normal((n, DIM), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def _clustered_rows(rng: Any, n: int, centers: Any) -> Any:
    """n normalised rows scattered around random centers, as embeddings of related things
    cluster; on uniformly random rows every point is nearly equidistant and no index helps."""
    import numpy as np

    picked = centers[rng.integers(0, len(centers), n)]
    rows = picked + 0.06 * rng.standard_normal((n, DIM), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


async def _fill(
    store: VectorStore, name: str, matrix: Any, dtype: str, index: IndexOptions | None = None
) -> None:
    """Create a cosine collection and upsert every row, BATCH at a time; ids `v0000000`..."""
    store.create(name, DIM, "cosine", dtype, index)
    for start in range(0, len(matrix), BATCH):
        rows = matrix[start : start + BATCH].tolist()
        items = [{"id": f"v{start + i:07d}", "vector": row} for i, row in enumerate(rows)]
        await store.upsert(name, items)


def _numpy_top(matrix: Any, q: Any) -> Any:
    """The floor: bare numpy exact top-K by dot product, nearest first."""
    import numpy as np

    scores = matrix @ q
    part = np.argpartition(scores, len(scores) - K)[-K:]
    return part[np.argsort(-scores[part])]


def _paired_medians(
    ours: Callable[[Any], Any], floor: Callable[[Any], Any], queries: list[Any], warmup: int = 3
) -> tuple[float, float]:
    """Median seconds per query of `ours` and `floor`, run alternately on the same queries so
    both see the same noise from the shared machine; which runs first alternates too, so
    neither always finds the caches warmed by the other."""
    for q in queries[:warmup]:
        ours(q)
        floor(q)
    mine: list[float] = []
    bare: list[float] = []
    for i, q in enumerate(queries):
        first, second = (floor, ours) if i % 2 else (ours, floor)
        t0 = time.perf_counter()
        first(q)
        t1 = time.perf_counter()
        second(q)
        t2 = time.perf_counter()
        (bare if i % 2 else mine).append(t1 - t0)
        (mine if i % 2 else bare).append(t2 - t1)
    return statistics.median(mine), statistics.median(bare)


async def _results(tmp: Path, quick: bool) -> list[Result]:
    import numpy as np

    n = 20_000 if quick else 100_000
    n_queries = 20 if quick else 60
    n_upserts = 20 if quick else 50
    n_python = 10_000
    n_python_queries = 20 if quick else 50
    target_rows = 1_000_000
    rng = np.random.default_rng(SEED)
    matrix = _unit_rows(rng, n)
    query_rows = _unit_rows(rng, n_queries)
    queries = [(row, row.tolist()) for row in query_rows]
    mib = 1024 * 1024
    out: list[Result] = []

    with Storage(tmp / "data") as storage:
        store = VectorStore(storage, use_numpy=True)
        memory: dict[str, tuple[int, int]] = {}  # dtype -> (bytes right after load, after search)

        # 1 and 2: exact top-10, float32 and int8, against bare numpy on the float32 matrix.
        searches: dict[str, tuple[float, float]] = {}
        for dtype in ("float32", "int8"):
            name = f"bench-{dtype}"
            await _fill(store, name, matrix, dtype)
            loaded = store.stats(name).memory_bytes  # loads the index: rows reserved exactly

            def ours(q: Any, name: str = name) -> Any:
                return store.search(name, vector=q[1], k=K)

            def floor(q: Any) -> Any:
                return _numpy_top(matrix, q[0])

            if dtype == "float32":  # same answers as the floor, or the ratio means nothing
                first = [hit.id for hit in ours(queries[0])]
                expected = [f"v{int(i):07d}" for i in floor(queries[0])]
                if first[0] != expected[0] or set(first) != set(expected):
                    raise RuntimeError(f"vector search disagrees with numpy: {first} {expected}")
            searches[dtype] = _paired_medians(ours, floor, queries)
            memory[dtype] = (loaded, store.stats(name).memory_bytes)

        search, floor_f32 = searches["float32"]
        out.append(
            Result(
                f"exact top-{K}, {n:,} x {DIM} float32 cosine",
                search * 1e3,
                "ms",
                "numpy matmul+argpartition+sort",
                floor_f32 * 1e3,
                "≤ 1.5x floor",
                search <= 1.5 * floor_f32,
            )
        )
        search_i8, floor_i8 = searches["int8"]
        out.append(
            Result(
                f"exact top-{K}, {n:,} x {DIM} int8 cosine",
                search_i8 * 1e3,
                "ms",
                "numpy on the float32 matrix",
                floor_i8 * 1e3,
                "(report)",
                True,
            )
        )

        # 3: upsert of one new item until a search returns it, in the float32 collection.
        visible = []
        for i, row in enumerate(_unit_rows(rng, n_upserts).tolist()):
            new_id = f"new{i:04d}"
            t0 = time.perf_counter()
            await store.upsert("bench-float32", [{"id": new_id, "vector": row}])
            while new_id not in {hit.id for hit in store.search("bench-float32", vector=row, k=K)}:
                await anyio.sleep(0)
            visible.append(time.perf_counter() - t0)
        latency = statistics.median(visible)
        commit = median_per_op(floor_sqlite_commit(tmp / "floor.db", "NORMAL"), 200, 5)
        out.append(
            Result(
                f"upsert of 1 item visible to search, at {n:,}",
                latency * 1e3,
                "ms",
                "sqlite3 commit + numpy top-10",
                (commit + floor_f32) * 1e3,
                "≤ 100 ms",
                latency <= 0.100,
            )
        )

        # 4: memory, extrapolated linearly to 1M rows: the per-row arrays (sized exactly to
        # the count on load) x 1M/n, plus the fixed buffer a search allocates (int8's
        # widening block), which does not grow with the rows.
        scale = target_rows // n
        for dtype in ("float32", "int8"):
            loaded, searched = memory[dtype]
            projected = loaded * scale + (searched - loaded)
            raw = target_rows * DIM * (4 if dtype == "float32" else 1)
            out.append(
                Result(
                    f"memory at 1M x {DIM} {dtype} (extrapolated: {n:,} measured x {scale})",
                    projected / mib,
                    "MiB",
                    "raw vector bytes at 1M",
                    raw / mib,
                    "(report)",
                    True,
                )
            )

        # 5: the pure-Python path on a smaller collection, numpy on the same rows as floor.
        small = matrix[:n_python]
        python = VectorStore(storage, use_numpy=False)
        await _fill(python, "bench-python", small, "float32")
        python.stats("bench-python")
        few = queries[:n_python_queries]
        pure, floor_small = _paired_medians(
            lambda q: python.search("bench-python", vector=q[1], k=K),
            lambda q: _numpy_top(small, q[0]),
            few,
            warmup=1,
        )
        out.append(
            Result(
                f"exact top-{K}, {n_python:,} x {DIM} float32, pure Python",
                pure * 1e3,
                "ms",
                "numpy on the same rows",
                floor_small * 1e3,
                "(report)",
                True,
            )
        )
    return out


async def _hnsw_results(tmp: Path, quick: bool) -> list[Result]:
    """Approximate top-10 through the HNSW graph against exact answers, at each ef_search."""
    import numpy as np

    n = 100_000 if quick else 1_000_000
    n_queries = 100 if quick else 200
    rng = np.random.default_rng(SEED + 1)
    centers = _unit_rows(rng, n // 100)
    matrix = _clustered_rows(rng, n, centers)
    query_rows = _clustered_rows(rng, n_queries, centers)
    truth = [{f"v{int(i):07d}" for i in _numpy_top(matrix, q)} for q in query_rows]
    out: list[Result] = []
    with Storage(tmp / "hnsw") as storage:
        store = VectorStore(storage, use_numpy=True)
        options = IndexOptions(kind="hnsw")  # the defaults: m 16, ef_construction 100
        print(f"hnsw: filling {n:,} rows", file=sys.stderr)
        await _fill(store, "bench-hnsw", matrix, "float32", options)
        del matrix

        def progress(done: int, total: int) -> None:
            if done % 100_000 == 0 or done == total:
                print(f"hnsw: built {done:,} of {total:,}", file=sys.stderr)

        t0 = time.perf_counter()
        stats = store.build_index("bench-hnsw", progress)
        build = time.perf_counter() - t0
        graph = store._indexes["bench-hnsw"].graph  # the floor queries the very same graph
        assert graph is not None
        out.append(
            Result(
                f"HNSW build, {n:,} x {DIM} (m {options.m}, ef_construction "
                f"{options.ef_construction}, 2 threads)",
                build,
                "s",
                "—",
                0.0,
                "≤ 60 s (aim)",
                build <= 60,
            )
        )
        for ef in (16, 32, 64, 128):
            store.tune("bench-hnsw", ef_search=ef)
            pairs = [(q, q.tolist()) for q in query_rows]
            search, raw = _paired_medians(
                lambda q: store.search("bench-hnsw", vector=q[1], k=K),
                lambda q: graph.index.knn_query(q[0], k=K),
                pairs,
            )
            found = [
                {hit.id for hit in store.search("bench-hnsw", vector=q, k=K)} for _, q in pairs
            ]
            recall = statistics.fmean(len(f & t) / K for f, t in zip(found, truth, strict=True))
            out.append(
                Result(
                    f"HNSW top-{K} at {n:,}, ef_search {ef}: recall@{K} {recall:.3f}",
                    search * 1e3,
                    "ms",
                    "bare hnswlib knn_query",
                    raw * 1e3,
                    "≤ 1 ms at recall ≥ 0.95",
                    search <= 1e-3 and recall >= 0.95,
                )
            )
        raw_bytes = n * DIM * 4
        out.append(
            Result(
                f"memory at {n:,} x {DIM} float32 with HNSW (rows + graph)",
                stats.memory_bytes / 2**20,
                "MiB",
                "raw vector bytes",
                raw_bytes / 2**20,
                "(report)",
                True,
            )
        )
    return out


def run_vector_benchmarks(json_path: str | None = None, quick: bool = False) -> int:
    """Run the vector benchmarks, print the table, optionally write JSON; an exit code."""
    with tempfile.TemporaryDirectory(prefix="frys-bench-vectors-") as tmp:
        results = anyio.run(_results, Path(tmp), quick)
        if HAVE_HNSWLIB:
            results += anyio.run(_hnsw_results, Path(tmp), quick)
        else:
            print("hnsw: skipped, the hnsw extra (hnswlib) is not installed", file=sys.stderr)
    print(format_table(results))
    if json_path:
        payload = [{**msgspec.structs.asdict(r), "ratio": r.ratio} for r in results]
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 0
