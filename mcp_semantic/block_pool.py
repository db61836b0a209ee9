"""KV blocks: fixed-size token blocks named by their content, and the contiguous cache built from them.

This is the first step of the block pool (issue 5): the content addressing and the
reconstruction that a pool of shared blocks needs. The store does not use it yet; an agent's
cache is still saved as one file (see store.py).

A full block's id hashes its parent block's id, its token ids, the model fingerprint and the
storage format, so an id names a whole prefix, as in vLLM's prefix caching: two agents whose
histories start with the same tokens get the same ids for those blocks and can share them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

BLOCK_TOKENS = 256

Block = list[tuple[mx.array, mx.array]]
"""One block: per layer, keys and values of shape (1, kv_heads, tokens, head_dim)."""


def block_ids(tokens: list[int], fingerprint: str, storage: str, block_tokens: int = BLOCK_TOKENS) -> list[str]:
    """The ids of the full blocks of `tokens`, in order; a partial tail block has none."""
    ids = []
    parent = b""
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        h = hashlib.sha256()
        for part in (parent, fingerprint.encode(), storage.encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        h.update(np.asarray(tokens[start : start + block_tokens], dtype=np.int64).tobytes())
        parent = h.digest()
        ids.append(h.hexdigest()[:32])
    return ids


def split_blocks(cache: list[Any], n_tokens: int, block_tokens: int = BLOCK_TOKENS) -> tuple[list[Block], Block]:
    """The full blocks and the tail of the first n_tokens of a KVCache list (views, no copy)."""
    blocks = []
    for start in range(0, n_tokens - block_tokens + 1, block_tokens):
        blocks.append([(c.keys[..., start : start + block_tokens, :], c.values[..., start : start + block_tokens, :]) for c in cache])
    start = len(blocks) * block_tokens
    tail = [(c.keys[..., start:n_tokens, :], c.values[..., start:n_tokens, :]) for c in cache]
    return blocks, tail


def reconstruct(blocks: list[Block], tail: Block, room: int = 0) -> list[KVCache]:
    """One contiguous KVCache per layer from blocks and a tail, with `room` spare slots.

    Why not KVCache.update_and_fetch block by block: it grows its buffer in steps and copies
    the whole prefix each time; one concatenation per layer writes every byte once.
    """
    caches = []
    for layer, (tail_k, tail_v) in enumerate(tail):
        keys = [b[layer][0] for b in blocks] + [tail_k] * (tail_k.shape[2] > 0)
        values = [b[layer][1] for b in blocks] + [tail_v] * (tail_v.shape[2] > 0)
        n = sum(k.shape[2] for k in keys)
        if room:
            shape = list(tail_k.shape)
            shape[2] = room
            keys.append(mx.zeros(shape, tail_k.dtype))
            shape = list(tail_v.shape)
            shape[2] = room
            values.append(mx.zeros(shape, tail_v.dtype))
        c = KVCache()
        c.keys, c.values, c.offset = mx.concatenate(keys, axis=2), mx.concatenate(values, axis=2), n
        caches.append(c)
    mx.eval([(c.keys, c.values) for c in caches])
    return caches
