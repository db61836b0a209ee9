"""The decode batch: calls to different agents generating together, one model pass per token.

Each layer's cache is mlx-lm's BatchKVCache (rows left-padded to a common length, with the
masks that keep each row to its own tokens), so a row's tokens are the ones it would get alone.

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
from mlx_lm.models.cache import BatchKVCache, KVCache

Sampler = Callable[[mx.array], mx.array]


@dataclass
class Row:
    """One call in the batch: the token it feeds next, how it samples, what it may generate."""

    key: Any  # the caller's handle for this call
    token: int
    sampler: Sampler
    max_tokens: int
    stop: set[int]
    tokens: list[int]  # those its cache holds
    generated: int = 1  # `token` is generated already
    finish: str | None = None
    cache: list[KVCache] | None = None  # once removed: its cache, as views of the batch's arrays


@dataclass
class DecodeBatch:
    model: Any
    rows: list[Row] = field(default_factory=list)
    cache: list[BatchKVCache] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: Row, cache: list[KVCache]) -> None:
        """Join with a call's cache (which holds `row.tokens`; `row.token` is not in it yet)."""
        n = cache[0].offset
        joined = []
        for c in cache:  # a one-row BatchKVCache over the call's arrays, spare room and all, no copy
            b = BatchKVCache([0])
            b.keys, b.values = c.keys, c.values
            b.offset, b._idx = mx.array([n]), n
            joined.append(b)
        if not self.rows:
            self.cache = joined
        else:
            for mine, theirs in zip(self.cache, joined):
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
        for r, token in stepped:
            r.tokens.append(r.token)
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

    def row_cache(self, row: Row) -> list[KVCache]:
        """The call's cache as views of the batch's arrays (valid until the batch changes)."""
        i = self.rows.index(row)
        pad = self.cache[0].left_padding[i].item()
        end = self.cache[0]._idx
        out = []
        for b in self.cache:
            c = KVCache()
            c.keys, c.values, c.offset = b.keys[i : i + 1, :, pad:end], b.values[i : i + 1, :, pad:end], end - pad
            out.append(c)
        return out

    def remove(self, rows: list[Row]) -> None:
        """Leave the batch; each removed row keeps a view of its cache in `row.cache`."""
        for r in rows:
            r.cache = self.row_cache(r)
        keep = [i for i, r in enumerate(self.rows) if r not in rows]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = []
            return
        for b in self.cache:
            b.filter(keep)
