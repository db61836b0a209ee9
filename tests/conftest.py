from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Iterator

import mcp_semantic  # noqa: F401, I001  first: it loads OpenBLAS, which must come before MLX loads
import mlx_lm
import pytest

from mcp_semantic.settings import Settings
from mcp_semantic.tiny_model import make_tiny_model
from servers import StdioServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model, loaded."""
    from mcp_semantic.models import load_model

    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def sentencepiece():
    """A SentencePiece BPE model trained on a small corpus (tests/gguf_files.py)."""
    from gguf_files import train_sentencepiece

    return train_sentencepiece()


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    # blocks of 16 tokens: the tiny model's short conversations span many blocks
    return Settings(model=str(tiny_model_dir), cache_dir=tmp_path / "cache", memory_budget=256 * 1024**2, block_tokens=16)


def replay_from_scratch(lm, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The same conversation, from scratch, through plain mlx-lm (greedy): the reference for exactness."""
    prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return mlx_lm.generate(lm.model, lm.tokenizer, prompt=prompt, max_tokens=max_tokens)


@pytest.fixture
def replay():
    return replay_from_scratch


def serve_args(settings: Settings, *extra: str) -> list[str]:
    return [
        "-m", "mcp_semantic", "serve", "--model", settings.model, "--cache-dir", str(settings.cache_dir),
        "--block-tokens", str(settings.block_tokens), *extra,
    ]


def saved_blocks(cache_dir: Path, agent: str) -> list[Path]:
    """The block files of an agent's saved cache, read from the store as another process would."""
    db = sqlite3.connect(f"file:{cache_dir / 'store.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT blocks FROM kv WHERE agent = ?", (agent,)).fetchone()
    finally:
        db.close()
    return [cache_dir / "blocks" / f"{bid}.safetensors" for bid in json.loads(row[0])] if row else []


@pytest.fixture
def stdio_server():
    servers: list[StdioServer] = []

    def start(settings: Settings, *extra: str) -> StdioServer:
        servers.append(StdioServer(serve_args(settings, *extra)))
        return servers[-1]

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait()



def _start(server_class):
    """Start a real server for the shared mode's tests; where it is not installed, skip, except
    on a Debian-like system, where `install.sh --dev` installs it: there a missing one fails."""
    try:
        return server_class.start()
    except RuntimeError as e:
        if "not installed" in str(e) and not shutil.which("apt-get"):
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="session")
def postgres_server():
    from servers import Postgres

    server = _start(Postgres)
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """A new, empty database of the session's PostgreSQL, for this test only."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.url(), autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    yield postgres_server.url(name)
    with psycopg.connect(postgres_server.url(), autocommit=True) as db:
        db.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_server():
    from servers import Redis

    server = _start(Redis)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url
