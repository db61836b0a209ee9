"""The real PostgreSQL and Redis the shared mode's tests run against (tests/servers.py): real
server processes on loopback, and each test starting from an empty database and an empty Redis."""

from __future__ import annotations

import psycopg
import redis


def test_each_test_gets_an_empty_database_of_a_real_postgresql(postgres_server, postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        db.execute("CREATE TABLE t (x int)")
        assert db.execute("SELECT inet_server_addr()::text, current_setting('port')::int").fetchone() == (
            "127.0.0.1/32", postgres_server.port)


def test_a_second_test_does_not_see_the_first_s_tables(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)


def test_each_test_gets_an_empty_real_redis(redis_server, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0 and client.info("server")["tcp_port"] == redis_server.port
        client.set("k", b"v")
    finally:
        client.close()


def test_a_second_test_finds_redis_empty(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()
