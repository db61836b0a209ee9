"""The shared mode's PostgreSQL (issue 15): a connection pool to it, its URL with the password
masked for messages, and its schema, versioned: each server applies the migrations it lacks at
start, one at a time under an advisory lock, so servers started together do not race.

Work in progress: leases (leases.py) are built on it; transcripts and block lists follow.
"""

from __future__ import annotations

import logging
import psycopg
from psycopg_pool import ConnectionPool

from mcp_semantic.settings import masked

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
]

_MIGRATION_LOCK = 0x6D637073  # pg_advisory_xact_lock key: "mcps"


class Unreachable(RuntimeError):
    """PostgreSQL cannot be reached or used; the message names the URL, its password masked."""


def connect(url: str, max_size: int = 8, timeout_s: float = 10.0) -> ConnectionPool:
    """A pool of connections to `url`, its schema migrated; Unreachable if the server cannot be
    reached or refuses us (checked now: a bad URL is a clear message at start, not at the
    first call)."""
    pool = ConnectionPool(url, min_size=1, max_size=max_size, open=False, timeout=timeout_s,
                          kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout_s))})
    try:
        pool.open(wait=True, timeout=timeout_s)
        migrate(pool)
    except (psycopg.Error, TimeoutError, OSError) as e:  # the pool's PoolTimeout is a TimeoutError
        pool.close()
        why = str(e).replace(url, masked(url)).strip() or type(e).__name__
        raise Unreachable(f"cannot use PostgreSQL at {masked(url)}: {why}") from None
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
