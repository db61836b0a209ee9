"""Content-addressed block ids, and caches split into blocks and rebuilt."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from mcp_semantic.block_pool import block_ids, reconstruct, split_blocks


def test_ids_name_whole_prefixes() -> None:
    a = list(range(1000))
    b = list(range(600)) + [7] * 400
    ids_a, ids_b = block_ids(a, "fp", "f32", 256), block_ids(b, "fp", "f32", 256)
    assert len(ids_a) == 3  # 1000 tokens: three full blocks, a tail of 232
    assert ids_a[:2] == ids_b[:2]  # the first 512 tokens agree
    assert ids_a[2] != ids_b[2]
    c = [9] + a[1:]  # differs only in the first block: every later id differs too
    assert all(x != y for x, y in zip(ids_a, block_ids(c, "fp", "f32", 256)))
    assert block_ids(a, "other-model", "f32", 256)[0] != ids_a[0]
    assert block_ids(a, "fp", "q8", 256)[0] != ids_a[0]
    assert block_ids(a[:255], "fp", "f32", 256) == []


@pytest.mark.parametrize("n, room", [(10, 0), (256, 0), (700, 64)])
def test_split_and_reconstruct_round_trip(n: int, room: int) -> None:
    cache = []
    for layer in range(3):
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, 2, n, 8)), mx.random.normal((1, 2, n, 8)))
        cache.append(c)
    blocks, tail = split_blocks(cache, n, 256)
    assert len(blocks) == n // 256 and tail[0][0].shape[2] == n % 256
    rebuilt = reconstruct(blocks, tail, room)
    for original, c in zip(cache, rebuilt):
        assert c.offset == n and c.keys.shape[2] == n + room
        assert mx.array_equal(c.keys[..., :n, :], original.keys[..., :n, :]).item()
        assert mx.array_equal(c.values[..., :n, :], original.values[..., :n, :]).item()
    before = rebuilt[0].keys.shape
    if room:
        rebuilt[0].update_and_fetch(mx.zeros((1, 2, room, 8)), mx.zeros((1, 2, room, 8)))
        assert rebuilt[0].keys.shape == before  # the room took the new tokens in place
