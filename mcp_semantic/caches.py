"""Where each agent's KV cache is: blocks in the pool, blocks on disk, and working caches kept.

An agent's cache is a list of content-addressed blocks (block_pool.py): the `KVRecord` of the
tokens they hold. The blocks live in the pool in memory (each once, however many agents hold
it) and in the store on disk. A call's working cache is built from its blocks, with room for its
prompt; after the call, only the blocks of its new tokens go into the pool (views of the working
cache until `settle` copies them, when no call waits). With recurrent layers a cache resumes only where a block ends (a state
cannot be trimmed back), so the engine keeps the states at every block end a call passes
(`Checkpoints`), and each block gets the state after its last token. The next prompt renders
the reply from its text, and a reply re-tokenized differently, or a template that rewrites it
(thinking models), would send the cache back to the last block end before the reply: so the
agent also keeps the cache where its reply's turn began, as a partial block (`KVRecord.branch`),
as llama.cpp keeps a checkpoint after each prompt.

An agent's next call goes on in its last working cache, in place, where that call ran alone
(not in a batch of several, whose arrays are shared), its new blocks joined the pool as views
of it (after a restart, or a turn of mostly new blocks: then they are most of the cache), and no
other agent holds them (a fork): `Kept`, `_take_kept`. Those views leave the pool first (they
are on disk; up to 512 tokens of blocks not written yet are copied out), since MLX writes an
array in place only when nothing else refers to its memory. Otherwise the working cache is
built from blocks: one copy of the whole cache (at 4K tokens of the default model 20 to 190 ms here, the more when the
memory is new), and the last one goes once its views are copied out (`settle`).

Memory, counted against the budget: the pool's blocks, at the storage precision. When room is
needed the least recently used blocks go, after their agents' unsaved blocks are handed to the
writer. Outside the budget: the running calls' working caches, a kept working cache's room
beyond its blocks, and blocks queued for the writer until written.

Everything here runs on the engine thread, except the store's writes, which the `Writer`
thread runs in order.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import common_prefix_len

from mcp_semantic.block_pool import (
    Block,
    BlockPool,
    Storage,
    array_names,
    block_ids,
    block_names,
    chain_ids,
    cut_blocks,
    wanted_leaves,
)
from mcp_semantic.cache_build import Spares, read_into_cache, reconstruct, starts
from mcp_semantic import checked_read, cuda, dequantize
from mcp_semantic.cache_kinds import Layout
from mcp_semantic.block_files import Remote, host_block
from mcp_semantic.store import Agent, KVRecord, Store, Writer

log = logging.getLogger(__name__)

Tier = Literal["new", "hot", "disk", "remote"]
SETTLE_GROUP = 2  # blocks copied at a time when idle: 2 of the default model's are 24 MB
FILL_GROUP = 8  # blocks read at a time when idle (Caches.fill): 8 of the default model's at --kv-bits 8 are 26 MB
KEPT_COPY_TOKENS = 512  # of blocks not on disk yet, at most what a next call copies out to go on in place (_take_kept)
Checkpoints = dict[int, list[list[Any]]]  # token count -> the recurrent leaves' states then (Layout.states)


@dataclass
class Kept:
    """An agent's last working cache, kept for its next call to go on writing in place: its arrays
    whole (cache_kinds.whole_of), the tokens they hold, and the pool's blocks that are views of them."""

    arrays: list[tuple[mx.array, mx.array]]
    tokens: list[int]
    views: list[str]


class Caches:
    def __init__(self, layout: Layout, store: Store, storage: Storage, *, block_tokens: int, memory_budget: int):
        self.layout = layout
        self.names = block_names(layout, storage)  # per leaf, the arrays a whole block holds for it
        self.all_names = array_names(layout, storage)
        self.store = store
        self.storage = storage
        self.block_tokens = block_tokens
        self.memory_budget = memory_budget
        self.pool = BlockPool()
        # each agent's blocks now (saved, or waiting for the writer), read from the store when the
        # agent is first used (record), not at start: a store may hold many agents
        self.records: dict[str, KVRecord] = {}
        self.problems: dict[str, str] = {}  # agents read without a usable saved cache, and why
        self.unsaved: set[str] = set()
        self.unsettled: list[str] = []  # blocks cut lazily, not copied yet: see settle
        # by agent: blocks its call read from their files converted into its working cache (--kv-bits on
        # the CPU), whose bytes the pool lacks: `fill` reads them into it when idle (`unread`)
        self.converted: dict[str, list[str]] = {}
        self.unread: list[str] = []
        self.working: dict[str, Kept] = {}  # by agent: its last call's working cache, for its next call (_take_kept)
        self.spares = Spares()  # the arrays of working caches gone, for the next (on the CPU)
        # on the CPU, blocks are copied into the working cache by numpy (_build, _build_straight): those stored as
        # computed straight from their files, quantized ones dequantized (a float32 model's, as the CPU runs)
        self.on_host = mx.default_device() == mx.cpu and (storage.kv_bits is None or storage.dtype == "float32")
        # the block-file reader and the kernels compiled now (or loaded from numba's cache), not on a resume's way
        checked_read.available()
        if self.on_host and storage.kv_bits:
            dequantize._kernels()
        self.gather = cuda.available()  # on CUDA, blocks read from disk go to one GPU buffer (_build_straight)
        self.writer = Writer()
        # MLX keeps freed buffers for reuse up to its cache limit: a call's working cache and blocks
        # then come back in memory already touched, instead of fresh pages (on this CPU about 2.5 GB/s
        # against 14 for memory reused). Its CPU default, 32 MB, holds no working cache of a
        # 1K-token agent of the default model (46 MB); Metal's default is larger and kept.
        previous = mx.set_cache_limit(memory_budget)
        if previous > memory_budget:
            mx.set_cache_limit(previous)

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
        new = [b for bid in record.ids if not self.store.has_block(bid) and (b := self.pool.peek(bid)) is not None
               and self.whole(b)]
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
        self._drop_kept(*[name for name, k in self.working.items() if not all(b in self.pool for b in k.views)])

    def evict_memory(self, names: list[str]) -> None:
        """Drop these agents' blocks that no other agent holds (saved first), and the spare arrays."""
        holders: Counter[str] = Counter()
        self.spares.clear()
        self._drop_kept(*names)
        for name in names:
            self.save(name)
            holders.update(set(self.records[name].ids) if name in self.records else ())
        for bid, n in holders.items():
            if self.pool.refs[bid] <= n:
                self.pool.drop(bid)

    # an agent's cache

    def record(self, name: str) -> KVRecord | None:
        """The agent's block list: in memory, or read from the store once (`problems` says why
        there is none)."""
        if name in self.records or name in self.problems:
            return self.records.get(name)
        record = self._stored(name)
        if isinstance(record, str):
            self.problems[name] = record
            return None
        self.records[name] = record
        self.pool.hold([], record.ids)
        return record

    def _stored(self, name: str) -> KVRecord | str:
        """The agent's saved block list, or why it has none that this model can use."""
        record = self.store.kv_record(name)
        if record is None:
            return "it has no saved KV cache"
        key, B = self.storage.key, self.block_tokens
        if chain_ids(record.tokens, key, B) != record.blocks or record.branch and (
                chain_ids(record.tokens[: record.branch_tokens], key, B)[-1:] != [record.branch]):
            return "its saved KV cache was made by another model, --kv-bits or --block-tokens"
        return record

    def release(self, name: str) -> bool:
        """Let an idle agent's block list go from memory (it is read again when the agent is used):
        not while it is unsaved, kept, or any of its blocks is in memory. Returns whether it went."""
        record = self.records.get(name)
        if record is not None and (name in self.unsaved or name in self.working or any(b in self.pool for b in record.ids)):
            return False
        if record is not None:
            self.pool.hold(record.ids, [])
            del self.records[name]
        self.problems.pop(name, None)
        return True

    def refresh(self, name: str) -> None:
        """Read the agent's block list from the store again (in the shared mode, another server
        may have served it since): the blocks both lists name stay in memory; the kept working
        cache goes if the list moved on. Not while this server holds it unsaved: it is newest."""
        if name in self.unsaved:
            return
        old = self.records.pop(name, None)
        self.problems.pop(name, None)
        new = self.record(name) if old is not None else None  # held before the old is let go
        if old is not None:
            self.pool.hold(old.ids, [])
        if new is None or new.tokens != old.tokens:
            self._drop_kept(name)

    def whole(self, block: Block) -> bool:
        """Whether the block holds every array (one read from disk for a call may not: Block)."""
        return len(block.arrays) == len(self.all_names)

    def remember(self, name: str, cache: list[Any], tokens: list[int], checkpoints: Checkpoints, turn: int = 0,
                 whole: list[tuple[mx.array, mx.array]] | None = None) -> None:
        """After a call: the agent's blocks are those of `tokens` (`cache` holds them, and
        `checkpoints` the recurrent states at block ends); copy the new ones into the pool. With
        recurrent layers, the cache of `tokens[:turn]` (the call's turn began there) is kept too:
        its last, partial block is the record's branch. `whole`: the cache's arrays whole, when
        the call ran alone: kept for the agent's next call when its blocks are views of them."""
        self._drop_kept(name)
        if self.layout.recurrent:
            checkpoints = {**checkpoints, len(tokens): self.layout.states(cache)}
        viewed: list[str] = []
        # blocks the call read converted are not cut from the cache (quantized anew, they would
        # differ from their files): the pool reads them when idle (fill)
        converted = self.converted.pop(name, [])
        ids = self._cut(cache, tokens, checkpoints, viewed, converted)
        self.unread.extend(converted)
        if whole is not None and 2 * len(viewed) > len(ids):  # its memory is mostly the pool's views' (counted)
            self.working[name] = Kept(whole, list(tokens), viewed)
        record = KVRecord(ids, tokens[: len(ids) * self.block_tokens])
        if self.layout.recurrent and turn in checkpoints and turn % self.block_tokens and turn < len(record.tokens):
            branch = self._cut(cache, tokens[:turn], checkpoints)
            if len(branch) == -(-turn // self.block_tokens):
                record.branch, record.branch_tokens = branch[-1], turn
        old = self.records.get(name)
        self.pool.hold(old.ids if old else [], record.ids)
        self.records[name] = record
        self.problems.pop(name, None)
        self.unsaved.add(name)

    def _cut(self, cache: list[Any], tokens: list[int], checkpoints: Checkpoints, viewed: list[str] | None = None,
             stored: list[str] = ()) -> list[str]:
        """Put the blocks of `tokens` the pool lacks into it (but those `stored`, whose files hold
        them), cut from `cache` lazily (views of it until `settle` copies them out, not in a decode
        step's time); returns the ids of the blocks there are, which stop before a block that
        neither memory nor disk has whole. The ids of those added as views of `cache` go into
        `viewed`."""
        ids = chain_ids(tokens, self.storage.key, self.block_tokens)
        skip = [b for b in ids if b in self.pool or b in stored]
        # Views when the new blocks are most of the cache (a first turn, or a turn after a restart
        # read straight into its cache): building from them is the one copy. A turn's few new
        # blocks are copied instead, so the cache they came from goes at once and the next
        # call's working cache reuses its memory (MLX's buffer cache), not fresh pages.
        views = 2 * len(skip) < len(ids)
        cut = cut_blocks(self.layout, cache, tokens, self.storage, self.block_tokens, checkpoints, skip, evaluate=False,
                         views=views)
        for i, block in zip([ids.index(b.id) for b in cut], cut):
            if not self.whole(block) and not self.store.has_block(block.id):
                log.warning("KV block %s is neither whole in memory nor on disk; the cache ends before it", block.id)
                ids = ids[:i]
                break
            self.pool.add(block)
            self.unsettled.append(block.id)
            if block.views and viewed is not None:
                viewed.append(block.id)
        return ids

    def kept(self, prompt: list[int]) -> int:
        """Tokens of the prompt's leading full blocks that are kept with their states (in memory,
        or on disk, whose files are whole): a prefill through them need not stop where they end."""
        n = 0
        for bid in block_ids(prompt, self.storage.key, self.block_tokens):
            block = self.pool.peek(bid)
            if not (block is not None and self.whole(block) or self.store.has_block(bid)):
                break
            n += self.block_tokens
        return n

    def settle(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Make the copies of the blocks cut lazily (`Block.own`), so that the working caches they
        were cut from can go: the engine calls this when no call is running, so the copies never
        sit between a generating call and its next token. A few blocks at a time, until `stop()`
        (a call has arrived): a call that comes at once after another waits for a few blocks' copy
        (~25 ms at most), not for all of them, and builds from the views it finds (one copy).
        A kept working cache (`working`) whose views are all copied out goes too: an agent that
        comes back after a pause builds from its blocks into the memory it leaves."""
        while self.unsettled and not stop():
            group, self.unsettled = self.unsettled[:SETTLE_GROUP], self.unsettled[SETTLE_GROUP:]
            for bid in group:
                if (block := self.pool.peek(bid)) is not None:  # a block dropped meanwhile needs no copy
                    block.own()
        for name, kept in list(self.working.items()):  # a kept cache no view refers to any more: memory twice
            if not any((block := self.pool.peek(bid)) is not None and block.views for bid in kept.views):
                del self.working[name]
        self.spares.trim()

    def fill(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Read into the pool the blocks calls read converted into their working caches (`unread`:
        their files again, from the page cache; a few at a time until `stop()`): the engine calls
        this once a call ends and nothing else runs, so that the agent's next call is hot."""
        while self.unread and not stop():
            group, self.unread = self.unread[:FILL_GROUP], self.unread[FILL_GROUP:]
            # those some agent still holds, not whole in the pool (a call may have read only some arrays)
            held = [bid for bid in group if self.pool.refs[bid] > 0 and not ((b := self.pool.peek(bid)) and self.whole(b))]
            self._read_into_pool(None, held, [self.all_names] * len(held), [])
            self.enforce_budget()

    def share_prompt(self, cache: list[Any], prompt: list[int], checkpoints: Checkpoints) -> None:
        """Once a prompt is read, its full blocks go into the pool (held by no agent yet, so the
        least recently used go first), for calls that start the same way before this one ends."""
        full = prompt[: len(prompt) // self.block_tokens * self.block_tokens]
        self._cut(cache, full, checkpoints)
        self.enforce_budget()

    def forget(self, name: str) -> None:
        """Drop the agent's cache from memory and from the lists here (not from disk)."""
        self.unsaved.discard(name)
        self._drop_kept(name)
        record = self.records.pop(name, None)
        self.problems.pop(name, None)
        if record is not None:
            self.pool.hold(record.ids, [])

    def fork(self, source: str, target: str, tokens: list[int] | None = None) -> None:
        """`target` holds the source's blocks (with `tokens`, a fork at an earlier turn, the whole
        blocks of those): nothing is copied, nothing is written but its list."""
        record = self.record(source)
        if record is None:
            return
        self._drop_kept(source)  # its blocks are the fork's too: the source's next call builds its own cache
        n = len(record.tokens) if tokens is None else common_prefix_len(record.tokens, tokens)
        if n < len(record.tokens):  # whole blocks only: a recurrent state is its block's end's
            branch = record.branch if record.branch and record.branch_tokens <= n else None
            record = KVRecord(record.blocks[: n // self.block_tokens], record.tokens[:n], branch,
                              record.branch_tokens if branch else 0)
        self.records[target] = KVRecord(list(record.blocks), list(record.tokens), record.branch, record.branch_tokens)
        self.problems.pop(target, None)
        self.pool.hold([], record.ids)
        self.save(source)  # the source's blocks are queued first, so the fork's list finds them on disk
        self.unsaved.add(target)
        self.save(target)

    def delete(self, name: str, agent_too: bool = False) -> int:
        """Forget the agent's cache, on disk too (and its transcript if `agent_too`); bytes freed."""
        self.forget(name)
        self.writer.wait()  # nothing half written is deleted; GC sees every saved list
        return self.store.delete_agent(name) if agent_too else self.store.delete_kv(name)

    def lookup(self, agent: Agent, prompt: list[int], room: int, warnings: list[str]) -> tuple[Tier, list[Any], int]:
        """The longest cache for `prompt` there is, and how many of its tokens it holds: built from
        the agent's own blocks or from blocks any agent shares with the prompt, from memory or
        disk, with `room` slots beyond the prompt (for the reply: the model writes in place).

        It holds at most all but the prompt's last token (one at least runs, for the logits); with
        recurrent layers, exactly the tokens up to the end of a block (a state cannot be trimmed
        back). A block that cannot be read is a miss: the cache ends before it."""
        failed = self.writer.take_error(agent.name)
        if failed:
            warnings.append(f"agent {agent.name}: saving its KV cache failed ({failed}); it is saved again after this call")
        record = self.record(agent.name)
        self.unread.extend(self.converted.pop(agent.name, []))  # of a call that ended without its cache remembered
        taken = self._take_kept(agent.name, record, prompt, room)
        tier, cache, reuse = taken or self._find(agent.name, record, prompt, room, warnings)
        if agent.tokens and record is None:
            why = self.problems.get(agent.name) or "it has no saved KV cache"
            shared = f"{reuse} of them from blocks other agents share, " if reuse else ""
            warnings.append(f"agent {agent.name}: {why}; re-prefilling its {len(agent.tokens)} tokens of history ({shared}"
                            f"{len(prompt) - reuse} prompt tokens computed)")
        return tier, cache, reuse

    def _take_kept(self, name: str, record: KVRecord | None, prompt: list[int], room: int) -> tuple[Tier, list[Any], int] | None:
        """The agent's last working cache itself, for its next call (hot, nothing copied), where it
        holds at least what its blocks would give (out of room for the prompt and reply, it is
        copied into a larger one first, as a build from blocks would copy it); else None.

        The pool's blocks that are views of it (held by this agent alone) leave memory first, or
        are copied out where they are not on disk yet (up to 512 tokens of the last call's new
        tokens, not handed to the writer: with more, as after a new agent's first turn, or with
        writes under way, which refer to them, it builds from blocks): MLX writes an array in
        place only when nothing else refers to its memory, and otherwise copies it whole at the
        first write. The call's blocks are cut from it again afterwards, as views. Why: building
        a working cache from blocks is a copy of the whole cache, into new memory when the
        blocks are views of the last one (after a restart, or a turn of new blocks): at 4K
        tokens of the default model 20 to 190 ms here."""
        kept = self.working.get(name)
        if kept is None or record is None:
            return None
        reuse = min(common_prefix_len(kept.tokens, prompt), len(prompt) - 1)
        unwritten = [b for b in kept.views if not self.store.has_block(b)]
        if (reuse <= 0 or reuse < self._choose(record, prompt, set())[2] or any(self.pool.refs[b] > 1 for b in kept.views)
                or unwritten and name not in self.unsaved or len(unwritten) * self.block_tokens > KEPT_COPY_TOKENS):
            self._drop_kept(name)
            return None
        arrays = kept.arrays
        if arrays[0][0].shape[2] < len(prompt) + room:  # out of room: copied into a larger one, once
            size = self.cache_size(len(prompt) + 2 * room + self.block_tokens)
            grown = [mx.concatenate([a[..., :reuse, :], mx.zeros((*a.shape[:2], size - reuse, a.shape[3]), a.dtype)], axis=2)
                     for pair in arrays for a in pair]
            mx.eval(grown)
            arrays = list(zip(grown[0::2], grown[1::2]))
        del self.working[name]
        for bid in kept.views:
            if bid not in unwritten:
                self.pool.drop(bid)
            elif (block := self.pool.peek(bid)) is not None:  # of the last call's new tokens, not saved yet: copied out
                block.own()
        cache = []
        kept.arrays = []  # only the cache below refers to them now
        for keys, values in arrays:
            c = KVCache()
            c.keys, c.values, c.offset = keys, values, reuse
            cache.append(c)
        return "hot", self.layout.nest(cache), reuse

    def _spares(self) -> Spares | None:
        """The spare arrays, unless blocks cut lazily may still refer to a working cache's memory (MLX
        would copy such an array whole rather than hand it over: slower than a new one)."""
        return None if self.unsettled else self.spares

    def _drop_kept(self, *names: str) -> None:
        """Let the agents' kept working caches go: their blocks' views are copied out when idle (settle)."""
        for name in names:
            if (kept := self.working.pop(name, None)) is not None:
                self.unsettled.extend(kept.views)

    def _find(self, name: str, record: KVRecord | None, prompt: list[int], room: int,
              warnings: list[str]) -> tuple[Tier, list[Any], int]:
        """lookup's cache: the longest there is, a block that cannot be read ending it."""
        bad: set[str] = set()
        while True:
            ids, ends, reuse = self._choose(record, prompt, bad)
            if not reuse:
                return "new", self.layout.new_cache(), 0
            # room for a next turn as long again and a block: the agent's next call goes on in it in place (_take_kept)
            size = self.cache_size(max(len(prompt), ends[-1]) + 2 * room + self.block_tokens)
            straight = self.on_host or self.gather
            build = self._build_straight if straight else self._build
            try:
                tier, cache, failed_ids = build(name, ids, ends, reuse, size, warnings)
            except Exception as e:  # noqa: BLE001 - blocks that do not fit together: a miss, never a failed call
                log.warning("agent %s: its KV blocks do not fit together (%s); re-prefilling", name, e)
                warnings.append(f"agent {name}: its saved KV blocks do not fit the model; re-prefilling its history")
                for bid in ids:
                    self.pool.drop(bid)
                return "new", self.layout.new_cache(), 0
            if not failed_ids:
                return tier, cache, reuse
            bad.update(failed_ids)

    def cache_size(self, n: int) -> int:
        """The tokens a working cache for `n` tokens has room for: `n` rounded up to a multiple of
        an eighth of the next power of two (at most a quarter more) and of a block. An agent's next turns mostly
        get the same size, and MLX's allocator hands back a buffer of the same size from its cache
        (mx.set_cache_limit above) instead of new memory, which costs page faults (on this VM from
        0.6 GB/s, for pages it has not backed yet, to 15 GB/s; memory reused: 30)."""
        step = max(self.block_tokens, (1 << max(n - 1, 1).bit_length()) // 8)
        return -(-n // step) * step

    def _choose(self, record: KVRecord | None, prompt: list[int], bad: set[str]) -> tuple[list[str], list[int], int]:
        """The blocks to build from (the agent's own, or the prompt's full blocks that memory, disk
        or the shared tier has), where they end, and how many tokens the cache holds; none from a
        `bad` block on."""
        B = self.block_tokens
        limit = len(prompt) - 1
        best: tuple[list[str], list[int], int] = ([], [], 0)
        if record is not None:
            ids = list(itertools.takewhile(lambda b: b not in bad, record.blocks))
            ends = [min((i + 1) * B, len(record.tokens)) for i in range(len(ids))]
            common = common_prefix_len(record.tokens, prompt)
            best = self._usable(ids, ends, min(common, limit, ends[-1] if ends else 0))
            n = record.branch_tokens
            if record.branch and record.branch not in bad and best[2] < n <= min(common, limit) and len(ids) >= n // B:
                best = (ids[: n // B] + [record.branch], ends[: n // B] + [n], n)
        if best[2] == limit:  # the agent's own blocks give all a cache can hold: no other can give more
            return best
        shared, chain = [], block_ids(prompt, self.storage.key, B)
        for i, bid in enumerate(chain):
            if bid in bad:
                break
            if bid not in self.pool and not self.store.has_block(bid):
                if self.store.shared:  # the rest from the shared tier, as far as it has them (one round trip)
                    found = self.store.in_shared_tier(chain[i:])
                    shared += itertools.takewhile(lambda b: b in found and b not in bad, chain[i:])
                break
            shared.append(bid)
        candidate = self._usable(shared, [(i + 1) * B for i in range(len(shared))], min(len(shared) * B, limit))
        return candidate if candidate[2] > best[2] else best

    def _usable(self, ids: list[str], ends: list[int], n: int) -> tuple[list[str], list[int], int]:
        """Of blocks ending at `ends`, those a cache of the first `n` tokens is built from, and how
        many tokens it holds: `n`, or with recurrent layers the last block end up to `n`."""
        if self.layout.recurrent:
            k = bisect.bisect_right(ends, n)
            return ids[:k], ends[:k], ends[k - 1] if k else 0
        k = bisect.bisect_left(ends, n) + 1 if n > 0 else 0
        return ids[:k], ends[:k], n

    def _missed(self, name: str | None, problem: str, warnings: list[str]) -> None:
        """Say why a block cannot be used: to the agent `name` whose call needed it, else in the log."""
        if name is None:
            log.warning("%s", problem)
            return
        log.warning("agent %s: %s", name, problem)
        warnings.append(f"agent {name}: {problem}; re-prefilling from there")

    def _wanted(self, leaves: list[list[Any]]) -> list[set[str]]:
        """The arrays each block must give, from the leaves it must give (wanted_leaves)."""
        return [{n for leaf in part for n in self.names[leaf.name]} for part in leaves]

    def _read_into_pool(self, name: str | None, ids: list[str], wanted: list[set[str]], warnings: list[str]) -> tuple[Tier, list[str]]:
        """Read the wanted arrays the pool lacks from disk, each block into a buffer of its own,
        and add them to the pool. Returns where they came from (hot: nothing read; remote: some
        from the shared tier), and the blocks that could not be read."""
        lacking = [(bid, need) for bid, need in zip(ids, wanted) if not need <= set(getattr(self.pool.get(bid), "arrays", ()))]
        failed: list[str] = []
        tier: Tier = "hot"
        if lacking:
            self.writer.wait()  # a block may be in a write not done yet
            remote = self.store.remote_blocks([bid for bid, _ in lacking])
            tier = "remote" if remote else "disk"
            read = self.store.blocks.read_blocks([bid for bid, _ in lacking], self.storage, self.all_names,
                                                 [need for _, need in lacking], remote)
            for (bid, _), (block, problem) in zip(lacking, read):
                if block is None:
                    self._missed(name, problem, warnings)
                    failed.append(bid)
                else:
                    self.pool.add(block)
        return tier, failed

    def _build(self, name: str, ids: list[str], ends: list[int], reuse: int, size: int,
               warnings: list[str]) -> tuple[Tier, list[Any], list[str]]:
        """The cache from blocks in the pool, the arrays it needs that the pool lacks read from
        disk into the pool first (_read_into_pool); then one copy into the working cache: by numpy
        on the CPU (read_into_cache, which dequantizes there too), with MLX elsewhere
        (reconstruct: a GPU). Returns the tier, the cache and the blocks that could not be read."""
        leaves = wanted_leaves(self.layout, ends, reuse, self.block_tokens)
        tier, failed = self._read_into_pool(name, ids, self._wanted(leaves), warnings)
        if failed:
            return "new", [], failed
        blocks = [self.pool.peek(bid) for bid in ids]
        if self.on_host:
            cache, _ = read_into_cache(self.layout, self.store, blocks, leaves, reuse, size, self.block_tokens, self.storage,
                                       spares=self._spares())
        else:
            cache = reconstruct(self.layout, self.storage, blocks, reuse, size, self.block_tokens)
        self.enforce_budget()  # blocks read for this call count at once; the working cache is aside
        return tier, cache, []

    def _build_straight(self, name: str, ids: list[str], ends: list[int], reuse: int, size: int,
                        warnings: list[str]) -> tuple[Tier, list[Any], list[str]]:
        """The cache straight from the blocks in memory and the block files, not through the
        pool. On the CPU the working cache is made first and the arrays it needs from disk are read
        straight into it (read_into_cache), so their bytes land in memory once rather than twice
        (a block buffer, then the cache); at 4K tokens of the default model that is about 100 ms
        of a resumed turn. Quantized or float16 files (--kv-bits) are converted on the way, a few
        arrays at a time in the reading threads' scratch memory. On CUDA (`gather`) the files are
        read into one GPU buffer by DMA and the cache gathered from it with a few operations per
        layer (Store.read_into_one, reconstruct). Blocks read as computed join the pool after the
        call (`remember` cuts them from the cache), not before; those read converted, when the
        engine is idle after it (`fill` reads their files again, from the page cache)."""
        leaves = wanted_leaves(self.layout, ends, reuse, self.block_tokens)
        parts: list[Any] = [self.pool.get(bid) for bid in ids]  # a Block, or a block file still to read
        missing = [i for i, (part, need) in enumerate(zip(parts, self._wanted(leaves)))
                   if part is None or not need <= set(part.arrays)]
        remote: dict[str, Remote] = {}
        if missing:
            self.writer.wait()  # a block may be in a write not done yet
            # those not here are read from the shared tier (Redis) as files are; their files are
            # written from the pool when the agent is saved, not before the call
            remote = self.store.remote_blocks([ids[i] for i in missing])
        failed = []
        opened = self.store.blocks.open_blocks([ids[i] for i in missing], self.storage, self.all_names, remote)
        for i, part in zip(missing, opened):
            if isinstance(part, str):
                self._missed(name, part, warnings)
                failed.append(ids[i])
            parts[i] = part
        if failed:
            return "new", [], failed
        if self.on_host:
            cache, problems = read_into_cache(self.layout, self.store, parts, leaves, reuse, size, self.block_tokens,
                                              self.storage, spares=self._spares())
            failed = [bid for bid, start in zip(ids, starts(parts)) if start in problems]
            if self.storage.kv_bits and not failed:
                self.converted[name] = [ids[i] for i in missing]
        else:  # the files into one buffer: on CUDA in GPU memory
            buffer, errors = self.store.blocks.read_into_one([parts[i] for i in missing], gpu=cuda.available())
            problems = {i: e for i, e in zip(missing, errors) if e}
            failed, cache = [ids[i] for i in problems], []
            if not failed:
                cache = reconstruct(self.layout, self.storage, parts, reuse, size, self.block_tokens, buffer,
                                    {i: row for row, i in enumerate(missing)})
        for problem in problems.values():
            self._missed(name, problem, warnings)
        return ("remote" if remote else "disk" if missing else "hot"), cache, failed

    # reports

    def hot_agents(self) -> int:
        """Agents whose whole cache is in memory."""
        return sum(bool(r.ids) and all(b in self.pool for b in r.ids) for r in self.records.values())

    def agent_memory(self, name: str) -> dict[str, Any]:
        """What list_agents says of an agent's cache (one not in use read from the store, not kept)."""
        record = self.records.get(name)
        if record is None and name not in self.problems and isinstance(stored := self._stored(name), KVRecord):
            record = stored
        ids = set(record.ids) if record else set()
        in_memory = [bid for bid in ids if bid in self.pool]
        disk, shared_disk = self.store.kv_bytes(name)
        hot = record is not None and len(in_memory) == len(ids) > 0
        if record is None:
            tier = "none"
        elif hot:
            tier = "hot"
        elif self.store.shared and not all(bid in self.pool or self.store.has_block(bid) for bid in ids):
            tier = "remote"  # some blocks only in the shared tier
        else:
            tier = "disk"
        return {
            "tier": tier,
            "blocks": len(record.ids) if record else 0,
            "memory_bytes": sum(self.pool.peek(b).nbytes for b in in_memory),
            "shared_memory_bytes": sum(self.pool.peek(b).nbytes for b in in_memory if self.pool.refs[b] > 1),
            "disk_bytes": disk,
            "shared_disk_bytes": shared_disk,
        }
