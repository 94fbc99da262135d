"""Storage: the only module that speaks SQL; one SQLite file in WAL mode under the data dir.

It owns the key-value store, the append-only event log, the records of workflow runs and
their steps, schema migrations, the data-dir lock, group commit and backups. It does not know
how workflows run or what plugins are; callers hand it plain values that msgspec can encode
as JSON. Reads and `write` work from any thread; the
async writes group-commit on the running asyncio loop (anyio's asyncio backend, or Pyodide's).
With `background=False` it starts no thread at all (Pyodide cannot): commits at every sync
level and WAL checkpoints then run inline on the caller's thread.

Durability contract (also in the README):
- ``sync="full"``: ``synchronous=FULL``. A write whose call returned survives power loss.
- ``sync="normal"``: ``synchronous=NORMAL``. A write whose call returned survives a crash or
  kill of the process; on power loss the last few transactions may be lost, never half of one.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import msgspec

from frys_edge.core import FrysError, Pool

DB_FILE = "frys.db"
LOCK_FILE = "frys.lock"
MAX_BATCH = 2000
CHECKPOINT_WRITES = 1000
CHECKPOINT_SECONDS = 5.0

log = logging.getLogger("frys.storage")

# Each entry upgrades the schema by one version; PRAGMA user_version records where a file is.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE kv (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        version INTEGER NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload TEXT NOT NULL,
        ts REAL NOT NULL
    );
    CREATE INDEX events_topic ON events (topic, seq);
    """,
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        status TEXT NOT NULL,
        definition TEXT NOT NULL,
        inputs TEXT NOT NULL,
        outputs TEXT,
        error TEXT,
        idempotency_key TEXT UNIQUE,
        parent_run TEXT,
        created_at REAL NOT NULL,
        finished_at REAL,
        deadline REAL
    );
    CREATE INDEX runs_status ON runs (status, created_at);
    CREATE TABLE steps (
        run_id TEXT NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        output TEXT,
        error TEXT,
        started_at REAL,
        finished_at REAL,
        wake_at REAL,
        PRIMARY KEY (run_id, name)
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE step_attempts (
        run_id TEXT NOT NULL,
        step TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        started_at REAL,
        finished_at REAL,
        PRIMARY KEY (run_id, step, attempt)
    ) WITHOUT ROWID;
    """,
    # Vector collections and their items; a vector is a little-endian blob of its dtype
    # (float32, or int8 times `scale`); metadata is JSON text.
    """
    CREATE TABLE vector_collections (
        name TEXT PRIMARY KEY,
        dim INTEGER NOT NULL,
        metric TEXT NOT NULL,
        dtype TEXT NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE vectors (
        collection TEXT NOT NULL,
        id TEXT NOT NULL,
        vector BLOB NOT NULL,
        scale REAL NOT NULL,
        metadata TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (collection, id)
    ) WITHOUT ROWID;
    """,
    # A collection's index settings (JSON), and a counter bumped by every write to its items
    # in the same transaction, so a saved index file can tell whether it is stale.
    """
    ALTER TABLE vector_collections ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE vector_collections ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
    """,
)
RUN_COLUMNS = (
    "id, workflow, status, definition, inputs, outputs, error, idempotency_key, parent_run,"
    " created_at, finished_at, deadline"
)
STEP_COLUMNS = "name, status, attempts, output, error, started_at, finished_at, wake_at"
VECTOR_COLLECTION_COLUMNS = "name, dim, metric, dtype, created_at, options, version"
UNFINISHED = ("running",)

Sync = Literal["normal", "full"]
# A write operation: ("put", ns, key, json, now) | ("cas", ns, key, json, now, expected)
# | ("delete", ns, key) | ("append", topic, json, now) | ("trim", up_to_seq).
# Tuples keep the hot path cheap.
Op = tuple[Any, ...]


class StorageError(FrysError):
    """Something went wrong with the data dir or its SQLite file."""


class InvalidValue(StorageError):
    """A caller handed storage something it cannot store (a bad name, a non-JSON value)."""


class DataDirLocked(StorageError):
    """Another process holds the data dir."""


class VersionConflict(StorageError):
    """A compare-and-set found another version than the one expected."""

    def __init__(self, namespace: str, key: str, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        state = "does not exist" if actual == 0 else f"is at version {actual}"
        super().__init__(
            f"kv {namespace}/{key}: expected version {expected} but it {state}; "
            "read it again and retry"
        )


class Entry(msgspec.Struct, frozen=True):
    """One key-value item."""

    namespace: str
    key: str
    value: Any
    version: int
    updated_at: float


class Event(msgspec.Struct, frozen=True):
    """One record of the durable event log."""

    seq: int
    topic: str
    payload: Any
    ts: float


class RunRecord(msgspec.Struct, frozen=True):
    """One workflow run as stored; `definition` is the workflow it runs, as JSON text."""

    id: str
    workflow: str
    status: str
    definition: str
    inputs: Any
    outputs: Any
    error: str | None
    idempotency_key: str | None
    parent_run: str | None
    created_at: float
    finished_at: float | None
    deadline: float | None


class AttemptRecord(msgspec.Struct, frozen=True):
    """One failed attempt of a step, with its error."""

    step: str
    attempt: int
    status: str
    error: str | None
    started_at: float | None
    finished_at: float | None


class StepRecord(msgspec.Struct, frozen=True):
    """The latest state of one step of a run."""

    name: str
    status: str
    attempts: int
    output: Any
    error: str | None
    started_at: float | None
    finished_at: float | None
    wake_at: float | None


class VectorCollectionRecord(msgspec.Struct, frozen=True):
    """One vector collection as stored: its name, dimension, metric, stored dtype, index
    options, and `version`, which every committed write to its items increments."""

    name: str
    dim: int
    metric: str
    dtype: str
    created_at: float
    options: dict[str, Any]
    version: int


class VectorRecord(msgspec.Struct, frozen=True):
    """One item of a vector collection: `vector` is the encoded blob, `scale` its factor."""

    id: str
    vector: bytes
    scale: float
    metadata: Any


def _run_record(row: Sequence[Any]) -> RunRecord:
    outputs = None if row[5] is None else _decode(row[5])
    return RunRecord(row[0], row[1], row[2], row[3], _decode(row[4]), outputs, *row[6:])


def _step_record(row: Sequence[Any]) -> StepRecord:
    output = None if row[3] is None else _decode(row[3])
    return StepRecord(row[0], row[1], row[2], output, *row[4:])


_encode = msgspec.json.encode
_decode = msgspec.json.decode


def _vector_collection_record(row: Sequence[Any]) -> VectorCollectionRecord:
    name, dim, metric, dtype, created_at, options, version = row
    return VectorCollectionRecord(name, dim, metric, dtype, created_at, _decode(options), version)


def encode_value(value: Any, where: str) -> str:
    """Encode a value as the JSON text stored in a column; `where` names it in errors."""
    try:
        return _encode(value).decode()
    except (TypeError, msgspec.EncodeError) as e:
        raise InvalidValue(
            f"{where}: cannot store a value of type {type(value).__name__} ({e}); store "
            "JSON-able values: dict, list, str, int, float, bool or None"
        ) from e


def _check_name(what: str, value: object) -> None:
    # Checked before queuing, so one caller's bad argument never fails a shared commit.
    if not isinstance(value, str) or not value:
        raise InvalidValue(f"{what} must be a non-empty string, got {value!r}")


def describe_error(path: Path, err: sqlite3.Error, doing: str) -> StorageError:
    """Turn a sqlite3 error into a StorageError that says what happened and what to do."""
    code = getattr(err, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return StorageError(
            f"{path}: disk full while {doing} (SQLITE_FULL); free space on the device or "
            "raise [storage] max_size if it is set; the write was not applied"
        )
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StorageError(
            f"{path}: the database file is corrupt ({err}) while {doing}; refusing to use it. "
            "Run `frys db check` to see the damage and restore the file from a backup "
            "(`frys db backup` makes them)"
        )
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StorageError(
            f"{path}: database is locked by another connection while {doing} (waited "
            "[storage] busy_timeout); a program outside frys (a sqlite3 shell, a backup tool) "
            "holds a write transaction on it. Close it, or raise [storage] busy_timeout"
        )
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return StorageError(
            f"{path}: cannot write ({err}) while {doing}; make the data dir and its files "
            "writable by this user, or point [system] data_dir elsewhere"
        )
    return StorageError(f"{path}: SQLite error while {doing}: {err}")


class Storage:
    """The data dir's SQLite database: one writer connection, pooled readers."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        sync: Sync = "normal",
        busy_timeout: float = 5.0,
        readers: int = 4,
        max_size: int | None = None,
        cache_kib: int = 2048,
        readonly: bool = False,
        background: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_FILE
        self.sync = sync
        self.busy_timeout = busy_timeout
        self.readonly = readonly
        self.cache_kib = cache_kib
        self.background = background
        # Called after every commit (on the committing thread); the Pyodide loader uses it to
        # copy the data dir to IndexedDB. An error it raises is logged, the commit stands.
        self.on_commit: Callable[[], None] | None = None
        self.commits = 0
        self.writes = 0
        self._lock_fd: int | None = None
        self._writer: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._flush_queued = False
        self._gathering = False
        self._writer_thread: ThreadPoolExecutor | None = None
        self.checkpoints = 0
        self._since_checkpoint = 0
        self._checkpoint_wanted = threading.Event()
        self._closing = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="frys-checkpoint", daemon=True
        )
        self._readers: Pool = Pool(
            self._connect_reader, readers, name="sqlite-readers", close=_close_connection
        )
        self._open(max_size)

    # -- opening and closing ------------------------------------------------------------

    def _open(self, max_size: int | None) -> None:
        if self.readonly:
            if not self.path.exists():
                raise StorageError(
                    f"{self.path}: no database here yet; check [system] data_dir or "
                    "FRYS_SYSTEM_DATA_DIR, or start `frys run` once to create it"
                )
            return
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"{self.data_dir}: cannot create the data dir ({e.strerror}); create it or "
                "point [system] data_dir elsewhere"
            ) from e
        self._take_lock()
        try:
            self._writer = self._connect(self.path)
            self._configure_writer(max_size)
            self._migrate()
            if self.background:
                self._checkpointer.start()
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> None:
        lock_path = self.data_dir / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(
                f"{lock_path}: cannot open the lock file ({e.strerror}); make the data dir "
                "writable by this user, or point [system] data_dir elsewhere"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            who = (
                "this process already has it open; close that Storage first"
                if holder == str(os.getpid())
                else f"another frys process (pid {holder}) has it open; stop it first"
            )
            raise DataDirLocked(
                f"{self.data_dir}: data dir is in use: {who}, or give this one another "
                "[system] data_dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as e:
            os.close(fd)
            raise StorageError(
                f"{lock_path}: cannot write the lock file ({e.strerror}); free space on the "
                "device or point [system] data_dir elsewhere"
            ) from e
        self._lock_fd = fd

    def _connect(self, target: str | Path, uri: bool = False) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                target,
                isolation_level=None,
                check_same_thread=False,
                timeout=self.busy_timeout,
                uri=uri,
            )
        except sqlite3.Error as e:
            raise describe_error(self.path, e, "opening the database") from e
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = self._connect(f"file:{self.path}?mode=ro", uri=True)
        conn.execute("PRAGMA query_only = ON")
        conn.execute(f"PRAGMA cache_size = -{self.cache_kib}")
        return conn

    def _configure_writer(self, max_size: int | None) -> None:
        w = self._writer
        assert w is not None
        try:
            mode = w.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StorageError(
                    f"{self.path}: SQLite refused WAL mode (got {mode!r}); the file system "
                    "may not support shared memory; use a local disk for the data dir"
                )
            w.execute(f"PRAGMA synchronous = {self.sync.upper()}")
            w.execute(f"PRAGMA cache_size = -{self.cache_kib}")
            # Checkpoints fsync; the checkpointer thread runs them so commits never do.
            w.execute("PRAGMA wal_autocheckpoint = 0")
            if max_size is not None:
                page_size = w.execute("PRAGMA page_size").fetchone()[0]
                w.execute(f"PRAGMA max_page_count = {max(1, max_size // page_size)}")
        except sqlite3.Error as e:
            raise describe_error(self.path, e, "opening the database") from e

    def _migrate(self) -> None:
        w = self._writer
        assert w is not None
        try:
            current = w.execute("PRAGMA user_version").fetchone()[0]
            if current > len(MIGRATIONS):
                raise StorageError(
                    f"{self.path}: schema version {current} is newer than this frys "
                    f"understands ({len(MIGRATIONS)}); upgrade frys or restore an older backup"
                )
            for version in range(current, len(MIGRATIONS)):
                # executescript commits whatever is open, so the transaction is in the script.
                w.executescript(
                    f"BEGIN IMMEDIATE; {MIGRATIONS[version]}"
                    f" PRAGMA user_version = {version + 1}; COMMIT;"
                )
        except sqlite3.Error as e:
            if w.in_transaction:
                w.execute("ROLLBACK")
            raise describe_error(self.path, e, "reading the schema") from e

    def set_sync(self, sync: Sync) -> None:
        """Change the durability level of later commits."""
        with self._write_lock:
            if self._writer is not None:
                self._writer.execute(f"PRAGMA synchronous = {sync.upper()}")
            self.sync = sync

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database file after many writes, or every few seconds."""
        conn: sqlite3.Connection | None = None
        while not self._closing.is_set():
            self._checkpoint_wanted.wait(CHECKPOINT_SECONDS)
            self._checkpoint_wanted.clear()
            if self._closing.is_set():
                break
            try:
                if conn is None:
                    conn = self._connect(self.path)
            except StorageError as e:
                self._since_checkpoint = 0  # retried on the timer, not at every write
                log.warning("checkpointing the WAL failed, will retry: %s", e)
                continue
            self._checkpoint(conn)
        if conn is not None:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        self._since_checkpoint = 0
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.checkpoints += 1
        except sqlite3.Error as e:
            # The next round retries; until then the WAL keeps the data safe.
            err = describe_error(self.path, e, "checkpointing")
            log.warning("checkpointing the WAL failed, will retry: %s", err)

    def close(self) -> None:
        """Fold the WAL into the database, close every connection, release the lock."""
        self._closing.set()
        if self._writer_thread is not None:
            self._writer_thread.shutdown(wait=True)
            self._writer_thread = None
        self._readers.close_all()
        if self._writer is not None:
            with self._write_lock:
                writer, self._writer = self._writer, None
            self._checkpoint_wanted.set()
            if self._checkpointer.is_alive():
                self._checkpointer.join()
            try:
                writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("%s", describe_error(self.path, e, "checkpointing at close"))
            writer.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads (any thread) -------------------------------------------------------------

    @contextmanager
    def _reader(self, doing: str) -> Iterator[sqlite3.Connection]:
        try:
            with self._readers.item(timeout=self.busy_timeout) as conn:
                yield conn
        except sqlite3.Error as e:
            raise describe_error(self.path, e, doing) from e

    def get(self, namespace: str, key: str) -> Entry | None:
        """Return the entry at namespace/key, or None."""
        with self._reader("reading kv") as conn:
            row = conn.execute(
                "SELECT value, version, updated_at FROM kv WHERE namespace = ? AND key = ?",
                (namespace, key),
            ).fetchone()
        if row is None:
            return None
        return Entry(namespace, key, _decode(row[0]), row[1], row[2])

    def list_prefix(
        self, namespace: str, prefix: str = "", *, after: str = "", limit: int = 1000
    ) -> list[Entry]:
        """Entries whose key starts with prefix, in key order, after the key `after`."""
        # Range scan on the primary key; the upper bound is the prefix with its last char bumped.
        lower = max(prefix, after)
        sql = (
            "SELECT key, value, version, updated_at FROM kv WHERE namespace = ? AND key >= ?"
            " AND key > ?"
        )
        args: list[Any] = [namespace, lower, after]
        if prefix and ord(prefix[-1]) < sys.maxunicode:  # U+10FFFF has no successor
            sql += " AND key < ?"
            args.append(prefix[:-1] + chr(ord(prefix[-1]) + 1))
        elif prefix:
            sql += " AND substr(key, 1, ?) = ?"
            args += [len(prefix), prefix]
        sql += " ORDER BY key LIMIT ?"
        args.append(limit)
        with self._reader("listing kv") as conn:
            rows = conn.execute(sql, args).fetchall()
        return [Entry(namespace, r[0], _decode(r[1]), r[2], r[3]) for r in rows]

    def events(self, after: int = 0, *, topic: str | None = None, limit: int = 1000) -> list[Event]:
        """Events with a sequence number above `after`, oldest first."""
        sql = "SELECT seq, topic, payload, ts FROM events WHERE seq > ?"
        args: list[Any] = [after]
        if topic is not None:
            sql += " AND topic = ?"
            args.append(topic)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        with self._reader("reading events") as conn:
            rows = conn.execute(sql, args).fetchall()
        return [Event(r[0], r[1], _decode(r[2]), r[3]) for r in rows]

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id, or None."""
        with self._reader("reading a run") as conn:
            row = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else _run_record(row)

    def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        parent_run: str | None = None,
        before: str | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        """Runs, newest first, optionally of one status, workflow and/or parent run, and
        only those listed after the run `before` (page on with the last id of a page)."""
        sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE 1 = 1"
        args: list[Any] = []
        if before is not None:
            sql += " AND (created_at, id) < (SELECT created_at, id FROM runs WHERE id = ?)"
            args.append(before)
        if parent_run is not None:
            sql += " AND parent_run = ?"
            args.append(parent_run)
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        if workflow is not None:
            sql += " AND workflow = ?"
            args.append(workflow)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._reader("listing runs") as conn:
            return [_run_record(row) for row in conn.execute(sql, args).fetchall()]

    def unfinished_runs(self) -> list[RunRecord]:
        """Every run that has not reached a final status, oldest first."""
        marks = ", ".join("?" * len(UNFINISHED))
        sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE status IN ({marks}) ORDER BY created_at"
        with self._reader("listing unfinished runs") as conn:
            return [_run_record(row) for row in conn.execute(sql, UNFINISHED).fetchall()]

    def run_steps(self, run_id: str) -> list[StepRecord]:
        """The recorded state of each step of a run that has one."""
        sql = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY started_at, name"
        with self._reader("reading steps") as conn:
            return [_step_record(row) for row in conn.execute(sql, (run_id,)).fetchall()]

    def run_attempts(self, run_id: str) -> list[AttemptRecord]:
        """Every failed attempt of every step of a run, in the order they ended."""
        sql = (
            "SELECT step, attempt, status, error, started_at, finished_at FROM step_attempts"
            " WHERE run_id = ? ORDER BY finished_at, step, attempt"
        )
        with self._reader("reading step attempts") as conn:
            return [AttemptRecord(*row) for row in conn.execute(sql, (run_id,)).fetchall()]

    def last_seq(self) -> int:
        """The sequence number of the newest event, 0 when the log is empty."""
        with self._reader("reading events") as conn:
            row = conn.execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0] or 0)

    def vector_collection(self, name: str) -> VectorCollectionRecord | None:
        """The vector collection with this name, or None."""
        sql = f"SELECT {VECTOR_COLLECTION_COLUMNS} FROM vector_collections WHERE name = ?"
        with self._reader("reading a vector collection") as conn:
            row = conn.execute(sql, (name,)).fetchone()
        return None if row is None else _vector_collection_record(row)

    def vector_collections(self) -> list[VectorCollectionRecord]:
        """Every vector collection, by name."""
        sql = f"SELECT {VECTOR_COLLECTION_COLUMNS} FROM vector_collections ORDER BY name"
        with self._reader("listing vector collections") as conn:
            return [_vector_collection_record(row) for row in conn.execute(sql).fetchall()]

    def vector_count(self, collection: str) -> int:
        """How many items a vector collection holds."""
        sql = "SELECT count(*) FROM vectors WHERE collection = ?"
        with self._reader("counting vectors") as conn:
            return int(conn.execute(sql, (collection,)).fetchone()[0])

    def vectors(
        self, collection: str, *, after: str = "", limit: int = 10000
    ) -> list[VectorRecord]:
        """Items of a collection in id order, after the id `after` (page with the last id)."""
        sql = (
            "SELECT id, vector, scale, metadata FROM vectors WHERE collection = ? AND id > ?"
            " ORDER BY id LIMIT ?"
        )
        with self._reader("reading vectors") as conn:
            rows = conn.execute(sql, (collection, after, limit)).fetchall()
        return [VectorRecord(r[0], r[1], r[2], _decode(r[3])) for r in rows]

    def stats(self) -> dict[str, Any]:
        """Counters and pool state for metrics and health."""
        return {
            "path": str(self.path),
            "sync": self.sync,
            "commits": self.commits,
            "writes": self.writes,
            "checkpoints": self.checkpoints,
            "readers": self._readers.stats(),
        }

    # -- writes (any thread; one transaction per call) -----------------------------------

    def write(self, ops: Sequence[Op]) -> list[Any]:
        """Apply ops in one transaction and return one result per op.

        Results: put -> new version; cas -> (applied, version now stored, 0 when missing);
        delete -> whether it existed; append -> the event's sequence number; trim -> count.
        """
        with self._write_lock:
            w = self._writer
            if w is None:
                state = "opened read-only" if self.readonly else "closed"
                raise StorageError(f"{self.path}: cannot write, this Storage is {state}")
            try:
                w.execute("BEGIN IMMEDIATE")
                results = [self._apply(w, op) for op in ops]
                w.execute("COMMIT")
            except BaseException as e:
                if w.in_transaction:
                    w.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise describe_error(self.path, e, "writing") from e
                if isinstance(e, Exception) and not isinstance(e, StorageError):
                    raise StorageError(f"{self.path}: write failed, rolled back: {e!r}") from e
                raise
            self.commits += 1
            self.writes += len(ops)
            self._since_checkpoint += len(ops)
            if self._since_checkpoint >= CHECKPOINT_WRITES:
                if self.background:
                    self._checkpoint_wanted.set()
                else:
                    self._checkpoint(w)
            if self.on_commit is not None:
                try:
                    self.on_commit()
                except Exception as e:
                    log.error("%s: on_commit hook failed after a commit: %r", self.path, e)
            return results

    @staticmethod
    def _apply(w: sqlite3.Connection, op: Op) -> Any:
        kind = op[0]
        if kind == "put":
            return w.execute(
                "INSERT INTO kv (namespace, key, value, version, updated_at)"
                " VALUES (?, ?, ?, 1, ?) ON CONFLICT (namespace, key) DO UPDATE SET"
                " value = excluded.value, version = kv.version + 1,"
                " updated_at = excluded.updated_at RETURNING version",
                op[1:5],
            ).fetchone()[0]
        if kind == "append":
            return w.execute(
                "INSERT INTO events (topic, payload, ts) VALUES (?, ?, ?) RETURNING seq", op[1:4]
            ).fetchone()[0]
        if kind == "delete":
            return w.execute("DELETE FROM kv WHERE namespace = ? AND key = ?", op[1:3]).rowcount > 0
        if kind == "cas":
            return Storage._cas(w, op)
        if kind == "step":
            w.execute(
                "INSERT OR REPLACE INTO steps (run_id, name, status, attempts, output, error,"
                " started_at, finished_at, wake_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                op[1:10],
            )
            if op[10] is not None:
                w.execute(
                    "INSERT OR REPLACE INTO step_attempts (run_id, step, attempt, status, error,"
                    " started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (op[1], op[2], *op[10]),
                )
            return None
        if kind == "run_new":
            return Storage._new_run(w, op)
        if kind == "run_end":
            marks = ", ".join("?" * len(UNFINISHED))
            return (
                w.execute(
                    "UPDATE runs SET status = ?, outputs = ?, error = ?, finished_at = ?"
                    f" WHERE id = ? AND status IN ({marks})",
                    (*op[2:], op[1], *UNFINISHED),
                ).rowcount
                > 0
            )
        if kind == "trim":
            return w.execute("DELETE FROM events WHERE seq <= ?", (op[1],)).rowcount
        if kind == "vcol_new":
            row = w.execute(
                "INSERT INTO vector_collections (name, dim, metric, dtype, created_at, options)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING name",
                op[1:7],
            ).fetchone()
            return row is not None
        if kind == "vcol_options":
            return (
                w.execute(
                    "UPDATE vector_collections SET options = ? WHERE name = ?", (op[2], op[1])
                ).rowcount
                > 0
            )
        if kind == "vcol_drop":
            w.execute("DELETE FROM vectors WHERE collection = ?", (op[1],))
            return w.execute("DELETE FROM vector_collections WHERE name = ?", (op[1],)).rowcount > 0
        if kind == "vput":
            # A missing collection is this op's result, not an error: raising would roll back
            # the other callers' ops sharing the group commit.
            if not Storage._bump_vector_version(w, op[1]):
                return None
            w.executemany(
                "INSERT OR REPLACE INTO vectors (collection, id, vector, scale, metadata,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(op[1], *row, op[3]) for row in op[2]],
            )
            return len(op[2])
        if kind == "vdel":
            Storage._bump_vector_version(w, op[1])
            return w.executemany(
                "DELETE FROM vectors WHERE collection = ? AND id = ?",
                [(op[1], item) for item in op[2]],
            ).rowcount
        raise StorageError(f"unknown storage operation {kind!r}")

    @staticmethod
    def _bump_vector_version(w: sqlite3.Connection, collection: str) -> bool:
        """Count one more write to the collection's items; False if it does not exist."""
        sql = "UPDATE vector_collections SET version = version + 1 WHERE name = ?"
        return w.execute(sql, (collection,)).rowcount > 0

    @staticmethod
    def _new_run(w: sqlite3.Connection, op: Op) -> tuple[bool, str]:
        row = w.execute(
            f"INSERT INTO runs ({RUN_COLUMNS}) VALUES (?, ?, 'running', ?, ?, NULL, NULL, ?, ?,"
            " ?, NULL, ?) ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
            op[1:],
        ).fetchone()
        if row is not None:
            return True, row[0]
        existing = w.execute("SELECT id FROM runs WHERE idempotency_key = ?", (op[5],)).fetchone()
        return False, existing[0]

    @staticmethod
    def _cas(w: sqlite3.Connection, op: Op) -> tuple[bool, int]:
        _, ns, key, value, now, expected = op
        if expected == 0:
            row = w.execute(
                "INSERT INTO kv (namespace, key, value, version, updated_at)"
                " VALUES (?, ?, ?, 1, ?) ON CONFLICT DO NOTHING RETURNING version",
                (ns, key, value, now),
            ).fetchone()
        else:
            row = w.execute(
                "UPDATE kv SET value = ?, version = version + 1, updated_at = ?"
                " WHERE namespace = ? AND key = ? AND version = ? RETURNING version",
                (value, now, ns, key, expected),
            ).fetchone()
        if row is not None:
            return True, row[0]
        actual = w.execute(
            "SELECT version FROM kv WHERE namespace = ? AND key = ?", (ns, key)
        ).fetchone()
        return False, actual[0] if actual else 0

    # -- async writes with group commit ---------------------------------------------------

    async def _submit(self, op: Op) -> Any:
        """Queue op for the next group commit; return its result once it has committed.

        A caller cancelled while waiting may still see its write committed: the op is in a
        shared transaction by then. Only a returned call is a durable acknowledgement.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((op, future))
        if self.sync == "full" and self.background:
            if not self._flush_queued:
                self._flush_queued = True
                loop.call_soon(self._flush_in_thread, loop)
        elif not self._gathering:
            # This writer leads the batch: one loop turn lets every writer that is ready
            # join it, then it commits for all of them. A NORMAL commit in WAL mode appends
            # to the WAL without fsync, so committing inline beats a thread hand-off.
            self._gathering = True
            try:
                await asyncio.sleep(0)
            finally:
                self._gathering = False
                self._flush_inline()
        return await future

    def _take_batch(self) -> list[tuple[Op, asyncio.Future[Any]]]:
        batch = self._pending[:MAX_BATCH]
        del self._pending[:MAX_BATCH]
        return batch

    def _flush_inline(self) -> None:
        while self._pending:
            batch = self._take_batch()
            try:
                results = self.write([op for op, _ in batch])
            except BaseException as e:
                self._settle(batch, e)
                if not isinstance(e, Exception):
                    raise
            else:
                self._settle(batch, results)

    def _flush_in_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._take_batch()
        if not batch or self._closing.is_set():
            self._flush_queued = False
            self._settle(batch, StorageError(f"{self.path}: storage was closed before commit"))
            return
        if self._writer_thread is None:
            self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="frys-writer")
        # fsync takes milliseconds: the writer thread commits, the loop stays free.
        done = loop.run_in_executor(self._writer_thread, self.write, [op for op, _ in batch])
        done.add_done_callback(lambda f: self._thread_done(loop, batch, f))

    def _thread_done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[Op, asyncio.Future[Any]]],
        done: asyncio.Future[list[Any]],
    ) -> None:
        error = done.exception()
        self._settle(batch, done.result() if error is None else error)
        self._flush_queued = bool(self._pending)
        if self._flush_queued:
            loop.call_soon(self._flush_in_thread, loop)

    @staticmethod
    def _settle(
        batch: list[tuple[Op, asyncio.Future[Any]]], outcome: list[Any] | BaseException
    ) -> None:
        if isinstance(outcome, BaseException):
            for _, future in batch:
                if not future.done():  # a waiter cancelled meanwhile
                    future.set_exception(outcome)
            return
        for (_, future), result in zip(batch, outcome, strict=True):
            if not future.done():
                future.set_result(result)

    async def put(self, namespace: str, key: str, value: Any) -> int:
        """Store value at namespace/key; returns the new version once committed."""
        _check_name("namespace", namespace)
        _check_name("key", key)
        op = ("put", namespace, key, encode_value(value, f"kv {namespace}/{key}"), time.time())
        return await self._submit(op)  # type: ignore[no-any-return]

    async def delete(self, namespace: str, key: str) -> bool:
        """Delete namespace/key; returns whether it existed."""
        _check_name("namespace", namespace)
        _check_name("key", key)
        return await self._submit(("delete", namespace, key))  # type: ignore[no-any-return]

    async def compare_and_set(self, namespace: str, key: str, value: Any, expected: int) -> int:
        """Store value only if the entry is at version `expected` (0: must not exist)."""
        _check_name("namespace", namespace)
        _check_name("key", key)
        if not isinstance(expected, int) or not 0 <= expected < 2**63:
            raise StorageError(f"kv {namespace}/{key}: expected version must be an int >= 0")
        encoded = encode_value(value, f"kv {namespace}/{key}")
        ok, version = await self._submit(("cas", namespace, key, encoded, time.time(), expected))
        if not ok:
            raise VersionConflict(namespace, key, expected, version)
        return version  # type: ignore[no-any-return]

    async def append(self, topic: str, payload: Any) -> int:
        """Append an event to the durable log; returns its sequence number."""
        _check_name("topic", topic)
        op = ("append", topic, encode_value(payload, f"event on {topic}"), time.time())
        return await self._submit(op)  # type: ignore[no-any-return]

    async def trim_events(self, up_to: int) -> int:
        """Delete events with seq <= up_to; returns how many went."""
        if not isinstance(up_to, int) or not 0 <= up_to < 2**63:
            raise StorageError(f"trim_events: up_to must be an int >= 0, got {up_to!r}")
        return await self._submit(("trim", up_to))  # type: ignore[no-any-return]

    async def new_run(
        self,
        run_id: str,
        workflow: str,
        definition: str,
        inputs: Any,
        *,
        idempotency_key: str | None = None,
        parent_run: str | None = None,
        deadline: float | None = None,
    ) -> tuple[bool, str]:
        """Store a new running run; with a key already used, return (False, that run's id)."""
        _check_name("run id", run_id)
        op = (
            "run_new",
            run_id,
            workflow,
            definition,
            encode_value(inputs, f"inputs of run {run_id}"),
            idempotency_key,
            parent_run,
            time.time(),
            deadline,
        )
        return await self._submit(op)  # type: ignore[no-any-return]

    async def end_run(
        self, run_id: str, status: str, outputs: Any = None, error: str | None = None
    ) -> bool:
        """Record a run's final status; False if it had already ended (e.g. cancelled)."""
        encoded = None if outputs is None else encode_value(outputs, f"outputs of run {run_id}")
        op = ("run_end", run_id, status, encoded, error, time.time())
        return await self._submit(op)  # type: ignore[no-any-return]

    async def record_step(
        self,
        run_id: str,
        name: str,
        status: str,
        attempts: int,
        *,
        output: Any = None,
        error: str | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
        wake_at: float | None = None,
        attempt: tuple[str, float, float] | None = None,
    ) -> None:
        """Record the latest state of one step; returns once it is committed.

        `attempt` is (outcome, started, finished) of a failed attempt, kept in the step's
        history in the same transaction (the final success is the step row itself, so the
        common path writes one row).
        """
        encoded = None if output is None else encode_value(output, f"output of step {name}")
        history = None if attempt is None else (attempts, attempt[0], error, *attempt[1:])
        op = (
            "step",
            run_id,
            name,
            status,
            attempts,
            encoded,
            error,
            started_at,
            finished_at,
            wake_at,
            history,
        )
        await self._submit(op)

    def create_vector_collection(
        self, name: str, dim: int, metric: str, dtype: str, options: dict[str, Any]
    ) -> bool:
        """Store a new vector collection (committed on return); False if the name is taken."""
        _check_name("vector collection name", name)
        encoded = encode_value(options, f"options of vector collection {name}")
        result = self.write([("vcol_new", name, dim, metric, dtype, time.time(), encoded)])
        return bool(result[0])

    def set_vector_options(self, name: str, options: dict[str, Any]) -> bool:
        """Replace a vector collection's index options; False if it does not exist."""
        _check_name("vector collection name", name)
        encoded = encode_value(options, f"options of vector collection {name}")
        return bool(self.write([("vcol_options", name, encoded)])[0])

    def drop_vector_collection(self, name: str) -> bool:
        """Delete a vector collection and all its items in one transaction; whether it existed."""
        _check_name("vector collection name", name)
        return bool(self.write([("vcol_drop", name)])[0])

    async def put_vectors(self, collection: str, items: Sequence[VectorRecord]) -> int:
        """Insert or replace items of a collection in one transaction; returns how many.

        All or nothing: a metadata value that cannot be stored raises before anything is
        queued, and StorageError if the collection does not exist (nothing is written).
        """
        _check_name("vector collection name", collection)
        rows = []
        for item in items:
            _check_name(f"id of a vector in {collection}", item.id)
            meta = encode_value(item.metadata, f"metadata of vector {collection}/{item.id}")
            rows.append((item.id, item.vector, item.scale, meta))
        written = await self._submit(("vput", collection, rows, time.time()))
        if written is None:
            raise StorageError(f"vector collection {collection!r} does not exist")
        return written  # type: ignore[no-any-return]

    async def delete_vectors(self, collection: str, ids: Sequence[str]) -> int:
        """Delete items of a collection by id in one transaction; returns how many existed."""
        _check_name("vector collection name", collection)
        for item in ids:
            _check_name(f"id of a vector in {collection}", item)
        return await self._submit(("vdel", collection, list(ids)))  # type: ignore[no-any-return]

    # -- maintenance ---------------------------------------------------------------------

    def check(self) -> list[str]:
        """Run PRAGMA integrity_check; returns ["ok"] for a sound file, else the damage."""
        with self._readers.item(timeout=self.busy_timeout) as conn:
            try:
                return [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
            except sqlite3.DatabaseError as e:
                # Damage bad enough that the check itself cannot finish is still its answer.
                return [f"integrity check stopped: {e}"]

    def backup(self, dest: str | os.PathLike[str]) -> Path:
        """Write a consistent snapshot to dest (atomically, via a temp file and rename)."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / DB_FILE
        if not dest.parent.is_dir():
            raise StorageError(
                f"{dest}: cannot write the backup, directory {dest.parent} does not exist; "
                "create it or choose another path"
            )
        tmp = dest.with_name(dest.name + ".tmp")
        try:
            target = sqlite3.connect(tmp)
            try:
                with self._reader("reading for the backup") as conn:
                    conn.backup(target)
                target.execute("PRAGMA journal_mode = DELETE")
            finally:
                target.close()
            os.replace(tmp, dest)
        except (OSError, sqlite3.Error) as e:
            raise StorageError(f"{dest}: cannot write the backup ({e}); check the path") from e
        finally:
            tmp.unlink(missing_ok=True)
        return dest


def _close_connection(conn: sqlite3.Connection) -> None:
    conn.close()
