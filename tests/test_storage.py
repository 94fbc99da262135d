"""Storage: KV, event log, group commit, and every bad condition a device meets."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import sqlite_utils

from frys_edge.storage import DB_FILE, DataDirLocked, Storage, StorageError, VersionConflict


def test_kv_round_trip_with_versions(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            assert await s.put("ns", "a", {"x": 1}) == 1
            assert await s.put("ns", "a", {"x": 2}) == 2
            entry = s.get("ns", "a")
            assert entry is not None
            assert (entry.value, entry.version) == ({"x": 2}, 2)
            assert s.get("other", "a") is None
            assert await s.delete("ns", "a") is True
            assert await s.delete("ns", "a") is False
            assert s.get("ns", "a") is None

    anyio.run(main)


def test_list_by_prefix_in_key_order_with_paging(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            for key in ["sensor/b", "sensor/a", "sensorx", "alarm/1", "sensor/c"]:
                await s.put("ns", key, key)
            keys = [e.key for e in s.list_prefix("ns", "sensor/")]
            assert keys == ["sensor/a", "sensor/b", "sensor/c"]
            page = [e.key for e in s.list_prefix("ns", "sensor/", after="sensor/a", limit=1)]
            assert page == ["sensor/b"]
            assert len(s.list_prefix("ns")) == 5

    anyio.run(main)


def test_compare_and_set_applies_only_at_the_expected_version(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            assert await s.compare_and_set("ns", "k", "first", expected=0) == 1
            with pytest.raises(VersionConflict, match="expected version 0 but it is at version 1"):
                await s.compare_and_set("ns", "k", "again", expected=0)
            assert await s.compare_and_set("ns", "k", "second", expected=1) == 2
            with pytest.raises(VersionConflict) as err:
                await s.compare_and_set("ns", "k", "stale", expected=1)
            assert err.value.actual == 2
            entry = s.get("ns", "k")
            assert entry is not None and entry.value == "second"

    anyio.run(main)


def test_event_log_has_increasing_sequence_numbers(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            seqs = [await s.append("sensors/1/temp", {"c": i}) for i in range(5)]
            await s.append("alerts/x", "hot")
            assert seqs == sorted(seqs) and len(set(seqs)) == 5
            assert [e.payload for e in s.events(after=seqs[2])][:2] == [{"c": 3}, {"c": 4}]
            assert [e.payload for e in s.events(topic="alerts/x")] == ["hot"]
            assert s.last_seq() == seqs[-1] + 1
            assert await s.trim_events(seqs[-1]) == 5
            assert [e.topic for e in s.events()] == ["alerts/x"]

    anyio.run(main)


def test_concurrent_writers_share_commits(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            async with anyio.create_task_group() as tg:
                for w in range(50):
                    for i in range(20):
                        tg.start_soon(s.put, "ns", f"w{w}-{i}", i)
            assert s.writes == 1000
            assert s.commits < 100, "group commit should gather concurrent writes"
            assert len(s.list_prefix("ns", limit=5000)) == 1000

    anyio.run(main)


def test_full_sync_commits_off_the_loop_and_persists(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir, sync="full") as s:
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(s.put, "ns", f"k{i}", i)
        with Storage(data_dir) as s:
            assert len(s.list_prefix("ns")) == 20

    anyio.run(main)


def test_values_survive_reopen_and_are_plain_sqlite(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            await s.put("cfg", "greeting", {"text": "hello", "n": [1, 2]})
            await s.append("boot", {"ok": True})

    anyio.run(main)
    db = sqlite_utils.Database(data_dir / DB_FILE)
    rows = list(db["kv"].rows)
    assert rows[0]["namespace"] == "cfg" and rows[0]["key"] == "greeting"
    assert rows[0]["value"] == '{"text":"hello","n":[1,2]}'
    assert [r["topic"] for r in db["events"].rows] == ["boot"]


def test_second_storage_on_the_same_data_dir_is_refused(data_dir: Path) -> None:
    with Storage(data_dir):
        with pytest.raises(DataDirLocked, match="this process already has it open"):
            Storage(data_dir)
        code = f"from frys_edge.storage import Storage; Storage({str(data_dir)!r})"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode == 1
        assert f"another frys process (pid {os.getpid()}) has it open" in other.stderr
    Storage(data_dir).close()


def test_disk_full_is_reported_and_nothing_half_written(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir, max_size=64 * 1024) as s:
            await s.put("ns", "small", "kept")
            with pytest.raises(StorageError, match="disk full") as err:
                for i in range(1000):
                    await s.put("ns", f"big{i}", "x" * 4000)
            assert "SQLITE_FULL" in str(err.value)
            entry = s.get("ns", "small")
            assert entry is not None and entry.value == "kept"
            assert s.check() == ["ok"]

    anyio.run(main)


def test_corrupt_file_refuses_to_start_and_names_the_fix(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / DB_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError) as err:
        Storage(data_dir)
    message = str(err.value)
    assert str(data_dir / DB_FILE) in message
    assert "corrupt" in message and "frys db check" in message


def test_integrity_check_finds_damaged_pages(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            for i in range(2000):
                await s.put("ns", f"key{i:05d}", "v" * 100)

    anyio.run(main)
    path = data_dir / DB_FILE
    assert path.stat().st_size > 100_000
    with open(path, "r+b") as f:
        f.seek(4096 * 10)
        f.write(os.urandom(4096 * 5))
    with Storage(data_dir, readonly=True) as s:
        assert s.check() != ["ok"]


def test_locked_database_says_what_holds_it(data_dir: Path) -> None:
    with Storage(data_dir, busy_timeout=0.1) as s:
        # A program outside frys holding a write transaction, like a sqlite3 shell.
        blocker = sqlite3.connect(data_dir / DB_FILE, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StorageError, match="a program outside frys"):
                anyio.run(s.put, "ns", "k", 1)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert anyio.run(s.put, "ns", "k", 1) == 1


def test_read_only_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    readonly = tmp_path / "ro"
    readonly.mkdir()
    # Root ignores file modes, so as root the data dir sits on a read-only tmpfs instead.
    as_root = os.geteuid() == 0
    if as_root:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", readonly], check=True)
    else:
        os.chmod(readonly, 0o555)
    try:
        with pytest.raises(StorageError) as err:
            Storage(readonly / "data")
    finally:
        if as_root:
            subprocess.run(["umount", readonly], check=True)
    assert "cannot create the data dir" in str(err.value)
    assert "point [system] data_dir elsewhere" in str(err.value)


def test_backup_is_a_consistent_standalone_copy(data_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            for i in range(100):
                await s.put("ns", f"k{i}", i)
            dest = s.backup(tmp_path / "snap.db")
        copy = sqlite3.connect(dest)
        assert copy.execute("SELECT count(*) FROM kv").fetchone()[0] == 100
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    anyio.run(main)


def test_values_that_are_not_json_are_refused(data_dir: Path) -> None:
    with Storage(data_dir) as s, pytest.raises(StorageError, match="cannot store a value"):
        anyio.run(s.put, "ns", "k", object())


def test_checkpoints_run_off_the_commit_path_and_close_folds_the_wal(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            for i in range(3000):
                await s.put("ns", f"k{i}", "v" * 50)
            for _ in range(100):
                if s.checkpoints:
                    break
                await anyio.sleep(0.01)
            assert s.checkpoints >= 1
        wal = data_dir / (DB_FILE + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0
        with Storage(data_dir, readonly=True) as s:
            assert len(s.list_prefix("ns", limit=5000)) == 3000

    anyio.run(main)


def test_one_bad_write_does_not_fail_the_others_in_its_batch(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            outcomes: dict[str, object] = {}

            async def put(key: object, value: object) -> None:
                try:
                    outcomes[str(key)] = await s.put("ns", key, value)  # type: ignore[arg-type]
                except StorageError as e:
                    outcomes[str(key)] = e

            async with anyio.create_task_group() as tg:
                tg.start_soon(put, "good1", 1)
                tg.start_soon(put, None, 2)
                tg.start_soon(put, "bad-value", object())
                tg.start_soon(put, "good2", 3)
            assert outcomes["good1"] == 1 and outcomes["good2"] == 1
            assert "key must be a non-empty string" in str(outcomes["None"])
            assert "kv ns/bad-value: cannot store a value of type object" in str(
                outcomes["bad-value"]
            )
            with pytest.raises(StorageError, match="up_to must be an int"):
                await s.trim_events(2**64)
            assert await s.put("ns", "after", 1) == 1

    anyio.run(main)


def test_more_writers_than_one_batch_all_get_their_own_result(data_dir: Path) -> None:
    async def main() -> None:
        with Storage(data_dir) as s:
            results: dict[int, int] = {}

            async def put(i: int) -> None:
                results[i] = await s.put("ns", f"k{i}", i)

            async with anyio.create_task_group() as tg:
                for i in range(5000):
                    tg.start_soon(put, i)
            assert results == {i: 1 for i in range(5000)}
            assert s.commits >= 3  # MAX_BATCH is 2000

    anyio.run(main)


def test_backup_to_a_missing_directory_names_it(data_dir: Path, tmp_path: Path) -> None:
    with Storage(data_dir) as s:
        anyio.run(s.put, "ns", "k", 1)
        with pytest.raises(StorageError, match=r"directory .*nowhere does not exist"):
            s.backup(tmp_path / "nowhere" / "snap.db")


def test_write_after_close_says_closed(data_dir: Path) -> None:
    s = Storage(data_dir)
    s.close()
    with pytest.raises(StorageError, match="this Storage is closed"):
        s.write([("delete", "ns", "k")])


def test_a_database_from_a_newer_frys_is_refused(data_dir: Path) -> None:
    Storage(data_dir).close()
    conn = sqlite3.connect(data_dir / DB_FILE)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StorageError, match="schema version 99 is newer than this frys"):
        Storage(data_dir)
    Storage(data_dir / "other").close()  # the failed open released its lock and files
    with pytest.raises(StorageError, match="schema version 99"):
        Storage(data_dir)
