"""The shared mode end to end: real servers (`mcp-semantic serve` processes over stdio) sharing a
real PostgreSQL and a real Redis (tests/servers.py), each with a cache dir of its own."""

from __future__ import annotations

import subprocess
import sys
import random
import threading
import time
from pathlib import Path

import psycopg
import pytest
import redis

from mcp_semantic.postgres import PostgresStore
from mcp_semantic.server import load
from mcp_semantic.settings import Settings
from conftest import serve_args
from servers import free_port


@pytest.fixture
def shared(settings: Settings, postgres_url: str, redis_url: str, stdio_server):
    """Start server `name` of the shared mode: its own cache dir, the test's PostgreSQL and Redis."""

    def start(name: str, *extra: str):
        own = settings.model_copy(update={"cache_dir": settings.cache_dir.parent / name})
        return start.started.setdefault(name, stdio_server(own, "--store", postgres_url, "--block-store", redis_url,
                                                           "--server-id", name, *extra))

    start.started = {}
    return start


@pytest.fixture
def lm(settings: Settings):
    return load(settings)


def transcript(postgres_url: str, tmp_path: Path, agent: str):
    store = PostgresStore(tmp_path / "reader", postgres_url)
    try:
        return store.load_agent(agent)
    finally:
        store.close()


def ask(server, agent: str, message: str, **kw) -> dict:
    return server.call("ask_agent", {"agent": agent, "message": message, "max_tokens": 8, **kw})


def test_an_agent_made_on_one_server_resumes_on_another_from_the_shared_blocks(
        shared, lm, replay, postgres_url: str, tmp_path: Path) -> None:
    a, b, c = shared("a"), shared("b"), shared("c")
    first = ask(a, "x", "Tell me about the river and the mill by the old town.", system="Be brief.")
    assert first["tier"] == "new"
    a.call("fork_agent", {"source": "x", "agent": "y"})
    a.call("evict_cache", {"agent": "x", "level": "memory"})  # saved: the blocks are in Redis now

    out = ask(b, "x", "And the bridge?")
    assert out["tier"] == "remote" and out["tokens"]["cached"] > 0 and not out["warnings"]
    messages = transcript(postgres_url, tmp_path, "x").messages
    assert messages[-1] == {"role": "assistant", "content": out["reply"]}
    assert out["reply"] == replay(lm, messages[:-1], 8)

    listed = {info["name"]: info for info in c.call("list_agents", {})["agents"]}
    assert set(listed) == {"x", "y"} and listed["y"]["parent"] == "x" and listed["x"]["tier"] == "remote"
    fork = ask(c, "y", "And the weir?")  # made on A, asked on C (B holds its blocks in memory now)
    assert fork["tier"] == "remote" and fork["tokens"]["cached"] > 0
    assert fork["reply"] == replay(lm, transcript(postgres_url, tmp_path, "y").messages[:-1], 8)
    assert ask(a, "x", "And the town?")["reply"] == replay(lm, transcript(postgres_url, tmp_path, "x").messages[:-1], 8)


def test_a_new_agent_on_another_server_reads_a_shared_prefix_from_redis(
        shared, lm, replay, postgres_url: str, tmp_path: Path) -> None:
    """Blocks another server's agent saved are shared across servers: a new agent with the same
    long system prompt on B reads them from Redis rather than prefilling them, exactly."""
    system = "You are a guide to the old town. " + "The river, the mill and the bridge are its heart. " * 12
    a, b = shared("a"), shared("b")
    ask(a, "x", "Where should I start?", system=system)
    a.call("evict_cache", {"agent": "x", "level": "memory"})
    deadline = time.monotonic() + 30
    while holder(postgres_url, "x") and time.monotonic() < deadline:  # A let x go: saved, its blocks in Redis
        time.sleep(0.02)
    out = ask(b, "y", "What is there to eat?", system=system)
    assert out["tier"] == "remote" and out["tokens"]["cached"] >= 64 and not out["warnings"]
    assert out["reply"] == replay(lm, transcript(postgres_url, tmp_path, "y").messages[:-1], 8)


def test_calls_to_one_agent_on_two_servers_run_one_after_the_other(
        shared, lm, replay, postgres_url: str, tmp_path: Path) -> None:
    a, b = shared("a"), shared("b")
    ask(a, "x", "Hello there.")
    replies: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda s=s, n=n: replies.__setitem__(n, ask(s, "x", f"Question from {n}.")))
               for s, n in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agent = transcript(postgres_url, tmp_path, "x")
    users = [m["content"] for m in agent.messages if m["role"] == "user"]
    assert users[0] == "Hello there." and sorted(users[1:]) == ["Question from a.", "Question from b."]
    assert agent.turns == 3  # nothing lost, nothing doubled
    for i, m in enumerate(agent.messages):  # each reply is the one its turn's history gives, in order
        if m["role"] == "assistant" and i > 2:
            who = agent.messages[i - 1]["content"][-2]
            assert replies[who]["reply"] == m["content"] == replay(lm, agent.messages[:i], 8)


def test_a_flushed_redis_costs_a_re_prefill_never_a_wrong_answer(
        shared, lm, replay, postgres_url: str, redis_url: str, tmp_path: Path) -> None:
    a, b = shared("a"), shared("b")
    ask(a, "x", "Tell me about the river and the mill by the old town.")
    a.call("evict_cache", {"agent": "x", "level": "memory"})
    b.call("evict_cache", {"agent": "x", "level": "memory"})  # takes the lease: once A's save is done
    redis.Redis.from_url(redis_url).flushall()
    out = ask(b, "x", "And the bridge?")
    assert out["tier"] == "new" and out["warnings"]
    assert out["reply"] == replay(lm, transcript(postgres_url, tmp_path, "x").messages[:-1], 8)
    out = ask(a, "x", "And the weir?")  # A's own files, though B served it last: B's turn is there
    assert out["tokens"]["cached"] > 0
    assert out["reply"] == replay(lm, transcript(postgres_url, tmp_path, "x").messages[:-1], 8)


def holder(postgres_url: str, agent: str) -> str | None:
    with psycopg.connect(postgres_url) as db:
        row = db.execute("SELECT holder FROM leases WHERE agent = %s", (agent,)).fetchone()
    return row[0] if row else None


def test_a_killed_server_s_agents_go_to_another_once_its_lease_expires(
        shared, lm, replay, postgres_url: str, tmp_path: Path) -> None:
    a, b = shared("a", "--lease-ttl", "2"), shared("b", "--lease-ttl", "2")
    ask(a, "x", "Hello there.")
    long_call = threading.Thread(target=_quiet, args=(ask, a, "x", "Tell me a long story."), kwargs={"max_tokens": 1500})
    long_call.start()
    deadline = time.monotonic() + 30
    while holder(postgres_url, "x") != "a" and time.monotonic() < deadline:  # the long call runs
        time.sleep(0.01)
    a.proc.kill()  # kill -9 in the middle of the call, its lease held
    long_call.join()
    assert holder(postgres_url, "x") == "a"  # a dead server's lease: it expires, nobody releases it
    out = ask(b, "x", "Are you there?")  # waits for the expiry (2 s), well within the wait (10 s)
    agent = transcript(postgres_url, tmp_path, "x")
    assert [m["content"] for m in agent.messages if m["role"] == "user"] == ["Hello there.", "Are you there?"]
    assert out["reply"] == agent.messages[-1]["content"] == replay(lm, agent.messages[:-1], 8)


def _quiet(fn, *args, **kw):
    """fn's result, or None where it raised (a call to a server killed under it)."""
    try:
        return fn(*args, **kw)
    except Exception:  # noqa: BLE001
        return None


def test_postgresql_restarted_under_a_running_server(
        shared, postgres_server, lm, replay, postgres_url: str, tmp_path: Path) -> None:
    a = shared("a")
    ask(a, "x", "Hello there.")
    postgres_server.halt()
    try:
        error = a.error("ask_agent", {"agent": "x", "message": "Are you there?", "max_tokens": 8})
        assert "PostgreSQL at postgresql://postgres@127.0.0.1" in error and "nothing was changed" in error
        listed = a.request("resources/list", {})  # the agents as resources: the same clear error
        assert "PostgreSQL at postgresql://postgres@127.0.0.1" in listed["message"], listed
    finally:
        postgres_server.run()
    deadline = time.monotonic() + 60
    while True:  # connected again once the pool's reconnection comes round (it backs off while it is down)
        result = a.request("tools/call", {"name": "ask_agent", "arguments": {"agent": "x", "message": "And now?",
                                                                             "max_tokens": 8}})
        if not result["isError"]:
            out = result["structuredContent"]
            break
        assert "PostgreSQL at" in result["content"][0]["text"] and time.monotonic() < deadline, result
        time.sleep(0.5)
    agent = transcript(postgres_url, tmp_path, "x")
    assert [m["content"] for m in agent.messages if m["role"] == "user"] == ["Hello there.", "And now?"]
    assert out["reply"] == replay(lm, agent.messages[:-1], 8)


def test_redis_restarted_under_running_servers(
        shared, redis_server, lm, replay, postgres_url: str, tmp_path: Path) -> None:
    """While Redis is down every agent still answers, exactly: a server's own files, else a
    re-prefill (its saves fail, the old list stays); back up and empty, saves put the blocks
    again and a resume on another server comes from Redis."""
    a, b = shared("a"), shared("b")
    ask(a, "x", "Tell me about the river and the mill by the old town.")
    a.call("evict_cache", {"agent": "x", "level": "memory"})  # saved: its blocks in Redis
    redis_server.halt()
    try:
        out = ask(b, "x", "And the bridge?")
        assert out["tier"] == "new" and out["warnings"]
        assert out["reply"] == replay(lm, transcript(postgres_url, tmp_path, "x").messages[:-1], 8)
        out = ask(a, "x", "And the weir?")  # its own files, with B's turn prefilled
        assert out["tokens"]["cached"] > 0
        assert out["reply"] == replay(lm, transcript(postgres_url, tmp_path, "x").messages[:-1], 8)
    finally:
        redis_server.run()
    ask(a, "x", "And the town?")
    a.call("evict_cache", {"agent": "x", "level": "memory"})  # saved: its blocks in Redis again
    out = ask(b, "x", "And the road?")
    assert out["tier"] == "remote" and out["tokens"]["cached"] > 0
    (warning,) = out["warnings"]  # its save while Redis was down, said once
    assert "saving its KV cache failed (Redis at redis://127.0.0.1" in warning and "cannot be reached" in warning
    agent = transcript(postgres_url, tmp_path, "x")
    assert [m["content"] for m in agent.messages if m["role"] == "user"] == [
        "Tell me about the river and the mill by the old town.", "And the bridge?", "And the weir?", "And the town?",
        "And the road?"]
    assert out["reply"] == replay(lm, agent.messages[:-1], 8)


@pytest.mark.parametrize("flag", ["--store", "--block-store"])
def test_a_store_out_of_reach_at_start_is_a_clear_message_without_the_password(
        settings: Settings, postgres_url: str, flag: str) -> None:
    port = free_port()
    url = f"postgresql://agent:s3cret@127.0.0.1:{port}/agents" if flag == "--store" else f"redis://:s3cret@127.0.0.1:{port}/0"
    extra = ["--store", url] if flag == "--store" else ["--store", postgres_url, "--block-store", url]
    out = subprocess.run([sys.executable, *serve_args(settings, *extra)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "s3cret" not in out.stderr
    name = "PostgreSQL at postgresql://agent:***@127.0.0.1" if flag == "--store" else "Redis at redis://:***@127.0.0.1"
    assert name in out.stderr.splitlines()[-1], out.stderr[-2000:]


def soak(shared, lm, replay, postgres_url: str, tmp_path: Path, servers: int, clients: int, agents: int,
         calls: int) -> None:
    """`clients` threads, each making `calls` random calls (asks, most; forks; evictions) to
    random agents on random servers; midway one server is killed (kill -9) and started again.
    After: every answered turn is in its agent's transcript, once, and no turn is there that
    was neither answered nor in flight on the killed server; each agent's last turn is exact."""
    names = "abcd"[:servers]
    live = {n: shared(n, "--lease-ttl", "2") for n in names}
    victim = live["a"]
    answered: list[tuple[str, str, str]] = []  # (agent, message, reply)
    in_flight_on_killed: set[str] = set()
    errors: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def client(c: int) -> None:
        rng = random.Random(c)
        for k in range(calls):
            agent = f"agent-{rng.randrange(agents)}"
            name = rng.choice(names)
            with lock:
                server = live[name]
            roll = rng.random()
            try:
                if roll < 0.8:
                    message = f"client {c} call {k}"
                    with lock:
                        if not killed.is_set() and server is victim:
                            in_flight_on_killed.add(message)
                    out = server.call("ask_agent", {"agent": agent, "message": message, "max_tokens": 6})
                    with lock:
                        answered.append((agent, message, out["reply"]))
                        in_flight_on_killed.discard(message)
                else:
                    tool, arguments = (("fork_agent", {"source": agent, "agent": f"fork-{c}-{k}"}) if roll < 0.9 else
                                       ("evict_cache", {"agent": agent, "level": rng.choice(["memory", "disk"])}))
                    result = server.request("tools/call", {"name": tool, "arguments": arguments})
                    if result["isError"] and "unknown agent" not in result["content"][0]["text"]:  # not asked yet
                        errors.append(result["content"][0]["text"])
            except Exception as e:  # noqa: BLE001 - a call to the killed server, else a failure
                if not (server is victim and killed.is_set()):
                    errors.append(f"{name}: {e!r}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while len(answered) < clients * calls // 4 and time.monotonic() < deadline:  # a quarter of the way
        time.sleep(0.05)
    with lock:
        killed.set()  # first: a call that fails from now on to `victim` is the kill's
        victim.proc.kill()
    victim.proc.wait()
    restarted = shared("a-again", "--lease-ttl", "2")  # a new process on a's cache dir is a's restart; its own here
    with lock:
        live["a"] = restarted
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    store = PostgresStore(tmp_path / "reader", postgres_url)
    try:
        by_agent: dict[str, list[tuple[str, str]]] = {}
        for agent, message, reply in answered:
            by_agent.setdefault(agent, []).append((message, reply))
        assert by_agent
        for agent, turns in by_agent.items():
            messages = store.load_agent(agent).messages
            pairs = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(len(messages) - 1)
                     if messages[i]["role"] == "user"]
            assert len({m for m, _ in pairs}) == len(pairs)  # nothing doubled
            assert set(turns) <= set(pairs)  # nothing answered lost, each with the reply given
            assert {m for m, _ in pairs} - {m for m, _ in turns} <= in_flight_on_killed
        for agent in sorted(by_agent)[:5]:
            messages = store.load_agent(agent).messages
            assert messages[-1]["content"] == replay(lm, messages[:-1], 6)
    finally:
        store.close()


def test_soak_short(shared, lm, replay, postgres_url: str, tmp_path: Path) -> None:
    soak(shared, lm, replay, postgres_url, tmp_path, servers=2, clients=4, agents=10, calls=16)


@pytest.mark.slow
def test_soak(shared, lm, replay, postgres_url: str, tmp_path: Path) -> None:
    soak(shared, lm, replay, postgres_url, tmp_path, servers=4, clients=16, agents=100, calls=100)


def test_an_agent_stays_hot_on_its_server_after_it_let_the_agent_go(shared, postgres_url: str) -> None:
    """A lease taken anew reads the agent's list again; the blocks it still names stay in memory."""
    a = shared("a")
    ask(a, "x", "Hello there, tell me about rivers.")
    ask(a, "x", "And lakes?")
    deadline = time.monotonic() + 30
    while holder(postgres_url, "x") is not None and time.monotonic() < deadline:  # saved, let go
        time.sleep(0.05)
    assert holder(postgres_url, "x") is None
    out = ask(a, "x", "And seas?")
    assert out["tier"] == "hot" and out["tokens"]["cached"] > 0
