"""Block bytes in Redis behind the local block files (real redis-server, tests/servers.py)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
import redis

from mcp_semantic.block_files import BlockFiles, host_block
from mcp_semantic.block_pool import Storage, array_names, cut_blocks
from mcp_semantic.block_redis import PREFIX, RedisBlocks, Unreachable
from mcp_semantic.cache_kinds import Layout
from servers import free_port

STORAGE = Storage("fp", "float32")
LAYOUT = Layout.full_attention(2, 2, 4)


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


def test_blocks_go_through_redis_to_another_server_s_files(tmp_path: Path, redis_url: str) -> None:
    """Server A puts its blocks; server B (files of its own) fetches them, reads them checked,
    exactly; a block Redis lost is a miss, not an error; a block it holds damaged fails its check."""
    a, b = BlockFiles(tmp_path / "a"), BlockFiles(tmp_path / "b")
    blocks = write_blocks(a)
    ids = [blk.id for blk in blocks]
    ra, rb = RedisBlocks(redis_url, a), RedisBlocks(redis_url, b)
    assert ra.put(ids) == sum(a.size(i) for i in ids) and ra.put(ids) > 0
    assert rb.fetch(ids) == ids and rb.fetch(ids) == []  # then local: nothing fetched again
    for original, (block, problem) in zip(blocks, b.read_blocks(ids, STORAGE, array_names(LAYOUT, STORAGE))):
        assert problem is None and mx.array_equal(block.arrays["layers.1.values"], original.arrays["layers.1.values"]).item()

    c = BlockFiles(tmp_path / "c")
    rc = RedisBlocks(redis_url, c)
    client = redis.Redis.from_url(redis_url)
    client.delete(PREFIX + ids[0])  # evicted by Redis (maxmemory) or lost
    data = bytearray(client.get(PREFIX + ids[1]))
    data[-1] ^= 1  # damaged in Redis
    client.set(PREFIX + ids[1], bytes(data))
    assert rc.fetch(ids) == ids[1:]
    (_, missing), (_, damaged) = c.read_blocks(ids[:2], STORAGE, array_names(LAYOUT, STORAGE))
    assert "missing" in missing and "checksum" in damaged
    ra.delete(ids)
    assert client.dbsize() == 0
    client.close()
    for r in (ra, rb, rc):
        r.close()
    for f in (a, b, c):
        f.close()


def test_an_unreachable_redis_is_a_clear_error_that_hides_the_password(tmp_path: Path) -> None:
    files = BlockFiles(tmp_path)
    with pytest.raises(Unreachable) as e:
        RedisBlocks(f"redis://:s3cret@127.0.0.1:{free_port()}/0", files, timeout_s=2)
    assert "redis://:***@127.0.0.1" in str(e.value) and "s3cret" not in str(e.value)
    files.close()


def test_blocks_read_from_redis_s_bytes_in_memory_are_checked_as_files_are(tmp_path: Path, redis_url: str) -> None:
    """A remote load reads the bytes Redis gave, without files: exact, and a damaged or
    truncated one is a miss (checksum), never data in the cache."""
    import numpy as np

    a, b = BlockFiles(tmp_path / "a"), BlockFiles(tmp_path / "b")
    blocks = write_blocks(a)
    ids = [blk.id for blk in blocks]
    ra, rb = RedisBlocks(redis_url, a), RedisBlocks(redis_url, b)
    ra.put(ids)
    got = rb.get(ids + ["0" * 32])
    assert set(got) == set(ids)  # one Redis lacks is left out
    got[ids[1]] = got[ids[1]][:-1] + bytes([got[ids[1]][-1] ^ 1])
    files = b.open_blocks(ids, STORAGE, array_names(LAYOUT, STORAGE), got)
    assert not any(isinstance(f, str) for f in files) and not list(b.dir.glob("*.safetensors"))
    name = "layers.0.keys"
    targets = [[(n, [np.zeros(f.layout[n][1], np.float32)]) for n in f.layout] for f in files]
    problems = b.fill_blocks(files, targets)
    assert problems[0] is None and "checksum" in problems[1]
    original = np.array(blocks[0].arrays[name], copy=False)
    assert np.array_equal(dict(targets[0])[name][0], original)
    short = {ids[0]: got[ids[0]][:-8]}
    (opened,) = b.open_blocks(ids[:1], STORAGE, array_names(LAYOUT, STORAGE), short)
    assert isinstance(opened, str) and "unreadable" in opened
    for r in (ra, rb):
        r.close()
    for f in (a, b):
        f.close()
