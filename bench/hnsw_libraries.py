"""Which HNSW library: hnswlib, usearch and faiss-cpu on the same data, in the same run.

Builds each library's HNSW index over the same clustered, normalised 128-d float32 rows with
the same settings (M 16, ef_construction 200, inner product, 2 threads), then measures the
median single-query top-10 latency and recall@10 against exact numpy answers at several
ef_search values, and each package's installed size. Not a dependency of frys: run it in a
scratch venv.

    python3 -m venv /tmp/hnsw && /tmp/hnsw/bin/pip install numpy hnswlib usearch faiss-cpu
    /tmp/hnsw/bin/python bench/hnsw_libraries.py [ROWS] [--json FILE]
"""

from __future__ import annotations

import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DIM, K, M, EF_CONSTRUCTION, THREADS, QUERIES = 128, 10, 16, 200, 2, 200


def rows(rng: Any, n: int, centers: Any) -> Any:
    out = centers[rng.integers(0, len(centers), n)]
    out = out + 0.06 * rng.standard_normal((n, DIM), dtype=np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def installed_mib(*dists: str) -> float:
    total = 0
    for dist in dists:
        for file in importlib.metadata.distribution(dist).files or ():
            path = Path(str(file.locate()))
            if path.is_file():
                total += path.stat().st_size
    return total / 2**20


def hnswlib_index(data: Any) -> tuple[Any, Any]:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=DIM)
    index.init_index(max_elements=len(data), M=M, ef_construction=EF_CONSTRUCTION)
    index.add_items(data, np.arange(len(data)), num_threads=THREADS)

    def search(q: Any, ef: int) -> Any:
        index.set_ef(ef)
        return index.knn_query(q, k=K)[0][0]

    return index, search


def usearch_index(data: Any) -> tuple[Any, Any]:
    from usearch.index import Index

    index = Index(ndim=DIM, metric="ip", dtype="f32", connectivity=M)
    index.expansion_add = EF_CONSTRUCTION
    index.add(np.arange(len(data)), data, threads=THREADS)

    def search(q: Any, ef: int) -> Any:
        index.expansion_search = ef
        return index.search(q, K).keys

    return index, search


def faiss_index(data: Any) -> tuple[Any, Any]:
    import faiss

    faiss.omp_set_num_threads(THREADS)
    index = faiss.IndexHNSWFlat(DIM, M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    index.add(data)

    def search(q: Any, ef: int) -> Any:
        index.hnsw.efSearch = ef
        return index.search(q[None], K)[1][0]

    return index, search


LIBRARIES = {
    "hnswlib": (hnswlib_index, ("hnswlib",)),
    "usearch": (usearch_index, ("usearch", "numkong")),
    "faiss-cpu": (faiss_index, ("faiss-cpu",)),
}


def main() -> int:
    args = sys.argv[1:]
    json_path = None
    if "--json" in args:
        at = args.index("--json")
        json_path = args[at + 1]
        del args[at : at + 2]
    n = int(args[0]) if args else 100_000
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((n // 100, DIM), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    data, queries = rows(rng, n, centers), rows(rng, QUERIES, centers)
    truth = [set(np.argpartition(-(data @ q), K)[:K].tolist()) for q in queries]
    results = []
    for name, (make, dists) in LIBRARIES.items():
        t0 = time.perf_counter()
        _, search = make(data)
        build = time.perf_counter() - t0
        for ef in (16, 32, 64, 128):
            for q in queries[:10]:
                search(q, ef)
            times, found = [], []
            for q in queries:
                t1 = time.perf_counter()
                keys = search(q, ef)
                times.append(time.perf_counter() - t1)
                found.append({int(key) for key in keys})
            recall = statistics.fmean(len(f & t) / K for f, t in zip(found, truth, strict=True))
            results.append(
                {
                    "library": name,
                    "version": importlib.metadata.version(dists[0]),
                    "rows": n,
                    "build_s": round(build, 2),
                    "ef_search": ef,
                    "median_ms": round(statistics.median(times) * 1e3, 4),
                    "recall_at_10": round(recall, 4),
                    "installed_mib": round(installed_mib(*dists), 1),
                }
            )
    print(
        f"{'library':<10} {'build s':>8} {'ef':>4} {'median ms':>10} {'recall@10':>10} {'MiB':>6}"
    )
    for r in results:
        print(
            f"{r['library']:<10} {r['build_s']:>8} {r['ef_search']:>4} {r['median_ms']:>10} "
            f"{r['recall_at_10']:>10} {r['installed_mib']:>6}"
        )
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
