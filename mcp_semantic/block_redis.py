"""Block bytes in Redis, shared by the servers of the shared mode (issue 15), with each server's
local block files (block_files.py) as a read-through cache in front of them.

A block is stored as its file's bytes under `mcp-semantic:block:<id>`: the safetensors header
carries the block's tokens, storage key (model fingerprint and precision) and a checksum per
array, so a block read from Redis is checked exactly as a local file is. A block Redis has
evicted (`maxmemory` with an LRU policy) or lost (FLUSHALL) is a miss like any other: the agent
re-prefills from its transcript, with a warning, never a wrong answer. One that fails its checks
is deleted from Redis, as a damaged file is from disk, so the next save puts it there anew.

A remote load reads a block as a local one is read (block_files.py): its header first (`heads`),
then only the arrays it needs, in ranges of about a megabyte, each straight into the working
cache (`read_into`). Why not redis-py's GET for those: it makes a bytes object of every reply,
and on this VM the fresh memory for them (and Redis's own reply buffers for a whole block) made
a remote load of 2K tokens 400 to 1,100 ms where the reads below take about 40. redis-py still
connects, authenticates and sends each command; only the reply of a GETRANGE is read here, from
the connection's socket, into the buffers it belongs in.

A Redis that cannot be reached while serving makes reads misses (logged) and saves fail (the
old list stays, the transcript is safe in PostgreSQL); the client connects again by itself.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import redis

from mcp_semantic.block_files import BlockFiles, Remote, Unusable
from mcp_semantic.settings import masked
from mcp_semantic.store import StoreUnavailable

log = logging.getLogger(__name__)

PREFIX = "mcp-semantic:block:"
HEAD_BYTES = 1 << 14  # first read of a block: its header (about 10 KB for a block of the default model)
RANGE_BYTES = 4 << 20  # at most this much a GETRANGE: Redis copies a reply into buffers of its own


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
        """Of `bids`, those Redis lacks (one round trip); Unreachable where it cannot say."""
        if not bids:
            return []
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for bid in bids:
                    pipe.exists(PREFIX + bid)
                return [bid for bid, n in zip(bids, pipe.execute()) if not n]
        except redis.RedisError as e:
            raise Unreachable(f"Redis at {self.url} cannot be reached ({e})") from None

    def put(self, bids: list[str]) -> int:
        """Upload these blocks' local files where Redis lacks them (a block's bytes never change:
        its id names its content); returns the bytes sent. Unreachable where Redis is."""
        sent = 0
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for bid in bids:
                    data = self.files.path(bid).read_bytes()
                    pipe.set(PREFIX + bid, data, nx=True)
                    sent += len(data)
                pipe.execute()
        except redis.RedisError as e:
            raise Unreachable(f"Redis at {self.url} cannot be reached ({e})") from None
        return sent

    def heads(self, bids: list[str]) -> dict[str, Remote]:
        """Of `bids`, the blocks Redis has, each with its size and its header's bytes, to be opened
        (block_files.open_blocks) and read (`read_into`); one round trip, another for a header
        longer than HEAD_BYTES. A block Redis lacks, or a Redis out of reach (logged), is left
        out: a miss when the cache is built."""
        if not bids:
            return {}
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for bid in bids:
                    pipe.strlen(PREFIX + bid)
                    pipe.getrange(PREFIX + bid, 0, HEAD_BYTES - 1)
                replies = pipe.execute()
            found = {}
            for bid, size, head in zip(bids, replies[::2], replies[1::2]):
                if not size:
                    log.info("KV block %s is in neither the local files nor Redis", bid)
                    continue
                if len(head) < (need := min(size, 8 + int.from_bytes(head[:8], "little"))):
                    head = self.client.getrange(PREFIX + bid, 0, need - 1)
                found[bid] = Remote(size, head, self)
            return found
        except redis.RedisError as e:
            log.warning("Redis at %s cannot be reached (%s): %d KV blocks are misses", self.url, e, len(bids))
            return {}

    def read_into(self, bid: str, buffers: list[Any], offset: int, n: int) -> None:
        """`n` bytes of the block from `offset` straight into `buffers` (contiguous, `n` bytes in
        all), by GETRANGEs of at most RANGE_BYTES. On the reading threads: each takes a
        connection of the client's pool. A block gone from Redis meanwhile is Unusable."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            for at, views in _ranges(buffers, offset, RANGE_BYTES):
                size = sum(len(v) for v in views)
                conn.send_command("GETRANGE", PREFIX + bid, at, at + size - 1)
                _read_reply(conn._sock, views, size)
        except BaseException:
            conn.disconnect()  # a reply perhaps half read: the next user connects anew
            raise
        finally:
            pool.release(conn)

    def damaged(self, bid: str) -> None:
        """A block that failed its checks: deleted, so that the next save of an agent holding it
        puts it anew (SET NX would leave the damaged one)."""
        try:
            self.client.delete(PREFIX + bid)
        except redis.RedisError as e:
            log.warning("Redis at %s: could not delete the damaged KV block %s (%s)", self.url, bid, e)

    def delete(self, bids: list[str]) -> None:
        """Delete blocks from Redis (the store decides when: no list names them, no commit that
        names them is in flight)."""
        if bids:
            try:
                self.client.delete(*[PREFIX + bid for bid in bids])
            except redis.RedisError as e:  # left to Redis's own eviction: no list names them
                log.warning("Redis at %s: could not delete %d unreferenced KV blocks (%s)", self.url, len(bids), e)


def _ranges(buffers: list[Any], offset: int, most: int) -> list[tuple[int, list[memoryview]]]:
    """`buffers` (read from `offset` on) cut into runs of at most `most` bytes: (where each
    starts, its views)."""
    runs: list[tuple[int, list[memoryview]]] = []
    at, run, size = offset, [], 0
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        while len(view):
            take = view[: most - size]
            run.append(take)
            size += len(take)
            view = view[len(take):]
            if size == most:
                runs.append((at, run))
                at, run, size = at + size, [], 0
    if run:
        runs.append((at, run))
    return runs


def _read_reply(sock: socket.socket, views: list[memoryview], n: int) -> None:
    """A bulk string reply of `n` bytes ("$<n>", CRLF, the data, CRLF) read from `sock` into `views`."""
    line = bytearray(64)
    got = 0
    while (end := line.find(b"\r\n", 0, got)) < 0:
        if got == len(line) or not (k := sock.recv_into(memoryview(line)[got:])):
            raise redis.ConnectionError(f"unexpected reply from Redis: {bytes(line[:got])[:60]!r}")
        got += k
    if line[:1] != b"$":
        raise redis.ResponseError(bytes(line[1:end]).decode(errors="replace"))
    if (size := int(line[1:end])) != n:
        raise Unusable(f"is unreadable (Redis has {size} bytes of it where {n} were asked for)")
    extra = memoryview(line)[end + 2 : got]  # data read with the line
    for view in [*views, memoryview(bytearray(2))]:  # the data, then its CRLF
        filled = min(len(extra), len(view))
        view[:filled] = extra[:filled]
        extra = extra[filled:]
        while filled < len(view):
            if not (k := sock.recv_into(view[filled:])):
                raise redis.ConnectionError("Redis closed the connection mid-reply")
            filled += k
