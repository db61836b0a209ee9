"""Block bytes in Redis, shared by the servers of the shared mode (issue 15), with each server's
local block files (block_files.py) as a read-through cache in front of them.

A block is stored as its file's bytes under `mcp-semantic:block:<id>`: the safetensors header
carries the block's tokens, storage key (model fingerprint and precision) and a checksum per
array, so a block fetched from Redis is checked exactly as a local file is, when it is read. A
block Redis has evicted (`maxmemory` with an LRU policy) or lost (FLUSHALL) is a miss like any
other: the agent re-prefills from its transcript, with a warning, never a wrong answer.

A Redis that cannot be reached while serving makes reads misses (logged) and saves fail (the
old list stays, the transcript is safe in PostgreSQL); the client connects again by itself.
"""

from __future__ import annotations

import logging

import redis

from mcp_semantic.block_files import BlockFiles
from mcp_semantic.settings import masked
from mcp_semantic.store import StoreUnavailable

log = logging.getLogger(__name__)

PREFIX = "mcp-semantic:block:"


class Unreachable(StoreUnavailable):
    """Redis cannot be reached; the message names the URL, its password masked."""


class RedisBlocks:
    def __init__(self, url: str, files: BlockFiles, timeout_s: float = 10.0):
        self.files = files
        self.url = masked(url)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            self.client.ping()  # now: a bad URL is a clear message at start, not at the first call
        except redis.RedisError as e:
            self.client.close()
            raise Unreachable(f"cannot use Redis at {self.url}: {e}") from None

    def close(self) -> None:
        self.client.close()

    def missing(self, bids: list[str]) -> list[str]:
        """Of `bids`, those Redis lacks (one round trip)."""
        if not bids:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for bid in bids:
                pipe.exists(PREFIX + bid)
            return [bid for bid, n in zip(bids, pipe.execute()) if not n]

    def put(self, bids: list[str]) -> int:
        """Upload these blocks' local files where Redis lacks them (a block's bytes never change:
        its id names its content); returns the bytes sent."""
        sent = 0
        with self.client.pipeline(transaction=False) as pipe:
            for bid in bids:
                data = self.files.path(bid).read_bytes()
                pipe.set(PREFIX + bid, data, nx=True)
                sent += len(data)
            pipe.execute()
        return sent

    def get(self, bids: list[str]) -> dict[str, bytes]:
        """The file bytes of the blocks Redis has (one round trip); one it lacks, or a Redis out of
        reach (logged), is left out: a miss when the cache is built."""
        if not bids:
            return {}
        try:
            found = self.client.mget([PREFIX + bid for bid in bids])
        except redis.RedisError as e:
            log.warning("Redis at %s cannot be reached (%s): %d KV blocks are misses", self.url, e, len(bids))
            return {}
        for bid, data in zip(bids, found):
            if data is None:
                log.info("KV block %s is in neither the local files nor Redis", bid)
        return {bid: data for bid, data in zip(bids, found) if data is not None}

    def fetch(self, bids: list[str]) -> list[str]:
        """Bring the blocks the local files lack from Redis into them; returns those that came
        from Redis (the `remote` tier)."""
        got = self.get([bid for bid in bids if not self.files.exists(bid)])
        for bid, data in got.items():
            self.files.write_bytes(bid, data)
        return list(got)

    def delete(self, bids: list[str]) -> None:
        """Delete blocks from Redis (the store decides when: no list names them, no commit that
        names them is in flight)."""
        if bids:
            try:
                self.client.delete(*[PREFIX + bid for bid in bids])
            except redis.RedisError as e:  # left to Redis's own eviction: no list names them
                log.warning("Redis at %s: could not delete %d unreferenced KV blocks (%s)", self.url, len(bids), e)
