"""The shared mode's database: transcripts, block lists and leases (leases.py) in PostgreSQL,
shared by every server; the block bytes in Redis (block_redis.py), each server's block files
in front of it as a read-through cache.

The schema is versioned: each server applies the migrations it lacks at start, one at a time
under an advisory lock, so servers started together do not race. Block references are rows
(`kv_blocks`), not a count in one server's memory: any server may commit a list.

Garbage collection across servers: a block leaves Redis only when no list names it, and never
while another server's commit that names it is in flight. A commit holds the GC lock shared
(a transaction-scoped advisory lock) from the moment it looks at which blocks Redis has until
its list is committed; a collection holds it exclusively while it checks that no list names
the blocks and deletes them from Redis. So a commit either sees a block gone and sends it
again, or the collection sees the commit's list and keeps the block.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg
from psycopg_pool import ConnectionPool

from mcp_semantic.block_files import Remote
from mcp_semantic.settings import masked
from mcp_semantic.store import Agent, LeaseLost, Store, StoreUnavailable, agent_row, check_name, kv_row

log = logging.getLogger(__name__)

# (version, SQL): applied in order, each once, in one transaction with its version
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
        CREATE TABLE leases (
            agent TEXT PRIMARY KEY,
            holder TEXT NOT NULL,              -- the server serving the agent
            expires_at TIMESTAMPTZ NOT NULL    -- the database's clock, never a server's
        )
    """),
    (2, """
        CREATE TABLE agents (
            name TEXT COLLATE "C" PRIMARY KEY, -- ordered by bytes, as SQLite orders: list_agents' pages
            system TEXT,
            parent TEXT,
            messages TEXT NOT NULL,            -- JSON list of {role, content}
            tokens TEXT NOT NULL,              -- JSON list of the token ids of its last prompt and reply
            created_at DOUBLE PRECISION NOT NULL,
            last_used_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE kv (
            agent TEXT PRIMARY KEY,
            blocks TEXT NOT NULL,              -- JSON list of block ids, in order
            tokens TEXT NOT NULL,              -- JSON list of the token ids those blocks hold
            branch TEXT                        -- JSON [block id, tokens] of a partial block, or null
        );
        CREATE TABLE kv_blocks (               -- which lists name which blocks: the references
            agent TEXT NOT NULL,
            block TEXT NOT NULL,
            PRIMARY KEY (agent, block)
        );
        CREATE INDEX kv_blocks_block ON kv_blocks (block);
    """),
]

_MIGRATION_LOCK = 0x6D637073  # pg_advisory_xact_lock key: "mcps"
_GC_LOCK = 0x6D637367  # "mcsg": commits hold it shared, collections exclusively


class Unreachable(StoreUnavailable):
    """PostgreSQL cannot be reached or used; the message names the URL, its password masked."""


def connect(url: str, max_size: int = 8, timeout_s: float = 5.0) -> ConnectionPool:
    """A pool of connections to `url`, its schema migrated; Unreachable if the server cannot be
    reached or refuses us (checked now: a bad URL is a clear message at start, not at the
    first call). A call waits up to `timeout_s` for a connection (PostgreSQL restarting)."""
    try:  # one connection first: refused at once, where the pool would retry until its timeout
        psycopg.connect(url, connect_timeout=max(1, int(timeout_s))).close()
    except psycopg.Error as e:
        raise Unreachable(f"cannot use PostgreSQL at {masked(url)}: {_why(e, url)}") from None
    # check: a connection is tried when taken, so one broken by a restart of PostgreSQL is
    # replaced rather than failing a call
    pool = ConnectionPool(url, min_size=1, max_size=max_size, open=False, timeout=timeout_s,
                          check=ConnectionPool.check_connection,
                          kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout_s))})
    try:
        pool.open(wait=True, timeout=timeout_s)
        migrate(pool)
    except (psycopg.Error, TimeoutError, OSError) as e:  # the pool's PoolTimeout is a TimeoutError
        pool.close()
        raise Unreachable(f"cannot use PostgreSQL at {masked(url)}: {_why(e, url)}") from None
    return pool


def migrate(pool: ConnectionPool) -> int:
    """Apply the migrations the database lacks; returns its schema version."""
    with pool.connection() as db, db.transaction():
        # the lock first: two servers creating the table at once would collide (PostgreSQL's
        # CREATE TABLE IF NOT EXISTS is not safe against a concurrent one)
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        for version, sql in MIGRATIONS:
            if version > current:
                db.execute(sql)
                db.execute("INSERT INTO schema_version VALUES (%s)", (version,))
                log.info("PostgreSQL schema migrated to version %d", version)
                current = version
    return current


def _why(e: BaseException, url: str) -> str:
    """The error on one line, the URL's password masked."""
    return " ".join(str(e).replace(url, masked(url)).split()) or type(e).__name__


@contextmanager
def using(pool: ConnectionPool) -> Iterator[psycopg.Connection]:
    """A connection from the pool; a lost database is Unreachable, naming it (the pool connects
    again at the next call)."""
    try:
        with pool.connection() as db:
            yield db
    except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as e:
        raise Unreachable(f"the shared store (PostgreSQL at {masked(pool.conninfo)}) cannot be reached: {_why(e, pool.conninfo)}; "
                          "nothing was changed, try again shortly") from None


def _named(db: psycopg.Connection, bids: list[str]) -> set[str]:
    """Of `bids`, those some list names."""
    return {row[0] for row in db.execute("SELECT DISTINCT block FROM kv_blocks WHERE block = ANY(%s)", (bids,))}


class PostgresStore(Store):
    """Transcripts and block lists in PostgreSQL; block bytes in the local block files and, with
    `remote`, in Redis behind them. The schema's ideas are store.db's (sqlite_store.py).

    With a `holder` (this server's name in the leases, leases.py), a transcript is saved only
    while that lease of the agent holds, checked in the transaction that saves it, the lease row
    locked until the commit: a server whose lease expired mid-call (it could not renew it) never
    commits a turn over another server's."""

    def __init__(self, root: Path, url: str, block_store: str | None = None, holder: str | None = None):
        from mcp_semantic.block_redis import RedisBlocks

        super().__init__(root)
        self.holder = holder
        self.pool: ConnectionPool | None = None
        self.remote: RedisBlocks | None = None  # None: each server's blocks are its own
        try:
            self.pool = connect(url)
            self.remote = RedisBlocks(block_store, self.blocks) if block_store else None
            self.shared = self.remote is not None
        except BaseException:
            self.close()
            raise
        with self._db() as db:
            named = _named(db, [p.stem for p in self.blocks.dir.glob("*.safetensors")])
        self.blocks.collect(lambda bid: bid in named)

    def close(self) -> None:
        super().close()
        if self.pool is not None:
            self.pool.close()
        if self.remote is not None:
            self.remote.close()

    def _db(self):
        return using(self.pool)

    def names(self, after: str | None = None, limit: int | None = None) -> list[str]:
        with self._db() as db:
            return [row[0] for row in db.execute(
                "SELECT name FROM agents WHERE name > %s ORDER BY name LIMIT %s", (after or "", limit))]

    def count(self) -> int:
        with self._db() as db:
            return db.execute("SELECT count(*) FROM agents").fetchone()[0]

    def exists(self, name: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM agents WHERE name = %s", (check_name(name),)).fetchone() is not None

    def save_agent(self, agent: Agent) -> None:
        check_name(agent.name)
        with self._db() as db, db.transaction():
            if self.holder is not None and not db.execute(
                "SELECT 1 FROM leases WHERE agent = %s AND holder = %s AND expires_at > now() FOR UPDATE",
                (agent.name, self.holder),
            ).fetchone():
                raise LeaseLost(f"this server's lease of agent {agent.name} expired (PostgreSQL was out of its reach) "
                                "and another server may be serving it; nothing was saved, ask again")
            db.execute("""INSERT INTO agents VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET
                          system = EXCLUDED.system, parent = EXCLUDED.parent, messages = EXCLUDED.messages,
                          tokens = EXCLUDED.tokens, created_at = EXCLUDED.created_at, last_used_at = EXCLUDED.last_used_at""",
                       agent_row(agent))

    def _agent_row(self, name: str) -> tuple | None:
        with self._db() as db:
            return db.execute("SELECT system, parent, messages, tokens, created_at, last_used_at FROM agents WHERE name = %s",
                              (name,)).fetchone()

    def _kv_row(self, name: str) -> tuple | None:
        with self._db() as db:
            return db.execute("SELECT blocks, tokens, branch FROM kv WHERE agent = %s", (name,)).fetchone()

    def _put_record(self, name: str, record) -> list[str] | None:
        with self._db() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock_shared(%s)", (_GC_LOCK,))
            if self.remote is not None:  # the bytes before the list that names them
                lacking = self.remote.missing(record.ids)
                if absent := [bid for bid in lacking if not self.blocks.exists(bid)]:
                    log.warning("agent %s: block %s is neither here nor in Redis; its cache is not saved", name, absent[0])
                    return None
                self.remote.put(lacking)
            old = [row[0] for row in db.execute("SELECT block FROM kv_blocks WHERE agent = %s", (name,))]
            db.execute("""INSERT INTO kv VALUES (%s, %s, %s, %s) ON CONFLICT (agent) DO UPDATE SET
                          blocks = EXCLUDED.blocks, tokens = EXCLUDED.tokens, branch = EXCLUDED.branch""", kv_row(name, record))
            db.execute("DELETE FROM kv_blocks WHERE agent = %s", (name,))
            db.execute("INSERT INTO kv_blocks SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING", (name, sorted(set(record.ids))))
        return sorted(set(old) - set(record.ids))

    def _delete_rows(self, name: str, agent_too: bool) -> list[str]:
        with self._db() as db, db.transaction():
            old = [row[0] for row in db.execute("DELETE FROM kv_blocks WHERE agent = %s RETURNING block", (name,))]
            db.execute("DELETE FROM kv WHERE agent = %s", (name,))
            if agent_too:
                db.execute("DELETE FROM agents WHERE name = %s", (name,))
        return old

    def _unnamed(self, bids: list[str]) -> list[str]:
        with self._db() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_GC_LOCK,))  # no commit is in flight now
            named = _named(db, bids)
            unnamed = [bid for bid in bids if bid not in named]
            if self.remote is not None:
                self.remote.delete(unnamed)  # before the lock goes: a commit then sees them gone
        return unnamed

    def _ref_counts(self, bids: list[str]) -> dict[str, int]:
        with self._db() as db:
            return dict(db.execute("SELECT block, count(*) FROM kv_blocks WHERE block = ANY(%s) GROUP BY block", (bids,)).fetchall())

    def disk_blocks(self) -> int:
        with self._db() as db:
            return db.execute("SELECT count(DISTINCT block) FROM kv_blocks").fetchone()[0]

    def remote_blocks(self, bids: list[str]) -> dict[str, Remote]:
        return self.remote.heads([bid for bid in bids if not self.has_block(bid)]) if self.remote is not None else {}

    def in_shared_tier(self, bids: list[str]) -> set[str]:
        if self.remote is None or not bids:
            return set()
        try:
            return set(bids) - set(self.remote.missing(bids))
        except StoreUnavailable as e:  # then none: the prompt is read
            log.warning("%s", e)
            return set()
