"""Vectors: durable collections of items with vectors, searched by similarity.

Items live in storage (SQLite) like every other durable value; this module keeps one
in-memory matrix per collection, loaded lazily from storage and updated on every write, so a
committed write is visible to the next search. Search is exact by default: with numpy when it
is importable, else in pure Python with the same answers, more slowly. A collection created
with `IndexOptions(kind="hnsw")` is also searched through an HNSW graph (hnsw.py) once its
graph is loaded or built; filtered searches stay exact. It speaks no SQL; the workflow
actions at the end reach it as `ctx.rt.vectors`.

Scores: cosine similarity and dot product rank highest first; `l2` is the Euclidean distance
and ranks lowest first. Hits are always ordered nearest first.
"""

from __future__ import annotations

import abc
import heapq
import importlib.util
import logging
import math
import operator
import os
import re
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from hashlib import blake2b
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import msgspec

from frys_edge import hnsw
from frys_edge.core import FrysError
from frys_edge.hnsw import HAVE_HNSWLIB, Graph, IndexBuildStopped, IndexOptions, IndexStamp
from frys_edge.storage import Storage, StorageError, VectorCollectionRecord, VectorRecord

# numpy is imported where it is used, not here: `frys run` without vector collections should
# not pay its ~12 MB of resident memory. Without it (Pyodide, small devices) search is pure
# Python.
HAVE_NUMPY = importlib.util.find_spec("numpy") is not None

if TYPE_CHECKING:
    from frys_edge.actions import Action, ActionContext
    from frys_edge.metrics import Metrics

log = logging.getLogger("frys.vectors")

# What turns a text into a vector: embedder(text, dim) -> dim numbers.
Embedder = Callable[[str, int], Sequence[float]]

METRICS = ("cosine", "dot", "l2")
DTYPES = ("float32", "int8")
DEFAULT_COLLECTION = "default"
DEFAULT_TEXT_DIM = 256
LEXICAL = "lexical"  # the built-in embedder, embed_text
MAX_DIM = 4096
MAX_K = 1000
MAX_ITEMS_PER_UPSERT = 1_000_000
MAX_FLOATS_PER_UPSERT = 64 * 1024 * 1024
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 100_000
MAX_METADATA_BYTES = 64 * 1024
LOAD_PAGE = 10_000
INT8_CHUNK_BYTES = 4 * 1024 * 1024  # int8 rows are widened to float32 in blocks this big
BIG_WRITE = 1000  # items from which a graph write runs on every core, off the event loop
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_WORD = re.compile(r"\w+")
_LITTLE = sys.byteorder == "little"


class VectorError(FrysError):
    """A vector collection, item or query is wrong; the message names it and the fix.

    For a bad item of an upsert, `item` is its index in the batch and `reason` the problem
    alone, so a caller (the CLI) can name the line it came from.
    """

    def __init__(self, message: str, *, item: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.item = item
        self.reason = message if reason is None else reason


class UnknownCollection(VectorError):
    """No collection has this name."""


class CollectionInfo(msgspec.Struct, frozen=True):
    """A collection: its settings and how many items it holds."""

    name: str
    dim: int
    metric: str
    dtype: str
    count: int
    created_at: float
    index: IndexOptions
    embedder: str


class CollectionStats(msgspec.Struct, frozen=True):
    """A loaded collection: its settings, size, search backend and searches since start.

    backend: what an unfiltered search uses now (hnsw, numpy or python); index_state: for an
    hnsw collection, ready, building, not built, or unavailable without hnswlib.
    """

    name: str
    dim: int
    metric: str
    dtype: str
    count: int
    backend: str
    memory_bytes: int
    searches: int
    index: IndexOptions
    index_state: str
    index_builds: int


class Hit(msgspec.Struct, frozen=True):
    """One search result: the item's id, its score and its metadata."""

    id: str
    score: float
    metadata: dict[str, Any]


class _Item(msgspec.Struct, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    vector: list[float] | None = None
    text: Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)] | None = None
    metadata: dict[str, Any] | None = None


class _BadVector(Exception):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


def _unknown(name: str) -> VectorError:
    return UnknownCollection(
        f"no vector collection {name!r}; create it with `frys vector create {name} --dim 256` "
        f"and fill it with `frys vector add {name} FILE`"
    )


# -- the default embedder -------------------------------------------------------------------


@lru_cache(maxsize=65_536)
def _feature(feature: str, dim: int) -> tuple[int, float]:
    # blake2b, not hash(): Python salts str hashes per process, and vectors are stored.
    h = int.from_bytes(blake2b(feature.encode(), digest_size=8).digest(), "little")
    return h % dim, 1.0 if h >> 63 else -1.0


def embed_text(text: str, dim: int = DEFAULT_TEXT_DIM) -> list[float]:
    """Embed text lexically: hashed words and character 3-grams, L2-normalised.

    Deterministic and needs no model, but it only knows spelling: texts that share words or
    parts of words come out close; synonyms with no letters in common do not.
    """
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIM:
        raise VectorError(f"embed_text: dim must be an int from 1 to {MAX_DIM}, got {dim!r}")
    if not isinstance(text, str):
        raise VectorError(f"embed_text: text must be a string, got {type(text).__name__}")
    out = [0.0] * dim
    for word in _WORD.findall(text.casefold()):
        index, sign = _feature("w:" + word, dim)
        out[index] += sign
        padded = f"<{word}>"
        for i in range(len(padded) - 2):
            index, sign = _feature("c:" + padded[i : i + 3], dim)
            out[index] += 0.5 * sign
    norm = math.sqrt(math.fsum(v * v for v in out))
    if norm == 0.0:
        raise VectorError(f"embed_text: {text[:40]!r} has no words to embed")
    return [v / norm for v in out]


# -- encoding: validated values to storage's blobs -------------------------------------------


class _Spec(msgspec.Struct, frozen=True):
    name: str
    dim: int
    metric: str
    dtype: str
    created_at: float
    embedder: str


class _Options(msgspec.Struct, frozen=True):
    """A collection's stored options: how it is searched, and what embeds its texts (fixed
    at creation: vectors already stored came from it). Unknown fields are ignored, so a
    data dir written by a newer frys still opens."""

    index: IndexOptions = IndexOptions()
    embedder: str = LEXICAL


def _options(name: str, raw: Mapping[str, Any]) -> _Options:
    try:
        return msgspec.convert(raw, _Options)
    except msgspec.ValidationError as e:
        raise VectorError(
            f"collection {name}: bad index options: {e}; kind is exact or hnsw, m 4 to 96, "
            "ef_construction 8 to 4096, ef_search 1 to 8192"
        ) from None


def _spec(record: VectorCollectionRecord) -> _Spec:
    embedder = _options(record.name, record.options).embedder
    return _Spec(record.name, record.dim, record.metric, record.dtype, record.created_at, embedder)


def _same_graph(a: IndexOptions, b: IndexOptions) -> bool:
    """Whether a graph built with options a serves options b (only ef_search differs)."""
    return (a.kind, a.m, a.ef_construction) == (b.kind, b.m, b.ef_construction)


def _require_hnswlib(name: str) -> None:
    if not HAVE_HNSWLIB:
        raise VectorError(
            f"collection {name}: an HNSW index needs hnswlib and numpy; "
            "pip install 'frys-edge[hnsw]'"
        )


def _bad_value(value: float, position: int) -> str:
    return (
        f"vector[{position}] is {value!r}, outside the float32 range; give finite numbers"
        if math.isfinite(value)
        else f"vector[{position}] is {value!r}; give finite numbers"
    )


def _encode_python(vectors: Sequence[Sequence[float]], spec: _Spec) -> list[tuple[bytes, float]]:
    out = []
    for i, values in enumerate(vectors):
        if len(values) != spec.dim:
            raise _BadVector(
                i, f"vector has {len(values)} numbers but the collection's dim is {spec.dim}"
            )
        rounded = array("f", values)  # float32, as the numpy path stores
        for position, value in enumerate(rounded):
            if not math.isfinite(value):
                raise _BadVector(i, _bad_value(values[position], position))
        floats: Sequence[float] = values
        if spec.metric == "cosine":
            norm = math.sqrt(math.fsum(v * v for v in values))
            if norm == 0.0:
                raise _BadVector(i, "vector is all zeros; cosine needs a direction")
            floats = [v / norm for v in values]
        if spec.dtype == "float32":
            packed = array("f", floats)
            if not _LITTLE:
                packed.byteswap()
            out.append((packed.tobytes(), 1.0))
            continue
        peak = max(abs(v) for v in floats)
        scale = peak / 127.0 if peak else 1.0
        quantised = array("b", (max(-127, min(127, round(v / scale))) for v in floats))
        out.append((quantised.tobytes(), scale))
    return out


def _encode_numpy(vectors: Sequence[Sequence[float]], spec: _Spec) -> list[tuple[bytes, float]]:
    import numpy as np

    for i, values in enumerate(vectors):
        if len(values) != spec.dim:
            raise _BadVector(
                i, f"vector has {len(values)} numbers but the collection's dim is {spec.dim}"
            )
    if not vectors:
        return []
    matrix = np.array(vectors, dtype=np.float64).reshape(len(vectors), spec.dim)
    with np.errstate(over="ignore"):  # overflow is reported below, by position
        bad = ~np.isfinite(matrix.astype(np.float32))
    if bad.any():
        i, position = (int(v) for v in np.argwhere(bad)[0])
        raise _BadVector(i, _bad_value(float(matrix[i, position]), position))
    if spec.metric == "cosine":
        norms = np.sqrt((matrix * matrix).sum(axis=1))
        if not norms.all():
            i = int(np.argmin(norms))
            raise _BadVector(i, "vector is all zeros; cosine needs a direction")
        matrix /= norms[:, None]
    if spec.dtype == "float32":
        rows = matrix.astype("<f4")
        return [(row.tobytes(), 1.0) for row in rows]
    peaks = np.abs(matrix).max(axis=1)
    scales = np.where(peaks > 0, peaks / 127.0, 1.0)
    quantised = np.clip(np.rint(matrix / scales[:, None]), -127, 127).astype(np.int8)
    return [(row.tobytes(), float(s)) for row, s in zip(quantised, scales, strict=True)]


# -- in-memory indexes -----------------------------------------------------------------------


class _Index(abc.ABC):
    """One collection's rows in memory: ids, metadata and vectors in storage's encoding."""

    backend = ""

    def __init__(self, spec: _Spec, options: IndexOptions) -> None:

        self.spec = spec
        self.options = options
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}
        self.metadata: list[dict[str, Any]] = []
        self.searches = 0
        self.graph: Graph | None = None  # the HNSW graph, once loaded or built
        self.building: _Build | None = None  # the graph build under way, if any
        # Committed writes not yet in the graph, in commit order, applied by whoever holds
        # graph_lock; a search that finds either busy searches exactly instead of waiting.
        self.graph_queue: deque[tuple[str, list[str], Any]] = deque()
        self.graph_lock = threading.Lock()

    def put(self, records: Sequence[VectorRecord]) -> None:
        """Insert or replace records; the last of two with one id wins, as in storage."""
        new: dict[str, VectorRecord] = {}
        for record in records:
            i = self.pos.get(record.id)
            if i is None:
                new[record.id] = record
            else:
                self._set_row(i, record.vector, record.scale)
                self.metadata[i] = record.metadata
        if new:
            start = len(self.ids)
            self._append_rows([r.vector for r in new.values()], [r.scale for r in new.values()])
            for offset, record in enumerate(new.values()):
                self.pos[record.id] = start + offset
                self.ids.append(record.id)
                self.metadata.append(record.metadata)

    def remove(self, ids: Iterable[str]) -> None:
        """Remove items by id (the last row moves into the hole); unknown ids are ignored."""
        for item in ids:
            i = self.pos.pop(item, None)
            if i is None:
                continue
            last = len(self.ids) - 1
            if i != last:
                self._move_row(last, i)
                self.ids[i] = self.ids[last]
                self.metadata[i] = self.metadata[last]
                self.pos[self.ids[i]] = i
            self.ids.pop()
            self.metadata.pop()
            self._truncate(last)

    def matching(self, where: Mapping[str, Any]) -> list[int]:
        """Rows whose metadata has every field of `where` with an equal value."""
        pairs = list(where.items())
        return [
            i
            for i, meta in enumerate(self.metadata)
            if all(key in meta and meta[key] == value for key, value in pairs)
        ]

    @abc.abstractmethod
    def top(
        self, query: Sequence[float], k: int, rows: list[int] | None
    ) -> list[tuple[int, float]]:
        """The k nearest rows (of `rows`, or all) as (row, score), nearest first."""

    @abc.abstractmethod
    def memory_bytes(self) -> int: ...

    def reserve(self, capacity: int) -> None:  # noqa: B027 - optional hook, a no-op here
        """Make room for `capacity` rows ahead of a load; only the numpy matrix needs it."""

    @abc.abstractmethod
    def _set_row(self, i: int, blob: bytes, scale: float) -> None: ...

    @abc.abstractmethod
    def _append_rows(self, blobs: list[bytes], scales: list[float]) -> None: ...

    @abc.abstractmethod
    def _move_row(self, src: int, dst: int) -> None: ...

    @abc.abstractmethod
    def _truncate(self, n: int) -> None: ...


class _Build:
    """One graph build under way: the writes to replay on its graph, and whether it is
    still wanted (a drop or a retune cancels it; it stops at its next chunk)."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, list[str], Any]] = []  # (kind, ids, float32 rows)
        self.cancelled = False


class _NumpyIndex(_Index):
    """Rows in one growing numpy matrix; search is a matrix-vector product and argpartition."""

    backend = "numpy"

    def __init__(self, spec: _Spec, options: IndexOptions) -> None:
        import numpy as np

        super().__init__(spec, options)
        self.dtype = np.dtype("<f4") if spec.dtype == "float32" else np.dtype("i1")
        self.n = 0
        self.matrix: Any = np.empty((0, spec.dim), self.dtype)
        self.scales: Any = np.empty(0, np.float32)
        self.sqnorms: Any = np.empty(0, np.float32)  # |row * scale|^2, for l2
        self._block_rows = max(64, INT8_CHUNK_BYTES // (4 * spec.dim))
        self._block: Any = np.empty((0, spec.dim), np.float32)

    def _decode(self, blobs: list[bytes]) -> Any:
        import numpy as np

        return np.frombuffer(b"".join(blobs), self.dtype).reshape(len(blobs), self.spec.dim)

    def floats(self, start: int, stop: int) -> Any:
        """Rows start..stop as a float32 copy (int8 rows times their scales)."""
        import numpy as np

        rows = self.matrix[start:stop].astype(np.float32)
        if self.spec.dtype == "int8":
            rows *= self.scales[start:stop, None]
        return rows

    def floats_of(self, records: Sequence[VectorRecord]) -> Any:
        """Records' vectors as float32 rows, as floats() gives stored rows."""
        import numpy as np

        rows = self._decode([r.vector for r in records]).astype(np.float32)
        if self.spec.dtype == "int8":
            rows *= np.array([r.scale for r in records], np.float32)[:, None]
        return rows

    def _fill(self, start: int, rows: Any, scales: Any) -> None:
        import numpy as np

        stop = start + len(rows)
        self.matrix[start:stop] = rows
        self.scales[start:stop] = scales
        wide = rows.astype(np.float32)
        self.sqnorms[start:stop] = (wide * wide).sum(axis=1) * np.square(self.scales[start:stop])

    def _set_row(self, i: int, blob: bytes, scale: float) -> None:
        self._fill(i, self._decode([blob]), [scale])

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` rows at least (loading reserves the count at once)."""
        import numpy as np

        if capacity <= len(self.matrix):
            return
        for name in ("matrix", "scales", "sqnorms"):
            old = getattr(self, name)
            grown = np.empty((capacity, *old.shape[1:]), old.dtype)
            grown[: self.n] = old[: self.n]
            setattr(self, name, grown)

    def _append_rows(self, blobs: list[bytes], scales: list[float]) -> None:
        need = self.n + len(blobs)
        if need > len(self.matrix):
            self.reserve(max(need, 2 * len(self.matrix), 64))
        self._fill(self.n, self._decode(blobs), scales)
        self.n = need

    def _move_row(self, src: int, dst: int) -> None:
        self.matrix[dst] = self.matrix[src]
        self.scales[dst] = self.scales[src]
        self.sqnorms[dst] = self.sqnorms[src]

    def _truncate(self, n: int) -> None:
        self.n = n

    def memory_bytes(self) -> int:
        arrays = (self.matrix, self.scales, self.sqnorms, self._block)
        return sum(int(a.nbytes) for a in arrays)

    def top(
        self, query: Sequence[float], k: int, rows: list[int] | None
    ) -> list[tuple[int, float]]:
        import numpy as np

        x = np.asarray(query, dtype=np.float32)
        if rows is None:
            matrix, scales, sqnorms = self.matrix[: self.n], self.scales[: self.n], None
            if self.spec.metric == "l2":
                sqnorms = self.sqnorms[: self.n]
        else:
            picked = np.asarray(rows, dtype=np.intp)
            matrix, scales, sqnorms = self.matrix[picked], self.scales[picked], None
            if self.spec.metric == "l2":
                sqnorms = self.sqnorms[picked]
        m = len(matrix)
        if m == 0:
            return []
        if self.spec.dtype == "float32":
            key = matrix @ x
        else:
            # Widened a cache-sized block at a time into one reused buffer: a whole float32
            # copy would undo the memory saving, and a fresh one per block costs page faults.
            step = min(m, self._block_rows)
            if len(self._block) < step:
                self._block = np.empty((step, self.spec.dim), np.float32)
            key = np.empty(m, np.float32)
            for a in range(0, m, step):
                b = min(a + step, m)
                np.copyto(self._block[: b - a], matrix[a:b], casting="unsafe")
                np.dot(self._block[: b - a], x, out=key[a:b])
            key *= scales
        if sqnorms is not None:  # -|r - x|^2 = 2 r.x - |r|^2 - |x|^2: higher is nearer
            key = 2.0 * key - sqnorms - float(x @ x)
        part = np.argpartition(key, m - k)[m - k :] if k < m else np.arange(m)
        order = part[np.argsort(-key[part], kind="stable")]
        best = key[order]
        scores = np.sqrt(np.maximum(-best, 0.0)) if sqnorms is not None else best
        found = order if rows is None else picked[order]
        return list(zip(found.tolist(), scores.tolist(), strict=True))


class _PythonIndex(_Index):
    """Rows as arrays of float32 or int8: the same answers as numpy, without numpy."""

    backend = "python"

    def __init__(self, spec: _Spec, options: IndexOptions) -> None:

        super().__init__(spec, options)
        self.code = "f" if spec.dtype == "float32" else "b"
        self.rows: list[array[Any]] = []
        self.scales: list[float] = []
        self.sqnorms: list[float] = []

    def _decode(self, blob: bytes, scale: float) -> tuple[array[Any], float]:
        row = array(self.code, blob)
        if not _LITTLE and self.code == "f":
            row.byteswap()
        return row, math.fsum(v * v for v in row) * scale * scale

    def _set_row(self, i: int, blob: bytes, scale: float) -> None:
        self.rows[i], self.sqnorms[i] = self._decode(blob, scale)
        self.scales[i] = scale

    def _append_rows(self, blobs: list[bytes], scales: list[float]) -> None:
        for blob, scale in zip(blobs, scales, strict=True):
            row, sqnorm = self._decode(blob, scale)
            self.rows.append(row)
            self.scales.append(scale)
            self.sqnorms.append(sqnorm)

    def _move_row(self, src: int, dst: int) -> None:
        self.rows[dst] = self.rows[src]
        self.scales[dst] = self.scales[src]
        self.sqnorms[dst] = self.sqnorms[src]

    def _truncate(self, n: int) -> None:
        del self.rows[n:], self.scales[n:], self.sqnorms[n:]

    def memory_bytes(self) -> int:
        return sum(sys.getsizeof(row) for row in self.rows) + 16 * len(self.rows)

    def top(
        self, query: Sequence[float], k: int, rows: list[int] | None
    ) -> list[tuple[int, float]]:

        x = array("f", query).tolist()  # float32, as the numpy path computes with
        candidates = range(len(self.rows)) if rows is None else rows
        mul, vectors, scales = operator.mul, self.rows, self.scales
        key = [sum(map(mul, vectors[i], x)) * scales[i] for i in candidates]
        l2 = self.spec.metric == "l2"
        if l2:
            xx = math.fsum(v * v for v in x)
            sq = self.sqnorms
            key = [2.0 * s - sq[i] - xx for s, i in zip(key, candidates, strict=True)]
        best = heapq.nlargest(k, range(len(key)), key=key.__getitem__)
        return [(candidates[j], math.sqrt(max(-key[j], 0.0)) if l2 else key[j]) for j in best]


# -- the store -------------------------------------------------------------------------------


class VectorStore:
    """Durable vector collections with exact or HNSW search; writes go to storage, then to
    memory.

    `use_numpy`: None picks numpy when importable; False forces the pure-Python path.
    `index_dir`: where HNSW graphs are saved (default: `vectors/` in the data dir).
    `background`: may use threads (the runtime does, unless threads = 0): a missing or stale
    graph is built in a background thread when a collection loads, and large writes reach
    the graph in a worker thread while searches stay exact. Otherwise such a collection is
    searched exactly until `build_index()` is called. Methods are safe to call from several
    threads.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        use_numpy: bool | None = None,
        index_dir: Path | None = None,
        background: bool = False,
    ) -> None:
        if use_numpy and not HAVE_NUMPY:
            raise VectorError("use_numpy=True but numpy is not installed; pip install numpy")
        self.storage = storage
        self.use_numpy = HAVE_NUMPY if use_numpy is None else use_numpy
        self.index_dir = storage.data_dir / "vectors" if index_dir is None else index_dir
        self.background = background
        self._indexes: dict[str, _Index] = {}
        self.loads = 0  # collections loaded (or reloaded) from storage into memory
        self.index_builds = 0  # HNSW graphs built (not loaded from their file)
        self._lock = threading.RLock()
        self._builders: set[threading.Thread] = set()
        self._stopping = threading.Event()
        # Writes per collection between their storage call and their update in memory: a
        # graph saved meanwhile would carry a stamp newer than its contents.
        self._writing: dict[str, int] = {}
        self._threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self.embedders: dict[str, Embedder] = {LEXICAL: embed_text}

    def register_embedder(self, name: str, embedder: Embedder) -> None:
        """Let collections created with `embedder=name` embed texts with embedder(text, dim),
        which returns dim numbers (a list or a numpy array). A plugin calls this in init."""
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == LEXICAL:
            raise VectorError(
                f"bad embedder name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
                f"other than {LEXICAL!r}"
            )
        if not callable(embedder):
            raise VectorError(f"embedder {name}: expected a function (text, dim) -> vector")
        self.embedders[name] = embedder

    def create(
        self,
        name: str,
        dim: int,
        metric: str = "cosine",
        dtype: str = "float32",
        index: IndexOptions | None = None,
        embedder: str = LEXICAL,
    ) -> CollectionInfo:
        """Create an empty collection; VectorError if the name is taken or a setting is bad.

        `embedder` names what turns the texts of items and queries into vectors: `lexical`
        (embed_text) or one given to register_embedder (by a plugin, say) before texts come.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise VectorError(
                f"bad collection name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIM:
            raise VectorError(f"collection {name}: dim must be an int from 1 to {MAX_DIM}")
        if metric not in METRICS:
            raise VectorError(f"collection {name}: metric must be one of {', '.join(METRICS)}")
        if dtype not in DTYPES:
            raise VectorError(f"collection {name}: dtype must be one of {', '.join(DTYPES)}")
        if not isinstance(embedder, str) or not _NAME.fullmatch(embedder):
            raise VectorError(f"collection {name}: bad embedder name {embedder!r}")
        options = _Options(index or IndexOptions(), embedder)
        with self._lock:
            if not self.storage.create_vector_collection(
                name, dim, metric, dtype, msgspec.to_builtins(options)
            ):
                old = self._spec(name)
                raise VectorError(
                    f"vector collection {name!r} already exists (dim {old.dim}, {old.metric}, "
                    f"{old.dtype}); drop it first (`frys vector drop {name}`) or pick another name"
                )
            self._indexes.pop(name, None)
        return self.info(name)

    def tune(self, name: str, **changes: Any) -> IndexOptions:
        """Change a collection's index options (kind, m, ef_construction, ef_search).

        A new ef_search applies at once; a new kind, m or ef_construction drops the graph,
        which is built again (in the background with `background`, else by `build_index`).
        """
        unknown = sorted(set(changes) - set(IndexOptions.__struct_fields__))
        if unknown:
            fields = ", ".join(IndexOptions.__struct_fields__)
            raise VectorError(f"collection {name}: unknown index options {unknown}; use {fields}")
        with self._lock:
            record = self.storage.vector_collection(name)
            if record is None:
                raise _unknown(name)
            stored = _options(name, record.options)
            old = stored.index
            raw = {**msgspec.to_builtins(old), **changes}
            new = _options(name, {"index": raw}).index
            updated = msgspec.structs.replace(stored, index=new)
            self.storage.set_vector_options(name, msgspec.to_builtins(updated))
            index = self._indexes.get(name)
            if index is None:
                return new
            index.options = new
            if new.kind == "hnsw" and _same_graph(old, new):
                if index.graph is not None:
                    index.graph.set_ef(new.ef_search)
                return new  # a build under way takes the new ef_search when it lands
            self._drop_graph(name, index)
        if new.kind == "hnsw":
            self._attach(name)
        return new

    def drop(self, name: str) -> None:
        """Delete a collection, all its items and its saved graph."""
        with self._lock:
            if not self.storage.drop_vector_collection(name):
                raise _unknown(name)
            index = self._indexes.pop(name, None)
            if index is not None:
                self._drop_graph(name, index)
            hnsw.remove_files(self.index_dir, name)

    def info(self, name: str) -> CollectionInfo:
        """A collection's settings and item count."""
        index = self._indexes.get(name)
        if index is not None:
            spec, options, count = index.spec, index.options, len(index.ids)
        else:
            record = self._record(name)
            spec, options = _spec(record), _options(name, record.options).index
            count = self.storage.vector_count(name)
        return CollectionInfo(
            spec.name,
            spec.dim,
            spec.metric,
            spec.dtype,
            count,
            spec.created_at,
            options,
            spec.embedder,
        )

    def collections(self) -> list[CollectionInfo]:
        """Every collection, by name."""
        return [self.info(record.name) for record in self.storage.vector_collections()]

    def stats(self, name: str) -> CollectionStats:
        """A collection's size in memory and searches so far (loads it if not loaded yet)."""
        index = self._index(name)
        spec = index.spec
        with self._lock:
            graph = index.graph
            memory = index.memory_bytes() + (graph.memory_bytes() if graph is not None else 0)
            return CollectionStats(
                spec.name,
                spec.dim,
                spec.metric,
                spec.dtype,
                len(index.ids),
                "hnsw" if graph is not None else index.backend,
                memory,
                index.searches,
                index.options,
                self._index_state(index),
                self.index_builds,
            )

    async def upsert(self, name: str, items: Iterable[Mapping[str, Any]]) -> int:
        """Insert or replace items ({id, vector or text, metadata}); returns how many.

        Every item is checked before anything is written: one bad item raises VectorError
        naming it, and nothing is written. A `text` is embedded with `embed_text`.
        """
        spec = self._spec(name)
        records = self._prepare(spec, list(items))
        self._begin_write(name)
        try:
            count = await self.storage.put_vectors(name, records)
            # Into whatever is loaded now: it may have been loaded during the write (then
            # putting the same rows again changes nothing).
            with self._lock:
                index = self._indexes.get(name)
                if index is not None:
                    if index.spec == spec:
                        index.put(records)
                        self._graph_write(index, "put", [r.id for r in records], records)
                    else:  # dropped and created again meanwhile: reload on next use
                        del self._indexes[name]
                        index = None
            if index is not None:
                await self._apply_graph_writes(index, len(records))
        except BaseException as e:
            # A write may commit although its caller was cancelled or the index update
            # failed: forget the in-memory copy so the next search reloads what is stored.
            self._forget(name)
            if isinstance(e, StorageError) and self.storage.vector_collection(name) is None:
                raise _unknown(name) from e
            raise
        finally:
            self._end_write(name)
        return count

    async def delete(self, name: str, ids: Iterable[str]) -> int:
        """Delete items by id; returns how many existed."""
        self._spec(name)
        wanted = list(ids)
        for item in wanted:
            if not isinstance(item, str) or not item:
                raise VectorError(f"collection {name}: ids must be non-empty strings, got {item!r}")
        self._begin_write(name)
        try:
            count = await self.storage.delete_vectors(name, wanted)
            with self._lock:
                index = self._indexes.get(name)
                if index is not None:
                    index.remove(wanted)
                    self._graph_write(index, "remove", wanted, None)
            if index is not None:
                await self._apply_graph_writes(index, len(wanted))
        except BaseException:
            self._forget(name)
            raise
        finally:
            self._end_write(name)
        return count

    def search(
        self,
        name: str,
        vector: Sequence[float] | None = None,
        query: str | None = None,
        k: int = 10,
        filter: Mapping[str, Any] | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        """The k items nearest to `vector`, or to the text `query` embedded with the
        collection's dim, whose metadata equals `filter` field by field; nearest first.

        Through the HNSW graph when the collection has one ready and there is no filter
        (approximate: it may miss a true neighbour), else exactly; `exact` forces exact.
        """
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise VectorError(f"search {name}: k must be an int from 1 to {MAX_K}, got {k!r}")
        if filter is not None and not isinstance(filter, Mapping):
            raise VectorError(
                f"search {name}: filter must be a mapping of metadata fields to values, "
                f"got {type(filter).__name__}"
            )
        if (vector is None) == (query is None):
            raise VectorError(f"search {name}: give exactly one of vector or query")
        index = self._index(name)
        spec = index.spec
        if query is not None:
            if not isinstance(query, str) or len(query) > MAX_TEXT_CHARS:
                raise VectorError(
                    f"search {name}: query must be a string of at most {MAX_TEXT_CHARS} chars"
                )
            values = self._query_vector(spec, self._embed(spec, query))
        else:
            values = self._query_vector(spec, vector)
        with self._lock:
            index.searches += 1
            graph = index.graph
            if (
                graph is not None
                and not filter
                and not exact
                and not index.graph_queue
                and index.graph_lock.acquire(blocking=False)
            ):
                import numpy as np

                try:
                    near = graph.search(np.asarray(values, dtype=np.float32), k)
                finally:
                    index.graph_lock.release()
                if near is not None and all(item in index.pos for item, _ in near):
                    at = [(index.pos[item], score) for item, score in near]
                    return [Hit(index.ids[i], s, dict(index.metadata[i])) for i, s in at]
                if near is not None:
                    log.warning("collection %s: its graph names items it no longer has", name)
                    self._drop_graph(name, index)
                    self._attach(name)
            rows = index.matching(filter) if filter else None
            if rows is not None and not rows:
                return []
            found = index.top(values, k, rows)
            return [Hit(index.ids[i], score, dict(index.metadata[i])) for i, score in found]

    def build_index(
        self, name: str, progress: Callable[[int, int], None] | None = None
    ) -> CollectionStats:
        """Build a collection's HNSW graph now and save it; VectorError if it has none."""
        index = self._index(name)
        if index.options.kind != "hnsw":
            raise VectorError(
                f"collection {name} is searched exactly; give it an index first: "
                f"`frys vector tune {name} --index hnsw`"
            )
        _require_hnswlib(name)
        if not isinstance(index, _NumpyIndex):
            raise VectorError(f"collection {name}: an HNSW index needs numpy; pip install numpy")
        with self._lock:
            if index.building is not None:
                raise VectorError(
                    f"collection {name}: its index is being built already; wait for it "
                    f"(`frys vector stats {name}` shows index_state)"
                )
            build = index.building = _Build()
        self._build(name, index, build, progress)
        return self.stats(name)

    def close(self) -> None:
        """Stop background builds and save every graph changed since it was saved."""
        self._stopping.set()
        for thread in list(self._builders):
            thread.join()
        for name, index in list(self._indexes.items()):
            self._drain_graph_queue(index)
            if index.graph is not None and index.graph.dirty:
                self._save(name, index)

    # -- internals ---------------------------------------------------------------------------

    def _forget(self, name: str) -> None:
        with self._lock:
            index = self._indexes.pop(name, None)
            if index is not None and index.building is not None:
                index.building.cancelled = True

    def _record(self, name: str) -> VectorCollectionRecord:
        if not isinstance(name, str) or not name:
            raise VectorError(f"collection name must be a non-empty string, got {name!r}")
        record = self.storage.vector_collection(name)
        if record is None:
            raise _unknown(name)
        return record

    def _spec(self, name: str) -> _Spec:
        index = self._indexes.get(name)
        if index is not None:
            return index.spec
        return _spec(self._record(name))

    def _index(self, name: str) -> _Index:
        index = self._indexes.get(name)
        if index is not None:
            return index
        with self._lock:
            loaded = self._indexes.get(name)
            if loaded is not None:
                return loaded
            record = self._record(name)
            spec, options = _spec(record), _options(name, record.options).index
            self.loads += 1
            cls = _NumpyIndex if self.use_numpy else _PythonIndex
            fresh = cls(spec, options)
            fresh.reserve(self.storage.vector_count(name))
            after = ""
            while page := self.storage.vectors(name, after=after, limit=LOAD_PAGE):
                fresh.put(page)
                after = page[-1].id
            self._indexes[name] = fresh
        if options.kind == "hnsw":
            self._attach(name)
        return fresh

    def _index_state(self, index: _Index) -> str:
        if index.options.kind != "hnsw":
            return "none"
        if index.graph is not None:
            return "ready"
        if index.building is not None:
            return "building"
        if not HAVE_HNSWLIB:
            return "unavailable: install the hnsw extra (hnswlib and numpy)"
        if not isinstance(index, _NumpyIndex):
            return "unavailable: this store searches without numpy"
        return "not built"

    def _stamp(self, name: str, index: _Index) -> IndexStamp:
        record = self._record(name)
        return IndexStamp(
            name,
            record.created_at,
            record.version,
            record.dim,
            record.metric,
            index.options.m,
            index.options.ef_construction,
        )

    def _attach(self, name: str) -> None:
        """Load the collection's saved graph, or start building one when `background` is set."""
        with self._lock:
            index = self._indexes.get(name)
            if index is None or index.graph is not None or index.building is not None:
                return
            if not (HAVE_HNSWLIB and isinstance(index, _NumpyIndex)):
                log.warning("collection %s: %s; searching exactly", name, self._index_state(index))
                return
            if not self._writing.get(name):
                stamp = self._stamp(name, index)
                found = Graph.load(self.index_dir, stamp, index.options, set(index.pos))
                if isinstance(found, Graph):
                    index.graph = found
                    return
                log.info("collection %s: not using its saved index: %s", name, found)
            if not self.background or self._stopping.is_set():
                return
            build = index.building = _Build()
            thread = threading.Thread(
                target=self._build_in_background, args=(name, index, build), name=f"index {name}"
            )
            self._builders.add(thread)
        thread.start()

    def _build_in_background(self, name: str, index: _Index, build: _Build) -> None:
        try:
            self._build(name, index, build, None)
        except IndexBuildStopped as e:
            log.info("collection %s: %s", name, e)
        except Exception:
            log.exception("collection %s: building its index failed; searching exactly", name)
        finally:
            with self._lock:
                self._builders.discard(threading.current_thread())

    def _build(
        self,
        name: str,
        index: _Index,
        build: _Build,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        """Build a graph over a snapshot of the rows, replay the writes made meanwhile, and
        install and save it unless the build was cancelled."""
        assert isinstance(index, _NumpyIndex)
        try:
            with self._lock:
                ids, rows = list(index.ids), index.floats(0, len(index.ids))
                options = index.options
            started = time.perf_counter()
            graph = hnsw.build(
                index.spec.dim,
                index.spec.metric,
                options,
                ids,
                rows,
                threads=self._threads,
                progress=progress,
                stop=lambda: build.cancelled or self._stopping.is_set(),
            )
            with self._lock:
                if build.cancelled or self._indexes.get(name) is not index:
                    return  # dropped, reloaded or retuned meanwhile: of no use
                for kind, changed, changed_rows in build.pending:
                    if kind == "put":
                        graph.add(changed, changed_rows)
                    else:
                        graph.remove(changed)
                graph.set_ef(index.options.ef_search)
                index.graph = graph
                index.building = None
                self.index_builds += 1
            self._save(name, index)
            log.info(
                "collection %s: built its HNSW index of %d items in %.1f s",
                name,
                len(ids),
                time.perf_counter() - started,
            )
        finally:
            with self._lock:
                if index.building is build:
                    index.building = None

    def _drop_graph(self, name: str, index: _Index) -> None:
        """Forget the collection's graph, cancel its build and delete its saved files."""
        index.graph = None
        if index.building is not None:
            index.building.cancelled = True
            index.building = None
        hnsw.remove_files(self.index_dir, name)

    def _save(self, name: str, index: _Index) -> None:
        """Save the graph, holding its lock but not the store's: searches meanwhile are
        exact, and writes queue up and are applied after. Skipped while a write is between
        storage and memory, since the stamp would claim it."""
        if not index.graph_lock.acquire(blocking=False):
            return  # a write is being applied: saved later, at close at the latest
        try:
            with self._lock:
                graph = index.graph
                if graph is None or self._writing.get(name) or index.graph_queue:
                    stamp = None
                else:
                    stamp = self._stamp(name, index)
            if graph is not None and stamp is not None:
                try:
                    graph.save(self.index_dir, stamp)
                except OSError as e:
                    log.warning("collection %s: could not save its index (%s)", name, e)
        except BaseException:
            index.graph_lock.release()
            raise
        self._drain_held(index)

    def _begin_write(self, name: str) -> None:
        with self._lock:
            self._writing[name] = self._writing.get(name, 0) + 1

    def _end_write(self, name: str) -> None:
        with self._lock:
            left = self._writing[name] - 1
            if left:
                self._writing[name] = left
            else:
                del self._writing[name]

    def _graph_write(
        self, index: _Index, kind: str, ids: list[str], records: Sequence[VectorRecord] | None
    ) -> None:
        """Queue a committed write for the graph, and for a graph being built (call with
        the lock held, right after the write reached the rows, so the order is commit order)."""
        if index.graph is None and index.building is None:
            return
        assert isinstance(index, _NumpyIndex)
        rows = index.floats_of(records) if records is not None else None
        if index.building is not None:
            index.building.pending.append((kind, ids, rows))
        if index.graph is not None:
            index.graph_queue.append((kind, ids, rows))

    async def _apply_graph_writes(self, index: _Index, size: int) -> None:
        """Apply queued writes to the graph: a large one in a worker thread when `background`
        is set, so the event loop keeps serving (searches meanwhile are exact)."""
        if not index.graph_queue:
            return
        if self.background and size >= BIG_WRITE:
            await anyio.to_thread.run_sync(self._drain_graph_queue, index)
        else:
            # Never wait on the loop: if another caller is applying writes, it applies
            # this one too before it lets go (see _drain_graph_queue).
            self._drain_graph_queue(index, blocking=False)

    def _drain_graph_queue(self, index: _Index, blocking: bool = True) -> None:
        """Apply queued writes until none is left. The lock is let go only with the queue
        seen empty under the store's lock, so a write queued meanwhile is never stranded."""
        if index.graph_lock.acquire(blocking=blocking):
            self._drain_held(index)

    def _drain_held(self, index: _Index) -> None:
        """Apply queued writes with graph_lock held, then let it go (see _drain_graph_queue)."""
        try:
            while True:
                with self._lock:
                    if not index.graph_queue:
                        index.graph_lock.release()
                        return
                    kind, ids, rows = index.graph_queue.popleft()
                    graph = index.graph
                if graph is None:  # dropped meanwhile; a new graph is built from the rows
                    continue
                if kind == "put":
                    graph.add(ids, rows, threads=self._threads if len(ids) >= BIG_WRITE else 1)
                else:
                    graph.remove(ids)
        except BaseException:
            index.graph_lock.release()
            raise

    def _embed(self, spec: _Spec, text: str) -> list[float]:
        """The collection's embedder applied to text, checked to be spec.dim numbers."""
        embedder = self.embedders.get(spec.embedder)
        if embedder is None:
            known = ", ".join(sorted(self.embedders))
            raise VectorError(
                f"collection {spec.name} embeds texts with {spec.embedder!r}, which is not "
                f"registered here (registered: {known}); load the plugin that registers it "
                "(`frys run` with it in [plugins] native), or give vectors instead of text"
            )
        try:
            vector = embedder(text, spec.dim)
            if hasattr(vector, "tolist"):  # a numpy array, without importing numpy to ask
                vector = vector.tolist()
            values = msgspec.convert(vector, list[float])
        except VectorError:
            raise
        except msgspec.ValidationError as e:
            raise VectorError(f"embedder {spec.embedder} returned no list of numbers: {e}") from e
        except Exception as e:
            raise VectorError(f"embedder {spec.embedder} failed on {text[:40]!r}: {e!r}") from e
        if len(values) != spec.dim:
            raise VectorError(
                f"embedder {spec.embedder} returned {len(values)} numbers for collection "
                f"{spec.name} of dim {spec.dim}"
            )
        return values

    def _query_vector(self, spec: _Spec, vector: Any) -> list[float]:
        if hasattr(vector, "tolist"):  # a numpy array, without importing numpy to ask
            vector = vector.tolist()
        try:
            values = msgspec.convert(vector, list[float])
        except msgspec.ValidationError as e:
            raise VectorError(f"search {spec.name}: vector must be a list of numbers: {e}") from e
        try:
            _encode_python(
                [values], _Spec(spec.name, spec.dim, "dot", "float32", 0.0, spec.embedder)
            )
        except _BadVector as e:
            raise VectorError(f"search {spec.name}: {e.reason}") from None
        if spec.metric == "cosine":
            norm = math.sqrt(math.fsum(v * v for v in values))
            if norm == 0.0:
                raise VectorError(f"search {spec.name}: vector is all zeros; cosine needs one")
            values = [v / norm for v in values]
        return values

    def _prepare(self, spec: _Spec, raw: list[Mapping[str, Any]]) -> list[VectorRecord]:
        # Bounded by numbers, not items: 1M items of 4,096 floats would be 16 GB.
        limit = min(MAX_ITEMS_PER_UPSERT, MAX_FLOATS_PER_UPSERT // spec.dim)
        if len(raw) > limit:
            raise VectorError(
                f"collection {spec.name}: {len(raw)} items in one upsert, over the limit of "
                f"{limit} at dim {spec.dim}; split them"
            )
        items: list[_Item] = []
        vectors: list[Sequence[float]] = []
        for i, entry in enumerate(raw):
            try:
                item = msgspec.convert(entry, _Item)
                if (item.vector is None) == (item.text is None):
                    raise ValueError("give exactly one of vector or text")
                if item.metadata is None:
                    item.metadata = {}
                if len(msgspec.json.encode(item.metadata)) > MAX_METADATA_BYTES:
                    raise ValueError(f"metadata is over {MAX_METADATA_BYTES} bytes as JSON")
                vector = item.vector
                if vector is None:
                    assert item.text is not None
                    vector = self._embed(spec, item.text)
            except (msgspec.ValidationError, msgspec.EncodeError, ValueError, VectorError) as e:
                raise self._bad_item(spec, raw, i, str(e)) from None
            items.append(item)
            vectors.append(vector)
        encode = _encode_numpy if self.use_numpy else _encode_python
        try:
            encoded = encode(vectors, spec)
        except _BadVector as e:
            raise self._bad_item(spec, raw, e.index, e.reason) from None
        return [
            VectorRecord(item.id, blob, scale, item.metadata)
            for item, (blob, scale) in zip(items, encoded, strict=True)
        ]

    @staticmethod
    def _bad_item(spec: _Spec, raw: list[Mapping[str, Any]], i: int, reason: str) -> VectorError:
        entry = raw[i]
        label = f" (id {entry.get('id')!r})" if isinstance(entry, Mapping) else ""
        return VectorError(
            f"collection {spec.name}: item {i}{label}: {reason}; nothing was written",
            item=i,
            reason=reason,
        )


# -- workflow actions ------------------------------------------------------------------------


def _store(ctx: ActionContext, action: str) -> VectorStore:
    store = getattr(ctx.rt, "vectors", None)
    if not isinstance(store, VectorStore):
        raise VectorError(f"action {action}: this runtime has no vector store")
    return store


def hit_document(hit: Hit) -> dict[str, Any]:
    """The JSON shape of a hit, shared by the action and `frys vector search --json`."""
    return {"id": hit.id, "score": hit.score, "metadata": hit.metadata}


def track_collection(store: VectorStore, metrics: Metrics, name: str) -> None:
    """Expose a collection's size as the gauge vector_items{collection}."""
    metrics.gauge(
        "vector_items",
        "Items per vector collection",
        lambda: float(store.stats(name).count),
        {"collection": name},
    )


async def _vector_search(ctx: ActionContext, params: dict[str, Any]) -> Any:
    """Search a collection (default `default`) by `query` text or `vector`; top `k` hits."""
    store = _store(ctx, "vector_search")
    name = str(params.get("collection", DEFAULT_COLLECTION))
    started = time.perf_counter()
    hits = store.search(
        name,
        vector=params.get("vector"),
        query=params.get("query"),
        k=params.get("k", 10),
        filter=params.get("filter"),
    )
    metrics, labels = ctx.rt.metrics, {"collection": name}
    metrics.counter("vector_searches_total", "Vector searches", labels).inc()
    metrics.histogram("vector_search_seconds", "Vector search time", labels).observe(
        time.perf_counter() - started
    )
    track_collection(store, metrics, name)
    return {"hits": [hit_document(hit) for hit in hits]}


async def _vector_upsert(ctx: ActionContext, params: dict[str, Any]) -> Any:
    """Insert or replace `items` ({id, vector or text, metadata}) in a collection."""
    items = params.get("items")
    if not isinstance(items, list):
        raise VectorError("action vector.upsert: items must be a list of {id, vector|text}")
    name = str(params.get("collection", DEFAULT_COLLECTION))
    return {"upserted": await _store(ctx, "vector.upsert").upsert(name, items)}


async def _vector_delete(ctx: ActionContext, params: dict[str, Any]) -> Any:
    """Delete items of a collection by `ids`."""
    ids = params.get("ids")
    if not isinstance(ids, list):
        raise VectorError("action vector.delete: ids must be a list of strings")
    name = str(params.get("collection", DEFAULT_COLLECTION))
    return {"deleted": await _store(ctx, "vector.delete").delete(name, ids)}


VECTOR_ACTIONS: dict[str, Action] = {
    "vector_search": _vector_search,
    "vector.upsert": _vector_upsert,
    "vector.delete": _vector_delete,
}
