"""The agents a server knows: their transcripts, read from the store when a call names them and
the most recently used kept in memory, and the calls that need no model (fork, list, evict).

It runs on the engine thread (engine.py), between the batch's steps: the engine owns the model
and the calls' order, this the transcripts and what the store and the caches do with them.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime
from typing import Callable, Literal

from mlx_lm.utils import common_prefix_len

from mcp_semantic.caches import Caches
from mcp_semantic.calls import AgentInfo, AgentList, EvictResult, ForkResult, MemoryInfo, RequestError
from mcp_semantic.store import Agent, Store

EvictLevel = Literal["memory", "disk", "agent"]

AGENTS_IN_MEMORY = 1024
"""Transcripts kept in memory, the most recently used; the others are read from the store when named."""


class Agents:
    def __init__(self, store: Store, caches: Caches, max_agents: int, busy: Callable[[], set[str]]):
        self.store = store
        self.caches = caches
        self.max_agents = max_agents
        self.busy = busy  # the agents of calls started or waiting: never let go
        # read from the store when named, the least recently used let go beyond AGENTS_IN_MEMORY
        # (every answered turn is in the store already)
        self.memory: OrderedDict[str, Agent] = OrderedDict()

    def check_room(self) -> None:
        if (n := self.store.count()) >= self.max_agents:
            raise RequestError(
                f"the server keeps {n} agents, its --max-agents; forget some with "
                "evict_cache(level='agent') first; nothing was changed"
            )

    def get(self, name: str) -> Agent | None:
        """The agent's transcript (read from the store if it is not in memory), or None if there
        is no such agent. One the store holds but cannot read is an error, never a new agent
        over it."""
        agent = self.memory.get(name)
        if agent is not None:
            self.memory.move_to_end(name)
            return agent
        agent = self.store.load_agent(name)
        if agent is None and self.store.exists(name):
            raise RequestError(f"agent {name!r}: its stored transcript cannot be read (the server's log says why); "
                               "evict_cache(agent, level='agent') forgets it")
        if agent is not None:
            self.keep(agent)
        return agent

    def require(self, name: str) -> Agent:
        agent = self.get(name)
        if agent is None:
            raise RequestError(f"unknown agent {name!r}; ask_agent creates agents, list_agents lists them")
        return agent

    def keep(self, agent: Agent) -> None:
        """Hold the transcript in memory, the most recently used; let the least recently used
        idle ones go beyond AGENTS_IN_MEMORY, with their block lists where nothing of them is in
        memory."""
        self.memory[agent.name] = agent
        self.memory.move_to_end(agent.name)
        if len(self.memory) <= AGENTS_IN_MEMORY:
            return
        busy = self.busy()
        for name in [n for n in self.memory if n not in busy][: len(self.memory) - AGENTS_IN_MEMORY]:
            del self.memory[name]
            self.caches.release(name)

    def refresh(self, name: str) -> None:
        """Read the agent from the store again at its next use: in the shared mode another
        server may have served it since this one let it go."""
        self.memory.pop(name, None)
        self.caches.refresh(name)

    def fork(self, source: str, name: str, at_turn: int | None = None,
             render: Callable[[list[dict[str, str]]], list[int]] | None = None) -> ForkResult:
        """A fork copies the source's transcript and block list: it writes no KV, whatever the
        source's length, and holds the same blocks in memory and on disk until it diverges.
        With `at_turn`, only the first `at_turn` turns (a user message and its reply each) and
        the blocks of their tokens, which `render` (the chat template) gives: a host rewinds a
        sub-agent that went astray, still without copying anything."""
        src = self.require(source)
        if at_turn is not None and (type(at_turn) is not int or not 0 <= at_turn <= src.turns):
            raise RequestError(f"at_turn {at_turn!r} is out of range: agent {source} has {src.turns} turns, "
                               f"so fork at 0 to {src.turns} (or omit it for all); nothing was changed")
        if self.store.exists(name):
            raise RequestError(f"agent {name!r} already exists; fork onto a new name")
        self.check_room()
        messages, tokens, cut = src.messages, src.tokens, at_turn is not None and at_turn < src.turns
        if cut:
            ends = [i + 1 for i, m in enumerate(src.messages) if m["role"] == "assistant"]
            messages = src.messages[: ends[at_turn - 1]] if at_turn else [m for m in src.messages if m["role"] == "system"]
            tokens = src.tokens[: common_prefix_len(src.tokens, render(messages))] if render and messages else []
        agent = Agent(name=name, system=src.system, parent=source, messages=[dict(m) for m in messages],
                      tokens=list(tokens))
        self.store.save_agent(agent)
        self.keep(agent)
        self.caches.fork(source, name, agent.tokens if cut else None)
        return ForkResult(agent=name, source=source, tokens=len(agent.tokens), turns=agent.turns)

    def list(self, limit: int, cursor: str | None, memory: MemoryInfo) -> AgentList:
        """A page of at most `limit` agents by name after `cursor`; none of them is kept (a
        listing is no use)."""
        page = self.store.names(after=cursor, limit=limit + 1)
        more = len(page) > limit
        infos = []
        for name in page[:limit]:
            a = self.memory.get(name) or self.store.load_agent(name)
            if a is None:
                continue  # its transcript cannot be read (logged); asking it says so
            infos.append(AgentInfo(
                name=name,
                parent=a.parent,
                tokens=len(a.tokens),
                turns=a.turns,
                created_at=datetime.fromtimestamp(a.created_at).astimezone(),
                last_used_at=datetime.fromtimestamp(a.last_used_at).astimezone(),
                **self.caches.agent_memory(name),
            ))
        return AgentList(agents=infos, total=self.store.count(), next_cursor=page[limit - 1] if more else None, memory=memory)

    def evict(self, agent: str | None, level: EvictLevel) -> EvictResult:
        """memory: drop the agent's blocks that no other agent holds (saved first); disk: also
        its saved cache (blocks another agent's list names stay); agent: all."""
        if agent is not None and agent not in self.memory and not self.store.exists(agent):
            raise RequestError(f"unknown agent {agent!r}; ask_agent creates agents, list_agents lists them")
        names = [agent] if agent is not None else self.store.names()  # one whose transcript is unreadable too
        before = self.caches.used()
        freed_disk = 0
        if level == "memory":
            self.caches.evict_memory(names)
        for name in names if level != "memory" else ():
            freed_disk += self.caches.delete(name, agent_too=level == "agent")
            if level == "agent":
                self.memory.pop(name, None)
        return EvictResult(evicted=names, freed_memory_bytes=before - self.caches.used(), freed_disk_bytes=freed_disk)
