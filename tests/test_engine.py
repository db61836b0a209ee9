"""The engine through its async API: resume, exactness, fork, evict, refusals, cancellation."""

from __future__ import annotations

import anyio
import pytest

from mcp_semantic.calls import AskRequest, RequestError
from mcp_semantic.server import open_engine
from mcp_semantic.settings import Settings
from mcp_semantic.store import InvalidName

pytestmark = pytest.mark.anyio

QUESTIONS = ["Tell me about the river.", "And what about the old mill?", "Summarise it in one line."]


async def test_resume_from_disk_is_exact_and_skips_prefill(settings: Settings, replay) -> None:
    engine = open_engine(settings)
    first = await engine.ask(AskRequest("alice", QUESTIONS[0], system="You are terse.", max_tokens=24))
    assert first.tier == "new" and first.tokens.cached == 0
    second = await engine.ask(AskRequest("alice", QUESTIONS[1], max_tokens=24))
    assert second.tier == "hot"
    assert second.tokens.cached >= first.tokens.context  # the whole first turn was reused
    assert second.tokens.prefilled == second.tokens.context - second.tokens.cached
    await engine.aclose()

    engine = open_engine(settings)  # a restart: the cache comes from disk
    third = await engine.ask(AskRequest("alice", QUESTIONS[2], max_tokens=24))
    assert third.tier == "disk"
    assert third.tokens.cached >= second.tokens.context
    assert third.tokens.prefilled < 40

    messages = [{"role": "system", "content": "You are terse."}]
    for question, answer in zip(QUESTIONS, (first, second, third)):
        messages.append({"role": "user", "content": question})
        assert answer.reply == replay(engine.lm, messages, 24)
        messages.append({"role": "assistant", "content": answer.reply})
    listed = await engine.list_agents()
    assert [(a.name, a.turns) for a in listed.agents] == [("alice", 3)]
    await engine.aclose()


async def test_fork_reuses_the_source_cache_and_diverges(settings: Settings, replay) -> None:
    engine = open_engine(settings)
    base = await engine.ask(AskRequest("src", "Tell me a story about a fox.", max_tokens=16))
    fork = await engine.fork("src", "alt")
    assert fork.tokens == len(engine.agents.memory["src"].tokens) > 0
    shared = {a.name: a for a in (await engine.list_agents()).agents}
    assert shared["alt"].blocks == shared["src"].blocks > 0
    assert shared["alt"].shared_memory_bytes == shared["src"].shared_memory_bytes > 0  # one copy in memory
    alt = await engine.ask(AskRequest("alt", "Make it about a bear instead.", max_tokens=16))
    assert alt.tier == "hot" and alt.tokens.cached >= base.tokens.context  # built from the source's blocks
    src = await engine.ask(AskRequest("src", "Go on.", max_tokens=16))
    assert src.tier == "hot"
    history = [{"role": "user", "content": "Tell me a story about a fox."}, {"role": "assistant", "content": base.reply}]
    assert alt.reply == replay(engine.lm, history + [{"role": "user", "content": "Make it about a bear instead."}], 16)
    assert src.reply == replay(engine.lm, history + [{"role": "user", "content": "Go on."}], 16)
    listed = await engine.list_agents()
    agents = {a.name: a for a in listed.agents}
    assert agents["alt"].parent == "src" and agents["alt"].turns == 2
    assert listed.memory.hot_agents == 2 and listed.memory.hit_rate == 1.0
    with pytest.raises(RequestError, match="already exists"):
        await engine.fork("src", "alt")
    with pytest.raises(RequestError, match="unknown agent"):
        await engine.fork("nobody", "x")
    await engine.aclose()


async def test_evict_levels(settings: Settings) -> None:
    engine = open_engine(settings)
    for name in ("a", "b"):  # their own system prompts: no block in common
        await engine.ask(AskRequest(name, "Hello there.", system=f"You are agent {name}.", max_tokens=8))
    out = await engine.evict("a", "memory")
    assert out.evicted == ["a"] and out.freed_memory_bytes > 0 and out.freed_disk_bytes == 0
    tiers = {a.name: a.tier for a in (await engine.list_agents()).agents}
    assert tiers["a"] == "disk"
    assert (await engine.ask(AskRequest("a", "Again.", max_tokens=8))).tier == "disk"

    await engine.flush()
    files = set(engine.store.blocks.dir.iterdir())
    out = await engine.evict("a", "disk")
    assert out.freed_disk_bytes > 0
    assert engine.store.kv_record("a") is None
    assert files - set(engine.store.blocks.dir.iterdir()) and set(engine.store.blocks.dir.iterdir()) <= files
    again = await engine.ask(AskRequest("a", "Once more.", max_tokens=8))
    assert again.tier == "new" and again.tokens.cached == 0
    assert any("re-prefilling" in w for w in again.warnings)
    assert (await engine.list_agents()).agents[0].turns == 3  # the transcript was kept

    out = await engine.evict(None, "agent")
    assert sorted(out.evicted) == ["a", "b"]
    assert (await engine.list_agents()).agents == []
    assert engine.store.names() == []
    with pytest.raises(RequestError, match="unknown agent"):
        await engine.evict("a", "memory")
    await engine.aclose()


async def test_refusals_change_nothing(settings: Settings) -> None:
    engine = open_engine(settings)
    await engine.ask(AskRequest("a", "Hi.", system="Be brief.", max_tokens=8))
    before = engine.store.load_agent("a")
    with pytest.raises(RequestError, match="different system prompt"):
        await engine.ask(AskRequest("a", "Hi.", system="Be verbose.", max_tokens=8))
    long = "word " * (engine.lm.context_length + 10)
    with pytest.raises(RequestError, match=rf"over the model's context of {engine.lm.context_length} tokens"):
        await engine.ask(AskRequest("a", long, max_tokens=8))
    with pytest.raises(RequestError, match="max_tokens"):
        await engine.ask(AskRequest("a", "Hi.", max_tokens=0))
    for bad in ("../etc", "a/b", "", "x" * 65, ".hidden", "nul\x00", "caf\u00e9"):
        with pytest.raises(InvalidName, match="invalid agent name"):
            await engine.ask(AskRequest(bad, "Hi."))
    assert engine.store.load_agent("a") == before
    assert engine.store.names() == ["a"]
    await engine.aclose()


async def test_corrupt_cache_file_costs_a_reprefill_not_an_answer(settings: Settings, replay) -> None:
    engine = open_engine(settings)
    first = await engine.ask(AskRequest("a", "Tell me about the sea.", max_tokens=12))
    await engine.flush()
    path = engine.store.blocks.path(engine.store.kv_record("a").blocks[0])
    await engine.aclose()
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated

    engine = open_engine(settings)
    second = await engine.ask(AskRequest("a", "And the shore?", max_tokens=12))
    assert second.tier == "new" and second.tokens.cached == 0
    assert any("unreadable" in w for w in second.warnings)
    messages = [
        {"role": "user", "content": "Tell me about the sea."},
        {"role": "assistant", "content": first.reply},
        {"role": "user", "content": "And the shore?"},
    ]
    assert second.reply == replay(engine.lm, messages, 12)
    await engine.aclose()
    engine = open_engine(settings)  # the damaged block was rebuilt when the agent was saved
    third = await engine.ask(AskRequest("a", "And the cliffs?", max_tokens=12))
    assert third.tier == "disk" and third.tokens.cached >= second.tokens.context and not third.warnings
    await engine.aclose()


async def test_cancel_leaves_the_agent_as_it_was(settings: Settings) -> None:
    engine = open_engine(settings)
    await engine.ask(AskRequest("a", "Start.", max_tokens=8))
    before = engine.store.load_agent("a")
    with anyio.move_on_after(0.3):
        await engine.ask(AskRequest("a", "Talk for a long time. " * 50, max_tokens=4000))
    await engine.list_agents()  # waits until the engine has handled the cancellation
    assert engine.store.load_agent("a") == before
    after = await engine.ask(AskRequest("a", "Next.", max_tokens=8))
    assert after.tokens.cached > 0
    await engine.aclose()


async def test_memory_budget_keeps_hot_caches_under_it(settings: Settings) -> None:
    engine = open_engine(settings)
    one = await engine.ask(AskRequest("a", "Hello.", system="You are a.", max_tokens=8))
    engine.memory_budget = (await engine.list_agents()).memory.used_bytes + 1  # room for about one agent
    for name in ("b", "c", "a"):
        await engine.ask(AskRequest(name, "Hello.", system=f"You are {name}.", max_tokens=8))
        listed = await engine.list_agents()
        assert listed.memory.used_bytes <= engine.memory_budget
    assert one.tier == "new"
    tiers = {a.name: a.tier for a in (await engine.list_agents()).agents}
    assert list(tiers.values()).count("hot") <= 1 and set(tiers) == {"a", "b", "c"}
    await engine.aclose()


async def test_kv_bits_resume_from_smaller_files(tmp_path, replay) -> None:
    from mcp_semantic.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "m64", hidden_size=128, num_heads=2, num_kv_heads=1)  # head_dim 64
    exact = Settings(model=str(model), cache_dir=tmp_path / "exact")
    small = Settings(model=str(model), cache_dir=tmp_path / "small", kv_bits="8")
    replies = {}
    for settings in (exact, small):
        engine = open_engine(settings)
        await engine.ask(AskRequest("a", "Tell me about the river and the mill.", max_tokens=32))
        await engine.aclose()
        engine = open_engine(settings)
        out = await engine.ask(AskRequest("a", "And then?", max_tokens=16))
        assert out.tier == "disk" and out.tokens.cached > 0 and not out.warnings
        replies[settings.kv_bits] = out.reply
        await engine.aclose()
    size = {s.kv_bits: sum(p.stat().st_size for p in (s.cache_dir / "blocks").iterdir()) for s in (exact, small)}
    assert size["8"] < 0.35 * size["lossless"]
    assert replies["8"]  # lossy: close to, but not promised equal to, the lossless reply


async def test_kv_bits_refused_for_heads_it_cannot_quantize(settings: Settings) -> None:
    with pytest.raises(RequestError, match="divisible by 32"):
        open_engine(settings.model_copy(update={"kv_bits": "4"}))
    engine = open_engine(settings)  # the refusal took no lock
    await engine.aclose()


async def test_fork_writes_no_kv_and_shares_every_block(settings: Settings, replay) -> None:
    engine = open_engine(settings)
    question = "Tell me everything about the river. " * 20
    long = await engine.ask(AskRequest("long", question, max_tokens=8))
    await engine.flush()
    files = {p.name: p.stat().st_mtime_ns for p in engine.store.blocks.dir.iterdir()}
    await engine.fork("long", "copy")
    await engine.flush()
    assert {p.name: p.stat().st_mtime_ns for p in engine.store.blocks.dir.iterdir()} == files  # no KV written
    assert engine.store.kv_record("copy") == engine.store.kv_record("long")
    agents = {a.name: a for a in (await engine.list_agents()).agents}
    assert agents["copy"].shared_disk_bytes == agents["copy"].disk_bytes == agents["long"].shared_disk_bytes > 0

    # both go on, each its own way, each exact against a replay from scratch
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": long.reply}]
    for name, message in (("long", "Go on."), ("copy", "Go on differently.")):
        out = await engine.ask(AskRequest(name, message, max_tokens=8))
        assert out.tokens.cached >= long.tokens.context
        assert out.reply == replay(engine.lm, history + [{"role": "user", "content": message}], 8)
    await engine.flush()
    agents = {a.name: a for a in (await engine.list_agents()).agents}
    assert 0 < agents["copy"].shared_disk_bytes < agents["copy"].disk_bytes  # the common prefix, once

    # forgetting the source frees only what the fork does not hold
    freed = await engine.evict("long", "agent")
    record = engine.store.kv_record("copy")
    assert freed.freed_disk_bytes > 0 and all(engine.store.blocks.path(b).exists() for b in record.blocks)
    out = await engine.ask(AskRequest("copy", "And then?", max_tokens=8))
    assert out.tokens.cached > long.tokens.context and not out.warnings
    await engine.aclose()


async def test_round_robin_under_a_budget_of_two_agents(settings: Settings, replay) -> None:
    """Ten agents, a budget for about two: memory stays under it, answers stay exact, nothing is lost."""
    engine = open_engine(settings)
    first = await engine.ask(AskRequest("rr-0", "Hello, agent number 0.", max_tokens=12))
    one_agent = (await engine.list_agents()).memory.used_bytes
    engine.memory_budget = int(2.5 * one_agent)
    history: dict[str, list[dict[str, str]]] = {"rr-0": [
        {"role": "user", "content": "Hello, agent number 0."}, {"role": "assistant", "content": first.reply}
    ]}
    for round in range(3):
        for i in range(10):
            name = f"rr-{i}"
            if round == 0 and i == 0:
                continue
            message = f"Round {round}: hello, agent number {i}."
            out = await engine.ask(AskRequest(name, message, max_tokens=12))
            messages = history.setdefault(name, []) + [{"role": "user", "content": message}]
            assert out.reply == replay(engine.lm, messages, 12)
            history[name] = messages + [{"role": "assistant", "content": out.reply}]
            memory = (await engine.list_agents()).memory
            assert memory.used_bytes <= memory.budget_bytes
    listed = await engine.list_agents()
    assert listed.memory.hot_agents < 10 and listed.memory.blocks_on_disk > listed.memory.blocks_in_memory
    await engine.aclose()

    engine = open_engine(settings)  # a restart: every agent and turn is in the store
    listed = {a.name: a for a in (await engine.list_agents()).agents}
    assert sorted(listed) == sorted(history) and all(a.turns == 3 for a in listed.values())
    for name in ("rr-3", "rr-7"):
        out = await engine.ask(AskRequest(name, "Still there?", max_tokens=8))
        assert out.tier == "disk" and out.tokens.cached > 0
    await engine.aclose()


async def test_a_shared_system_prompt_is_stored_once_and_reused(settings: Settings, replay) -> None:
    engine = open_engine(settings)
    system = "You answer questions about the valley. " + "The river runs past the mill and the dam. " * 50
    first = await engine.ask(AskRequest("one", "Where is the mill?", system=system, max_tokens=8))
    second = await engine.ask(AskRequest("two", "How old is the dam?", system=system, max_tokens=8))
    assert first.tokens.context > 1000 and first.tokens.cached == 0
    # a new agent, yet its prompt's first blocks are the other's: read from memory, not recomputed
    assert second.tier == "hot" and second.tokens.cached >= first.tokens.context - 2 * settings.block_tokens - 16
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "How old is the dam?"}]
    assert second.reply == replay(engine.lm, messages, 8)
    await engine.flush()
    agents = {a.name: a for a in (await engine.list_agents()).agents}
    files = sum(p.stat().st_size for p in engine.store.blocks.dir.iterdir())
    assert files == agents["one"].disk_bytes + agents["two"].disk_bytes - agents["one"].shared_disk_bytes
    assert agents["one"].shared_disk_bytes == agents["two"].shared_disk_bytes > 0.9 * agents["one"].disk_bytes
    await engine.aclose()


async def test_calls_beyond_the_queue_are_refused_and_nothing_is_lost(settings: Settings) -> None:
    engine = open_engine(settings.model_copy(update={"max_queue": 2}))
    results: dict[str, object] = {}

    async def ask(i: int) -> None:
        try:
            results[f"q{i}"] = await engine.ask(AskRequest(f"q{i}", f"Tell me a long story, number {i}.", max_tokens=48))
        except RequestError as e:
            results[f"q{i}"] = e

    async with anyio.create_task_group() as tg:
        for i in range(5):  # all five arrive before the first can finish
            tg.start_soon(ask, i)
    answered = sorted(name for name, r in results.items() if not isinstance(r, RequestError))
    busy = sorted(name for name, r in results.items() if isinstance(r, RequestError))
    assert answered == ["q0", "q1"] and busy == ["q2", "q3", "q4"]
    assert all("server busy" in str(results[name]) and "--max-queue 2" in str(results[name]) for name in busy)
    assert engine.store.names() == ["q0", "q1"]  # the refused created nothing
    assert all(engine.store.load_agent(name).turns == 1 for name in answered)  # each answered once
    assert (await engine.ask(AskRequest("q2", "Now?", max_tokens=4))).tokens.generated >= 1  # room again
    await engine.aclose()


async def ask_all(engine, requests: list[AskRequest]) -> list:
    """Send the requests at once, from as many tasks; their results in the same order."""
    results: list = [None] * len(requests)

    async def one(i: int) -> None:
        results[i] = await engine.ask(requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    return results


async def test_concurrent_agents_answer_as_they_would_alone(settings: Settings, tmp_path) -> None:
    questions = ["Tell me about the river.", "Describe the old mill.", "What is a dam?", "Name three birds."]
    requests = [AskRequest(f"c{i}", q, system="You are brief." if i % 2 else None, max_tokens=24) for i, q in enumerate(questions)]
    alone = open_engine(settings.model_copy(update={"cache_dir": tmp_path / "alone"}))
    sequential = [await alone.ask(r) for r in requests]
    await alone.aclose()

    engine = open_engine(settings)
    together = await ask_all(engine, requests)
    assert engine.peak_batch == 4  # they ran in one batch
    assert [r.reply for r in together] == [r.reply for r in sequential]
    # a second turn for all four, and a third for one, queued behind its second: order and context kept
    follow = [AskRequest(f"c{i}", "And then?", max_tokens=12) for i in range(4)] + [AskRequest("c0", "Last one.", max_tokens=12)]
    second = await ask_all(engine, follow)
    assert all(r.tier == "hot" and r.tokens.cached >= first.tokens.context for r, first in zip(second, together))
    transcript = engine.store.load_agent("c0").messages
    assert [m["content"] for m in transcript if m["role"] == "user"] == [questions[0], "And then?", "Last one."]
    assert second[4].tokens.cached >= second[0].tokens.context
    await engine.aclose()


async def test_a_cancelled_call_leaves_its_agent_as_it_was_and_the_others_finish(settings: Settings, replay) -> None:
    engine = open_engine(settings)
    await engine.ask(AskRequest("slow", "Start.", max_tokens=8))
    before = engine.store.load_agent("slow")
    others: list = []

    async def other(i: int) -> None:
        others.append(await engine.ask(AskRequest(f"o{i}", "Count to five.", max_tokens=16)))

    async with anyio.create_task_group() as tg:
        for i in range(2):
            tg.start_soon(other, i)
        with anyio.move_on_after(0.5):
            await engine.ask(AskRequest("slow", "Talk for a long time. " * 20, max_tokens=4000))
    assert len(others) == 2 and all(o.finish_reason in ("stop", "length") for o in others)
    assert engine.store.load_agent("slow") == before  # the cancelled turn was not half appended
    after = await engine.ask(AskRequest("slow", "Next.", max_tokens=8))
    assert after.tokens.cached > 0
    assert after.reply == replay(engine.lm, before.messages + [{"role": "user", "content": "Next."}], 8)
    await engine.aclose()


async def test_agents_asked_at_once_read_a_shared_system_prompt_once(settings: Settings, replay) -> None:
    engine = open_engine(settings)
    system = "You answer questions about the valley. " + "The river runs past the mill and the dam. " * 20
    questions = ["Where is the mill?", "How old is the dam?", "Where does the river go?"]
    results = await ask_all(engine, [AskRequest(f"a{i}", q, system=system, max_tokens=8) for i, q in enumerate(questions)])
    assert results[0].tokens.cached == 0
    assert all(r.tokens.cached >= results[0].tokens.context - 2 * settings.block_tokens - 16 for r in results[1:])
    for q, r in zip(questions, results):
        assert r.reply == replay(engine.lm, [{"role": "system", "content": system}, {"role": "user", "content": q}], 8)
    await engine.aclose()


async def test_seeded_sampling_is_the_same_alone_and_in_a_batch(settings: Settings, tmp_path) -> None:
    sampled = AskRequest("s", "Tell me a story.", temperature=0.9, top_p=0.95, seed=7, max_tokens=16)
    alone = open_engine(settings.model_copy(update={"cache_dir": tmp_path / "alone"}))
    reply = (await alone.ask(sampled)).reply
    assert (await alone.ask(AskRequest("s2", "Tell me a story.", temperature=0.9, top_p=0.95, seed=8, max_tokens=16))).reply != reply
    await alone.aclose()
    engine = open_engine(settings)
    others = [AskRequest(f"o{i}", "Count to ten.", temperature=0.7, max_tokens=16) for i in range(2)]
    results = await ask_all(engine, [others[0], sampled, others[1]])
    assert engine.peak_batch == 3 and results[1].reply == reply
    await engine.aclose()


async def test_size_limits_refuse_and_keep_what_is_stored(settings: Settings) -> None:
    engine = open_engine(settings.model_copy(update={"max_message_bytes": 1000, "max_agents": 2}))
    await engine.ask(AskRequest("a", "Hello.", max_tokens=4))
    before = engine.store.load_agent("a")
    with pytest.raises(RequestError, match=r"message is 1,001 bytes, over --max-message-bytes \(1,000\)"):
        await engine.ask(AskRequest("a", "x" * 1001, max_tokens=4))
    with pytest.raises(RequestError, match="system prompt is"):
        await engine.ask(AskRequest("new", "Hi.", system="\u00e9" * 501, max_tokens=4))  # 1,002 bytes in UTF-8
    await engine.ask(AskRequest("b", "Hello.", max_tokens=4))
    with pytest.raises(RequestError, match="--max-agents"):
        await engine.ask(AskRequest("c", "Hello.", max_tokens=4))
    with pytest.raises(RequestError, match="--max-agents"):
        await engine.fork("a", "a2")
    assert engine.store.names() == ["a", "b"] and engine.store.load_agent("a") == before
    await engine.evict("b", "agent")
    assert (await engine.ask(AskRequest("c", "Hello.", max_tokens=4))).tokens.generated >= 1  # room again
    await engine.aclose()
    engine = open_engine(settings.model_copy(update={"max_agents": 2}))  # after a restart the store's agents count
    with pytest.raises(RequestError, match="the server keeps 2 agents, its --max-agents"):
        await engine.ask(AskRequest("d", "Hello.", max_tokens=4))
    await engine.aclose()


async def test_a_full_disk_loses_no_answer_and_damages_nothing_stored(settings: Settings, replay, caplog, monkeypatch) -> None:
    import errno

    import mcp_semantic.block_files as block_files

    engine = open_engine(settings)
    kept = await engine.ask(AskRequest("kept", "Tell me about the river.", max_tokens=8))
    await engine.flush()
    saved = {p.name: p.read_bytes() for p in engine.store.blocks.dir.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(block_files, "write_block", full)
    out = await engine.ask(AskRequest("new", "Tell me about the mill.", max_tokens=8))
    assert out.finish_reason in ("stop", "length") and out.reply  # the call still answers
    await engine.flush()
    assert "could not save the KV cache of agent new" in caplog.text and "No space left" in caplog.text
    assert {p.name: p.read_bytes() for p in engine.store.blocks.dir.iterdir() if p.name in saved} == saved
    assert not [p for p in engine.store.blocks.dir.iterdir() if p.name.startswith(".")]  # no temporaries left
    monkeypatch.undo()
    told = await engine.ask(AskRequest("new", "And the wheel?", max_tokens=8))  # the host hears of it
    assert any("saving its KV cache failed" in w and "No space left" in w for w in told.warnings)
    await engine.aclose()

    engine = open_engine(settings)  # the disk has room again
    again = await engine.ask(AskRequest("kept", "And the mill?", max_tokens=8))
    assert again.tier == "disk" and again.tokens.cached >= kept.tokens.context
    new = await engine.ask(AskRequest("new", "And the dam?", max_tokens=8))  # saved again, and whole
    assert new.tier == "disk" and not new.warnings
    history = [
        {"role": "user", "content": "Tell me about the mill."}, {"role": "assistant", "content": out.reply},
        {"role": "user", "content": "And the wheel?"}, {"role": "assistant", "content": told.reply},
    ]
    assert new.reply == replay(engine.lm, history + [{"role": "user", "content": "And the dam?"}], 8)
    await engine.aclose()


async def test_blocks_of_the_wrong_shape_cost_a_reprefill(settings: Settings, replay) -> None:
    """A block whose header gives its bytes another shape (its checksum, over the bytes, still
    holds) is a miss, not a failed call."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    engine = open_engine(settings)
    first = await engine.ask(AskRequest("a", "Tell me about the sea.", max_tokens=8))
    await engine.flush()
    path = engine.store.blocks.path(engine.store.kv_record("a").blocks[1])
    await engine.aclose()
    with safe_open(str(path), "numpy") as f:
        metadata = f.metadata()
    arrays = load_file(str(path))
    for name, a in arrays.items():  # (1, heads, tokens, dim) -> (1, dim, tokens, heads): same bytes
        arrays[name] = a.reshape(a.shape[0], a.shape[3], a.shape[2], a.shape[1])
    save_file(arrays, str(path), metadata=metadata)

    engine = open_engine(settings)
    out = await engine.ask(AskRequest("a", "And the shore?", max_tokens=8))
    assert any("do not fit" in w for w in out.warnings)
    messages = [{"role": "user", "content": "Tell me about the sea."}, {"role": "assistant", "content": first.reply}]
    assert out.reply == replay(engine.lm, messages + [{"role": "user", "content": "And the shore?"}], 8)
    await engine.aclose()


@pytest.mark.parametrize("kv_bits", ["16", "8", "4"])
async def test_kv_bits_resume_on_the_cpu_reads_the_files_as_they_are(tmp_path, kv_bits: str) -> None:
    """At --kv-bits on the CPU a restarted agent's quantized files are converted straight into
    its working cache (Caches._build_straight); once the engine idles its blocks join the pool
    with the files' bytes unchanged (Caches.fill), and its turns (after the restart, then hot)
    answer as on the path through the pool and MLX's dequantization."""
    import mlx.core as mx

    from mcp_semantic.block_pool import array_names
    from mcp_semantic.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "m64", hidden_size=128, num_heads=2, num_kv_heads=1)  # head_dim 64
    replies = {}
    for path in ("straight", "pool"):
        settings = Settings(model=str(model), cache_dir=tmp_path / path, kv_bits=kv_bits, block_tokens=16)
        engine = open_engine(settings)
        await engine.ask(AskRequest("a", "Tell me about the river and the mill.", max_tokens=32))
        await engine.aclose()
        engine = open_engine(settings)
        engine.caches.on_host = path == "straight"
        turns = [await engine.ask(AskRequest("a", "And then?", max_tokens=16))]
        with anyio.fail_after(10):
            while engine.caches.unread:  # the blocks read converted, read into the pool once the engine idles
                await anyio.sleep(0.01)
        turns.append(await engine.ask(AskRequest("a", "Why?", max_tokens=16)))
        assert [t.tier for t in turns] == ["disk", "hot"] and not any(t.warnings for t in turns)
        replies[path] = [t.reply for t in turns]
        await engine.flush()
        caches = engine.caches
        ids = [b for b in caches.record("a").blocks if engine.store.has_block(b)]  # a last partial block is not saved
        assert len(ids) >= 2
        read = engine.store.blocks.read_blocks(ids, caches.storage, array_names(caches.layout, caches.storage))
        for bid, (block, problem) in zip(ids, read):
            held = caches.pool.peek(bid)
            assert problem is None and held is not None and set(held.arrays) == set(block.arrays)
            assert all(mx.array_equal(held.arrays[n], a).item() for n, a in block.arrays.items()), bid
        await engine.aclose()
    assert replies["straight"] == replies["pool"]


async def test_a_damaged_quantized_block_on_the_cpu_is_a_named_miss(tmp_path, caplog) -> None:
    """At --kv-bits on the CPU, a block file that fails its checksum ends the cache before it,
    with a warning naming the file's problem (not a failure to build), and the agent answers."""
    from mcp_semantic.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "m64", hidden_size=128, num_heads=2, num_kv_heads=1)  # head_dim 64
    settings = Settings(model=str(model), cache_dir=tmp_path / "c", kv_bits="8", block_tokens=16)
    engine = open_engine(settings)
    await engine.ask(AskRequest("a", "Tell me about the river and the mill.", max_tokens=32))
    await engine.aclose()
    engine = open_engine(settings)
    record = engine.caches.record("a")
    path = engine.store.blocks.path(record.blocks[1])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    out = await engine.ask(AskRequest("a", "And then?", max_tokens=8))
    assert out.reply and out.tier == "disk" and out.tokens.cached == 16  # the first block, before the damaged one
    assert any("fails its checksum" in w for w in out.warnings), out.warnings
    assert not any("do not fit" in w for w in out.warnings), out.warnings
    await engine.aclose()


def _address(engine, agent: str) -> int | None:
    """Where the agent's kept working cache (Caches.working) begins in memory, or None."""
    from mcp_semantic.block_pool import host_view

    kept = engine.caches.working.get(agent)
    return None if kept is None else host_view(kept.arrays[0][0]).__array_interface__["data"][0]


async def test_hot_turns_write_on_in_the_last_cache_in_place(settings: Settings, replay) -> None:
    """After a restart and after each hot turn, the agent's next turn goes on in the working cache
    of its last call, in place (the same memory), and answers as a replay from scratch; a fork
    shares the blocks, so its source's next turn builds a cache of its own, still exact."""
    engine = open_engine(settings)
    first = await engine.ask(AskRequest("a", QUESTIONS[0], system="You are terse.", max_tokens=12))
    await engine.aclose()
    engine = open_engine(settings)  # a restart: the blocks are read straight into a working cache
    replies, messages = [first], [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTIONS[0]},
                                  {"role": "assistant", "content": first.reply}]
    second = await engine.ask(AskRequest("a", QUESTIONS[1], max_tokens=12))
    assert second.tier == "disk"
    address = _address(engine, "a")
    assert address is not None
    await engine.flush()  # its new blocks written: the writer must have let go of them
    for i, question in enumerate(["Go on.", "And then?"]):
        r = await engine.ask(AskRequest("a", question, max_tokens=12))
        assert r.tier == "hot" and r.tokens.cached > second.tokens.context - 1
        if i == 0:  # the cache made after the restart has room for a turn like the last one
            assert _address(engine, "a") == address, "the cache was copied, not written on in place"
        replies.append(r)
    address = _address(engine, "a")
    assert address is not None
    await engine.fork("a", "b")
    after_fork = await engine.ask(AskRequest("a", "Stop.", max_tokens=12))
    assert after_fork.tier == "hot" and _address(engine, "a") != address  # its blocks are the fork's too
    for question, answer in zip([QUESTIONS[1], "Go on.", "And then?", "Stop."], [second, *replies[1:], after_fork]):
        messages.append({"role": "user", "content": question})
        assert answer.reply == replay(engine.lm, messages, 12)
        messages.append({"role": "assistant", "content": answer.reply})
    await engine.evict("a")
    assert "a" not in engine.caches.working  # its memory goes with its blocks
    await engine.aclose()


@pytest.mark.parametrize("mode", ["embedded", "shared"])
async def test_an_idle_engine_settles_its_caches(settings: Settings, mode: str, request) -> None:
    """Once idle, the blocks a call cut as views of its working cache are copied out and the
    kept cache goes (its memory then serves the next build as spares). In the shared mode each
    call is saved at its end, so nothing was left to save: its caches were never settled."""
    if mode == "shared":
        settings = settings.model_copy(update={"store": request.getfixturevalue("postgres_url")})
    engine = open_engine(settings)
    await engine.ask(AskRequest("a", QUESTIONS[0], max_tokens=12))
    assert engine.caches.working and engine.caches.unsettled
    with anyio.fail_after(10):
        while engine.caches.unsettled or engine.caches.working:
            await anyio.sleep(0.05)
    await engine.aclose()


async def test_a_turn_whose_lease_was_lost_is_refused_and_changes_nothing(settings: Settings, postgres_url: str,
                                                                         replay) -> None:
    """The shared mode: a call whose server lost the agent's lease before the call's end (it
    expired and another server took it) is a tool error, its turn saved nowhere, the agent as
    it was; once the lease is free again the agent goes on from its last saved turn, exactly."""
    import psycopg

    engine = open_engine(settings.model_copy(update={"store": postgres_url}))
    first = await engine.ask(AskRequest("a", QUESTIONS[0], max_tokens=8))
    save = engine.store.save_agent

    def taken_meanwhile(agent) -> None:
        with psycopg.connect(postgres_url, autocommit=True) as db:
            db.execute("UPDATE leases SET holder = 'server-b' WHERE agent = %s", (agent.name,))
        save(agent)

    engine.store.save_agent = taken_meanwhile
    with pytest.raises(RequestError, match="lease of agent a expired.*nothing was saved"):
        await engine.ask(AskRequest("a", QUESTIONS[1], max_tokens=8))
    engine.store.save_agent = save
    assert len(engine.store.load_agent("a").messages) == 2
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("DELETE FROM leases WHERE agent = 'a'")  # server B is done with it
    again = await engine.ask(AskRequest("a", QUESTIONS[2], max_tokens=8))
    messages = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": first.reply},
                {"role": "user", "content": QUESTIONS[2]}]
    assert again.reply == replay(engine.lm, messages, 8)
    assert len(engine.store.load_agent("a").messages) == 4
    await engine.aclose()


async def test_a_fork_at_a_turn_rewinds_exactly_and_refuses_turns_out_of_range(settings: Settings, replay) -> None:
    """fork_agent(at_turn=N): the first N turns, their blocks shared (nothing copied), exact
    against a replay, after a restart too; a turn out of range changes nothing."""
    system = [{"role": "system", "content": "You are terse."}]
    engine = open_engine(settings)
    replies = [(await engine.ask(AskRequest("a", q, system="You are terse.", max_tokens=12))).reply for q in QUESTIONS]
    history = system + [m for q, r in zip(QUESTIONS, replies) for m in ({"role": "user", "content": q},
                                                                         {"role": "assistant", "content": r})]
    for bad in (4, -1, True, 1.5):
        with pytest.raises(RequestError, match=r"out of range: agent a has 3 turns, so fork at 0 to 3"):
            await engine.fork("a", "b", at_turn=bad)
    assert not engine.store.exists("b")
    one = await engine.fork("a", "one", at_turn=1)
    assert one.turns == 1 and 0 < one.tokens < len(engine.store.load_agent("a").tokens)
    assert engine.store.load_agent("one").messages == history[:3]
    listed = {info.name: info for info in (await engine.list_agents()).agents}
    assert 0 < listed["one"].blocks < listed["a"].blocks  # only the blocks of its turn
    asked = await engine.ask(AskRequest("one", "And then?", max_tokens=12))
    assert asked.tokens.cached >= one.tokens - 16 and not asked.warnings
    assert asked.reply == replay(engine.lm, history[:3] + [{"role": "user", "content": "And then?"}], 12)
    zero = await engine.fork("a", "zero", at_turn=0)
    assert zero.turns == 0 and engine.store.load_agent("zero").messages == system
    again = await engine.ask(AskRequest("zero", "Hello?", max_tokens=12))
    assert again.reply == replay(engine.lm, system + [{"role": "user", "content": "Hello?"}], 12)
    assert engine.store.load_agent("a").messages == history  # the source as it was
    await engine.aclose()
    engine = open_engine(settings)  # a restart: the fork's own list is on disk
    later = await engine.ask(AskRequest("one", "Why?", max_tokens=12))
    assert later.tier == "disk" and later.tokens.cached > one.tokens
    messages = history[:3] + [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": asked.reply},
                              {"role": "user", "content": "Why?"}]
    assert later.reply == replay(engine.lm, messages, 12)
    await engine.aclose()


async def test_a_thinking_model_s_reasoning_comes_apart_from_its_reply(tmp_path, settings: Settings, replay) -> None:
    """A model with `<think>` tokens and a template that can switch thinking (as Qwen3's): the
    reasoning goes to `reasoning`, the answer to `reply`, the transcript keeps the text whole
    (the template shows later prompts what it wants of it), `think=False` closes the block in
    the prompt; the turns after still answer exactly. `think` on a model without the switch is
    refused, changing nothing."""
    import mlx.core as mx

    from mcp_semantic.tiny_model import SWITCHABLE_THINKING_CHAT_TEMPLATE, make_tiny_model

    switch = SWITCHABLE_THINKING_CHAT_TEMPLATE
    model = make_tiny_model(tmp_path / "thinker", chat_template=switch, thinking=True)
    engine = open_engine(settings.model_copy(update={"model": str(model), "cache_dir": tmp_path / "c"}))
    tok = engine.lm.tokenizer
    assert tok.has_thinking

    def scripted(text: str):  # the model "writes" `text`, then ends its turn
        tokens = iter(tok.encode(text, add_special_tokens=False) + [tok.eos_token_id])
        return lambda logprobs: mx.array([next(tokens)] * logprobs.shape[0], dtype=mx.uint32)

    greedy = engine._greedy
    engine._greedy = scripted("First the river.</think>\n\nThe mill.")
    thought = await engine.ask(AskRequest("a", "Where is it?", max_tokens=40))
    assert (thought.reasoning, thought.reply) == ("First the river.", "The mill.")
    assert engine.store.load_agent("a").messages[-1]["content"] == "First the river.</think>\n\nThe mill."
    engine._greedy = scripted("The weir.")
    quick = await engine.ask(AskRequest("a", "And then?", max_tokens=40, think=False))
    assert (quick.reasoning, quick.reply) == (None, "The weir.")
    engine._greedy = greedy
    later = await engine.ask(AskRequest("a", "Go on.", max_tokens=12))  # the tiny model itself: it never closes the block
    messages = engine.store.load_agent("a").messages
    assert later.tokens.cached > 0 and later.finish_reason == "length"
    assert messages[-1]["content"] == replay(engine.lm, messages[:-1], 12)  # exact, the history as the template shows it
    assert (later.reasoning, later.reply) == (messages[-1]["content"].strip(), "")  # cut off while thinking
    await engine.aclose()

    plain = open_engine(settings)
    with pytest.raises(RequestError, match="`think` needs a model whose chat template can switch thinking"):
        await plain.ask(AskRequest("b", "Hello?", think=True))
    assert not plain.store.exists("b")
    await plain.aclose()


async def test_a_gpt_oss_model_s_reasoning_comes_apart_from_its_reply(tmp_path, settings: Settings, replay) -> None:
    """gpt-oss writes OpenAI's harmony format, in special tokens that mlx-lm does not take for
    thinking: a tiny random gpt_oss model with gpt-oss's tokens and (shortened) template, its
    replies scripted. The analysis channel goes to `reasoning`, the final one to `reply`, split on
    the tokens; the transcript keeps them as the template takes them (`thinking`, `content`);
    progress messages show the answer only; a reply cut off while reasoning is all reasoning; the
    turns after reuse the cache up to what the template rewrote and answer exactly. `think` is
    refused: harmony sets a reasoning effort, it has no switch."""
    import mlx.core as mx
    from mlx_lm.utils import common_prefix_len

    from mcp_semantic.models import harmony_tokens
    from mcp_semantic.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "gpt-oss", model_type="gpt_oss", harmony=True)
    engine = open_engine(settings.model_copy(update={"model": str(model), "cache_dir": tmp_path / "c"}))
    tok = engine.lm.tokenizer
    assert harmony_tokens(tok) is not None and not tok.has_thinking

    def scripted(text: str):  # the model "writes" `text`, then ends its turn (<|return|>)
        tokens = iter(tok.encode(text, add_special_tokens=False) + [tok.eos_token_id])
        return lambda logprobs: mx.array([next(tokens)] * logprobs.shape[0], dtype=mx.uint32)

    progress: list[str] = []

    async def on_progress(done: float, total: float, message: str) -> None:
        progress.append(message)

    greedy = engine._greedy
    reasoning = "First the river, then the mill, and the weir below them both."
    answer = "The mill stands by the river, just above the old weir."
    engine._greedy = scripted(f"<|channel|>analysis<|message|>{reasoning}<|end|>"
                              f"<|start|>assistant<|channel|>final<|message|>{answer}")
    first = await engine.ask(AskRequest("a", "Where is it?", system="You are terse.", max_tokens=100), on_progress)
    assert (first.reasoning, first.reply, first.finish_reason) == (reasoning, answer, "stop")
    agent = engine.store.load_agent("a")
    assert agent.messages[-1] == {"role": "assistant", "content": answer, "thinking": reasoning}
    # the transcript, rendered as ending with the reply, is what the model wrote, then <|return|>
    assert tok.apply_chat_template(agent.messages, add_generation_prompt=False) == agent.tokens + [tok.eos_token_id]
    written = [m for m in progress if not m.startswith("prefill")]
    assert any(m.startswith("reasoning, ") for m in written) and any(m and answer.startswith(m) for m in written)
    assert all(m.startswith("reasoning, ") or answer.startswith(m) for m in written), written  # never the analysis

    thought = "The weir is further down, past"
    engine._greedy = scripted(f"<|channel|>analysis<|message|>{thought}")
    n = len(tok.encode(f"<|channel|>analysis<|message|>{thought}", add_special_tokens=False))
    cut = await engine.ask(AskRequest("a", "And then?", max_tokens=n))
    assert (cut.reasoning, cut.reply, cut.finish_reason) == (thought, "", "length")
    assert engine.store.load_agent("a").messages[-1] == {"role": "assistant", "content": "", "thinking": thought}
    # the template shows the first reply as its final channel only: the cache is reused up to its channel
    prompt = tok.apply_chat_template(agent.messages + [{"role": "user", "content": "And then?"}], add_generation_prompt=True)
    assert cut.tokens.cached == common_prefix_len(agent.tokens, prompt) == first.tokens.context + 1

    engine._greedy = greedy
    later = await engine.ask(AskRequest("a", "Go on.", max_tokens=12))  # the tiny model itself: no harmony, all answer
    messages = engine.store.load_agent("a").messages
    assert later.tokens.cached == cut.tokens.context + 1 and later.finish_reason == "length"
    assert (later.reply, later.reasoning) == (messages[-1]["content"], None)
    assert later.reply == replay(engine.lm, messages[:-1], 12)  # exact, the history as the template shows it

    with pytest.raises(RequestError, match="harmony format.*reasoning effort"):
        await engine.ask(AskRequest("a", "Quickly?", think=False))
    assert engine.store.load_agent("a").turns == 3
    await engine.aclose()


async def test_agents_are_read_when_named_and_idle_ones_let_go(settings: Settings, replay, monkeypatch) -> None:
    """A store of many agents: nothing of them is read at start; an agent's transcript and block
    list come from the store when a call names it, the least recently used idle ones go from
    memory beyond the limit, and every agent still resumes from disk exactly."""
    from mcp_semantic import agents as agents_module

    monkeypatch.setattr(agents_module, "AGENTS_IN_MEMORY", 3)
    engine = open_engine(settings)
    replies = {}
    for i in range(6):
        replies[f"a{i}"] = await engine.ask(AskRequest(f"a{i}", f"{i}: {QUESTIONS[0]}", system="You are terse.", max_tokens=8))
    assert list(engine.agents.memory) == ["a3", "a4", "a5"]
    await engine.aclose()

    engine = open_engine(settings)
    assert not engine.agents.memory and not engine.caches.records  # nothing read at start
    listed = await engine.list_agents(limit=4)
    assert [a.name for a in listed.agents] == ["a0", "a1", "a2", "a3"] and listed.total == 6 and listed.next_cursor == "a3"
    assert all(a.turns == 1 and a.tier == "disk" for a in listed.agents) and not engine.agents.memory  # a listing keeps nothing
    for name in ["a0", "a5", "a1"]:
        second = await engine.ask(AskRequest(name, QUESTIONS[1], max_tokens=8))
        assert second.tier == "disk" and second.tokens.cached >= replies[name].tokens.context
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"{name[1]}: {QUESTIONS[0]}"},
                    {"role": "assistant", "content": replies[name].reply}, {"role": "user", "content": QUESTIONS[1]}]
        assert second.reply == replay(engine.lm, messages, 8)
    await engine.evict(level="memory")  # nothing of them in memory: their block lists can go too
    await engine.ask(AskRequest("a2", QUESTIONS[1], max_tokens=8))
    assert list(engine.agents.memory) == ["a5", "a1", "a2"] and set(engine.caches.records) <= {"a5", "a1", "a2"}
    assert (await engine.list_agents()).total == 6
    await engine.aclose()


async def test_an_unreadable_transcript_is_an_error_never_a_new_agent_over_it(settings: Settings) -> None:
    engine = open_engine(settings)
    await engine.ask(AskRequest("a", QUESTIONS[0], max_tokens=4))
    await engine.aclose()
    engine = open_engine(settings)
    engine.store.db.execute("UPDATE agents SET messages = '{not json' WHERE name = 'a'")
    with pytest.raises(RequestError, match="'a': its stored transcript cannot be read.*level='agent'"):
        await engine.ask(AskRequest("a", "Hello?", max_tokens=4))
    with pytest.raises(RequestError, match="cannot be read"):
        await engine.fork("a", "b")
    row = engine.store.db.execute("SELECT messages FROM agents WHERE name = 'a'").fetchone()
    assert row == ("{not json",)  # nothing was written over it
    assert (await engine.list_agents()).total == 1
    assert (await engine.evict("a", "agent")).evicted == ["a"]
    assert (await engine.ask(AskRequest("a", "Hello?", max_tokens=4))).tier == "new"  # now a new agent
    await engine.aclose()
