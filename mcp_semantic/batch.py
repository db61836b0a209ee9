"""The decode batch: calls to different agents generating together, one model pass per token.

Each layer's cache takes its batched form (cache_kinds.to_batch): mlx-lm's BatchKVCache for full
attention (rows left-padded to a common length, with the masks that keep each row to its own
tokens), BatchWindowCache for sliding windows, and ArraysCache, whose rows are its first axis,
for recurrent state; so a row's tokens are the ones it would get alone. A model with chunked
attention decodes one call at a time (cache_kinds.py says why).

Why not mlx-lm's BatchGenerator, which this replaced: a call joining it passes through its
prompt-processing batch, so its cache is copied three times (merged, deep-copied when split
off, extended into the generation batch) and its first step runs alone; leaving copies it twice
more (extracted, filtered). With 4K tokens of context those copies paused the other agents for
most of a second on this machine. Here a call joins with its cache extended into the batch
once (one copy of the batch, which a contiguous batched cache cannot avoid), leaves with one
filter, and its blocks are cut from the batch's arrays directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

from mcp_semantic.cache_kinds import Layout, row_of, to_batch, whole_of

Sampler = Callable[[mx.array], mx.array]


def seeded_sampler(temperature: float, top_p: float, seed: int) -> Sampler:
    """Sampling from the request's own random stream, so a seeded reply is the same whatever
    else is in the batch (mlx-lm's samplers draw from the global stream)."""
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, step = mx.random.split(key)
        if top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1 / temperature), key=step)

    return sample


@dataclass
class Row:
    """One call in the batch: the token it feeds next, how it samples, what it may generate."""

    key: Any  # the caller's handle for this call
    token: int
    sampler: Sampler
    max_tokens: int
    stop: set[int]
    tokens: list[int]  # those its cache holds
    checkpoints: dict[int, Any] = field(default_factory=dict)  # recurrent states at block ends (caches.py)
    generated: int = 1  # `token` is generated already
    finish: str | None = None
    cache: list[Any] | None = None  # once removed: its cache, as views of the batch's arrays
    whole: list[Any] | None = None  # once removed alone: the batch's arrays whole (cache_kinds.whole_of)


@dataclass
class DecodeBatch:
    model: Any
    layout: Layout
    block_tokens: int  # with recurrent layers, a row's states are kept where its blocks end
    rows: list[Row] = field(default_factory=list)
    cache: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: Row, cache: list[Any]) -> None:
        """Join with a call's cache (which holds `row.tokens`; `row.token` is not in it yet)."""
        if not self.layout.batchable:  # one call at a time: its own cache is the batch's
            assert not self.rows, "a model without a batched cache decodes one call at a time"
            self.cache = cache
        elif not self.rows:
            self.cache = to_batch(self.layout, cache)
        else:
            for mine, theirs in zip(self.cache, to_batch(self.layout, cache)):
                mine.extend(theirs)
        self.rows.append(row)

    def step(self) -> list[tuple[Row, int]]:
        """Feed every row its token and sample the next: each row with its new token. Rows that
        finish (`finish` set) are removed."""
        inputs = mx.array([r.token for r in self.rows])
        logits = self.model(inputs[:, None], cache=self.cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        samplers = [r.sampler for r in self.rows]
        if all(s is samplers[0] for s in samplers):
            sampled = samplers[0](logprobs)
        else:
            sampled = mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(samplers)])
        stepped = list(zip(self.rows, sampled.tolist()))
        for i, (r, token) in enumerate(stepped):
            r.tokens.append(r.token)
            if self.layout.recurrent and len(r.tokens) % self.block_tokens == 0:
                r.checkpoints[len(r.tokens)] = self.layout.states(self.cache, i if self.layout.batchable else None)
            r.generated += 1
            r.token = token
            if token in r.stop:
                r.finish = "stop"
            elif r.generated >= r.max_tokens:
                r.finish = "length"
        done = [r for r in self.rows if r.finish]
        if done:
            self.remove(done)
        return stepped

    def row_cache(self, row: Row) -> list[Any]:
        """The call's cache as views of the batch's arrays (valid until the batch changes)."""
        if not self.layout.batchable:
            return self.cache
        return row_of(self.layout, self.cache, self.rows.index(row), len(row.tokens))

    def remove(self, rows: list[Row]) -> None:
        """Leave the batch; each removed row keeps a view of its cache in `row.cache`."""
        for r in rows:
            r.cache = self.row_cache(r)
            if len(self.rows) == 1 and self.layout.batchable:
                r.whole = whole_of(self.layout, self.cache)
        keep = [i for i, r in enumerate(self.rows) if r not in rows]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = []
            return
        for b in self.cache:
            b.filter(keep)  # BatchKVCache, ArraysCache and CacheList each filter their rows
