"""Block bytes in Redis behind the local block files (real redis-server, tests/servers.py)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import mlx.core as mx
import numpy as np
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from mcp_semantic.block_files import BlockFiles, host_block
from mcp_semantic.block_pool import Storage, array_names, cut_blocks
from mcp_semantic.block_redis import PREFIX, RedisBlocks, Unreachable
from mcp_semantic.cache_kinds import Layout
from servers import free_port

STORAGE = Storage("fp", "float32")
LAYOUT = Layout.full_attention(2, 2, 4)
NAMES = array_names(LAYOUT, STORAGE)


def write_blocks(files: BlockFiles) -> list:
    from mlx_lm.models.cache import KVCache

    cache = []
    for _ in range(2):
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, 2, 8, 4)), mx.random.normal((1, 2, 8, 4)))
        cache.append(c)
    blocks = cut_blocks(LAYOUT, cache, list(range(8)), STORAGE, 4)
    for b in blocks:
        files.write(host_block(b), STORAGE)
    return blocks


@contextmanager
def two_servers(tmp_path: Path, redis_url: str) -> Iterator[SimpleNamespace]:
    """Server A's blocks (`blocks`, `ids`) in its files and put in Redis (`sent`: the bytes), and
    server B with files of its own; both servers' files (`a`, `b`) and Redis clients (`ra`,
    `rb`) closed after."""
    a, b = BlockFiles(tmp_path / "a"), BlockFiles(tmp_path / "b")
    ra, rb = RedisBlocks(redis_url, a), RedisBlocks(redis_url, b)
    try:
        blocks = write_blocks(a)
        ids = [blk.id for blk in blocks]
        yield SimpleNamespace(a=a, b=b, ra=ra, rb=rb, blocks=blocks, ids=ids, sent=ra.put(ids))
    finally:
        for closing in (ra, rb, a, b):
            closing.close()


def zeros(files: list) -> list:
    """A target of zeros for each array of each opened block file, as fill_blocks takes them."""
    return [[(n, [np.zeros(f.layout[n][1], np.float32)]) for n in f.layout] for f in files]


def test_blocks_go_through_redis_to_another_server(tmp_path: Path, redis_url: str) -> None:
    """Server A puts its blocks; server B (files of its own) reads them from Redis, checked,
    exactly, writing no file; a block Redis lost is a miss, not an error; one it holds damaged
    fails its check and is deleted from Redis (so a save puts it anew: SET NX keeps a value)."""
    with two_servers(tmp_path, redis_url) as s:
        a, b, ra, rb, blocks, ids = s.a, s.b, s.ra, s.rb, s.blocks, s.ids
        assert s.sent == sum(a.size(i) for i in ids) and ra.put(ids) > 0
        heads = rb.heads(ids + ["0" * 32])
        assert set(heads) == set(ids) and all(heads[i].size == a.size(i) for i in ids)  # one Redis lacks is left out
        for original, (block, problem) in zip(blocks, b.read_blocks(ids, STORAGE, NAMES, remote=heads)):
            assert problem is None and mx.array_equal(block.arrays["layers.1.values"], original.arrays["layers.1.values"]).item()
        assert not list(b.dir.iterdir())  # files are written when an agent is saved, from the pool

        client = redis.Redis.from_url(redis_url)
        client.delete(PREFIX + ids[0])  # evicted by Redis (maxmemory) or lost
        data = bytearray(client.get(PREFIX + ids[1]))
        data[-1] ^= 1  # damaged in Redis
        client.set(PREFIX + ids[1], bytes(data))
        heads = rb.heads(ids)
        assert set(heads) == {ids[1]}
        (_, missing), (_, damaged) = b.read_blocks(ids[:2], STORAGE, NAMES, remote=heads)
        assert "missing" in missing and "checksum" in damaged and "shared tier" in damaged
        assert client.exists(PREFIX + ids[1]) == 0
        ra.delete(ids)
        assert client.dbsize() == 0
        client.close()


def test_an_unreachable_redis_is_a_clear_error_that_hides_the_password(tmp_path: Path) -> None:
    files = BlockFiles(tmp_path)
    with pytest.raises(Unreachable) as e:
        RedisBlocks(f"redis://:s3cret@127.0.0.1:{free_port()}/0", files, timeout_s=2)
    assert "redis://:***@127.0.0.1" in str(e.value) and "s3cret" not in str(e.value)
    files.close()


def test_a_remote_read_goes_straight_into_its_targets_in_ranges(tmp_path: Path, redis_url: str, monkeypatch) -> None:
    """Arrays read from Redis land in the caller's buffers, exact, by GETRANGEs of at most
    RANGE_BYTES (here a few bytes, so ranges cut across arrays and buffers), a header longer than
    HEAD_BYTES read by a second round trip; a block changed or gone between its header and its
    data is a miss, never data in the cache."""
    from mcp_semantic import block_redis

    monkeypatch.setattr(block_redis, "HEAD_BYTES", 16)
    monkeypatch.setattr(block_redis, "RANGE_BYTES", 40)
    with two_servers(tmp_path, redis_url) as s:
        b, rb, blocks, ids = s.b, s.rb, s.blocks, s.ids
        files = b.open_blocks(ids, STORAGE, NAMES, rb.heads(ids))
        assert all(f.source is rb for f in files)
        targets = zeros(files)
        assert b.fill_blocks(files, targets) == [None, None]
        for f, t, original in zip(files, targets, blocks):
            for name, (buffer,) in t:
                assert np.array_equal(buffer, np.array(original.arrays[name], copy=False)), name

        client = redis.Redis.from_url(redis_url)
        client.set(PREFIX + ids[0], client.get(PREFIX + ids[0])[:-8])  # shorter since its header was read
        client.delete(PREFIX + ids[1])  # gone since
        targets = zeros(files)
        problems = b.fill_blocks(files, targets)
        assert all(p and "unreadable" in p for p in problems)
        assert client.dbsize() == 0  # the short one deleted as damaged
        client.close()


def test_a_connection_lost_mid_read_is_a_miss_and_the_next_read_connects_anew(tmp_path: Path, redis_url: str) -> None:
    """Redis closing the readers' connections: the reads then are misses or succeed on a new
    connection, never wrong data, and the blocks stay in Redis; the next read is exact."""
    with two_servers(tmp_path, redis_url) as s:
        b, rb, blocks, ids = s.b, s.rb, s.blocks, s.ids
        files = b.open_blocks(ids, STORAGE, NAMES, rb.heads(ids))
        assert b.fill_blocks(files, zeros(files)) == [None, None]  # the pool now holds connections
        client = redis.Redis.from_url(redis_url)
        client.client_kill_filter(_type="normal", skipme=True)
        for _ in range(2):
            targets = zeros(files)
            for problem, t, original in zip(b.fill_blocks(files, targets), targets, blocks):
                if problem is None:
                    assert all(np.array_equal(buf, np.array(original.arrays[n], copy=False)) for n, (buf,) in t)
                else:
                    assert "unreadable" in problem
        assert all(client.exists(PREFIX + i) for i in ids)
        targets = zeros(files)
        assert b.fill_blocks(files, targets) == [None, None]
        client.close()


@given(st.lists(st.integers(0, 50), max_size=8), st.integers(0, 1000), st.integers(1, 64))
def test_ranges_cover_the_buffers_in_order_each_at_most_the_bound(sizes: list[int], offset: int, most: int) -> None:
    from mcp_semantic.block_redis import _ranges

    buffers = [bytearray(n) for n in sizes]
    runs = _ranges(buffers, offset, most)
    assert all(0 < sum(map(len, views)) <= most for _, views in runs)
    sizes_of_runs = [sum(map(len, views)) for _, views in runs]
    assert [at for at, _ in runs] == [offset + sum(sizes_of_runs[:i]) for i in range(len(runs))]
    at = 0
    for _, views in runs:  # written in the runs' order: the buffers must read as one count, no gap, no overlap
        for v in views:
            v[:] = bytes((at + k) % 256 for k in range(len(v)))
            at += len(v)
    assert b"".join(buffers) == bytes(k % 256 for k in range(sum(sizes)))
