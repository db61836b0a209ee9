"""Content-addressed block ids, blocks cut from a cache and rebuilt, and the in-memory pool."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from mcp_semantic.block_pool import Block, BlockPool, Storage, block_ids, chain_ids, cut_blocks, host_view
from mcp_semantic.cache_build import Spares, reconstruct
from mcp_semantic.cache_kinds import Layout

EXACT = Storage("fp", "float32")
PLAIN = Layout.full_attention(3, 2, 32)


def test_ids_name_whole_prefixes() -> None:
    a = list(range(1000))
    b = list(range(600)) + [7] * 400
    ids_a, ids_b = block_ids(a, "k", 256), block_ids(b, "k", 256)
    assert len(ids_a) == 3 and len(chain_ids(a, "k", 256)) == 4  # three full blocks and a partial one
    assert ids_a[:2] == ids_b[:2]  # the first 512 tokens agree
    assert ids_a[2] != ids_b[2]
    c = [9] + a[1:]  # differs only in the first block: every later id differs too
    assert all(x != y for x, y in zip(ids_a, block_ids(c, "k", 256)))
    assert block_ids(a, "other-model", 256)[0] != ids_a[0]
    assert block_ids(a[:255], "k", 256) == []
    # a partial block is not the full block it grows into, so an id's content never changes
    assert chain_ids(a[:300], "k", 256)[1] != chain_ids(a[:400], "k", 256)[1]
    assert chain_ids(a[:300], "k", 256)[0] == ids_a[0]


def test_storage_keys_differ_by_model_dtype_and_precision() -> None:
    keys = {Storage("fp", "float32").key, Storage("fp2", "float32").key, Storage("fp", "bfloat16").key, Storage("fp", "float32", 8).key}
    assert len(keys) == 4


def make_cache(n: int, layers: int = 3) -> list[KVCache]:
    cache = []
    for _ in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, 2, n, 32)), mx.random.normal((1, 2, n, 32)))
        cache.append(c)
    return cache


@pytest.mark.parametrize("n, room, bits", [(10, 0, None), (256, 0, None), (700, 64, None), (300, 32, 8)])
def test_cut_and_reconstruct_round_trip(n: int, room: int, bits: int | None) -> None:
    storage = Storage("fp", "float32", bits)
    cache = make_cache(n)
    blocks = cut_blocks(PLAIN, cache, list(range(n)), storage, 256)
    assert [len(b.tokens) for b in blocks] == [256] * (n // 256) + [n % 256] * (n % 256 > 0)
    assert [b.parent for b in blocks] == [""] + [b.id for b in blocks[:-1]]
    rebuilt = reconstruct(PLAIN, storage, blocks, n, n + room, 256)
    for original, c in zip(cache, rebuilt):
        assert c.offset == n and c.keys.shape[2] == n + room
        tolerance = 0 if bits is None else 0.1
        assert mx.abs(c.keys[..., :n, :] - original.keys[..., :n, :]).max().item() <= tolerance
        assert mx.abs(c.values[..., :n, :] - original.values[..., :n, :]).max().item() <= tolerance
    if room:
        before = rebuilt[0].keys.shape
        rebuilt[0].update_and_fetch(mx.zeros((1, 2, room, 32)), mx.zeros((1, 2, room, 32)))
        assert rebuilt[0].keys.shape == before  # the room took the new tokens in place


def test_a_cache_built_from_one_block_never_writes_into_it() -> None:
    (block,) = cut_blocks(PLAIN, make_cache(8), list(range(8)), EXACT, 256)
    before = mx.array(block.arrays["layers.0.keys"])
    (c, *_) = reconstruct(PLAIN, EXACT, [block], 8, 8, 256)
    c.trim(4)  # then overwrite positions the block holds
    c.update_and_fetch(mx.zeros((1, 2, 2, 32)), mx.zeros((1, 2, 2, 32)))
    mx.eval(c.keys)
    assert mx.array_equal(block.arrays["layers.0.keys"], before).item()


def test_cut_skips_blocks_already_held() -> None:
    cache = make_cache(600)
    ids = chain_ids(list(range(600)), EXACT.key, 256)
    blocks = cut_blocks(PLAIN, cache, list(range(600)), EXACT, 256, skip=ids[:2])
    assert [b.id for b in blocks] == ids[2:]  # only the new tail is copied


def block(bid: str, nbytes: int) -> Block:
    return Block(bid, "", [0], {"layers.0.keys": mx.zeros((nbytes // 4,), mx.float32)})


def test_pool_counts_bytes_refs_and_order() -> None:
    pool = BlockPool()
    for bid in "abc":
        pool.add(block(bid, 400))
    assert pool.nbytes == 1200 and len(pool) == 3
    pool.add(block("a", 400))  # already held: counted once
    assert pool.nbytes == 1200
    pool.add(Block("a", "", [0], {"layers.0.state.0": mx.zeros((25,), mx.float32)}))  # an array it lacked
    assert pool.nbytes == 1300 and set(pool.peek("a").arrays) == {"layers.0.keys", "layers.0.state.0"}
    pool.peek("a").arrays.pop("layers.0.state.0")
    pool.nbytes -= 100
    pool.get("b")  # used: now the most recent
    assert list(pool.oldest()) == ["c", "a", "b"]
    pool.hold([], ["a", "b"])  # agent 1
    pool.hold([], ["a", "c"])  # agent 2 shares a
    pool.hold(["a", "b"], ["a"])  # agent 1 drops b: nobody holds it, so it leaves memory
    assert "b" not in pool and pool.refs["a"] == 2 and pool.nbytes == 800
    pool.hold(["a"], [])
    assert "a" in pool and pool.refs["a"] == 1  # agent 2 still holds it
    assert pool.drop("a") == 400 and pool.drop("a") == 0 and pool.nbytes == 400


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_reconstruct_refuses_blocks_that_do_not_join(dtype) -> None:
    storage = Storage("fp", str(dtype).removeprefix("mlx.core."))
    layout = Layout.full_attention(3, 2, 32, dtype)
    cache = make_cache(600)
    for c in cache:
        c.keys, c.values = c.keys.astype(dtype), c.values.astype(dtype)
    blocks = cut_blocks(layout, cache, list(range(600)), storage, 256)
    rebuilt = reconstruct(layout, storage, blocks, 600, 640, 256)
    assert rebuilt[2].keys.dtype == dtype and rebuilt[2].keys.shape[2] == 640
    assert mx.array_equal(rebuilt[2].values[..., :600, :], cache[2].values[..., :600, :]).item()
    assert not rebuilt[2].keys[..., 600:, :].any().item()  # the room is zeros
    other = cut_blocks(layout, make_cache(300, layers=3)[:1] * 3, list(range(300)), storage, 256)[1]
    other.arrays = {k: a[:, :1].astype(dtype) for k, a in other.arrays.items()}  # one head, not two
    with pytest.raises(ValueError):
        reconstruct(layout, storage, blocks[:2] + [other], 600, 600, 256)


def _address(a: mx.array) -> int:
    return host_view(a).ctypes.data


def test_spares_hand_back_idle_arrays_in_place_and_never_shared_memory() -> None:
    """A working cache's arrays come back for the next of the same shape once nothing refers to
    them (the same memory, no zero fill); one something still refers to is not taken, and one
    whose memory a view (a block cut from it) still shares is copied, the view left as it was."""
    spares, shape = Spares(), (1, 2, 8, 4)
    a = mx.ones(shape)
    mx.eval(a)
    spares.keep([a])
    assert spares.take({"k": (shape, mx.float32)}) == {}  # `a` is still ours
    address = _address(a)
    del a
    assert spares.take({"k": (shape, mx.float16)}) == {} and spares.take({"k": ((1, 2, 9, 4), mx.float32)}) == {}
    taken = spares.take({"k": (shape, mx.float32)})["k"]
    assert _address(taken) == address and spares.arrays == []
    spares.keep([taken])
    view = taken[..., :4, :]
    before = np.array(view)
    del taken
    reused = spares.take({"k": (shape, mx.float32)})["k"]
    assert _address(reused) != address  # copied: the view shares the memory
    host_view(reused)[...] = 7
    assert np.array_equal(np.array(view), before)


def test_spares_keep_at_most_a_cache_s_worth_of_idle_arrays() -> None:
    spares = Spares()
    spares.keep([mx.zeros((4,)), mx.zeros((4,))])
    spares.keep([mx.zeros((4,)), mx.zeros((4,))])  # idle now: the first two, newest kept
    new = [mx.zeros((4,))]
    spares.keep(new)
    assert len(spares.arrays) == 2 and spares.arrays[-1] is new[0]
    spares.clear()
    assert spares.arrays == []


def test_spares_keep_one_cache_s_worth_once_calls_that_ran_together_end() -> None:
    spares = Spares()
    caches = [[mx.zeros((4,)) for _ in range(2)] for _ in range(3)]
    for arrays in caches:  # three calls' caches, in use: all kept
        spares.keep(arrays)
    assert len(spares.arrays) == 6
    del caches, arrays  # the calls end
    spares.trim()  # as Caches.settle does when idle
    assert len(spares.arrays) == 2
