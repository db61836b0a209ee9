"""Leases: one server serves an agent at a time; a dead server's leases expire (real PostgreSQL)."""

from __future__ import annotations

import time

import pytest

from mcp_semantic.leases import AgentBusy, Leases
from mcp_semantic.postgres import connect


@pytest.fixture
def pool(postgres_url: str):
    pool = connect(postgres_url)
    yield pool
    pool.close()


def test_one_server_at_a_time_and_the_next_after_a_release(pool) -> None:
    a, b = Leases(pool, "server-a"), Leases(pool, "server-b")
    a.take("x")
    a.take("x", wait_s=0)  # ours already: renewed
    with pytest.raises(AgentBusy, match="agent x is busy on another server.*nothing was changed"):
        b.take("x", wait_s=0.3)
    b.take("y", wait_s=0)  # another agent is free
    assert a.holder_of("x") == "server-a" and a.holder_of("y") == "server-b"
    a.release("x")
    b.take("x", wait_s=0)
    assert b.holder_of("x") == "server-b"
    a.release("x")  # not ours any more: nothing happens
    assert b.holder_of("x") == "server-b"


def test_a_waiting_call_gets_the_lease_once_it_is_released(pool) -> None:
    import threading

    a, b = Leases(pool, "server-a"), Leases(pool, "server-b")
    a.take("x")
    threading.Timer(0.3, a.release, args=("x",)).start()
    b.take("x", wait_s=10)  # waits for the release, well within the bound
    assert a.holder_of("x") == "server-b"


def test_a_dead_server_s_lease_expires_and_another_takes_the_agent(pool) -> None:
    dead, alive = Leases(pool, "dead", ttl_s=0.5), Leases(pool, "alive")
    dead.take("x")
    with pytest.raises(AgentBusy):
        alive.take("x", wait_s=0)
    alive.take("x", wait_s=10)  # once the database's clock passes its expiry
    assert alive.holder_of("x") == "alive"
    assert dead.renew(["x"]) == ["x"]  # lost: its calls must not commit


def test_renewing_keeps_a_lease_past_its_ttl(pool) -> None:
    a, b = Leases(pool, "server-a", ttl_s=0.6), Leases(pool, "server-b")
    a.take("x")
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        assert a.renew(["x", "x"]) == []
        with pytest.raises(AgentBusy):
            b.take("x", wait_s=0)
        time.sleep(0.2)
    assert a.renew([]) == []
