"""Kill -9 the server at random moments around its saves: no answered turn is lost, answers stay exact."""

from __future__ import annotations

import random
import time

import pytest

from mcp_semantic.engine import AskRequest
from mcp_semantic.server import open_engine
from mcp_semantic.settings import Settings

pytestmark = pytest.mark.anyio


async def test_sigkill_around_saves_loses_no_answered_turn(settings: Settings, stdio_server, replay) -> None:
    rng = random.Random(7)
    answered = []
    for trial in range(4):
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
