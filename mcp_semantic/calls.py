"""What the engine's calls take and give: the requests, the typed results (their fields'
docstrings are the MCP tools' output schemas), and the refusal error."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from mcp_semantic.caches import Tier


class RequestError(ValueError):
    """A call the engine refuses; the message says what was wrong, and nothing was changed."""


# Results (typed, so MCP hosts get an output schema)


class _Result(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)  # field docstrings become schema descriptions


class TokenCounts(_Result):
    context: int
    """Tokens of the prompt for this call (the whole conversation so far plus the new message)."""
    cached: int
    """Prompt tokens reused from the agent's KV cache instead of recomputed."""
    prefilled: int
    """Prompt tokens computed in this call (context - cached)."""
    generated: int


class Timings(_Result):
    queue: float
    """Waiting behind other calls."""
    cache_load: float
    """Finding the agent's cache and building it from its blocks (read from disk for tier disk)."""
    prefill: float
    """Reading the new prompt tokens, up to the first token."""
    ttft: float
    """From the call's arrival at the engine to its first token: queue + cache_load + prefill."""
    total: float
    longest_pause: float
    """The longest time between two tokens of the reply: other calls joining the batch, or
    reading their prompts, show here."""


class AskResult(_Result):
    agent: str
    reply: str
    reasoning: str | None = None
    """A thinking model's reasoning before its reply (None for a model that does not think)."""
    finish_reason: Literal["stop", "length", "cancelled"]
    tier: Tier
    """Where the agent's cache came from: all in memory (hot), partly read from disk (disk),
    partly brought from the servers' shared block store (remote: Redis, then disk), or nothing
    reusable (new)."""
    turns: int
    """The agent's turns with this one (1: the call made the agent)."""
    tokens: TokenCounts
    timings_ms: Timings
    decode_tokens_per_s: float
    warnings: list[str] = []


class ForkResult(_Result):
    agent: str
    source: str
    tokens: int
    turns: int


class AgentInfo(_Result):
    name: str
    parent: str | None
    """The agent it was forked from."""
    tokens: int
    """Tokens of its conversation that its KV cache holds."""
    turns: int
    tier: Literal["hot", "disk", "remote", "none"]
    """Where its cache is: all in memory (and maybe on disk), partly or only on disk, partly
    only in the servers' shared block store (remote), or nowhere (the next call re-reads its
    history)."""
    blocks: int
    """KV blocks its cache is made of."""
    memory_bytes: int
    """Its blocks in memory."""
    shared_memory_bytes: int
    """Of memory_bytes, the blocks other agents hold too (in memory once)."""
    disk_bytes: int
    shared_disk_bytes: int
    """Of disk_bytes, the blocks other agents' saved caches hold too (on disk once)."""
    created_at: datetime
    last_used_at: datetime


class MemoryInfo(_Result):
    budget_bytes: int
    """Memory allowed for KV blocks (--memory-budget); running calls' working caches aside."""
    used_bytes: int
    """Bytes of the blocks in memory."""
    block_tokens: int
    blocks_in_memory: int
    blocks_on_disk: int
    hot_agents: int
    """Agents whose whole cache is in memory."""
    hit_rate: float
    """Of the calls to existing agents since start, the share whose cache was all in memory."""
    cached_token_rate: float
    """Of the prompt tokens of all calls since start, the share reused from a cache, not computed."""


class AgentList(_Result):
    agents: list[AgentInfo]
    """A page of the agents, by name."""
    total: int
    """Agents in all."""
    next_cursor: str | None
    """The `cursor` for the next page; None after the last."""
    memory: MemoryInfo


class EvictResult(_Result):
    evicted: list[str]
    freed_memory_bytes: int
    freed_disk_bytes: int


@dataclass
class AskRequest:
    """One ask_agent call, as the engine takes it."""

    agent: str
    message: str
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    think: bool | None = None  # thinking models: reason first or not; None: the template's default
