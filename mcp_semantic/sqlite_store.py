"""The embedded store's database: transcripts and block lists in SQLite (`store.db` in the cache
dir, WAL), read and written by this one server (the cache dir's lock says so). Block references
are counted in memory, from the lists read at start.

Why SQLite rather than a JSON file per agent: a turn is one transaction, and an agent's block
list commits or not as a whole.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mcp_semantic.store import Agent, KVRecord, Store, agent_row, check_name, checked_record, kv_row

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    system TEXT,
    parent TEXT,
    messages TEXT NOT NULL,   -- JSON list of {role, content}
    tokens TEXT NOT NULL,     -- JSON list of the token ids of its last prompt and reply
    created_at REAL NOT NULL,
    last_used_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    agent TEXT PRIMARY KEY,
    blocks TEXT NOT NULL,     -- JSON list of block ids, in order
    tokens TEXT NOT NULL,     -- JSON list of the token ids those blocks hold
    branch TEXT               -- JSON [block id, tokens] of a partial block ending inside them, or null
);
"""


class SQLiteStore(Store):
    """The engine thread writes transcripts, the writer thread blocks and block lists; the
    store's lock orders them."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.db = self._open_db(self.root / "store.db")
        self.refs: Counter[str] = Counter()  # block id -> block lists on disk naming it
        with self._lock:  # the lists' block ids only: their token lists are read when an agent is used
            rows = self.db.execute("SELECT agent, blocks, '[]', branch FROM kv").fetchall()
        for agent, *row in rows:
            if (record := checked_record(agent, row)) is not None:
                self.refs.update(record.ids)
        self.blocks.collect(lambda bid: bid in self.refs)

    def _open_db(self, path: Path) -> sqlite3.Connection:
        """Open the database; one that is not a database is moved aside, and the loss said."""
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a turn answered is a turn on disk
            db.executescript(_SCHEMA)
            if "branch" not in {row[1] for row in db.execute("PRAGMA table_info(kv)")}:  # a store of before 0.2
                db.execute("ALTER TABLE kv ADD COLUMN branch TEXT")
            return db
        except sqlite3.DatabaseError as e:
            lost = []
            try:
                lost = [row[0] for row in db.execute("SELECT name FROM agents")]
            except sqlite3.DatabaseError:
                pass
            db.close()
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            os.replace(path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            log.error(
                "the transcript database %s cannot be read (%s): moved to %s; transcripts lost for: %s",
                path, e, aside.name, ", ".join(lost) or "all agents it held",
            )
            return self._open_db(path)

    def close(self) -> None:
        super().close()
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT on the autocommit connection; ROLLBACK if anything fails."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def names(self, after: str | None = None, limit: int | None = None) -> list[str]:
        with self._lock:
            return [row[0] for row in self.db.execute(
                "SELECT name FROM agents WHERE name > ? ORDER BY name LIMIT ?", (after or "", -1 if limit is None else limit))]

    def count(self) -> int:
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM agents").fetchone()[0]

    def exists(self, name: str) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM agents WHERE name = ?", (check_name(name),)).fetchone() is not None

    def save_agent(self, agent: Agent) -> None:
        check_name(agent.name)
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO agents VALUES (?, ?, ?, ?, ?, ?, ?)", agent_row(agent))

    def _agent_row(self, name: str) -> tuple | None:
        with self._lock:
            return self.db.execute(
                "SELECT system, parent, messages, tokens, created_at, last_used_at FROM agents WHERE name = ?", (name,)
            ).fetchone()

    def _kv_row(self, name: str) -> tuple | None:
        with self._lock:
            return self.db.execute("SELECT blocks, tokens, branch FROM kv WHERE agent = ?", (name,)).fetchone()

    def kv_records(self) -> dict[str, KVRecord]:
        """Every agent's stored block list; unreadable rows are left out (logged)."""
        with self._lock:
            rows = self.db.execute("SELECT agent, blocks, tokens, branch FROM kv").fetchall()
        return {agent: record for agent, *row in rows if (record := checked_record(agent, row)) is not None}

    def _put_record(self, name: str, record: KVRecord) -> list[str]:
        old = self.kv_record(name)
        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", kv_row(name, record))
        self.refs.update(record.ids)
        return self._release(old.ids if old else [])

    def _delete_rows(self, name: str, agent_too: bool) -> list[str]:
        record = self.kv_record(name)
        with self._transaction():
            if agent_too:
                self.db.execute("DELETE FROM agents WHERE name = ?", (name,))
            self.db.execute("DELETE FROM kv WHERE agent = ?", (name,))
        return self._release(record.ids if record else [])

    def _release(self, bids: list[str]) -> list[str]:
        """Drop one reference to each block; returns those no list names any more."""
        self.refs.subtract(bids)
        unnamed = [bid for bid in set(bids) if self.refs[bid] <= 0]
        for bid in unnamed:
            del self.refs[bid]
        return unnamed

    def _unnamed(self, bids: list[str]) -> list[str]:
        return [bid for bid in bids if bid not in self.refs]

    def _ref_counts(self, bids: list[str]) -> dict[str, int]:
        return {bid: self.refs[bid] for bid in bids if bid in self.refs}

    def disk_blocks(self) -> int:
        with self._lock:
            return len(self.refs)
