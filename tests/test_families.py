"""Every model family through the engine, as a user would run it (tiny random-weight models loaded
through the real loading path): resumed after a restart, hot, from a fork, after its saved cache
is evicted, and in a batch of three, each reply equal to plain mlx-lm's on the same transcript.

The families cover every cache kind: full attention (llama, qwen3), sliding windows shorter than
the conversation (gemma3_text; gpt_oss, with attention sinks), recurrent state beside attention
(qwen3_next and qwen3_5: gated delta; lfm2: short convolutions; nemotron_h and falcon_h1: Mamba 2,
falcon_h1 in a CacheList; baichuan_m1: convolutions and windows in a CacheList), pure SSM (mamba2)
and chunked attention (llama4).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import anyio
import mlx_lm
import pytest
from mlx_lm.utils import common_prefix_len

from mcp_semantic.calls import AskRequest
from mcp_semantic.server import open_engine
from mcp_semantic.settings import Settings
from mcp_semantic.tiny_model import THINKING_CHAT_TEMPLATE, make_tiny_model

pytestmark = pytest.mark.anyio

FAMILIES = ["llama", "qwen3", "gemma3_text", "gpt_oss", "qwen3_next", "qwen3_5", "lfm2", "nemotron_h", "mamba2",
            "falcon_h1", "baichuan_m1", "llama4"]
N = 24  # tokens per reply
SYSTEM = "You answer questions about the town by the river, its mill and its people."
QUESTIONS = ["Tell me about the river.", "And what about the old mill?", "Who lives there now?", "Summarise it in one line."]


def replay(lm, messages: list[dict[str, str]]) -> str:
    """The same conversation, from scratch, through plain mlx-lm (greedy, its own caches)."""
    prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return mlx_lm.generate(lm.model, lm.tokenizer, prompt=prompt, max_tokens=N)


class Conversation:
    """An agent's messages as the engine keeps them, to replay against mlx-lm."""

    def __init__(self, engine, name: str, system: str | None = None):
        self.engine, self.name = engine, name
        self.messages = [{"role": "system", "content": system}] if system else []
        self.system = system

    async def ask(self, question: str):
        result = await self.engine.ask(AskRequest(self.name, question, system=self.system, max_tokens=N))
        return self.check(question, result)

    def check(self, question: str, result):
        self.messages.append({"role": "user", "content": question})
        assert result.reply == replay(self.engine.lm, self.messages), (self.name, result.tier, result.tokens)
        self.messages.append({"role": "assistant", "content": result.reply})
        return result

    def fork(self, name: str) -> Conversation:
        other = Conversation(self.engine, name)
        other.messages = [dict(m) for m in self.messages]
        return other


async def saved_conversation(settings: Settings, turns: int) -> Conversation:
    """Agent `a`'s first `turns` questions, answered (exactly) and saved by a server since closed."""
    a = Conversation(open_engine(settings), "a", SYSTEM)
    for q in QUESTIONS[:turns]:
        await a.ask(q)
        a.system = None
    await a.engine.aclose()
    return a


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("families")
    return lambda family, **kw: make_tiny_model(root / (family + "".join(kw)), model_type=family, **kw)


@pytest.mark.parametrize("family", FAMILIES)
async def test_every_tier_equals_plain_mlx_lm(family: str, family_dirs, tmp_path: Path) -> None:
    settings = Settings(model=str(family_dirs(family)), cache_dir=tmp_path / "cache", memory_budget=64 * 1024**2,
                        block_tokens=16)
    engine = open_engine(settings)
    a = Conversation(engine, "a", SYSTEM)
    first = await a.ask(QUESTIONS[0])
    assert first.tier == "new"
    a.system = None
    hot = await a.ask(QUESTIONS[1])
    assert hot.tier == "hot" and hot.tokens.cached >= first.tokens.context - 16
    listed = (await engine.list_agents()).agents[0]  # the memory budget counts K/V and states alike
    nbytes = {name: math.prod(shape) * dtype.size for name, (shape, dtype) in engine.layout.shapes.items()}
    kv = sum(n for name, n in nbytes.items() if ".state." not in name)
    states = sum(n for name, n in nbytes.items() if ".state." in name)
    record = engine.caches.record("a")  # a recurrent model's branch block holds its turn's start
    assert bool(record.branch) == engine.layout.recurrent and listed.blocks == len(record.blocks) + bool(record.branch)
    tokens = len(record.tokens) + record.branch_tokens % 16
    assert listed.memory_bytes == tokens * kv + listed.blocks * states == engine.caches.used()
    await engine.aclose()

    engine = a.engine = open_engine(settings)  # a restart: the cache comes from disk
    disk = await a.ask(QUESTIONS[2])
    assert disk.tier == "disk" and disk.tokens.cached >= hot.tokens.context - 16 and not disk.warnings
    again = await a.ask(QUESTIONS[3])
    assert again.tier == "hot" and again.tokens.cached >= disk.tokens.context - 16

    await engine.fork("a", "f")
    f = a.fork("f")
    forked = await f.ask("Tell it to a child.")
    assert forked.tier == "hot" and forked.tokens.cached >= again.tokens.context - 16
    rewound = await engine.fork("a", "r", at_turn=2)  # the first two turns, their whole blocks shared
    assert rewound.turns == 2 and 0 < rewound.tokens < again.tokens.context
    r = a.fork("r")
    r.messages = r.messages[:5]  # the system prompt and two turns
    branch = await r.ask("Who built the mill?")
    assert branch.tokens.cached >= rewound.tokens - 2 * 16 and not branch.warnings, branch.tokens

    evicted = await engine.evict("a", "disk")
    assert evicted.freed_disk_bytes >= 0
    after = await a.ask("Once more, please.")  # its blocks in memory are the fork's now, or re-prefilled
    assert after.tokens.cached + after.tokens.prefilled == after.tokens.context

    n = Conversation(engine, "n", SYSTEM)
    await n.ask(QUESTIONS[0])
    n.system = None
    results = []

    async def ask(c: Conversation, question: str) -> None:
        results.append(c.check(question, await engine.ask(AskRequest(c.name, question, max_tokens=N))))

    engine.peak_batch = 0
    async with anyio.create_task_group() as tg:
        for c, q in ((a, "What is the weather like?"), (f, "Go on."), (n, QUESTIONS[1])):
            tg.start_soon(ask, c, q)
    assert engine.peak_batch == (3 if engine.layout.batchable else 1)
    # n's prompt is a's second one: it starts from a's blocks, whose window K/V may be on disk only
    assert all(r.tokens.cached > 0 and not r.warnings for r in results), [(r.agent, r.tier, r.tokens, r.warnings) for r in results]
    await engine.aclose()


@pytest.mark.parametrize("family", ["qwen3_next", "gemma3_text", "llama"])
async def test_a_template_that_rewrites_history_reuses_up_to_the_change(family: str, family_dirs, tmp_path: Path) -> None:
    """A thinking model's template renders an earlier reply without the `<think>` its prompt
    opened: the prompt changes inside the cached tokens. The cache is reused up to the change
    itself (attention), or up to where that reply's turn began (recurrent state: a checkpoint is
    kept there), past the last block boundary before the change."""
    settings = Settings(model=str(family_dirs(family, chat_template=THINKING_CHAT_TEMPLATE)), cache_dir=tmp_path / "c",
                        block_tokens=16)
    engine = open_engine(settings)
    a = Conversation(engine, "a", SYSTEM)
    first = await a.ask(QUESTIONS[0])
    a.system = None
    second = await a.ask(QUESTIONS[1])
    prompt = engine.lm.tokenizer.apply_chat_template(a.messages[:-1], add_generation_prompt=True)
    changed = next(i for i, (x, y) in enumerate(zip(first_prompt(engine, a), prompt)) if x != y)
    assert changed < first.tokens.context  # the rewrite is inside the first prompt's tokens
    without = engine.lm.tokenizer.apply_chat_template(a.messages[:2], add_generation_prompt=False)
    turn = common_prefix_len(first_prompt(engine, a), without)  # where the first reply's turn began
    expected = turn if engine.layout.recurrent else changed
    assert second.tokens.cached == expected and changed // 16 * 16 < expected <= changed
    await engine.aclose()


def first_prompt(engine, c: Conversation) -> list[int]:
    return engine.lm.tokenizer.apply_chat_template(c.messages[:2], add_generation_prompt=True)


@pytest.mark.parametrize("path", ["pool", "gather"])
@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_next", "falcon_h1"])
async def test_the_gpu_build_paths_and_kv_bits_resume_too(family: str, path: str, family_dirs, tmp_path: Path) -> None:
    """The paths a GPU takes, run here on the CPU with MLX: `pool`, Metal's (blocks read into
    buffers of their own, joining the pool, then `reconstruct`) and `gather`, CUDA's (the files
    read into one buffer, the cache gathered from strided views of it, the blocks joining the
    pool after the call). Lossless it is exact, after a restart and on the next, hot turn; at
    --kv-bits 8 the K/V are quantized (states are not) and the agent still resumes from disk."""
    for kv_bits in ("lossless", "8"):
        settings = Settings(model=str(family_dirs(family, config_overrides={"head_dim": 32})),
                            cache_dir=tmp_path / kv_bits, block_tokens=16, kv_bits=kv_bits)

        def engine_on_the_path():
            engine = open_engine(settings)
            engine.caches.on_host, engine.caches.gather = False, path == "gather"
            return engine

        a = Conversation(engine_on_the_path(), "a", SYSTEM)
        await a.ask(QUESTIONS[0])
        a.system = None
        await a.engine.aclose()
        engine = a.engine = engine_on_the_path()
        for question, tier in zip(QUESTIONS[1:3], ("disk", "hot")):
            if kv_bits == "lossless":
                result = await a.ask(question)
            else:
                result = await engine.ask(AskRequest("a", question, max_tokens=N))
            assert result.tier == tier and result.tokens.cached > 0 and not result.warnings
        listed = (await engine.list_agents()).agents[0]
        assert listed.tier == "hot" and listed.memory_bytes > 0
        await engine.aclose()


@pytest.mark.parametrize("family", ["qwen3_next", "gemma3_text"])
async def test_a_resume_reads_only_what_the_next_token_needs(family: str, family_dirs, tmp_path: Path, monkeypatch) -> None:
    """From disk, a resumed agent reads every block's full-attention K/V, a window's K/V only
    from the blocks its last tokens are in, and one recurrent state: the last block's."""
    settings = Settings(model=str(family_dirs(family)), cache_dir=tmp_path / "c", block_tokens=16)
    a = await saved_conversation(settings, 3)
    engine = a.engine = open_engine(settings)
    saved = len(engine.caches.record("a").blocks)
    read: list[list[str]] = []
    fill = engine.store.blocks.fill_blocks

    def spy(files, targets):  # each file's targets are made on a reading thread: recorded there, in file order
        made: list = [None] * len(targets)

        def recorded(i, make):
            def record(p):
                made[i] = make(p)
                return made[i]
            return record

        problems = fill(files, [recorded(i, t) for i, t in enumerate(targets)])
        read.extend([n for n, _ in m] for m in made)
        return problems

    monkeypatch.setattr(engine.store.blocks, "fill_blocks", spy)
    result = await a.ask(QUESTIONS[3])
    assert result.tier == "disk" and len(read) == -(-result.tokens.cached // 16) > 6 and len(read) >= saved - 1
    layout = engine.layout
    states = [n for names in read for n in names if ".state." in n]
    per_block = len([n for n in layout.shapes if ".state." in n])
    assert len(states) == per_block and all(".state." not in n for names in read[:-1] for n in names)
    window = [leaf for leaf in layout.leaves if leaf.kind == "window"]
    if window:
        blocks_with_window = [i for i, names in enumerate(read) if f"{window[0].name}.keys" in names]
        assert blocks_with_window == list(range(len(read) - len(blocks_with_window), len(read)))
        assert len(blocks_with_window) <= -(-window[0].size // 16) + 1 < len(read)
    full = [leaf for leaf in layout.leaves if leaf.kind == "kv"]
    assert all(f"{full[0].name}.keys" in names for names in read)
    await engine.aclose()


@pytest.mark.parametrize("family", ["qwen3_next", "gemma3_text"])
async def test_a_damaged_last_block_resumes_from_an_earlier_one(family: str, family_dirs, tmp_path: Path) -> None:
    """The last block a resume reads (its state checkpoint, its window) damaged: a warning, and
    the cache resumes from before it, never from a wrong state; the reply is exact."""
    settings = Settings(model=str(family_dirs(family)), cache_dir=tmp_path / "c", block_tokens=16)
    a = await saved_conversation(settings, 2)
    shutil.copytree(tmp_path / "c", tmp_path / "intact")
    intact = open_engine(settings.model_copy(update={"cache_dir": tmp_path / "intact"}))
    undamaged = await intact.ask(AskRequest("a", QUESTIONS[2], max_tokens=N))
    record = intact.store.kv_record("a")
    await intact.aclose()
    last = (undamaged.tokens.cached - 1) // 16  # the last block the resume read
    path = settings.cache_dir / "blocks" / f"{record.blocks[last]}.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # the data's last array: a state, or a layer's values
    path.write_bytes(bytes(data))
    engine = a.engine = open_engine(settings)
    saved = engine.caches.record("a")
    result = await a.ask(QUESTIONS[2])
    assert result.tier == "disk" and any("checksum" in w for w in result.warnings)
    # before the damaged block: the blocks up to it, or the turn's start (the branch of a recurrent model)
    assert 0 < result.tokens.cached < undamaged.tokens.cached
    assert result.tokens.cached <= last * 16 or result.tokens.cached == saved.branch_tokens
    await engine.aclose()


async def test_evicting_a_hybrid_agent_from_memory_frees_its_checkpoints_too(family_dirs, tmp_path: Path) -> None:
    settings = Settings(model=str(family_dirs("qwen3_next")), cache_dir=tmp_path / "c", block_tokens=16)
    engine = open_engine(settings)
    a = Conversation(engine, "a", SYSTEM)
    for q in QUESTIONS[:2]:
        await a.ask(q)
        a.system = None
    assert engine.caches.record("a").branch and engine.caches.used() > 0
    out = await engine.evict("a", "memory")
    assert out.freed_memory_bytes > 0 and engine.caches.used() == 0
    again = await a.ask(QUESTIONS[2])  # from disk, branch and all
    assert again.tier == "disk" and again.tokens.cached > 0 and not again.warnings
    await engine.aclose()
