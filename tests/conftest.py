from __future__ import annotations

from pathlib import Path

import mlx_lm
import pytest

import mcp_semantic  # noqa: F401  (loads OpenBLAS before MLX)
from mcp_semantic.settings import Settings
from mcp_semantic.tiny_model import make_tiny_model


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return Settings(model=str(tiny_model_dir), cache_dir=tmp_path / "cache", memory_budget=256 * 1024**2)


def replay_from_scratch(lm, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The same conversation, from scratch, through plain mlx-lm (greedy): the reference for exactness."""
    prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return mlx_lm.generate(lm.model, lm.tokenizer, prompt=prompt, max_tokens=max_tokens)


@pytest.fixture
def replay():
    return replay_from_scratch
