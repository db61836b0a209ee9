"""The engine: one thread owns the model and runs every call, in the order calls arrive.

Each agent's truth is its transcript (store.Agent); its KV cache is only a cache of
the transcript's tokens, kept as content-addressed blocks (block_pool.py). On every call
the prompt is rebuilt from the messages with the chat template, the longest cached prefix
is found (the agent's own blocks, or blocks any agent shares with this prompt), the
contiguous cache the model takes is built from those blocks, and only the new tokens are
prefilled. After the call the blocks of the new tokens are copied out of that cache into
the pool.

Memory, counted against --memory-budget: the pool's blocks (each once, however many agents
hold it), plus the working caches of recently used agents, kept so that an agent asked
again is not rebuilt. Those go first when room is needed; then least recently used blocks,
after their agents' unsaved blocks are handed to the writer. Aside from the budget: the
running call's working cache, and blocks queued for the writer until written. When the
engine has been idle for a moment the writer thread saves the agents' new blocks and block
lists, so saving never delays the next token.

The engine knows nothing of MCP: it takes and returns plain values and pydantic
models, and reports progress through an async callback.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Awaitable, Callable, Iterator, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import common_prefix_len
from pydantic import BaseModel, ConfigDict

from mcp_semantic.block_pool import (
    BLOCK_TOKENS,
    BlockPool,
    Storage,
    block_ids,
    chain_ids,
    cut_blocks,
    kv_bits_supported,
    reconstruct,
)
from mcp_semantic.models import LoadedModel
from mcp_semantic.store import Agent, KVRecord, Store, Writer, check_name, host_block

log = logging.getLogger(__name__)

Tier = Literal["new", "hot", "disk"]
EvictLevel = Literal["memory", "disk", "agent"]
ProgressFn = Callable[[float, float, str], Awaitable[None]]


SAVE_AFTER_IDLE_S = 0.5
"""Caches are saved once the engine has had no work for this long: a host's back-to-back
calls are not slowed by the writer, and an agent in a quick exchange is written once."""

_TAIL = 32
"""Prompt tokens run in the final prefill pass, the one whose logits are computed."""


class RequestError(ValueError):
    """A call the engine refuses; the message says what was wrong, and nothing was changed."""


# Results (typed, so MCP hosts get an output schema)


class _Result(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)  # field docstrings become schema descriptions


class TokenCounts(_Result):
    context: int
    """Tokens of the prompt for this call (the whole conversation so far plus the new message)."""
    cached: int
    """Prompt tokens reused from the agent's KV cache instead of recomputed."""
    prefilled: int
    """Prompt tokens computed in this call (context - cached)."""
    generated: int


class Timings(_Result):
    queue: float
    """Waiting behind other calls."""
    cache_load: float
    """Reading the agent's cache from disk (0 when hot or new)."""
    prefill: float
    """Reading the new prompt tokens, up to the first token."""
    ttft: float
    """From the call's arrival at the engine to its first token: queue + cache_load + prefill."""
    total: float


class AskResult(_Result):
    agent: str
    reply: str
    finish_reason: Literal["stop", "length", "cancelled"]
    tier: Tier
    """Where the agent's cache came from: all in memory (hot), partly read from disk (disk), or nothing reusable (new)."""
    tokens: TokenCounts
    timings_ms: Timings
    decode_tokens_per_s: float
    warnings: list[str] = []


class ForkResult(_Result):
    agent: str
    source: str
    tokens: int


class AgentInfo(_Result):
    name: str
    parent: str | None
    """The agent it was forked from."""
    tokens: int
    """Tokens of its conversation that its KV cache holds."""
    turns: int
    tier: Literal["hot", "disk", "none"]
    """Where its cache is: all in memory (and maybe on disk), partly or only on disk, or
    nowhere (the next call re-reads its history)."""
    blocks: int
    """KV blocks its cache is made of."""
    memory_bytes: int
    """Its blocks in memory, plus its working cache if it is kept."""
    shared_memory_bytes: int
    """Of memory_bytes, the blocks other agents hold too (in memory once)."""
    disk_bytes: int
    shared_disk_bytes: int
    """Of disk_bytes, the blocks other agents' saved caches hold too (on disk once)."""
    created_at: datetime
    last_used_at: datetime


class MemoryInfo(_Result):
    budget_bytes: int
    """Memory allowed for KV blocks and kept working caches (--memory-budget)."""
    used_bytes: int
    block_bytes: int
    """Of used_bytes, the blocks (the rest: working caches kept for hot agents)."""
    block_tokens: int
    blocks_in_memory: int
    blocks_on_disk: int
    hot_agents: int
    """Agents whose whole cache is in memory."""
    hit_rate: float
    """Of the calls to existing agents since start, the share whose cache was all in memory."""
    cached_token_rate: float
    """Of the prompt tokens of all calls since start, the share reused from a cache, not computed."""


class AgentList(_Result):
    agents: list[AgentInfo]
    memory: MemoryInfo


class EvictResult(_Result):
    evicted: list[str]
    freed_memory_bytes: int
    freed_disk_bytes: int


@dataclass
class AskRequest:
    agent: str
    message: str
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


# Internals


@dataclass
class _Hot:
    """An agent's working cache kept after its call, with the token ids it holds."""

    cache: list[Any]
    tokens: list[int]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


class _Cancelled(Exception):
    pass


@dataclass
class _Job:
    fn: Callable[[_Job], Any]
    token: Any
    submitted: float = field(default_factory=time.perf_counter)
    done: anyio.Event = field(default_factory=anyio.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


def _post(token: Any, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on the caller's event loop; a loop that has gone away is not an error."""
    try:
        anyio.from_thread.run_sync(fn, *args, token=token)
    except (anyio.RunFinishedError, anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError):
        pass


def room_for(n: int) -> int:
    """Slots to build a cache with for n tokens: n, rounded up to 32 (the model's writes stay in place)."""
    return -(-n // 32) * 32


def check_kv_bits(lm: LoadedModel, kv_bits: int | None) -> None:
    """Refuse a --kv-bits the model's heads cannot be quantized at (a clear error at start-up)."""
    if kv_bits not in (8, 4):
        return
    cache = make_prompt_cache(lm.model)
    lm.model(mx.array([[0]]), cache=cache)  # one token: model configs name head_dim in too many ways
    head_dim = cache[0].state[0].shape[-1]
    if not kv_bits_supported(head_dim, kv_bits):
        raise RequestError(f"--kv-bits {kv_bits} needs a head dimension divisible by 32; this model's is {head_dim}")


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        store: Store,
        *,
        memory_budget: int,
        prefill_step_size: int = 512,
        max_tokens_limit: int = 4096,
        max_queue: int = 32,
        kv_bits: int | None = None,
        block_tokens: int = BLOCK_TOKENS,
    ):
        check_kv_bits(lm, kv_bits)
        self.lm = lm
        self.store = store
        self.memory_budget = memory_budget
        self.prefill_step_size = prefill_step_size
        self.max_tokens_limit = max_tokens_limit
        self.max_queue = max_queue
        self._asks = 0  # ask calls queued or running
        self._asks_lock = threading.Lock()
        self.kv_bits = kv_bits
        self.block_tokens = block_tokens
        self.storage = Storage(lm.fingerprint, lm.dtype, kv_bits)
        self._agents: dict[str, Agent] = {}
        self.unreadable: list[str] = []
        for name in store.names():
            agent = store.load_agent(name)
            if agent is None:
                self.unreadable.append(name)
            else:
                self._agents[name] = agent
        if self.unreadable:
            log.warning("could not read the transcripts of agents: %s", ", ".join(self.unreadable))
        self.pool = BlockPool()
        self._kv: dict[str, KVRecord] = {}  # each agent's blocks now (saved, or waiting for the writer)
        self._kv_problems: dict[str, str] = {}  # saved caches this engine cannot use, and why
        for name, record in store.kv_records().items():
            if name not in self._agents:
                continue
            if chain_ids(record.tokens, self.storage.key, block_tokens) != record.blocks:
                self._kv_problems[name] = (
                    "its saved KV cache was made by another model, --kv-bits or --block-tokens"
                )
                continue
            self._kv[name] = record
            self.pool.hold([], record.blocks)
        self._unsaved: set[str] = set()
        self._hot: OrderedDict[str, _Hot] = OrderedDict()  # kept working caches, least recently used first
        self._tiers: Counter[str] = Counter()  # where the caches of calls to existing agents came from
        self._tokens: Counter[str] = Counter()  # prompt tokens of all calls: "prompt", "cached"
        template = make_prompt_cache(lm.model)
        self._n_layers = len(template)
        self._blocks_ok = all(type(c) is KVCache for c in template)  # other kinds are not cut into blocks yet
        self._writer = Writer()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mcp-semantic-engine", daemon=True)
        self._thread.start()

    # The async side: called from the event loop

    async def _submit(self, fn: Callable[[_Job], Any]) -> Any:
        job = _Job(fn, anyio.lowlevel.current_token())
        self._queue.put(job)
        try:
            await job.done.wait()
        except BaseException:
            job.cancelled.set()  # the engine stops it at its next step
            raise
        if job.error is not None:
            raise job.error
        return job.result

    async def ask(self, req: AskRequest, on_progress: ProgressFn | None = None) -> AskResult:
        """Queue a call; refused at once, changing nothing, when --max-queue calls are waiting."""
        check_name(req.agent)
        with self._asks_lock:
            if self._asks >= self.max_queue:
                raise RequestError(
                    f"server busy: {self._asks} calls are queued or running (--max-queue {self.max_queue}); "
                    "nothing was changed, try again shortly"
                )
            self._asks += 1
        try:
            return await self._ask_queued(req, on_progress)
        finally:
            with self._asks_lock:
                self._asks -= 1

    async def _ask_queued(self, req: AskRequest, on_progress: ProgressFn | None) -> AskResult:
        if on_progress is None:
            return await self._submit(partial(self._ask, req, None))
        send, receive = anyio.create_memory_object_stream[tuple[float, float, str]](64)
        token = anyio.lowlevel.current_token()

        def report(done: float, total: float, message: str) -> None:
            _post(token, send.send_nowait, (done, total, message))

        async def forward() -> None:
            async with receive:
                async for item in receive:
                    await on_progress(*item)

        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(forward)
            try:
                result = await self._submit(partial(self._ask, req, report))
            except Exception as e:  # raised below, not wrapped in the task group's ExceptionGroup
                error = e
            finally:
                send.close()
        if error is not None:
            raise error
        return result

    async def fork(self, source: str, agent: str) -> ForkResult:
        check_name(source)
        check_name(agent)
        return await self._submit(lambda job: self._fork(source, agent))

    async def list_agents(self) -> AgentList:
        return await self._submit(lambda job: self._list())

    async def evict(self, agent: str | None = None, level: EvictLevel = "memory") -> EvictResult:
        if agent is not None:
            check_name(agent)
        if level not in ("memory", "disk", "agent"):
            raise RequestError(f"invalid level {level!r}: use 'memory', 'disk' or 'agent'")
        return await self._submit(lambda job: self._evict(agent, level))

    async def flush(self) -> None:
        """Return once every agent's cache is on disk (saves normally wait for an idle moment)."""
        await self._submit(lambda job: self._save_all())
        await anyio.to_thread.run_sync(self._writer.wait)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        """Finish the queued calls, write every unsaved cache, and stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
            self.store.close()

    # The engine thread

    def _run(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=SAVE_AFTER_IDLE_S if self._dirty() else None)
            except queue.Empty:  # idle for a while: hand every unsaved cache to the writer
                self._save_all()
                continue
            if job is None:
                break
            try:
                job.result = job.fn(job)
            except BaseException as e:  # delivered to the caller, who re-raises it
                job.error = e
            _post(job.token, job.done.set)
        self._save_all()
        self._writer.close()

    def _dirty(self) -> bool:
        return bool(self._unsaved)

    def _save_all(self) -> None:
        for name in sorted(self._unsaved):
            self._save(name)

    def _save(self, name: str) -> None:
        """Hand the agent's new blocks and block list to the writer thread."""
        if name not in self._unsaved:
            return
        self._unsaved.discard(name)
        record = self._kv.get(name)
        if record is None:
            return
        blocks = [
            host_block(b) for bid in record.blocks if not self.store.has_block(bid) and (b := self.pool.peek(bid)) is not None
        ]
        self._writer.put(name, partial(self.store.commit_kv, name, record, blocks, self.storage))

    def _used(self) -> int:
        return self.pool.nbytes + sum(h.nbytes for h in self._hot.values())

    def _enforce_budget(self) -> None:
        """Kept working caches go first (their blocks stay), then least recently used blocks."""
        while self._hot and self._used() > self.memory_budget:
            self._hot.popitem(last=False)
        if self._used() <= self.memory_budget:
            return
        self._save_all()  # a block leaves memory only once it is written or queued to be
        for bid in self.pool.oldest():
            if self._used() <= self.memory_budget:
                break
            self.pool.drop(bid)

    def _remember(self, name: str, cache: list[Any], tokens: list[int]) -> None:
        """After a call: the agent's blocks are those of `tokens`; copy the new ones into the pool."""
        if self._blocks_ok:
            ids = chain_ids(tokens, self.storage.key, self.block_tokens)
            for block in cut_blocks(cache, tokens, self.storage, self.block_tokens, skip=[b for b in ids if b in self.pool]):
                self.pool.add(block)
            old = self._kv.get(name)
            self.pool.hold(old.blocks if old else [], ids)
            self._kv[name] = KVRecord(ids, tokens)
            self._unsaved.add(name)
        self._hot[name] = _Hot(cache, tokens)
        self._hot.move_to_end(name)

    def _forget(self, name: str) -> None:
        """Drop the agent's cache from memory and from the engine's lists (not from disk)."""
        self._hot.pop(name, None)
        self._unsaved.discard(name)
        record = self._kv.pop(name, None)
        if record is not None:
            self.pool.hold(record.blocks, [])

    def _cache_for(self, agent: Agent, prompt: list[int], max_new: int, warnings: list[str]) -> tuple[Tier, list[Any], list[int]]:
        """The longest cache for `prompt` there is: the agent's kept working cache, or one built
        from its own blocks or from blocks any agent shares with the prompt, from memory or disk."""
        hot = self._hot.get(agent.name)
        if hot is not None:
            self._hot.move_to_end(agent.name)
            return "hot", hot.cache, hot.tokens
        B = self.block_tokens
        ids: list[str] = []
        tokens: list[int] = []
        record = self._kv.get(agent.name)
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
        blocks, tier, waited = [], "hot", False
        for bid in ids:
            block = self.pool.get(bid)
            if block is None:
                if not waited:  # the block may be in a write not done yet
                    self._writer.wait()
                    waited = True
                block, problem = self.store.read_block(bid, self.storage, self._n_layers)
                if block is None:
                    log.warning("agent %s: %s", agent.name, problem)
                    warnings.append(f"agent {agent.name}: {problem}; re-prefilling from there")
                    break
                self.pool.add(block)
                tier = "disk"
            blocks.append(block)
        if agent.tokens and record is None:
            why = self._kv_problems.get(agent.name) or "it has no saved KV cache"
            warnings.append(f"agent {agent.name}: {why}; re-prefilling its {len(agent.tokens)} tokens of history")
        if not blocks:
            return "new", make_prompt_cache(self.lm.model), []
        n = sum(len(b.tokens) for b in blocks)
        room = room_for(max(0, len(prompt) - common_prefix_len(tokens[:n], prompt)) + max_new + 1)
        cache = reconstruct(blocks, self.storage, self._n_layers, room)
        self._enforce_budget()  # blocks read for this call count at once; the working cache is aside
        return tier, cache, tokens[:n]

    def _ask(self, req: AskRequest, report: Callable[[float, float, str], None] | None, job: _Job) -> AskResult:
        started = time.perf_counter()
        tokenizer = self.lm.tokenizer
        if not 1 <= req.max_tokens <= self.max_tokens_limit:
            raise RequestError(f"max_tokens must be between 1 and {self.max_tokens_limit}, got {req.max_tokens}")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise RequestError("temperature must be >= 0 and top_p in (0, 1]")
        agent = self._agents.get(req.agent)
        if agent is None:
            agent = Agent(name=req.agent, system=req.system)
            if req.system is not None:
                agent.messages.append({"role": "system", "content": req.system})
        elif req.system is not None and req.system != agent.system:
            raise RequestError(
                f"agent {req.agent} already has a different system prompt; omit `system`, "
                "or fork or create another agent for a new one"
            )
        messages = agent.messages + [{"role": "user", "content": req.message}]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        limit = self.lm.context_length
        if len(prompt) >= limit:
            raise RequestError(
                f"agent {req.agent}: the conversation with this message is {len(prompt)} tokens, "
                f"over the model's context of {limit} tokens; nothing was changed"
            )
        max_new = min(req.max_tokens, limit - len(prompt))

        warnings: list[str] = []
        loading = time.perf_counter()
        tier, cache, cached_tokens = self._cache_for(agent, prompt, max_new, warnings)
        loaded = time.perf_counter()
        if agent.name in self._agents:
            self._tiers[tier] += 1
        self._tokens["prompt"] += len(prompt)
        reuse = common_prefix_len(cached_tokens, prompt)
        reuse = min(reuse, len(prompt) - 1)  # at least one token must run to get logits
        if reuse < len(cached_tokens):
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, len(cached_tokens) - reuse)
            else:
                cache, reuse = make_prompt_cache(self.lm.model), 0
        new_tokens = prompt[reuse:]
        self._tokens["cached"] += reuse
        total = len(new_tokens) + max_new

        def on_prefill(done: int) -> None:
            if job.cancelled.is_set():
                raise _Cancelled()
            if report:
                report(done, total, f"prefill {done}/{len(new_tokens)} tokens")

        if req.seed is not None:
            mx.random.seed(req.seed)
        sampler = make_sampler(temp=req.temperature, top_p=req.top_p if req.top_p < 1 else 0.0)
        eos = set(tokenizer.eos_token_ids)
        generated: list[int] = []
        seen: list[int] = []  # every token yielded, eos included (the cache may have fed them all)
        finish: Literal["stop", "length", "cancelled"] = "length"
        first = last = None
        try:
            logits = self._prefill(cache, new_tokens, on_prefill)
            for token in self._decode(logits, cache, sampler, max_new):
                seen.append(token)
                last = time.perf_counter()
                first = first or last
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                if token in eos:
                    finish = "stop"
                    break
                generated.append(token)
                if report and (len(generated) % 8 == 0 or len(generated) == max_new):
                    report(len(new_tokens) + len(generated), total, f"generated {len(generated)} tokens")
        except _Cancelled:
            finish = "cancelled"
        except BaseException:
            self._hot.pop(agent.name, None)  # the working cache may be half-updated; the blocks are not
            raise
        # generate_step computes one step ahead; finish it now rather than in the next call's time.
        mx.eval([c.state for c in cache])
        ended = time.perf_counter()

        # The cache holds a prefix of prompt + everything yielded (eos too); remember exactly which.
        held = cache[0].offset if hasattr(cache[0], "offset") else 0
        if finish != "cancelled":
            agent.messages = messages + [{"role": "assistant", "content": self._text(generated)}]
            agent.tokens = (prompt + seen)[:held]
            agent.last_used_at = time.time()
            self.store.save_agent(agent)  # the transcript is saved before the reply goes out
            self._agents[agent.name] = agent
        if agent.name in self._agents:
            self._remember(agent.name, cache, (prompt + seen)[:held])
        self._enforce_budget()

        first = first or ended
        ms = lambda a, b: round((b - a) * 1000, 2)  # noqa: E731
        decode_s = (last or ended) - first
        return AskResult(
            agent=agent.name,
            reply=agent.messages[-1]["content"] if finish != "cancelled" else self._text(generated),
            finish_reason=finish,
            tier=tier,
            tokens=TokenCounts(context=len(prompt), cached=reuse, prefilled=len(new_tokens), generated=len(generated)),
            timings_ms=Timings(
                queue=ms(job.submitted, started),
                cache_load=ms(loading, loaded),
                prefill=ms(started, first) - ms(loading, loaded),  # with the chat template and tokenizing
                ttft=ms(job.submitted, first),
                total=ms(job.submitted, ended),
            ),
            decode_tokens_per_s=round((len(generated) - 1) / decode_s, 2) if len(generated) > 1 and decode_s > 0 else 0.0,
            warnings=warnings,
        )

    def _text(self, tokens: list[int]) -> str:
        """The reply's text as mlx-lm's own generate and server decode it (its streaming detokenizer)."""
        detokenizer = self.lm.tokenizer.detokenizer
        detokenizer.reset()
        for token in tokens:
            detokenizer.add_token(token)
        detokenizer.finalize()
        return detokenizer.text

    def _prefill(self, cache: list[Any], tokens: list[int], on_chunk: Callable[[int], None]) -> mx.array:
        """Feed `tokens` to the model; return the logits of the last one.

        Why not generate_step's prefill: it runs the last prompt token in a pass of its own,
        which on a CPU costs about a tenth of a short turn's time to first token. Here all but
        the last `_TAIL` tokens run in chunks whose logits are never evaluated (so never
        computed), and the tail runs in one pass that also gives the logits.
        """
        model = self.lm.model
        head = max(0, len(tokens) - _TAIL)
        done = 0
        on_chunk(done)
        while done < head:
            n = min(self.prefill_step_size, head - done)
            model(mx.array(tokens[done : done + n])[None], cache=cache)
            mx.eval([c.state for c in cache])
            done += n
            on_chunk(done)
        return model(mx.array(tokens[head:])[None], cache=cache)[:, -1, :]

    def _decode(self, logits: mx.array, cache: list[Any], sampler: Callable, max_new: int) -> Iterator[int]:
        """Sample the first token from the prefill's logits, then let mlx-lm's generate_step go on."""
        token = sampler(logits - mx.logsumexp(logits, keepdims=True)).item()
        yield token
        if max_new > 1:
            steps = generate_step(mx.array([token]), self.lm.model, max_tokens=max_new - 1, sampler=sampler, prompt_cache=cache)
            for token, _ in steps:
                yield token

    def _get(self, name: str) -> Agent:
        agent = self._agents.get(name)
        if agent is None:
            raise RequestError(f"unknown agent {name!r}; ask_agent creates agents, list_agents lists them")
        return agent

    def _fork(self, source: str, name: str) -> ForkResult:
        """A fork copies the source's transcript and block list: it writes no KV, whatever the
        source's length, and holds the same blocks in memory and on disk until it diverges."""
        src = self._get(source)
        if name in self._agents or self.store.exists(name):
            raise RequestError(f"agent {name!r} already exists; fork onto a new name")
        agent = Agent(
            name=name,
            system=src.system,
            parent=source,
            messages=[dict(m) for m in src.messages],
            tokens=list(src.tokens),
        )
        self.store.save_agent(agent)
        self._agents[name] = agent
        record = self._kv.get(source)
        if record is not None:
            self._kv[name] = KVRecord(list(record.blocks), list(record.tokens))
            self.pool.hold([], record.blocks)
            self._save(source)  # the source's blocks are queued first, so the fork's list finds them on disk
            self._unsaved.add(name)
            self._save(name)
        return ForkResult(agent=name, source=source, tokens=len(agent.tokens))

    def _list(self) -> AgentList:
        infos = []
        hot_agents = 0
        for name, a in sorted(self._agents.items()):
            record = self._kv.get(name)
            ids = set(record.blocks) if record else set()
            in_memory = [bid for bid in ids if bid in self.pool]
            kept = self._hot.get(name)
            disk, shared_disk = self.store.kv_bytes(name)
            hot = kept is not None or (record is not None and len(in_memory) == len(ids) > 0)
            hot_agents += hot
            infos.append(
                AgentInfo(
                    name=name,
                    parent=a.parent,
                    tokens=len(a.tokens),
                    turns=a.turns,
                    tier="hot" if hot else "disk" if record else "none",
                    blocks=len(record.blocks) if record else 0,
                    memory_bytes=(kept.nbytes if kept else 0) + sum(self.pool.peek(b).nbytes for b in in_memory),
                    shared_memory_bytes=sum(self.pool.peek(b).nbytes for b in in_memory if self.pool.refs[b] > 1),
                    disk_bytes=disk,
                    shared_disk_bytes=shared_disk,
                    created_at=datetime.fromtimestamp(a.created_at).astimezone(),
                    last_used_at=datetime.fromtimestamp(a.last_used_at).astimezone(),
                )
            )
        calls = sum(self._tiers.values())
        memory = MemoryInfo(
            budget_bytes=self.memory_budget,
            used_bytes=self._used(),
            block_bytes=self.pool.nbytes,
            block_tokens=self.block_tokens,
            blocks_in_memory=len(self.pool),
            blocks_on_disk=self.store.disk_blocks(),
            hot_agents=hot_agents,
            hit_rate=round(self._tiers["hot"] / calls, 3) if calls else 0.0,
            cached_token_rate=round(self._tokens["cached"] / self._tokens["prompt"], 3) if self._tokens["prompt"] else 0.0,
        )
        return AgentList(agents=infos, memory=memory)

    def _evict(self, agent: str | None, level: EvictLevel) -> EvictResult:
        """memory: drop the agent's working cache and the blocks no other agent holds (saved
        first); disk: also its saved cache (blocks another agent's list names stay); agent: all."""
        names = [self._get(agent).name] if agent is not None else sorted(self._agents)
        before = self._used()
        freed_disk = 0
        if level == "memory":
            holders: Counter[str] = Counter()
            for name in names:
                self._save(name)
                self._hot.pop(name, None)
                holders.update(set(self._kv[name].blocks) if name in self._kv else ())
            for bid, n in holders.items():
                if self.pool.refs[bid] <= n:  # no agent left in memory holds it
                    self.pool.drop(bid)
        for name in names if level != "memory" else ():
            self._forget(name)
            self._writer.wait()  # nothing half written is deleted; GC sees every saved list
            if level == "disk":
                freed_disk += self.store.delete_kv(name)
            else:
                freed_disk += self.store.delete_agent(name)
                del self._agents[name]
        return EvictResult(evicted=names, freed_memory_bytes=before - self._used(), freed_disk_bytes=freed_disk)
