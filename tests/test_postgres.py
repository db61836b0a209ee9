"""The shared mode's PostgreSQL connection and schema, against a real server (tests/servers.py)."""

from __future__ import annotations

import threading

import pytest

from mcp_semantic.postgres import MIGRATIONS, Unreachable, connect, migrate
from mcp_semantic.settings import masked
from servers import free_port


def test_the_schema_is_migrated_once_even_by_servers_starting_together(postgres_url: str) -> None:
    pools, errors = [], []

    def start() -> None:
        try:
            pools.append(connect(postgres_url))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(pools) == 4
    with pools[0].connection() as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == [v for v, _ in MIGRATIONS]  # each once
    assert migrate(pools[0]) == MIGRATIONS[-1][0]
    for pool in pools:
        pool.close()


def test_an_unreachable_server_is_a_clear_error_that_hides_the_password() -> None:
    url = f"postgresql://agent:s3cret@127.0.0.1:{free_port()}/agents"
    with pytest.raises(Unreachable) as e:
        connect(url, timeout_s=2)
    assert "postgresql://agent:***@127.0.0.1" in str(e.value) and "s3cret" not in str(e.value)


def test_masked_urls() -> None:
    assert masked("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert masked("postgresql://u@h/db") == "postgresql://u@h/db"
