"""`mcp-semantic serve` as a real subprocess: over stdio, and over Streamable HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client

from conftest import saved_blocks, serve_args
from servers import free_port, wait_for_port
from mcp_semantic.settings import Settings

pytestmark = pytest.mark.anyio


async def hints_and_growing_reply(client: Client, agent: str) -> dict:
    """What issue 16 asks of the transports: the tools' hints, progress messages that are the
    reply as it is written, and the agent as a resource. Returns the call's result."""
    hints = {t.name: t.annotations for t in (await client.list_tools()).tools}
    assert hints["list_agents"].read_only_hint and hints["evict_cache"].destructive_hint
    written: list[str] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        if message and not message.startswith("prefill"):
            written.append(message)

    result = await client.call_tool("ask_agent", {"agent": agent, "message": "Hi there.", "max_tokens": 20},
                                    progress_callback=progress)
    assert not result.is_error, result.content
    reply = result.structured_content["reply"]
    assert written and all(b.startswith(a) for a, b in zip(written, written[1:] + [reply])), (written, reply)
    assert f"agent://{agent}" in [str(r.uri) for r in (await client.list_resources()).resources]
    text = (await client.read_resource(f"agent://{agent}")).contents[0].text
    assert "**user**: Hi there." in text and text.rstrip().endswith(reply.rstrip())
    return result.structured_content


async def test_stdio_subprocess_and_restart(settings: Settings) -> None:
    params = StdioServerParameters(command=sys.executable, args=serve_args(settings), env=dict(os.environ))
    async with Client(params) as client:
        assert (await hints_and_growing_reply(client, "s"))["tier"] == "new"
    async with Client(params) as client:  # a second server process on the same cache dir
        result = await client.call_tool("ask_agent", {"agent": "s", "message": "Again.", "max_tokens": 8})
        assert result.structured_content["tier"] == "disk"
        assert result.structured_content["tokens"]["cached"] > 0


@contextmanager
def http_server(settings: Settings, transport: str, *extra: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """`mcp-semantic serve` over an HTTP transport on a free port: yields the port once it listens;
    stops it with SIGINT (as a user's Ctrl-C) afterwards, and checks it exited cleanly."""
    port = free_port()
    args = serve_args(settings, "--transport", transport, "--port", str(port), *extra)
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_for_port(port, "mcp-semantic serve",
                      lambda: None if proc.poll() is None else f"exit {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]


async def test_streamable_http_on_loopback(settings: Settings, tmp_path: Path) -> None:
    with http_server(settings, "streamable-http") as port:
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            await hints_and_growing_reply(client, "h")
            listed = await client.call_tool("list_agents", {})
            assert [a["name"] for a in listed.structured_content["agents"]] == ["h"]
    # a clean stop writes every cache
    assert saved_blocks(settings.cache_dir, "h") and all(p.exists() for p in saved_blocks(settings.cache_dir, "h"))


async def test_sse_sessions_share_one_engine(settings: Settings) -> None:
    with http_server(settings, "sse") as port:
        async with Client(sse_client(f"http://127.0.0.1:{port}/sse")) as one, Client(
            sse_client(f"http://127.0.0.1:{port}/sse")
        ) as two:
            result = await one.call_tool("ask_agent", {"agent": "e", "message": "Hello.", "max_tokens": 8})
            assert not result.is_error, result.content
            listed = await two.call_tool("list_agents", {})
            assert [(a["name"], a["tier"]) for a in listed.structured_content["agents"]] == [("e", "hot")]


def test_sigterm_on_stdio_saves_every_cache(settings: Settings, stdio_server) -> None:
    server = stdio_server(settings)
    hints = {t["name"]: t["annotations"] for t in server.request("tools/list", {})["tools"]}  # as on the wire
    assert hints["list_agents"]["readOnlyHint"] is True and hints["evict_cache"]["destructiveHint"] is True
    server.call("ask_agent", {"agent": "t", "message": "Hello.", "max_tokens": 4})
    server.proc.send_signal(signal.SIGTERM)  # before the idle save, stdin still open: the lifespan must save it
    server.proc.wait(timeout=30)
    assert server.proc.returncode == 0 and "terminate called" not in server.log(), server.log()[-2000:]
    assert saved_blocks(settings.cache_dir, "t") and all(p.exists() for p in saved_blocks(settings.cache_dir, "t"))


def test_a_second_server_on_the_same_cache_dir_refuses(settings: Settings) -> None:
    first = subprocess.Popen(
        [sys.executable, *serve_args(settings)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not (settings.cache_dir / "lock").exists() or not (settings.cache_dir / "lock").read_text():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, *serve_args(settings)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 1
        assert f"another mcp-semantic server (pid {first.pid})" in second.stderr and "--cache-dir" in second.stderr
    finally:
        first.stdin.close()
        first.wait(timeout=30)
    assert first.returncode == 0


def test_a_call_cancelled_by_the_host_leaves_its_agent_as_it_was(settings: Settings, stdio_server) -> None:
    """MCP notifications/cancelled stops the call at the engine's next step; nothing is half appended."""
    server = stdio_server(settings)
    first = server.call("ask_agent", {"agent": "c", "message": "Hello.", "max_tokens": 4})
    server._id += 1
    long_call = server._id
    server._send({"id": long_call, "method": "tools/call", "params": {
        "name": "ask_agent", "arguments": {"agent": "c", "message": "Talk for a long time. " * 20, "max_tokens": 1500},
    }})
    time.sleep(0.5)  # it is generating
    server._send({"method": "notifications/cancelled", "params": {"requestId": long_call, "reason": "the user pressed stop"}})
    other = server.call("ask_agent", {"agent": "d", "message": "Hi.", "max_tokens": 4})  # the server goes on
    assert other["finish_reason"] in ("stop", "length")
    # c's next call runs after the cancelled one (calls to one agent keep their order)
    again = server.call("ask_agent", {"agent": "c", "message": "Next.", "max_tokens": 4})
    assert first["tokens"]["context"] <= again["tokens"]["cached"] < again["tokens"]["context"]
    listed = server.call("list_agents", {})
    assert {a["name"]: a["turns"] for a in listed["agents"]} == {"c": 2, "d": 1}  # the long turn is not there


def test_binding_beyond_loopback_needs_a_token(settings: Settings) -> None:
    args = serve_args(settings, "--transport", "streamable-http", "--host", "0.0.0.0", "--port", str(free_port()))
    out = subprocess.run([sys.executable, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "--auth-token" in out.stderr and "0.0.0.0" in out.stderr


def post(port: int, headers: dict[str, str]) -> int:
    """An MCP initialize request over Streamable HTTP; its HTTP status."""
    import json
    import urllib.error
    import urllib.request

    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/mcp", data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json", "accept": "application/json, text/event-stream", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_with_a_token_every_request_must_carry_it(settings: Settings) -> None:
    env = {**os.environ, "MCP_SEMANTIC_AUTH_TOKEN": "s3cret-token"}
    with http_server(settings, "streamable-http", "--host", "0.0.0.0", env=env) as port:
        assert post(port, {}) == 401
        assert post(port, {"authorization": "Bearer wrong"}) == 401
        assert post(port, {"authorization": "s3cret-token"}) == 401  # the scheme is part of it
        assert post(port, {"authorization": "Bearer s3cret-token"}) == 200


def test_loopback_refuses_a_foreign_origin(settings: Settings) -> None:
    """DNS rebinding: a page from another site that reaches 127.0.0.1 is refused (the SDK's check)."""
    with http_server(settings, "streamable-http") as port:
        assert post(port, {"origin": "http://evil.example"}) in (400, 403)
        assert post(port, {"host": "evil.example"}) in (400, 421, 403)
        assert post(port, {"origin": f"http://127.0.0.1:{port}"}) == 200


async def soak(settings: Settings, calls: int, agents: int = 50, clients: int = 8) -> None:
    """`calls` calls over `agents` agents from `clients` clients through Streamable HTTP, with
    random forks and evictions and two server restarts; then every agent holds exactly the turns
    answered to it (a fork: its source's turns before its own), and memory stayed under budget."""
    import random

    from mcp_semantic.sqlite_store import SQLiteStore

    budget = 4 * 1024**2
    answered: dict[str, list[str]] = {f"a{i}": [] for i in range(agents)}
    forks: dict[str, str] = {}
    per_phase = calls // 3
    for phase in range(3):  # two restarts between the phases
        with http_server(settings, "streamable-http", "--memory-budget", str(budget)) as port:

            async def client_run(c: int) -> None:
                rng = random.Random(phase * 100 + c)
                async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                    for n in range(per_phase // clients):
                        name = rng.choice(sorted(answered))
                        roll = rng.random()
                        if roll < 0.03 and answered[name]:
                            fork = f"f{phase}-{c}-{n}"
                            result = await client.call_tool("fork_agent", {"source": name, "agent": fork})
                            assert not result.is_error, result.content
                            forks[fork] = name
                            answered[fork] = []
                            continue
                        if roll < 0.08:
                            level = rng.choice(["memory", "disk"])
                            result = await client.call_tool("evict_cache", {"agent": name, "level": level})
                            assert not result.is_error or "unknown agent" in result.content[0].text, result.content
                            continue
                        message = f"phase {phase} client {c} call {n}"
                        result = await client.call_tool("ask_agent", {"agent": name, "message": message, "max_tokens": 3})
                        assert not result.is_error, result.content
                        answered[name].append(message)
                        if n % 10 == 0:
                            memory = (await client.call_tool("list_agents", {})).structured_content["memory"]
                            assert memory["used_bytes"] <= memory["budget_bytes"] == budget

            async with anyio.create_task_group() as tg:
                for c in range(clients):
                    tg.start_soon(client_run, c)

    store = SQLiteStore(settings.cache_dir)
    try:
        for name, mine in answered.items():
            agent = store.load_agent(name)
            if agent is None:
                assert not mine and name not in forks
                continue
            users = [m["content"] for m in agent.messages if m["role"] == "user"]
            own = [u for u in users if u in set(mine)]
            assert sorted(own) == sorted(mine) and len(set(own)) == len(own)  # each answered turn, once
            inherited = users[: len(users) - len(mine)]
            assert users[len(inherited):] == own  # its own turns come after what it inherited
            if name not in forks:
                assert not inherited
            else:  # a fork starts with a prefix of its source's turns
                source = [m["content"] for m in store.load_agent(forks[name]).messages if m["role"] == "user"]
                assert source[: len(inherited)] == inherited
            assert len(agent.messages) == 2 * len(users)  # every turn is a question and its answer
    finally:
        store.close()


async def test_soak_short(settings: Settings) -> None:
    await soak(settings, calls=240)


@pytest.mark.slow
async def test_soak(settings: Settings) -> None:
    await soak(settings, calls=2000)


# A client that asks for a long reply, says when the reply is being generated, and waits: the
# test kills it (SIGKILL) there, as a host that crashes or is closed mid-call.
LONG_CALL_CLIENT = """
import json, sys
import anyio
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client

async def main():
    transport, target, mode = sys.argv[1:4]
    if transport == "stdio":
        target = StdioServerParameters(command=sys.executable, args=json.loads(target))
    elif transport == "sse":
        target = sse_client(target)
    async with Client(target, mode=mode) as client:
        said = []

        async def progress(done, total, message):
            if not said:
                said.append(done)
                print("generating", flush=True)

        await client.call_tool("ask_agent", {"agent": "k", "message": "Talk for a long time. " * 20, "max_tokens": 1500},
                               progress_callback=progress)
        print("answered", flush=True)

anyio.run(main)
"""


def kill_during_a_long_call(transport: str, target: str, mode: str) -> None:
    """Run LONG_CALL_CLIENT and SIGKILL it once the server is generating its reply."""
    client = subprocess.Popen([sys.executable, "-c", LONG_CALL_CLIENT, transport, target, mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = client.stdout.readline()
        assert line == "generating\n", (line, client.stderr.read()[-2000:] if client.poll() is not None else "")
    finally:
        client.kill()
        client.wait()


def wait_for_cache_dir(settings: Settings, timeout: float = 120) -> None:
    """Until no process holds the cache dir's lock (a server left without its client exits)."""
    import fcntl

    deadline = time.monotonic() + timeout
    with open(settings.cache_dir / "lock", "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not exit after its client was killed") from None
                time.sleep(0.2)


async def check_the_killed_call_left_no_turn(client: Client) -> None:
    """The killed call is not in the transcript, and the agent answers its next call (which a
    call still generating for nobody would hold up behind it, then commit before it)."""
    result = await client.call_tool("ask_agent", {"agent": "k", "message": "Next.", "max_tokens": 4})
    assert not result.is_error, result.content
    listed = await client.call_tool("list_agents", {})
    assert {a["name"]: a["turns"] for a in listed.structured_content["agents"]}["k"] == 1


# "legacy": the 2025 wire (an initialize handshake, a session), which hosts speak today; "auto":
# the SDK's newest, where a request's stream closing is its cancellation
@pytest.mark.parametrize("transport, mode", [("streamable-http", "legacy"), ("streamable-http", "auto"), ("sse", "legacy")])
async def test_a_killed_client_s_call_is_cancelled_over_http(settings: Settings, transport: str, mode: str) -> None:
    with http_server(settings, transport) as port:
        url = f"http://127.0.0.1:{port}/mcp" if transport == "streamable-http" else f"http://127.0.0.1:{port}/sse"
        await anyio.to_thread.run_sync(kill_during_a_long_call, transport, url, mode)
        async with Client(url if transport == "streamable-http" else sse_client(url), mode=mode) as client:
            await check_the_killed_call_left_no_turn(client)


async def test_a_killed_client_s_call_is_cancelled_over_stdio(settings: Settings) -> None:
    """The host dies: the server it started sees its input end, cancels the call, saves and exits."""
    await anyio.to_thread.run_sync(kill_during_a_long_call, "stdio", json.dumps(serve_args(settings)), "legacy")
    await anyio.to_thread.run_sync(wait_for_cache_dir, settings)
    params = StdioServerParameters(command=sys.executable, args=serve_args(settings), env=dict(os.environ))
    async with Client(params) as client:
        await check_the_killed_call_left_no_turn(client)


def family_gguf(family: str, tmp_path: Path, tiny_model_dir: Path, request: pytest.FixtureRequest) -> Path:
    """A tiny random-weight GGUF file of a non-llama family, as llama.cpp's convert script writes
    it (tests/gguf_files.py): Gemma 3 with its SentencePiece vocabulary, Phi-3 with fused tensors."""
    from gguf_files import spm_vocab, write_gguf
    from mcp_semantic.tiny_model import make_tiny_model
    from test_gguf import make_phi3

    if family == "gemma3":
        model_dir = make_tiny_model(tmp_path / "gemma", model_type="gemma3_text")
        vocab = spm_vocab(request.getfixturevalue("sentencepiece"), add_space_prefix=False)
        return write_gguf(model_dir, tmp_path / "gemma.gguf", "gemma3", vocab=vocab)
    return write_gguf(make_phi3(tiny_model_dir, tmp_path / "phi3"), tmp_path / "phi3.gguf", "phi3")


async def two_turns(client: Client, agent: str, first_tier: str) -> None:
    """An agent answers (`first_tier`), then answers again from its hot cache."""
    for tier, message in ((first_tier, "Hello, who are you?"), ("hot", "And then?")):
        result = await client.call_tool("ask_agent", {"agent": agent, "message": message, "max_tokens": 8})
        assert not result.is_error, result.content
        out = result.structured_content
        assert out["tier"] == tier and out["tokens"]["generated"] > 0 and isinstance(out["reply"], str), out
        assert out["finish_reason"] in ("stop", "length")
    assert out["tokens"]["cached"] > 0


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
async def test_a_gguf_of_another_family_is_served_over_stdio_and_streamable_http(
        family: str, settings: Settings, tiny_model_dir: Path, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """`serve --model <file.gguf>` of a Gemma 3 or Phi-3 file: the SDK's client over stdio and
    over Streamable HTTP (each server on its own cache dir) gets answers, turn after turn; a
    second stdio server on the first's cache dir resumes its agent from disk."""
    settings = settings.model_copy(update={"model": str(family_gguf(family, tmp_path, tiny_model_dir, request))})
    params = StdioServerParameters(command=sys.executable, args=serve_args(settings), env=dict(os.environ))
    async with Client(params) as client:
        await two_turns(client, "s", "new")
    async with Client(params) as client:
        await two_turns(client, "s", "disk")
    with http_server(settings.model_copy(update={"cache_dir": tmp_path / "http"}), "streamable-http") as port:
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            await two_turns(client, "h", "new")
