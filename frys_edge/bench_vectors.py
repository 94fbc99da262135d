"""Vector benchmarks: exact search, int8, upsert-to-visible, memory, the pure-Python path.

Every figure sits beside a floor measured in the same run on the same data: a bare numpy
`matrix @ q` + `argpartition` top-10 + sort, a bare sqlite3 commit, or the raw bytes of the
vectors. Collections are filled through `VectorStore.upsert` in batches of 10,000 into a
temporary data dir. Run with `frys bench --vectors [--quick] [--json FILE]`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from frys_edge.bench import Result, floor_sqlite_commit, format_table, median_per_op
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


async def _fill(store: VectorStore, name: str, matrix: Any, dtype: str) -> None:
    """Create a cosine collection and upsert every row, BATCH at a time; ids `v0000000`..."""
    store.create(name, DIM, "cosine", dtype)
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
    both see the same noise from the shared machine."""
    for q in queries[:warmup]:
        ours(q)
        floor(q)
    mine, bare = [], []
    for q in queries:
        t0 = time.perf_counter()
        floor(q)
        t1 = time.perf_counter()
        ours(q)
        t2 = time.perf_counter()
        bare.append(t1 - t0)
        mine.append(t2 - t1)
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


def run_vector_benchmarks(json_path: str | None = None, quick: bool = False) -> int:
    """Run the vector benchmarks, print the table, optionally write JSON; an exit code."""
    with tempfile.TemporaryDirectory(prefix="frys-bench-vectors-") as tmp:
        results = anyio.run(_results, Path(tmp), quick)
    print(format_table(results))
    if json_path:
        payload = [{**msgspec.structs.asdict(r), "ratio": r.ratio} for r in results]
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 0
