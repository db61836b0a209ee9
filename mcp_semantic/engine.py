"""The engine: one thread owns the model; calls to different agents run together in one batch.

Each agent's truth is its transcript (store.Agent); its KV cache is only a cache of the
transcript's tokens, kept as content-addressed blocks (caches.py). On every call the prompt is
rebuilt from the messages with the chat template, the longest cached prefix is found (for a
model with recurrent layers, the longest that ends where a block ends), and only the new tokens
are prefilled.

Calls are scheduled continuously: a call reads its prompt, then joins the decode batch
(batch.py) at the next step, its cache with it, and leaves when it finishes, so one agent's long
prefill is read in chunks between the decode steps of the others, and the decode steps of
several agents share one pass over the weights. Calls to one agent run one at a time, in
arrival order; so do the other calls that name it (fork, evict), and calls that name every
agent (evict all, flush) wait for the batch to drain. A cancelled call leaves the batch at the
next step and its agent as it was before the call.

The engine knows nothing of MCP: it takes and returns plain values and pydantic models, and
reports progress through an async callback.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections import Counter
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import mlx.core as mx
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import common_prefix_len
from mcp_semantic import attention
from mcp_semantic.batch import DecodeBatch, Row, seeded_sampler
from mcp_semantic.block_pool import BLOCK_TOKENS, Storage
from mcp_semantic.cache_kinds import whole_of
from mcp_semantic.caches import Caches
from mcp_semantic.calls import (
    AgentList,
    AskRequest,
    AskResult,
    EvictResult,
    ForkResult,
    MemoryInfo,
    RequestError,
    Timings,
    TokenCounts,
)
from mcp_semantic.jobs import Job, ProgressFn, Running, forwarding_progress, post, wait_for_exit
from mcp_semantic.agents import Agents, EvictLevel
from mcp_semantic.models import LoadedModel, assistant_turn, check_model, harmony_tokens, thinking_opened, thinking_switch
from mcp_semantic.store import Agent, AgentBusy, InvalidName, LeaseLost, Store, StoreUnavailable, check_name

if TYPE_CHECKING:  # leases.py needs psycopg, which only the shared mode installs
    from mcp_semantic.leases import Leases

log = logging.getLogger(__name__)

Finish = Literal["stop", "length", "cancelled"]

LIST_LIMIT, MAX_LIST_LIMIT = 100, 1000
"""list_agents' page: by default, and at most."""

SAVE_AFTER_IDLE_S = 0.5
"""Caches are saved, and blocks cut lazily copied out (Caches.settle), once the engine has had
no work for this long: a host's back-to-back calls are not slowed by the writer or the copies,
and an agent in a quick exchange is written once."""

PAUSE_TARGET_S = 0.25
"""While other calls are generating, a prompt is read in chunks of about this much time, so
that it holds their next token back by no more. The chunk's tokens follow the measured speed
(fewer as the context grows: attention costs more per token). Shorter chunks cost the reading
call time (each is a pass over the weights), longer ones the others' pauses."""

_TAIL = 32
"""Prompt tokens run in the final prefill pass, the one whose logits are computed."""


# Internals


_open_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    """An engine its owner did not close is closed as the interpreter exits, while its thread can
    still run: its caches are saved, and its thread does not end during finalization (below)."""
    for engine in list(_open_engines):
        engine.close()


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
        max_batch: int = 8,
        max_message_bytes: int = 256 * 1024,
        max_agents: int = 1000,
        kv_bits: int | None = None,
        block_tokens: int = BLOCK_TOKENS,
        leases: Leases | None = None,
    ):
        self.layout = check_model(lm, kv_bits)
        if not self.layout.batchable and max_batch > 1:
            log.warning("model type %s: its chunked-attention layers have no batched form; its calls decode "
                        "one at a time (--max-batch 1)", self.layout.model_type)
            max_batch = 1
        log.info("model cache: %s", self.layout.describe())
        self.lm = lm
        self.store = store
        self.leases = leases  # the shared mode: a call serves its agents only while it holds their leases
        self.prefill_step_size = prefill_step_size
        self.max_tokens_limit = max_tokens_limit
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_message_bytes = max_message_bytes
        self._asks = 0  # ask calls queued or running
        self._asks_lock = threading.Lock()
        self.caches = Caches(
            self.layout,
            store,
            Storage(lm.fingerprint, lm.dtype, kv_bits),
            block_tokens=block_tokens,
            memory_budget=memory_budget,
        )
        self.agents = Agents(store, self.caches, max_agents, self._busy)
        self._tiers: Counter[str] = Counter()  # where the caches of calls to existing agents came from
        self._tokens: Counter[str] = Counter()  # prompt tokens of all calls: "prompt", "cached"
        self._greedy = make_sampler(temp=0.0)  # one object: greedy rows are sampled in one call
        self._batch = self._new_batch()
        attention.install(lm.model)  # on the CPU: prompts' softmax in numpy (attention.py says why)
        self._eos = set(lm.tokenizer.eos_token_ids)
        self._running: list[Running] = []  # started calls, in the order they started
        self._s_per_token = 0.0  # the last prefill chunk's seconds per token
        self.peak_batch = 0  # the most calls that ran together
        self._waiting: list[Job] = []  # arrived, not started, in arrival order
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mcp-semantic-engine", daemon=True)
        self._thread.start()
        _open_engines.add(self)

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.lm.model, self.layout, self.caches.block_tokens)

    @property
    def memory_budget(self) -> int:
        return self.caches.memory_budget

    @memory_budget.setter
    def memory_budget(self, value: int) -> None:
        self.caches.memory_budget = value

    # The async side: called from the event loop

    async def _submit(self, job: Job) -> Any:
        leased = await self._lease(job)
        try:
            self._queue.put(job)
            try:
                await job.done.wait()
            except BaseException:
                job.cancelled.set()  # the engine drops it, or stops it at its next step
                raise
        finally:
            for name in leased:  # after the agent's save, which the call handed to the writer
                self.caches.writer.put(name, partial(self.leases.release, name))
        if job.error is not None:
            raise job.error
        return job.result

    async def _lease(self, job: Job) -> list[str]:
        """In the shared mode, take the leases of the agents the call names, waiting (up to
        --lease-wait) while another server serves one; returns those taken. AgentBusy after the
        wait, and StoreUnavailable, change nothing."""
        if self.leases is None or not job.agents:
            return []
        taken: list[str] = []
        fresh = []
        try:
            for name in sorted(job.agents):  # in order: two calls naming the same two agents cannot deadlock
                with anyio.CancelScope(shield=True):  # a lease taken is released below, never left held
                    new = await anyio.to_thread.run_sync(self.leases.take, name)
                taken.append(name)
                if new:
                    fresh.append(name)
                await anyio.lowlevel.checkpoint()  # a cancellation that came meanwhile: here
        except BaseException as e:
            for name in taken:
                self.caches.writer.put(name, partial(self.leases.release, name))
            if isinstance(e, AgentBusy):
                raise RequestError(str(e)) from None
            raise
        job.fresh = frozenset(fresh)
        return taken

    def _call(self, fn: Callable[[], Any], agents: frozenset[str] | None) -> Awaitable[Any]:
        return self._submit(Job(anyio.lowlevel.current_token(), agents, fn=fn))

    async def ask(self, req: AskRequest, on_progress: ProgressFn | None = None) -> AskResult:
        """Queue a call; refused at once, changing nothing, when --max-queue calls are waiting."""
        check_name(req.agent)
        for what, text in (("message", req.message), ("system prompt", req.system or "")):
            if len(text.encode()) > self.max_message_bytes:
                raise RequestError(
                    f"the {what} is {len(text.encode()):,} bytes, over --max-message-bytes "
                    f"({self.max_message_bytes:,}); nothing was changed"
                )
        if req.think is not None and thinking_switch(self.lm.tokenizer) is None:
            why = ""
            if harmony_tokens(self.lm.tokenizer) is not None:  # gpt-oss: an effort, not a switch (README)
                why = (" (it writes OpenAI's harmony format, as gpt-oss, and always reasons: its template sets "
                       "only a reasoning effort, in the system message at the conversation's start)")
            raise RequestError(f"`think` needs a model whose chat template can switch thinking on and off; "
                               f"{self.lm.name}'s cannot{why}: omit it; nothing was changed")
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
        token = anyio.lowlevel.current_token()
        if on_progress is None:
            return await self._submit(Job(token, frozenset([req.agent]), req=req))
        return await forwarding_progress(lambda report: self._submit(Job(token, frozenset([req.agent]), req=req,
                                                                         report=report)), on_progress)

    async def fork(self, source: str, agent: str, at_turn: int | None = None) -> ForkResult:
        """`agent` as a copy of `source`'s conversation: all of it, or its first `at_turn` turns."""
        check_name(source)
        check_name(agent)
        render = lambda messages: list(self.lm.tokenizer.apply_chat_template(messages, add_generation_prompt=False))  # noqa: E731
        return await self._call(lambda: self.agents.fork(source, agent, at_turn, render), frozenset([source, agent]))

    async def transcript(self, name: str) -> Agent:
        """The agent's conversation as committed (read from the store: no lease, no engine thread)."""
        check_name(name)
        if (agent := await anyio.to_thread.run_sync(self.store.load_agent, name)) is None:
            raise RequestError(f"unknown agent {name!r}")
        return agent

    async def names(self, limit: int) -> list[str]:
        """The first `limit` agents' names, in order."""
        return await anyio.to_thread.run_sync(partial(self.store.names, limit=limit))

    async def list_agents(self, limit: int = LIST_LIMIT, cursor: str | None = None) -> AgentList:
        """A page of at most `limit` agents by name, after the agent named `cursor` (the last
        page's next_cursor)."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise RequestError(f"limit {limit} is out of range: list 1 to {MAX_LIST_LIMIT} agents a page")
        if cursor is not None:
            try:
                check_name(cursor)
            except InvalidName:
                raise RequestError(f"cursor {cursor!r} is not one list_agents gave: pass its next_cursor as it is") from None
        return await self._call(lambda: self.agents.list(limit, cursor, self._memory()), frozenset())

    async def evict(self, agent: str | None = None, level: EvictLevel = "memory") -> EvictResult:
        if agent is not None:
            check_name(agent)
        if level not in ("memory", "disk", "agent"):
            raise RequestError(f"invalid level {level!r}: use 'memory', 'disk' or 'agent'")
        return await self._call(lambda: self.agents.evict(agent, level), frozenset([agent]) if agent else None)

    async def flush(self) -> None:
        """Return once every agent's cache is on disk (saves normally wait for an idle moment)."""
        await self._call(self.caches.save_all, None)
        await anyio.to_thread.run_sync(self.caches.writer.wait)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        """Finish the queued calls, write every unsaved cache, and stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
            wait_for_exit(self._thread.native_id)
            if self.leases is not None:
                self.leases.close()
            self.store.close()

    # The engine thread: scheduling

    def _run(self) -> None:
        attention.enable()
        stopping = False
        while not stopping or self._waiting or self._running:
            busy = bool(self._waiting or self._running)
            try:
                if busy:
                    item = self._queue.get_nowait()
                else:
                    # nothing runs or waits: the blocks calls read converted go into the pool
                    self.caches.fill(stop=lambda: not self._queue.empty())
                    # idle a while: caches saved and settled (the shared mode saves at each call's end,
                    # yet blocks cut lazily hold its last working caches until settled: no spares)
                    idle_work = self.caches.unsaved or self.caches.unsettled
                    item = self._queue.get(timeout=SAVE_AFTER_IDLE_S if idle_work else None)
                while True:  # take everything that has arrived
                    if item is None:
                        stopping = True
                    else:
                        self._waiting.append(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                if not busy and not self._waiting:  # idle for a while: hand unsaved caches to the writer
                    self.caches.save_all()
            if not self._running:
                # before a new call starts, not between anyone's tokens; it stops when one arrives
                self.caches.settle(stop=lambda: bool(self._waiting) or not self._queue.empty())
            self._schedule()
            if self._running:
                self._step()
        self.caches.close()

    def _schedule(self) -> None:
        """Start every waiting call that may start, in arrival order: a call waits for the
        earlier calls naming its agents, an ask also for a place in the batch, and a call
        naming every agent for the batch to drain."""
        blocked = {r.agent.name for r in self._running}
        everything = False
        waiting = []
        for job in self._waiting:
            if job.cancelled.is_set():  # its caller has gone: nothing to do
                post(job.token, job.done.set)
                continue
            if job.agents is None:
                ready = not everything and not waiting and not self._running
            else:
                ready = not everything and not (job.agents & blocked)
            if ready and job.req is not None and len(self._running) >= self.max_batch:
                ready = False
            if not ready:
                waiting.append(job)
                everything = everything or job.agents is None
                blocked |= job.agents or set()
                continue
            for name in job.fresh:  # served by another server since we last did, perhaps: read it again
                self.agents.refresh(name)
            if job.req is None:
                try:
                    job.result = job.fn()
                except BaseException as e:  # delivered to the caller, who re-raises it
                    job.error = e
                post(job.token, job.done.set)
            elif self._admit(job):
                blocked.add(job.req.agent)
        self._waiting = waiting

    def _admit(self, job: Job) -> bool:
        """Validate an ask call, find its cache and put it in the batch; False if refused."""
        started = time.perf_counter()
        req = job.req
        try:
            if not 1 <= req.max_tokens <= self.max_tokens_limit:
                raise RequestError(f"max_tokens must be between 1 and {self.max_tokens_limit}, got {req.max_tokens}")
            if req.temperature < 0 or not 0 < req.top_p <= 1:
                raise RequestError("temperature must be >= 0 and top_p in (0, 1]")
            agent = self.agents.get(req.agent)
            if agent is None:
                self.agents.check_room()
                agent = Agent(name=req.agent, system=req.system)
                if req.system is not None:
                    agent.messages.append({"role": "system", "content": req.system})
            elif req.system is not None and req.system != agent.system:
                raise RequestError(
                    f"agent {req.agent} already has a different system prompt; omit `system`, "
                    "or fork or create another agent for a new one"
                )
            messages = agent.messages + [{"role": "user", "content": req.message}]
            think = {} if req.think is None else {"enable_thinking": req.think}  # mlx-lm names it as the template does
            prompt = list(self.lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **think))
            limit = self.lm.context_length
            if len(prompt) >= limit:
                raise RequestError(
                    f"agent {req.agent}: the conversation with this message is {len(prompt)} tokens, "
                    f"over the model's context of {limit} tokens; nothing was changed"
                )
        except BaseException as e:
            job.error = e
            post(job.token, job.done.set)
            return False
        if req.temperature == 0:
            sampler = self._greedy
        elif req.seed is not None:
            sampler = seeded_sampler(req.temperature, req.top_p, req.seed)
        else:
            sampler = make_sampler(temp=req.temperature, top_p=req.top_p if req.top_p < 1 else 0.0)
        max_new = min(req.max_tokens, limit - len(prompt))
        r = Running(job, agent, messages, prompt, max_new, sampler, started, opened=thinking_opened(self.lm.tokenizer, prompt))
        if self.layout.recurrent:  # a checkpoint there is kept (Caches.remember)
            r.turn = common_prefix_len(prompt, self.lm.tokenizer.apply_chat_template(messages, add_generation_prompt=False))
        self._running.append(r)
        self.peak_batch = max(self.peak_batch, len(self._running))
        return True

    def _find_cache(self, r: Running) -> None:
        """Just before a call reads its prompt: its cache, trimmed to what the prompt shares.

        Not at admission: calls read their prompts one after another, so a call that arrived with
        others finds the blocks of the prompts read before its own (a shared system prompt is
        read once, even by agents asked at once)."""
        started = time.perf_counter()
        r.tier, r.cache, r.reuse = self.caches.lookup(r.agent, r.prompt, r.max_new, r.warnings)
        if r.agent.tokens:  # an agent with a turn before
            self._tiers[r.tier] += 1
        if self.layout.recurrent:
            if r.reuse:
                r.checkpoints[r.reuse] = self.layout.states(r.cache)  # its block may have come from disk without them
            r.kept = self.caches.kept(r.prompt)
        r.pending = r.prompt[r.reuse :]
        r.cache_load = time.perf_counter() - started
        self._tokens["prompt"] += len(r.prompt)
        self._tokens["cached"] += r.reuse
        if r.job.report:
            r.job.report(0, len(r.pending) + r.max_new, f"prefill 0/{len(r.pending)} tokens")

    # The engine thread: one step of the batch

    def _step(self) -> None:
        """One decode step for the calls in the batch, then one prefill chunk for the first call
        still reading its prompt: a long prompt never holds the others' next token for long."""
        decoding = any(r.row is not None for r in self._running)
        if decoding:
            self._decode_step()
        reading = next((r for r in self._running if r.row is None), None)
        if reading is not None:
            step = self.prefill_step_size
            if decoding and self._s_per_token > 0:
                step = max(16, min(step, int(PAUSE_TARGET_S / self._s_per_token)))
            try:
                self._prefill_chunk(reading, step, tail=0 if decoding else _TAIL)
            except BaseException as e:  # this call fails; the batch goes on
                log.exception("prefill failed for agent %s", reading.agent.name)
                self._running.remove(reading)
                reading.job.error = e
                post(reading.job.token, reading.job.done.set)
        for r in list(self._running):
            if r.job.cancelled.is_set():
                if r.row is not None:
                    self._batch.remove([r.row])
                self._finish(r, "cancelled", None)

    def _prefill_chunk(self, r: Running, step: int, tail: int) -> None:
        """Read up to `step` of the call's prompt tokens; with the last ones, sample its first token
        and move it to the batch.

        Why not mlx-lm's prefill (generate_step, BatchGenerator): it runs the last prompt token
        in a pass of its own (BatchGenerator also reports a token one step after sampling it),
        about a third of a short turn's time to first token on a CPU. Here all but the last
        `tail` (up to step + tail) tokens run in chunks whose logits are never computed, the
        last ones run in one pass that gives the logits, and the first token is sampled and
        reported at once.
        """
        if r.cache is None:
            self._find_cache(r)
        model = self.lm.model
        started = time.perf_counter()
        B, done = self.caches.block_tokens, len(r.prompt) - len(r.pending)
        if self.layout.recurrent:  # chunks end where new blocks end, so each gets its state, and where the turn begins
            step = min(step, (max(done, r.kept) // B + 1) * B - done, r.turn - done if r.turn > done else step)
        if len(r.pending) > step + tail or self.layout.recurrent and len(r.pending) > step:
            model(mx.array(r.pending[:step])[None], cache=r.cache)
            mx.eval([c.state for c in r.cache])
            r.pending = r.pending[step:]
            self._s_per_token = (time.perf_counter() - started) / step
            self._checkpoint(r, done + step)
            if r.job.report:
                done, total = len(r.prompt) - r.reuse - len(r.pending), len(r.prompt) - r.reuse
                r.job.report(done, total + r.max_new, f"prefill {done}/{total} tokens")
            return
        logits = model(mx.array(r.pending)[None], cache=r.cache)[:, -1, :]
        token = r.sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item()
        r.first = r.last = time.perf_counter()
        self._s_per_token = (r.first - started) / len(r.pending)
        r.pending = []
        self._checkpoint(r, len(r.prompt))
        if any(o.cache is None and o.prompt[:B] == r.prompt[:B] for o in self._running if o is not r):
            self.caches.share_prompt(r.cache, r.prompt, r.checkpoints)  # a call still to read starts the same way
        if token in self.lm.tokenizer.eos_token_ids:
            return self._finish(r, "stop", r.prompt)
        r.generated.append(token)
        if r.max_new == 1:
            return self._finish(r, "length", r.prompt)
        r.row = Row(r, token, r.sampler, r.max_new, self._eos, list(r.prompt), r.checkpoints)
        self._batch.add(r.row, r.cache)
        r.cache = None  # the batch holds it now

    def _checkpoint(self, r: Running, n: int) -> None:
        """With recurrent layers, keep their states when the cache holds `n` tokens, a block's end
        or where the turn begins."""
        if self.layout.recurrent and (n % self.caches.block_tokens == 0 or n == r.turn):
            r.checkpoints[n] = self.layout.states(r.cache)

    def _decode_step(self) -> None:
        try:
            stepped = self._batch.step()
        except BaseException as e:  # the batch is in no known state: fail its calls, start anew
            log.exception("a batch step failed")
            for r in [r for r in self._running if r.row is not None]:
                self._running.remove(r)
                r.job.error = e
                post(r.job.token, r.job.done.set)
            self._batch = self._new_batch()
            return
        now = time.perf_counter()
        for row, token in stepped:
            r = row.key
            r.longest_pause = max(r.longest_pause, now - r.last)
            r.last = now
            if row.finish != "stop":  # "stop": the token is an end-of-sequence token
                r.generated.append(token)
            if row.finish is not None:
                r.cache = row.cache
                self._finish(r, row.finish, row.tokens)
            elif r.job.report and len(r.generated) % 8 == 0:
                new = len(r.prompt) - r.reuse
                r.job.report(new + len(r.generated), new + r.max_new, r.text_so_far(self.lm.tokenizer))

    def _finish(self, r: Running, finish: Finish, tokens: list[int] | None) -> None:
        """A call is done: save its turn (not a cancelled one), keep its cache, answer it.
        `tokens`: those its cache (`r.cache`) holds."""
        self._running.remove(r)

        agent = r.agent
        # the message as the template wants it for the next prompts: the text whole (<think>), or
        # the answer and the reasoning apart (harmony, split on the tokens)
        reply, reasoning, message = assistant_turn(self.lm.tokenizer, r.prompt, r.generated, r.opened)
        if finish != "cancelled":
            turn = replace(agent, messages=r.messages + [message], tokens=tokens, last_used_at=time.time())
            try:
                self.store.save_agent(turn)  # the transcript is saved before the reply goes out
            except StoreUnavailable as e:  # the turn is lost, the agent stays as it was: said, not hidden
                if isinstance(e, LeaseLost) and self.leases is not None:
                    self.leases.mark_lost(agent.name)  # its next call takes the lease anew, reads the agent again
                r.job.error = RequestError(f"agent {agent.name}: the reply could not be saved, so it is not "
                                           f"given ({e})")
                finish = "cancelled"
            else:
                agent.messages, agent.tokens, agent.last_used_at = turn.messages, turn.tokens, turn.last_used_at
                self.agents.keep(agent)
                whole = r.row.whole if r.row is not None else whole_of(self.layout, r.cache)
                self.caches.remember(agent.name, r.cache, tokens, r.checkpoints, r.turn, whole)
                self.caches.enforce_budget()
                if self.leases is not None:  # the next server to serve it finds its blocks
                    self.caches.save(agent.name)
        if r.row is not None:  # let the cache's memory go now (the row and the call refer to each other)
            r.row.cache = r.row.key = r.row.whole = None
        r.cache = r.row = None
        r.checkpoints = {}
        if r.job.error is not None:
            post(r.job.token, r.job.done.set)
            return
        ended = time.perf_counter()
        first = r.first or ended
        ms = lambda a, b: round((b - a) * 1000, 2)  # noqa: E731
        decode_s = (r.last or ended) - first
        r.job.result = AskResult(
            agent=agent.name,
            reply=reply,
            reasoning=reasoning,
            finish_reason=finish,
            tier=r.tier,
            turns=agent.turns,
            tokens=TokenCounts(
                context=len(r.prompt), cached=r.reuse, prefilled=len(r.prompt) - r.reuse, generated=len(r.generated)
            ),
            timings_ms=Timings(
                queue=ms(r.job.submitted, r.started),
                cache_load=round(r.cache_load * 1000, 2),
                prefill=round(ms(r.started, first) - r.cache_load * 1000, 2),  # with the chat template and tokenizing
                ttft=ms(r.job.submitted, first),
                total=ms(r.job.submitted, ended),
                longest_pause=round(r.longest_pause * 1000, 2),
            ),
            decode_tokens_per_s=round((len(r.generated) - 1) / decode_s, 2) if len(r.generated) > 1 and decode_s > 0 else 0.0,
            warnings=r.warnings,
        )
        post(r.job.token, r.job.done.set)

    def _busy(self) -> set[str]:
        """The agents of calls started or waiting: their transcripts stay in memory."""
        return {r.agent.name for r in self._running} | {j.req.agent for j in self._waiting if j.req is not None}

    def _memory(self) -> MemoryInfo:
        """list_agents' account of the memory and of the calls' caches."""
        calls = sum(self._tiers.values())
        return MemoryInfo(
            budget_bytes=self.memory_budget,
            used_bytes=self.caches.used(),
            block_tokens=self.caches.block_tokens,
            blocks_in_memory=len(self.caches.pool),
            blocks_on_disk=self.store.disk_blocks(),
            hot_agents=self.caches.hot_agents(),
            hit_rate=round(self._tiers["hot"] / calls, 3) if calls else 0.0,
            cached_token_rate=round(self._tokens["cached"] / self._tokens["prompt"], 3) if self._tokens["prompt"] else 0.0,
        )
