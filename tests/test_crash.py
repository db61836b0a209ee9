"""Kill -9 the server around its saves, and between a save's block files and its commit: no answered
turn is lost, the store opens, answers stay exact."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest

from mcp_semantic.calls import AskRequest
from mcp_semantic.server import open_engine
from mcp_semantic.settings import Settings

pytestmark = pytest.mark.anyio


async def sigkill_trials(settings: Settings, stdio_server, replay, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    answered = []
    for trial in range(trials):
        server = stdio_server(settings)
        for turn in range(2):
            question = f"Question {trial}.{turn}: tell me about the river."
            out = server.call("ask_agent", {"agent": "k", "message": question, "max_tokens": 6})
            answered.append((question, out["reply"]))
        time.sleep(rng.uniform(0.3, 0.9))  # the engine saves after 0.5 s idle: kill before, during or after
        server.proc.kill()
        server.proc.wait()

    engine = open_engine(settings)
    agent = engine.store.load_agent("k")
    pairs = list(zip(agent.messages[0::2], agent.messages[1::2]))
    assert [(u["content"], a["content"]) for u, a in pairs] == answered  # every answered turn, in order
    out = await engine.ask(AskRequest("k", "And now?", max_tokens=8))
    assert out.tokens.cached > 0 or out.warnings  # its cache was used, or its loss was reported
    assert out.reply == replay(engine.lm, agent.messages + [{"role": "user", "content": "And now?"}], 8)
    await engine.aclose()


async def test_sigkill_around_saves_loses_no_answered_turn(settings: Settings, stdio_server, replay) -> None:
    await sigkill_trials(settings, stdio_server, replay, trials=4, seed=7)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
async def test_sigkill_many_times(settings: Settings, stdio_server, replay, seed: int) -> None:
    """The long version: 5 x 12 kills at random moments (`pytest -m slow`)."""
    await sigkill_trials(settings, stdio_server, replay, trials=12, seed=seed)


CRASH_BETWEEN_BLOCKS_AND_COMMIT = """
import os, signal, sys, anyio
import mcp_semantic
from mcp_semantic.calls import AskRequest
from mcp_semantic.server import open_engine
from mcp_semantic.settings import Settings
from mcp_semantic.sqlite_store import SQLiteStore

async def main():
    engine = open_engine(Settings(model=sys.argv[1], cache_dir=sys.argv[2], block_tokens=16))
    await engine.ask(AskRequest("c", "Tell me about the river.", max_tokens=8))
    await engine.flush()  # turn 1: blocks and list committed
    await engine.ask(AskRequest("c", "And the mill?", max_tokens=8))  # turn 2: transcript saved
    SQLiteStore._put_record = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # die after the block files, before the list
    await engine.flush()

anyio.run(main)
"""


async def test_crash_between_block_files_and_commit(settings: Settings, replay) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CRASH_BETWEEN_BLOCKS_AND_COMMIT, settings.model, str(settings.cache_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    on_disk = {p.stem for p in (settings.cache_dir / "blocks").glob("*.safetensors")}

    engine = open_engine(settings)  # opens: the turn-2 blocks no list names are collected
    record = engine.store.kv_record("c")
    assert set(record.blocks) < on_disk and {p.stem for p in engine.store.blocks.dir.iterdir()} == set(record.blocks)
    agent = engine.store.load_agent("c")
    assert agent.turns == 2  # the transcript, saved before turn 2 was answered, is the truth
    out = await engine.ask(AskRequest("c", "And the town?", max_tokens=8))
    assert out.tier == "disk" and 0 < out.tokens.cached < out.tokens.context and not out.warnings
    assert out.reply == replay(engine.lm, agent.messages + [{"role": "user", "content": "And the town?"}], 8)
    await engine.aclose()


INTERRUPTED = """
import os, signal, sys, anyio
import mcp_semantic
from mcp_semantic.caches import Caches
from mcp_semantic.calls import AskRequest
from mcp_semantic.server import open_engine
from mcp_semantic.settings import Settings
from mcp_semantic.store import Store

async def main():
    engine = open_engine(Settings(model=sys.argv[1], cache_dir=sys.argv[2], block_tokens=16))
    await engine.ask(AskRequest("src", "Tell me about the river.", max_tokens=8))
    await engine.ask(AskRequest("gone", "Tell me about the dam.", system="Be brief.", max_tokens=8))
    await engine.flush()
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[3] == "fork":
        Caches.fork = die  # after the fork's transcript row, before its block list
        await engine.fork("src", "copy")
    else:
        Store._collect = die  # after the rows are deleted, before the block files are
        await engine.evict("gone", "agent")

anyio.run(main)
"""


@pytest.mark.parametrize("what", ["fork", "evict"])
async def test_an_interrupted_fork_or_eviction_is_done_or_not(settings: Settings, replay, what: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", INTERRUPTED, settings.model, str(settings.cache_dir), what],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    engine = open_engine(settings)
    names = engine.store.names()
    if what == "fork":  # done: the fork has its transcript; its cache comes from the source's blocks
        assert names == ["copy", "gone", "src"]
        copy, src = engine.store.load_agent("copy"), engine.store.load_agent("src")
        assert copy.messages == src.messages and copy.parent == "src"
        answer = await engine.ask(AskRequest("copy", "And then?", max_tokens=8))
        assert answer.tokens.cached > 0
        assert answer.reply == replay(engine.lm, src.messages + [{"role": "user", "content": "And then?"}], 8)
    else:  # done: the agent is gone, and the blocks only it held were collected at start
        assert names == ["src"]
        held = set(engine.store.kv_record("src").blocks)
        assert {p.stem for p in engine.store.blocks.dir.iterdir()} == held
        assert (await engine.ask(AskRequest("src", "And then?", max_tokens=8))).tier == "disk"
    await engine.aclose()


async def test_sigkill_around_saves_of_a_hybrid_model(tmp_path, stdio_server, replay) -> None:
    """The same with recurrent state in the blocks (a gated delta-net model): no answered turn
    lost, and the answer after the kills exact."""
    from mcp_semantic.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "model", model_type="qwen3_next")
    settings = Settings(model=str(model), cache_dir=tmp_path / "cache", block_tokens=16)
    await sigkill_trials(settings, stdio_server, replay, trials=3, seed=11)
