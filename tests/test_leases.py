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
    assert a.take("x") is True  # taken anew
    assert a.take("x", wait_s=0) is False  # ours already: held twice
    with pytest.raises(AgentBusy, match="agent x is busy on another server.*nothing was changed"):
        b.take("x", wait_s=0.3)
    b.take("y", wait_s=0)  # another agent is free
    assert a.holder_of("x") == "server-a" and a.holder_of("y") == "server-b"
    a.release("x")
    assert a.holder_of("x") == "server-a"  # one hold is left (a second call, or a save)
    a.release("x")
    assert b.take("x", wait_s=0) is True
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
    dead, alive = Leases(pool, "dead", ttl_s=0.5, renew=False), Leases(pool, "alive")
    dead.take("x")
    with pytest.raises(AgentBusy):
        alive.take("x", wait_s=0)
    alive.take("x", wait_s=10)  # once the database's clock passes its expiry
    assert alive.holder_of("x") == "alive"
    assert dead.renew(["x"]) == ["x"]  # lost: its calls must not commit


def test_renewing_keeps_a_lease_past_its_ttl(pool) -> None:
    a, b = Leases(pool, "server-a", ttl_s=0.6, renew=False), Leases(pool, "server-b")
    a.take("x")
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        assert a.renew(["x", "x"]) == []
        with pytest.raises(AgentBusy):
            b.take("x", wait_s=0)
        time.sleep(0.2)
    assert a.renew([]) == []


def test_a_server_renews_the_leases_it_holds_by_itself(pool) -> None:
    a, b = Leases(pool, "server-a", ttl_s=0.6), Leases(pool, "server-b")
    a.take("x")
    time.sleep(1.5)  # over twice the TTL: renewed by a's thread meanwhile
    with pytest.raises(AgentBusy):
        b.take("x", wait_s=0)
    a.release("x")
    assert b.take("x", wait_s=0)
    a.close()


def test_a_server_whose_lease_expired_saves_no_turn_over_the_next_server_s(tmp_path, postgres_url: str) -> None:
    """Fencing: A's lease of x expired (A could not renew it) and B took it: A's save of a turn
    is refused, B's transcript stays; a save without the lease is refused too."""
    from mcp_semantic.postgres import PostgresStore
    from mcp_semantic.store import Agent, LeaseLost

    turn = lambda text: Agent("x", messages=[{"role": "user", "content": text}])  # noqa: E731
    store_a = PostgresStore(tmp_path / "a", postgres_url, holder="server-a")
    store_b = PostgresStore(tmp_path / "b", postgres_url, holder="server-b")
    a = Leases(store_a.pool, "server-a", ttl_s=0.5, renew=False)
    b = Leases(store_b.pool, "server-b", renew=False)
    with pytest.raises(LeaseLost, match="lease of agent x"):
        store_a.save_agent(turn("never held"))
    assert store_a.load_agent("x") is None
    a.take("x")
    store_a.save_agent(turn("A's turn"))
    time.sleep(0.7)  # expired, not renewed
    assert b.take("x", wait_s=0)
    store_b.save_agent(turn("B's turn"))
    with pytest.raises(LeaseLost, match="another server may be serving it; nothing was saved"):
        store_a.save_agent(turn("A's late turn"))
    assert store_a.load_agent("x").messages == [{"role": "user", "content": "B's turn"}]
    for store in (store_a, store_b):
        store.close()


def test_a_lease_found_lost_while_held_is_taken_anew_by_the_next_call(pool) -> None:
    """A hold of ours outlived the lease (a save still to let it go): once it is known lost, the
    next take goes to the database and says the agent must be read again."""
    a, b = Leases(pool, "server-a", ttl_s=0.5, renew=False), Leases(pool, "server-b", renew=False)
    assert a.take("x") is True
    time.sleep(0.7)  # expired, not renewed
    assert b.take("x", wait_s=0) is True
    assert a.take("x", wait_s=0) is False  # not known lost yet: our own count says held
    a.mark_lost("x")
    with pytest.raises(AgentBusy):
        a.take("x", wait_s=0.2)  # B holds it: no longer ours to count
    b.release("x")
    assert a.take("x", wait_s=0) is True and a.holder_of("x") == "server-a"
    for _ in range(3):
        a.release("x")
    assert a.holder_of("x") is None and not a.held and not a.lost


def test_a_release_never_deletes_the_row_of_a_take_under_way(pool) -> None:
    """A lease of ours found lost is taken anew while the old hold's release is still to come
    (it follows the call's save): that release must leave the new row alone."""
    import threading

    a, b = Leases(pool, "server-a", ttl_s=0.5, renew=False), Leases(pool, "server-b", renew=False)
    assert a.take("x")
    time.sleep(0.7)
    assert b.take("x", wait_s=0)
    a.mark_lost("x")
    b.release("x")
    taken, go_on = threading.Event(), threading.Event()
    try_once = a._try

    def slow_try(agent: str) -> bool:  # the row is ours in the database; the take has not counted it yet
        got = try_once(agent)
        taken.set()
        go_on.wait(10)
        return got

    a._try = slow_try
    anew: list[bool] = []
    again = threading.Thread(target=lambda: anew.append(a.take("x", wait_s=0)))
    again.start()
    assert taken.wait(10)
    a.release("x")  # the old hold's release, after the call's save
    go_on.set()
    again.join(10)
    assert anew == [True] and a.holder_of("x") == "server-a" and a.held["x"] == 1
    a.release("x")
    assert a.holder_of("x") is None
