"""Where each agent's KV cache is: blocks in the pool, blocks on disk, and working caches kept.

An agent's cache is a list of content-addressed blocks (block_pool.py): the `KVRecord` of the
tokens they hold. The blocks live in the pool in memory (each once, however many agents hold
it) and in the store on disk. A call's working cache is built from its blocks, with room for its
prompt; after the call, only the blocks of its new tokens are copied into the pool, and the
working cache goes.

Why not keep the working cache for the agent's next call: it passes through the batch, which
copies it (mlx-lm's BatchKVCache), and what comes out has no room for the next prompt, so
reusing it costs a copy as well; building from blocks costs one copy (34 ms for 2K tokens of
the default model here) and keeps memory to one copy of each block.

Memory, counted against the budget: the pool's blocks, at the storage precision. When room is
needed the least recently used blocks go, after their agents' unsaved blocks are handed to the
writer. Outside the budget: the running calls' working caches, and blocks queued for the
writer until written.

Everything here runs on the engine thread, except the store's writes, which the `Writer`
thread runs in order.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from typing import Any, Callable, Literal

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.utils import common_prefix_len

from mcp_semantic.block_pool import Block, BlockPool, Storage, block_ids, chain_ids, cut_blocks, read_into_cache, reconstruct, starts
from mcp_semantic.store import Agent, KVRecord, Store, Writer, host_block

log = logging.getLogger(__name__)

Tier = Literal["new", "hot", "disk"]
SETTLE_GROUP = 2  # blocks copied at a time when idle: 2 of the default model's are 24 MB


class Caches:
    def __init__(self, model: Any, store: Store, storage: Storage, *, block_tokens: int, memory_budget: int, agents: set[str]):
        self.model = model
        self.store = store
        self.storage = storage
        self.block_tokens = block_tokens
        self.memory_budget = memory_budget
        self.pool = BlockPool()
        self.records: dict[str, KVRecord] = {}  # each agent's blocks now (saved, or waiting for the writer)
        self.problems: dict[str, str] = {}  # saved caches that cannot be used, and why
        for name, record in store.kv_records().items():
            if name not in agents:
                continue
            if chain_ids(record.tokens, storage.key, block_tokens) != record.blocks:
                self.problems[name] = "its saved KV cache was made by another model, --kv-bits or --block-tokens"
                continue
            self.records[name] = record
            self.pool.hold([], record.blocks)
        self.unsaved: set[str] = set()
        self.unsettled: list[Block] = []  # blocks cut lazily, not copied yet: see settle
        template = make_prompt_cache(model)
        self.n_layers = len(template)
        self.blocks_ok = all(type(c) is KVCache for c in template)  # other kinds are not cut into blocks yet
        self.writer = Writer()

    def close(self) -> None:
        """Hand every unsaved cache to the writer, and wait until all are written."""
        self.save_all()
        self.writer.close()

    # saving

    def save_all(self) -> None:
        for name in sorted(self.unsaved):
            self.save(name)

    def save(self, name: str) -> None:
        """Hand the agent's new blocks and block list to the writer thread."""
        if name not in self.unsaved:
            return
        self.unsaved.discard(name)
        record = self.records.get(name)
        if record is None:
            return
        new = [b for bid in record.blocks if not self.store.has_block(bid) and (b := self.pool.peek(bid)) is not None]
        mx.eval([a for b in new for a in b.arrays.values()])  # blocks cut lazily are copied now
        blocks = [host_block(b) for b in new]
        self.writer.put(name, partial(self.store.commit_kv, name, record, blocks, self.storage))

    # memory

    def used(self) -> int:
        return self.pool.nbytes

    def enforce_budget(self) -> None:
        """Drop least recently used blocks until the pool is under the budget."""
        if self.used() <= self.memory_budget:
            return
        self.save_all()  # a block leaves memory only once it is written or queued to be
        for bid in self.pool.oldest():
            if self.used() <= self.memory_budget:
                break
            self.pool.drop(bid)

    def evict_memory(self, names: list[str]) -> None:
        """Drop these agents' blocks that no other agent holds (saved first)."""
        holders: Counter[str] = Counter()
        for name in names:
            self.save(name)
            holders.update(set(self.records[name].blocks) if name in self.records else ())
        for bid, n in holders.items():
            if self.pool.refs[bid] <= n:
                self.pool.drop(bid)

    # an agent's cache

    def remember(self, name: str, cache: list[Any], tokens: list[int]) -> None:
        """After a call: the agent's blocks are those of `tokens`; copy the new ones into the pool."""
        if self.blocks_ok:
            ids = chain_ids(tokens, self.storage.key, self.block_tokens)
            # lazily: the copies are made when the blocks are saved or used, not in a decode step's time
            skip = [b for b in ids if b in self.pool]
            for block in cut_blocks(cache, tokens, self.storage, self.block_tokens, skip=skip, evaluate=False):
                self.pool.add(block)
                self.unsettled.append(block)
            old = self.records.get(name)
            self.pool.hold(old.blocks if old else [], ids)
            self.records[name] = KVRecord(ids, tokens)
            self.unsaved.add(name)

    def settle(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Make the copies of the blocks cut lazily: the engine calls this when no call is
        running, so the copies never sit between a generating call and its next token. A few
        blocks at a time, until `stop()` (a call has arrived): a call that comes at once after
        another waits for a few blocks' copy (~25 ms at most), not for all of them."""
        while self.unsettled and not stop():
            group, self.unsettled = self.unsettled[:SETTLE_GROUP], self.unsettled[SETTLE_GROUP:]
            mx.eval([a for b in group for a in b.arrays.values()])

    def share_prompt(self, cache: list[Any], prompt: list[int]) -> None:
        """Once a prompt is read, its full blocks go into the pool (held by no agent yet, so the
        least recently used go first), for calls that start the same way before this one ends."""
        if not self.blocks_ok:
            return
        ids = block_ids(prompt, self.storage.key, self.block_tokens)
        full = prompt[: len(ids) * self.block_tokens]
        skip = [b for b in ids if b in self.pool]
        for block in cut_blocks(cache, full, self.storage, self.block_tokens, skip=skip, evaluate=False):
            self.pool.add(block)
            self.unsettled.append(block)
        self.enforce_budget()

    def forget(self, name: str) -> None:
        """Drop the agent's cache from memory and from the lists here (not from disk)."""
        self.unsaved.discard(name)
        record = self.records.pop(name, None)
        if record is not None:
            self.pool.hold(record.blocks, [])

    def fork(self, source: str, target: str) -> None:
        """`target` holds the source's blocks: nothing is copied, nothing is written but its list."""
        record = self.records.get(source)
        if record is None:
            return
        self.records[target] = KVRecord(list(record.blocks), list(record.tokens))
        self.pool.hold([], record.blocks)
        self.save(source)  # the source's blocks are queued first, so the fork's list finds them on disk
        self.unsaved.add(target)
        self.save(target)

    def delete(self, name: str, agent_too: bool = False) -> int:
        """Forget the agent's cache, on disk too (and its transcript if `agent_too`); bytes freed."""
        self.forget(name)
        self.writer.wait()  # nothing half written is deleted; GC sees every saved list
        return self.store.delete_agent(name) if agent_too else self.store.delete_kv(name)

    def lookup(self, agent: Agent, prompt: list[int], room: int, warnings: list[str]) -> tuple[Tier, list[Any], list[int]]:
        """The longest cache for `prompt` there is, and the tokens it holds: built from the
        agent's own blocks or from blocks any agent shares with the prompt, from memory or disk,
        with `room` slots beyond the prompt (for the reply: the model writes in place)."""
        failed = self.writer.take_error(agent.name)
        if failed:
            warnings.append(f"agent {agent.name}: saving its KV cache failed ({failed}); it is saved again after this call")
        B = self.block_tokens
        ids: list[str] = []
        tokens: list[int] = []
        record = self.records.get(agent.name)
        if record is not None:
            n = -(-common_prefix_len(record.tokens, prompt) // B)
            ids, tokens = record.blocks[:n], record.tokens[: n * B]
        shared = 0
        for bid in block_ids(prompt, self.storage.key, B):
            if bid not in self.pool and not self.store.has_block(bid):
                break
            shared += 1
        if shared * B > min(len(tokens), common_prefix_len(tokens, prompt)):
            ids, tokens = block_ids(prompt, self.storage.key, B)[:shared], prompt[: shared * B]
        if agent.tokens and record is None:
            why = self.problems.get(agent.name) or "it has no saved KV cache"
            warnings.append(f"agent {agent.name}: {why}; re-prefilling its {len(agent.tokens)} tokens of history")
        if not ids:
            return "new", make_prompt_cache(self.model), []
        # Buffers sized in whole blocks: an agent's next turns get the same size, which MLX's
        # allocator hands back from its cache instead of filling fresh memory (slow on some hosts).
        size = -(-(max(len(prompt), len(tokens)) + room) // B) * B
        build = self._build_on_host if self.storage.kv_bits is None and mx.default_device() == mx.cpu else self._build
        try:
            tier, cache, n = build(agent.name, ids, size, warnings)
        except Exception as e:  # noqa: BLE001 - blocks that do not fit together: a miss, never a failed call
            log.warning("agent %s: its KV blocks do not fit together (%s); re-prefilling", agent.name, e)
            warnings.append(f"agent {agent.name}: its saved KV blocks do not fit the model; re-prefilling its history")
            for bid in ids:
                self.pool.drop(bid)
            return "new", make_prompt_cache(self.model), []
        if not n:
            return "new", make_prompt_cache(self.model), []
        return tier, cache, tokens[:n]

    def _missed(self, name: str, problem: str, warnings: list[str]) -> None:
        log.warning("agent %s: %s", name, problem)
        warnings.append(f"agent {name}: {problem}; re-prefilling from there")

    def _build(self, name: str, ids: list[str], size: int, warnings: list[str]) -> tuple[Tier, list[Any], int]:
        """The cache from blocks in the pool, and blocks read from disk into buffers of their
        own, which join the pool; then one copy into the working cache (reconstruct)."""
        missing = [bid for bid in ids if bid not in self.pool]
        read = {}
        if missing:
            self.writer.wait()  # a block may be in a write not done yet
            read = dict(zip(missing, self.store.read_blocks(missing, self.storage, self.n_layers)))
        blocks, tier = [], "hot"
        for bid in ids:
            block = self.pool.get(bid)
            if block is None:
                block, problem = read[bid]
                if block is None:
                    self._missed(name, problem, warnings)
                    break
                self.pool.add(block)
                tier = "disk"
            blocks.append(block)
        if not blocks:
            return "new", [], 0
        n = sum(len(b.tokens) for b in blocks)
        cache = reconstruct(blocks, self.storage, self.n_layers, size - n)
        self.enforce_budget()  # blocks read for this call count at once; the working cache is aside
        return tier, cache, n

    def _build_on_host(self, name: str, ids: list[str], size: int, warnings: list[str]) -> tuple[Tier, list[Any], int]:
        """On the CPU, for blocks stored as they are computed (no --kv-bits): the working cache
        is made first and the blocks on disk are read straight into it, so their bytes land in
        fresh memory once rather than twice (a block buffer, then the cache); at 4K tokens of
        the default model that is about 100 ms of a resumed turn. Those blocks join the pool
        after the call (`remember` cuts them from the cache), not before."""
        found = [self.pool.get(bid) for bid in ids]
        missing = [bid for bid, block in zip(ids, found) if block is None]
        if missing:
            self.writer.wait()  # a block may be in a write not done yet
        opened = iter(self.store.open_blocks(missing, self.storage, self.n_layers))
        parts: list[Any] = []  # a Block from the pool, or a block file whose data is still to read
        for block in found:
            part = block if block is not None else next(opened)
            if isinstance(part, str):
                self._missed(name, part, warnings)
                break
            parts.append(part)
        if not parts:
            return "new", [], 0
        cache, n, failed = read_into_cache(self.store, parts, self.n_layers, size)
        for problem in failed.values():
            self._missed(name, problem, warnings)
        read = any(start < n for start, part in zip(starts(parts), parts) if not isinstance(part, Block))
        return ("disk" if read else "hot"), cache, n

    # reports

    def agent_memory(self, name: str) -> dict[str, Any]:
        """What list_agents says of an agent's cache."""
        record = self.records.get(name)
        ids = set(record.blocks) if record else set()
        in_memory = [bid for bid in ids if bid in self.pool]
        disk, shared_disk = self.store.kv_bytes(name)
        hot = record is not None and len(in_memory) == len(ids) > 0
        return {
            "tier": "hot" if hot else "disk" if record else "none",
            "blocks": len(record.blocks) if record else 0,
            "memory_bytes": sum(self.pool.peek(b).nbytes for b in in_memory),
            "shared_memory_bytes": sum(self.pool.peek(b).nbytes for b in in_memory if self.pool.refs[b] > 1),
            "disk_bytes": disk,
            "shared_disk_bytes": shared_disk,
        }
