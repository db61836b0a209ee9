from __future__ import annotations

from pathlib import Path

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
