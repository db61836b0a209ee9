"""The four tools through a real MCP client connected in memory."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp import Client

from conftest import saved_blocks
from mcp_semantic.server import create_server
from mcp_semantic.settings import Settings

pytestmark = pytest.mark.anyio


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    return result.structured_content


async def error_of(client: Client, tool: str, **args: Any) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error
    return result.content[0].text


async def test_tool_schemas(settings: Settings) -> None:
    async with Client(create_server(settings)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"ask_agent", "fork_agent", "list_agents", "evict_cache"}
    ask = tools["ask_agent"]
    assert ask.input_schema["required"] == ["agent", "message"]
    assert ask.input_schema["properties"]["agent"]["pattern"].startswith("^[A-Za-z0-9]")
    assert ask.input_schema["properties"]["max_tokens"]["maximum"] == settings.max_tokens_limit
    assert "think" in ask.input_schema["properties"] and "reasoning" in ask.output_schema["properties"]
    out = ask.output_schema
    assert {"agent", "reply", "finish_reason", "tier", "tokens", "timings_ms", "decode_tokens_per_s"} <= set(
        out["properties"]
    )
    assert set(tools["fork_agent"].output_schema["properties"]) >= {"agent", "source", "tokens"}
    assert set(tools["list_agents"].output_schema["properties"]) == {"agents", "total", "next_cursor", "memory"}
    assert tools["list_agents"].input_schema["properties"]["limit"]["maximum"] == 1000
    assert set(tools["evict_cache"].output_schema["properties"]) == {
        "evicted",
        "freed_memory_bytes",
        "freed_disk_bytes",
    }
    assert tools["evict_cache"].input_schema["properties"]["level"]["enum"] == ["memory", "disk", "agent"]
    hints = {name: t.annotations for name, t in tools.items()}  # hosts confirm only where it matters
    assert hints["list_agents"].read_only_hint is True
    assert hints["evict_cache"].destructive_hint is True and hints["evict_cache"].idempotent_hint is True
    assert hints["fork_agent"].destructive_hint is False and hints["ask_agent"].destructive_hint is False
    assert not any(h.read_only_hint for n, h in hints.items() if n != "list_agents")
    assert all(h.open_world_hint is False and h.title == tools[n].title for n, h in hints.items())


async def test_all_four_tools_and_restart(settings: Settings) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async with Client(create_server(settings)) as client:
        result = await client.call_tool(
            "ask_agent",
            {"agent": "helper", "message": "Hello, who are you?", "max_tokens": 20},
            progress_callback=on_progress,
        )
        assert not result.is_error
        first = result.structured_content
        assert first["tier"] == "new" and first["agent"] == "helper"
        assert first["tokens"]["generated"] >= 1 and first["finish_reason"] in ("stop", "length")
        assert result.content[0].text.startswith("[helper · tier new")
        assert progress and "prefill" in progress[0][2]
        done = [p[0] for p in progress]
        assert done == sorted(done) and done[-1] <= progress[-1][1]
        written = [m for _, _, m in progress if not m.startswith("prefill")]  # the reply as it grows
        assert len(written) >= 2 and len(written[0]) < len(written[-1])
        assert all(b.startswith(a) for a, b in zip(written, written[1:] + [first["reply"]])), written

        second = await call(client, "ask_agent", agent="helper", message="Tell me more.", max_tokens=12)
        assert second["tier"] == "hot" and second["tokens"]["cached"] >= first["tokens"]["context"]
        fork = await call(client, "fork_agent", source="helper", agent="helper.2")
        assert fork == {"agent": "helper.2", "source": "helper", "tokens": fork["tokens"], "turns": 2} and fork["tokens"] > 0
        listed = await call(client, "list_agents")
        names = {a["name"]: a for a in listed["agents"]}
        assert names["helper"]["tier"] == "hot" and names["helper"]["turns"] == 2
        assert names["helper.2"]["parent"] == "helper" and names["helper.2"]["tier"] == "hot"  # the source's blocks
        assert names["helper.2"]["shared_memory_bytes"] == names["helper.2"]["memory_bytes"] > 0
        assert listed["memory"]["budget_bytes"] == settings.memory_budget
        evicted = await call(client, "evict_cache", agent="helper", level="memory")
        assert evicted["evicted"] == ["helper"] and evicted["freed_memory_bytes"] == 0  # the fork holds them all
        evicted = await call(client, "evict_cache", level="memory")
        assert evicted["evicted"] == ["helper", "helper.2"] and evicted["freed_memory_bytes"] > 0

    async with Client(create_server(settings)) as client:  # a new server process would see the same
        listed = await call(client, "list_agents")
        assert {a["name"] for a in listed["agents"]} == {"helper", "helper.2"}
        third = await call(client, "ask_agent", agent="helper", message="Thanks!", max_tokens=8)
        assert third["tier"] == "disk" and third["tokens"]["cached"] >= second["tokens"]["context"]
        gone = await call(client, "evict_cache", level="agent")
        assert sorted(gone["evicted"]) == ["helper", "helper.2"] and gone["freed_disk_bytes"] > 0


async def test_errors_a_user_can_act_on(settings: Settings) -> None:
    async with Client(create_server(settings)) as client:
        text = await error_of(client, "ask_agent", agent="../escape", message="hi")
        assert "agent" in text and "^[A-Za-z0-9]" in text
        text = await error_of(client, "fork_agent", source="nobody", agent="x")
        assert "unknown agent 'nobody'" in text
        text = await error_of(client, "evict_cache", agent="nobody")
        assert "unknown agent 'nobody'" in text
        text = await error_of(client, "ask_agent", agent="a", message="hi", max_tokens=10**9)
        assert "max_tokens" in text
        text = await error_of(client, "ask_agent", agent="a", message="word " * 5000)
        assert "over the model's context" in text
        text = await error_of(client, "ask_agent", agent="a")
        assert "message" in text
        text = await error_of(client, "evict_cache", level="everything")
        assert "level" in text
        assert (await call(client, "list_agents"))["agents"] == []
        await call(client, "ask_agent", agent="a", message="Hello.", max_tokens=4)
        text = await error_of(client, "fork_agent", source="a", agent="b", at_turn=2)
        assert "at_turn 2 is out of range: agent a has 1 turns, so fork at 0 to 1" in text
        text = await error_of(client, "fork_agent", source="a", agent="b", at_turn=-1)
        assert "at_turn" in text
        assert [a["name"] for a in (await call(client, "list_agents"))["agents"]] == ["a"]  # nothing was made
        rewound = await call(client, "fork_agent", source="a", agent="b", at_turn=0)
        assert rewound["turns"] == 0 and rewound["source"] == "a"


async def test_corrupt_cache_is_reported_to_the_host_as_a_warning(settings: Settings) -> None:
    logs: list[Any] = []

    async def on_log(params: Any) -> None:
        logs.append(params)

    async with Client(create_server(settings)) as client:
        await call(client, "ask_agent", agent="a", message="Hello.", max_tokens=8)
    saved_blocks(settings.cache_dir, "a")[0].write_bytes(b"\x00" * 100)
    async with Client(create_server(settings), logging_callback=on_log, log_level="warning") as client:
        out = await call(client, "ask_agent", agent="a", message="Again.", max_tokens=8)
    assert out["tier"] == "new" and any("unreadable" in w for w in out["warnings"])
    assert any("unreadable" in str(entry.data) for entry in logs)


async def test_stress_many_clients_many_agents_under_a_small_budget(settings: Settings) -> None:
    """200 calls over 20 agents from 8 concurrent clients, with evictions, under a budget for a few
    agents: every transcript holds exactly the turns answered, in order, and a restart finds them."""
    import random

    import anyio

    settings = settings.model_copy(update={"memory_budget": 2 * 1024**2, "max_queue": 64})
    server = create_server(settings)
    answered: dict[str, list[tuple[str, str]]] = {f"s{i}": [] for i in range(20)}

    async def client_run(c: int) -> None:
        rng = random.Random(c)
        async with Client(server) as client:
            for n in range(25):
                agent = f"s{rng.randrange(20)}"
                if rng.random() < 0.1:
                    await call(client, "evict_cache", agent=agent, level=rng.choice(["memory", "disk"])) if answered[agent] else None
                message = f"client {c} call {n}: hello"
                out = await call(client, "ask_agent", agent=agent, message=message, max_tokens=4)
                answered[agent].append((message, out["reply"]))
                if n % 5 == 4:
                    memory = (await call(client, "list_agents"))["memory"]
                    assert memory["used_bytes"] <= memory["budget_bytes"]

    async with anyio.create_task_group() as tg:
        for c in range(8):
            tg.start_soon(client_run, c)
    assert sum(len(v) for v in answered.values()) == 200

    async with Client(create_server(settings)) as client:  # a restart
        listed = await call(client, "list_agents")
        assert {a["name"]: a["turns"] for a in listed["agents"]} == {n: len(t) for n, t in answered.items() if t}
    from mcp_semantic.sqlite_store import SQLiteStore

    store = SQLiteStore(settings.cache_dir)
    for name, turns in answered.items():
        agent = store.load_agent(name)
        if not turns:
            assert agent is None
            continue
        pairs = list(zip(agent.messages[0::2], agent.messages[1::2]))
        assert sorted((u["content"], a["content"]) for u, a in pairs) == sorted(turns)  # each answered turn, once
        order = [u["content"] for u, _ in pairs]
        for c in range(8):  # one client's calls to an agent keep their order
            mine = [m for m in order if m.startswith(f"client {c} ")]
            assert mine == [m for m, _ in turns if m.startswith(f"client {c} ")]
    store.close()


async def test_an_internal_error_reaches_the_client_without_details(settings: Settings, caplog) -> None:
    from mcp_semantic.engine import Engine

    async def broken(self, *args, **kwargs):
        raise RuntimeError(f"boom in {settings.cache_dir}/blocks/secret.safetensors")

    server = create_server(settings)
    async with Client(server) as client:
        original = Engine.list_agents
        Engine.list_agents = broken
        try:
            text = await error_of(client, "list_agents")
        finally:
            Engine.list_agents = original
        assert "internal error" in text and "server's log" in text
        assert str(settings.cache_dir) not in text and "Traceback" not in text and "boom" not in text
        assert "boom in" in caplog.text  # the details went to the log
        assert (await call(client, "list_agents"))["agents"] == []  # and the server goes on


def test_wrong_tool_arguments_get_errors_never_tracebacks(settings: Settings) -> None:
    """Property test: arguments of any type, missing or extra, are refused with a message (the
    schema's or the engine's) or answered; never a traceback, and the server goes on."""
    import anyio
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from hypothesis import strategies as st

    value = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=True),
                      st.text(max_size=80), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
    arguments = st.dictionaries(
        st.sampled_from(["agent", "message", "system", "max_tokens", "temperature", "top_p", "seed", "source", "level", "extra"]),
        value,
        max_size=6,
    )
    calls = st.lists(st.tuples(st.sampled_from(["ask_agent", "fork_agent", "evict_cache", "list_agents"]), arguments), min_size=20, max_size=20)

    @hypothesis_settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(calls)
    def run(batch) -> None:
        async def main() -> None:
            async with Client(create_server(settings)) as client:
                for tool, args in batch:
                    if tool == "ask_agent" and isinstance(args.get("max_tokens"), int):
                        args["max_tokens"] = min(args["max_tokens"], 4)  # valid calls stay short
                    result = await client.call_tool(tool, args)
                    text = " ".join(c.text for c in result.content if hasattr(c, "text"))
                    assert "Traceback" not in text and str(settings.cache_dir) not in text
                    if result.is_error:
                        assert text.strip()
                assert "agents" in (await client.call_tool("list_agents", {})).structured_content

        anyio.run(main)

    run()


async def test_list_agents_pages_by_name(settings: Settings) -> None:
    """Pages of `limit` agents in name order, each page's next_cursor giving the next; a bad limit
    or cursor is an error that says what to pass, and changes nothing."""
    async with Client(create_server(settings)) as client:
        for name in ["b", "a", "d", "c", "e"]:
            await call(client, "ask_agent", agent=name, message="Hi.", max_tokens=1)
        pages, cursor = [], None
        while True:
            page = await call(client, "list_agents", limit=2, **({"cursor": cursor} if cursor else {}))
            assert page["total"] == 5
            pages.append([a["name"] for a in page["agents"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [["a", "b"], ["c", "d"], ["e"]]
        assert [a["name"] for a in (await call(client, "list_agents"))["agents"]] == ["a", "b", "c", "d", "e"]
        assert [a["name"] for a in (await call(client, "list_agents", cursor="bb"))["agents"]] == ["c", "d", "e"]
        assert "limit" in await error_of(client, "list_agents", limit=0)
        assert "next_cursor" in await error_of(client, "list_agents", cursor="../x")
        assert (await call(client, "list_agents"))["total"] == 5


async def test_stdin_lines_read_a_pipe_line_by_line_and_leave_files_to_the_sdk(tmp_path) -> None:
    import os

    from mcp_semantic.server import StdinLines

    r, w = os.pipe()
    os.write(w, '{"a": 1}\n{"b": "ü"'.encode())
    lines = StdinLines.of(r)
    assert await lines.__anext__() == '{"a": 1}\n'
    os.write(w, b"}\nlast")
    os.close(w)
    assert [line async for line in lines] == ['{"b": "ü"}\n', "last"]  # the last line without its newline, then the end
    os.close(r)
    path = tmp_path / "input"
    path.write_text("{}\n")
    with open(path) as f:
        assert StdinLines.of(f.fileno()) is None


async def test_agents_are_resources_and_hosts_hear_when_they_come_and_go(settings: Settings) -> None:
    """Each agent's conversation is a resource (`agent://<name>`, Markdown, and JSON), listed;
    a made, forked or forgotten agent changes the list, said on both wires: to a listening
    client (subscriptions/listen, 2026-07-28) and to the calling session on earlier ones."""
    import json

    import mcp_types

    server = create_server(settings)
    changed: list[str] = []

    async def on_message(message) -> None:
        if isinstance(message, mcp_types.ResourceListChangedNotification):
            changed.append("legacy")

    async with Client(server, mode="legacy", message_handler=on_message) as old:
        assert old.server_capabilities.resources.list_changed is True
        asked = await call(old, "ask_agent", agent="a", message="Hello.", system="Be brief.", max_tokens=6)
        assert asked["turns"] == 1 and changed == ["legacy"]
        await call(old, "ask_agent", agent="a", message="More.", max_tokens=6)  # no new agent: nothing said
        assert changed == ["legacy"]
        templates = {t.uri_template for t in (await old.list_resource_templates()).resource_templates}
        assert templates == {"agent://{name}", "agent://{name}/transcript.json"}
        listed = (await old.list_resources()).resources
        assert [(str(r.uri), r.mime_type) for r in listed] == [("agent://a", "text/markdown")]
        text = (await old.read_resource("agent://a")).contents[0].text
        assert text.startswith("# Agent a") and "**system**: Be brief." in text and "**user**: More." in text
        data = json.loads((await old.read_resource("agent://a/transcript.json")).contents[0].text)
        assert data["turns"] == 2 and data["system"] == "Be brief." and data["messages"][-2]["content"] == "More."
        with pytest.raises(Exception, match="unknown agent 'nobody'"):
            await old.read_resource("agent://nobody")

    async with Client(server) as new:
        assert new.protocol_version == "2026-07-28"
        async with new.listen(resources_list_changed=True) as events:
            await call(new, "fork_agent", source="a", agent="b", at_turn=1)
            with anyio.fail_after(10):
                await events.__anext__()
            await call(new, "evict_cache", agent="b", level="agent")
            with anyio.fail_after(10):
                await events.__anext__()
        assert [str(r.uri) for r in (await new.list_resources()).resources] == ["agent://a"]


def test_the_embedded_mode_needs_none_of_the_shared_mode_s_packages() -> None:
    """A plain install (no `shared` extra: no psycopg, no redis) imports and builds the server:
    the shared mode's modules load only when --store is given."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('psycopg', 'psycopg_pool', 'redis', 'hiredis'): sys.modules[m] = None  # not installed\n"
            "from mcp_semantic import cli\n"
            "from mcp_semantic.server import create_server\n"
            "from mcp_semantic.settings import Settings\n"
            "create_server(Settings())\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def scripted_replies(engine, *texts: str) -> None:
    """The engine's model "writes" each text in turn (one a call), then ends its turn: as
    test_engine.py's reasoning tests script it."""
    import mlx.core as mx

    tok = engine.lm.tokenizer
    replies = iter(texts)
    tokens: list = []

    def sampler(logprobs):
        nonlocal tokens
        if not tokens:
            tokens = tok.encode(next(replies), add_special_tokens=False) + [tok.eos_token_id]
        return mx.array([tokens.pop(0)] * logprobs.shape[0], dtype=mx.uint32)

    engine._greedy = sampler


async def test_a_thinking_model_s_reasoning_reaches_the_client_apart_from_its_reply(settings: Settings, tmp_path) -> None:
    """A `<think>` model whose template can switch thinking (as Qwen3's), its replies scripted: the
    client gets the reasoning in `reasoning`, the answer in `reply`; with `think: false` all is
    reply; `think` on a model without the switch is a tool error."""
    from mcp_semantic.tiny_model import SWITCHABLE_THINKING_CHAT_TEMPLATE, make_tiny_model

    switch = SWITCHABLE_THINKING_CHAT_TEMPLATE
    model = make_tiny_model(tmp_path / "thinker", chat_template=switch, thinking=True)
    server = create_server(settings.model_copy(update={"model": str(model), "cache_dir": tmp_path / "c"}))
    async with Client(server) as client:
        scripted_replies(server.shared.engine, "First the river.</think>\n\nThe mill.", "The weir.")
        first = await call(client, "ask_agent", agent="a", message="Where is it?", max_tokens=40)
        assert (first["reasoning"], first["reply"], first["tier"]) == ("First the river.", "The mill.", "new")
        quick = await call(client, "ask_agent", agent="a", message="And then?", max_tokens=40, think=False)
        assert (quick.get("reasoning"), quick["reply"]) == (None, "The weir.")
    async with Client(create_server(settings)) as client:
        text = await error_of(client, "ask_agent", agent="b", message="Hello?", think=True)
        assert "`think` needs a model whose chat template can switch thinking" in text


async def test_a_gpt_oss_model_s_reasoning_reaches_the_client_apart_from_its_reply(settings: Settings, tmp_path) -> None:
    """gpt-oss's harmony format (its replies scripted): the analysis channel reaches the client as
    `reasoning`, the final one as `reply`; `think` is a tool error saying harmony sets a
    reasoning effort, and changes nothing."""
    from mcp_semantic.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "gpt-oss", model_type="gpt_oss", harmony=True)
    server = create_server(settings.model_copy(update={"model": str(model), "cache_dir": tmp_path / "c"}))
    reasoning, answer = "First the river, then the mill.", "The mill stands by the river."
    async with Client(server) as client:
        scripted_replies(server.shared.engine, f"<|channel|>analysis<|message|>{reasoning}<|end|>"
                                               f"<|start|>assistant<|channel|>final<|message|>{answer}")
        first = await call(client, "ask_agent", agent="a", message="Where is it?", max_tokens=60)
        assert (first["reasoning"], first["reply"], first["finish_reason"]) == (reasoning, answer, "stop")
        for think in (False, True):
            text = await error_of(client, "ask_agent", agent="a", message="Quickly?", think=think)
            assert "harmony format" in text and "reasoning effort" in text
        assert server.shared.engine.store.load_agent("a").turns == 1
