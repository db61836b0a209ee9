"""The MCP layer: four tools that validate, call the engine, and shape the result.

One engine serves the whole process. The SDK enters the server's lifespan once per
connection (several SSE clients each enter it), so the lifespan shares one engine
among them and closes it when the last connection ends.
"""

# No `from __future__ import annotations`: the SDK evaluates tool signatures, which use `settings`.
import hmac
import json
import logging
import os
import signal
import socket
import stat
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Annotated, Any, AsyncIterator, Literal

import anyio
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.stdio import stdio_server
from mcp_types import CallToolResult, Resource, TextContent, ToolAnnotations
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR
from pydantic import BaseModel, Field

from mcp_semantic import __version__
from mcp_semantic.blas import blas_warning
from mcp_semantic.cache_kinds import UnsupportedCache
from mcp_semantic.models import LoadedModel, check_model
from mcp_semantic.calls import AgentList, AskRequest, AskResult, EvictResult, ForkResult, RequestError
from mcp_semantic.engine import LIST_LIMIT, MAX_LIST_LIMIT, Engine
from mcp_semantic.settings import Settings
from mcp_semantic.sqlite_store import SQLiteStore
from mcp_semantic.store import NAME_RULE, Agent, CacheDirLocked, InvalidName, Store, StoreUnavailable, lock_cache_dir

log = logging.getLogger(__name__)

INSTRUCTIONS = """\
Local LLM agents that remember. `ask_agent` talks to a named agent (created on first use) \
whose conversation and KV cache persist across calls and server restarts, so a resumed agent \
does not re-read its history. `fork_agent` branches an agent, `list_agents` shows them and \
their cache tiers, `evict_cache` frees memory or disk."""

AgentName = Annotated[str, Field(pattern=NAME_RULE, description="agent name: letters, digits, '.', '_', '-'")]


def load(settings: Settings) -> LoadedModel:
    """Load the model: the slow part of start-up, done once per process."""
    import mlx.core as mx

    from mcp_semantic.models import load_model

    warning = blas_warning(mx.default_device() == mx.cpu)
    if warning:
        log.warning(warning)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    return load_model(settings.model, settings.cache_dir)


def open_store(settings: Settings, holder: str | None = None) -> Store:
    """The embedded store (SQLite and block files in --cache-dir), or the shared one: PostgreSQL
    (--store), with Redis behind the block files (--block-store), saving transcripts only under
    `holder`'s leases. StoreUnavailable names an unreachable one."""
    if settings.store is None:
        return SQLiteStore(settings.cache_dir)
    from mcp_semantic.postgres import PostgresStore

    return PostgresStore(settings.cache_dir, settings.store, settings.block_store, holder)


def server_id(settings: Settings) -> str:
    """This server's name in the shared store's leases: unique among the servers sharing it."""
    return settings.server_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def open_engine(settings: Settings, lm: LoadedModel | None = None) -> Engine:
    lm = lm or load(settings)
    holder = server_id(settings) if settings.store is not None else None
    store = open_store(settings, holder)
    try:
        leases = None
        if holder is not None:
            from mcp_semantic.leases import Leases

            leases = Leases(store.pool, holder, ttl_s=settings.lease_ttl, wait_s=settings.lease_wait)
        return Engine(
            lm,
            store,
            leases=leases,
            memory_budget=int(settings.memory_budget),
            prefill_step_size=settings.prefill_step_size,
            max_tokens_limit=settings.max_tokens_limit,
            max_queue=settings.max_queue,
            max_message_bytes=int(settings.max_message_bytes),
            max_agents=settings.max_agents,
            max_batch=settings.max_batch,
            kv_bits=settings.kv_bits_value,
            block_tokens=settings.block_tokens,
        )
    except BaseException:
        store.close()
        raise


@dataclass
class _Shared:
    engine: Engine | None = None
    users: int = 0


def _summary(result: BaseModel) -> str:
    if isinstance(result, AskResult):
        t = result.tokens
        head = (
            f"[{result.agent} · tier {result.tier} · {t.cached}/{t.context} tokens cached · "
            f"ttft {result.timings_ms.ttft:.0f} ms · {result.finish_reason}]"
        )
        return f"{head}\n{result.reply}"
    if isinstance(result, ForkResult):
        return f"forked {result.source} into {result.agent} ({result.turns} turns, {result.tokens} tokens shared)"
    if isinstance(result, AgentList):
        rows = [f"{a.name}: {a.turns} turns, {a.tokens} tokens, tier {a.tier}" for a in result.agents]
        if result.next_cursor:
            rows.append(f"{len(result.agents)} of {result.total} agents; next page: cursor {result.next_cursor!r}")
        mem = result.memory
        rows.append(f"memory: {mem.used_bytes} of {mem.budget_bytes} bytes")
        return "\n".join(rows)
    if isinstance(result, EvictResult):
        return (
            f"evicted {len(result.evicted)} agent(s): freed {result.freed_memory_bytes} bytes of memory "
            f"and {result.freed_disk_bytes} bytes of disk"
        )
    return result.model_dump_json()


def _result(result: BaseModel) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=_summary(result))],
        structured_content=result.model_dump(mode="json", by_alias=True),
    )


RESOURCE_LIST_LIMIT = 1000
"""Agents `resources/list` names (the first by name); any agent is read by its URI."""


class _Server(MCPServer):
    """MCPServer whose resource list also names the agents (`agent://<name>`), from the store:
    the SDK's list holds resources added up front, and agents come and go."""

    def __init__(self, shared: _Shared, **kwargs: Any):
        super().__init__(**kwargs)
        self.shared = shared

    async def list_resources(self) -> list[Resource]:
        listed = await super().list_resources()
        if self.shared.engine is None:
            return listed
        try:
            names = await self.shared.engine.names(RESOURCE_LIST_LIMIT)
        except StoreUnavailable as e:  # the shared store out of reach: said, as the tools say it
            raise MCPError(code=INTERNAL_ERROR, message=str(e)) from None
        return listed + [Resource(uri=f"agent://{n}", name=n, title=f"Agent {n}", mime_type="text/markdown",
                                  description=f"the conversation of agent {n}") for n in names]


def transcript_text(agent: Agent) -> str:
    """An agent's conversation as Markdown, for hosts that show or attach it."""
    parts = [f"# Agent {agent.name}" + (f" (forked from {agent.parent})" if agent.parent else "")]
    parts += [f"**{m['role']}**: {m['content']}" for m in agent.messages]
    return "\n\n".join(parts) + "\n"


def transcript_json(agent: Agent) -> str:
    """An agent's conversation as JSON: its messages as the model saw them, and who it is."""
    when = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat()  # noqa: E731
    return json.dumps({"name": agent.name, "parent": agent.parent, "system": agent.system, "turns": agent.turns,
                       "messages": agent.messages, "created_at": when(agent.created_at),
                       "last_used_at": when(agent.last_used_at)}, ensure_ascii=False)


def create_server(settings: Settings, lm: LoadedModel | None = None) -> MCPServer:
    """The MCP server; it loads the model on its first connection unless given `lm`."""
    shared = _Shared()
    lock = anyio.Lock()

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[_Shared]:
        async with lock:
            if shared.engine is None:
                shared.engine = await anyio.to_thread.run_sync(open_engine, settings, lm)
            shared.users += 1
        try:
            yield shared
        finally:
            # Shielded: a connection that ends by cancellation must still save every cache.
            with anyio.CancelScope(shield=True):
                async with lock:
                    shared.users -= 1
                    if shared.users == 0 and shared.engine is not None:
                        engine, shared.engine = shared.engine, None
                        await engine.aclose()

    server = _Server(shared, name="mcp-semantic", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan)
    # Say that the resource list changes (agents come and go) on the wires before 2026-07-28 too:
    # the SDK takes that from options its transports build with defaults (its own TODO says so)
    lowlevel = server._lowlevel_server
    lowlevel.create_initialization_options = partial(type(lowlevel).create_initialization_options, lowlevel,
                                                     NotificationOptions(resources_changed=True))

    def engine_of(ctx: Context) -> Engine:
        engine = ctx.request_context.lifespan_context.engine
        if engine is None:
            raise ToolError("the server is shutting down; try again")
        return engine

    async def call(coro):
        """The engine's refusals become tool errors a user can act on; anything else is logged
        here, and the client gets no traceback, path or internal detail."""
        try:
            return await coro
        except (RequestError, InvalidName, StoreUnavailable) as e:
            raise ToolError(str(e)) from None
        except Exception:
            log.exception("a tool call failed")
            raise ToolError("the call failed on an internal error; the server's log has the details") from None

    # Hints for hosts (a host may skip a confirmation where it is safe): nothing here reaches
    # outside this machine; only evict_cache deletes what is stored, and evicting again changes nothing more
    @server.tool(title="Ask an agent", annotations=ToolAnnotations(
        title="Ask an agent", read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False))
    async def ask_agent(
        agent: AgentName,
        message: Annotated[str, Field(description="the user message to send")],
        ctx: Context,
        system: Annotated[
            str | None, Field(description="system prompt; only when the agent is created (must match later)")
        ] = None,
        max_tokens: Annotated[int, Field(ge=1, le=settings.max_tokens_limit, description="reply length cap")] = 512,
        temperature: Annotated[float, Field(ge=0, le=10, description="0 is greedy and exact")] = 0.0,
        top_p: Annotated[float, Field(gt=0, le=1)] = 1.0,
        seed: Annotated[int | None, Field(description="random seed for sampling")] = None,
        think: Annotated[bool | None, Field(description="thinking models: reason before answering (true) or not "
                                            "(false), where the chat template has the switch; omit for its default")] = None,
    ) -> Annotated[CallToolResult, AskResult]:
        """Send a message to a named local agent and get its reply. The agent is created on first
        use and remembers the whole conversation, also across server restarts; its KV cache is
        reused, so only the new message is read."""
        engine = engine_of(ctx)
        req = AskRequest(agent, message, system, max_tokens, temperature, top_p, seed, think)
        result: AskResult = await call(engine.ask(req, on_progress=ctx.report_progress))
        for warning in result.warnings:
            log.warning(warning)
            await ctx.warning(warning)
        if result.turns == 1 and result.finish_reason != "cancelled":
            await agents_changed(ctx)  # a new agent
        return _result(result)

    @server.tool(title="Fork an agent", annotations=ToolAnnotations(
        title="Fork an agent", read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False))
    async def fork_agent(
        source: AgentName,
        agent: AgentName,
        ctx: Context,
        at_turn: Annotated[int | None, Field(ge=0, description="keep only the source's first N turns (a user "
                                             "message and its reply each); omit for all")] = None,
    ) -> Annotated[CallToolResult, ForkResult]:
        """Create `agent` as a copy of `source`'s conversation, to explore an alternative, or of its
        first `at_turn` turns, to rewind it. It shares the source's KV cache (nothing is copied),
        so its first call does not re-read the history."""
        result = await call(engine_of(ctx).fork(source, agent, at_turn))
        await agents_changed(ctx)
        return _result(result)

    @server.tool(title="List agents", annotations=ToolAnnotations(
        title="List agents", read_only_hint=True, open_world_hint=False))
    async def list_agents(
        ctx: Context,
        limit: Annotated[int, Field(ge=1, le=MAX_LIST_LIMIT, description="agents a page, by name")] = LIST_LIMIT,
        cursor: Annotated[str | None, Field(description="the next_cursor of the page before; omit for the first")] = None,
    ) -> Annotated[CallToolResult, AgentList]:
        """List the agents by name, a page at a time (`next_cursor` gets the next), with their size,
        turns, where their cache is (hot: memory; disk; remote: only in the shared tier; none) and
        the bytes they use and share, and the memory budget, use and hit rate of the KV block pool."""
        return _result(await call(engine_of(ctx).list_agents(limit, cursor)))

    @server.tool(title="Evict caches", annotations=ToolAnnotations(
        title="Evict caches", read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False))
    async def evict_cache(
        ctx: Context,
        agent: Annotated[str | None, Field(pattern=NAME_RULE, description="one agent; omit for all")] = None,
        level: Annotated[
            Literal["memory", "disk", "agent"],
            Field(description="memory: free RAM (cache stays on disk); disk: also delete the saved cache; "
            "agent: forget the agent entirely"),
        ] = "memory",
    ) -> Annotated[CallToolResult, EvictResult]:
        """Free an agent's (or every agent's) cache from memory, from disk, or forget the agent."""
        result = await call(engine_of(ctx).evict(agent, level))
        if level == "agent" and result.evicted:
            await agents_changed(ctx)
        return _result(result)

    # Agents as resources: hosts show them in their pickers and attach a conversation to a prompt

    async def read_agent(ctx: Context, name: str) -> Agent:
        try:
            return await engine_of(ctx).transcript(name)
        except (ToolError, RequestError, InvalidName, StoreUnavailable) as e:
            raise ResourceError(str(e)) from None

    @server.resource("agent://{name}", name="agent", title="An agent's conversation", mime_type="text/markdown",
                     description="The conversation of the agent `name` so far, as Markdown")
    async def agent_text(name: str, ctx: Context) -> str:
        return transcript_text(await read_agent(ctx, name))

    @server.resource("agent://{name}/transcript.json", name="agent-json", title="An agent's conversation (JSON)",
                     mime_type="application/json",
                     description="The conversation of the agent `name`: its messages, system prompt, parent and times")
    async def agent_json(name: str, ctx: Context) -> str:
        return transcript_json(await read_agent(ctx, name))

    return server


async def agents_changed(ctx: Context) -> None:
    """Agents were made or forgotten: hosts refresh their resource lists (on the 2026 wire every
    client listening through subscriptions/listen; on earlier ones the session that called).
    Best effort: the call's work is done, and a host gone meanwhile is no error of the call's."""
    try:
        await ctx.notify_resources_changed()
        session = ctx.request_context.session
        if session.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            await session.send_resource_list_changed()
    except Exception as e:  # noqa: BLE001
        log.info("could not tell the host that the agents changed: %s", e)


async def _serve_stdio(server: MCPServer) -> None:
    """Serve stdio until end of input or SIGTERM/SIGINT; either way the lifespan saves every cache.

    A signal cancels the server's task group rather than raising at an arbitrary point.
    (The HTTP transports' uvicorn handles these signals itself.)
    """
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()

        tg.start_soon(stop_on_signal)
        lowlevel = getattr(server, "_lowlevel_server", None)  # what run_stdio_async runs; the SDK's own path where it moves
        lines = StdinLines.of(0)
        if lowlevel is None or lines is None:
            await server.run_stdio_async()
        else:
            async with stdio_server(stdin=lines) as (read_stream, write_stream):
                await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
        tg.cancel_scope.cancel()


class StdinLines:
    """stdin's lines for the SDK's stdio_server, read when the pipe is readable: a cancellation
    (SIGTERM) stops the wait. Why: the SDK reads stdin on a worker thread, which nothing can
    stop, so a server whose host kept stdin open ignored SIGTERM and never saved its caches.
    Pipes, sockets and terminals only (a regular file cannot be waited on: the SDK reads it)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = b""

    @classmethod
    def of(cls, fd: int) -> "StdinLines | None":
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return None
        return cls(fd) if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) else None

    def __aiter__(self) -> "StdinLines":
        return self

    async def __anext__(self) -> str:
        while b"\n" not in self.buffer:
            await anyio.wait_readable(self.fd)
            chunk = os.read(self.fd, 1 << 16)  # readable: it does not block
            if not chunk:
                if not self.buffer:
                    raise StopAsyncIteration
                line, self.buffer = self.buffer, b""
                return line.decode("utf-8", errors="replace")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode("utf-8", errors="replace") + "\n"


def serve(settings: Settings) -> None:
    from mcp_semantic.models import ModelError

    try:  # before the transport starts: a bad model, a busy cache dir or a shared store out of reach is a clear message
        lock_cache_dir(settings.cache_dir)  # held until the process ends
        if settings.store is not None:
            open_store(settings).close()
        lm = load(settings)
        check_model(lm, settings.kv_bits_value)
    except (ModelError, CacheDirLocked, RequestError, UnsupportedCache, StoreUnavailable, OSError) as e:
        raise SystemExit(f"mcp-semantic: {e}") from None
    server = create_server(settings, lm)
    if settings.transport == "stdio":
        anyio.run(_serve_stdio, server)
    else:
        _serve_http(server, settings)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _serve_http(server: MCPServer, settings: Settings) -> None:
    """SSE or Streamable HTTP through uvicorn. On loopback the SDK checks Host and Origin
    (DNS rebinding); any other address needs --auth-token, checked on every request."""
    import uvicorn

    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    if settings.host not in LOOPBACK and not token:
        raise SystemExit(
            f"mcp-semantic: binding {settings.host} would let anyone on the network use your agents; "
            "set --auth-token (or MCP_SEMANTIC_AUTH_TOKEN), or bind 127.0.0.1"
        )
    if settings.transport == "sse":
        app = server.sse_app(host=settings.host)
    else:
        app = CancelOnDisconnect(server.streamable_http_app(host=settings.host))
    if token:
        app = BearerToken(app, token)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())


class BearerToken:
    """ASGI middleware: HTTP requests without `Authorization: Bearer <token>` get 401.

    Why not the SDK's auth: it is an OAuth 2.1 resource server (an issuer, token introspection);
    a local server shared on a LAN needs one shared secret. Compared in constant time."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = b'{"error": "unauthorized: send Authorization: Bearer <the server\'s --auth-token>"}'
                headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class CancelOnDisconnect:
    """ASGI middleware for Streamable HTTP: a request whose client goes away before its response
    is complete is cancelled, by a `notifications/cancelled` for it sent in as its client would
    (same session), so the engine stops it and the agent stays as it was.

    Why: the SDK keeps serving a request after its POST's connection drops, for a client that
    reconnects and has the stream replayed from an event store. This server keeps no event
    store, so nobody can receive that reply: a client killed 3 s into a 400-token call left it
    generating for 25 s, holding the agent, and its unreceived turn was committed."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:  # the body, to learn the request's id (a JSON-RPC message is small)
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        request_id = _request_id(body)
        answered = replayed = False

        async def receiving() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message["type"] == "http.disconnect" and not answered and request_id is not None:
                with anyio.CancelScope(shield=True):
                    await self._cancel(scope, request_id)
            return message

        async def sending(message: dict) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        await self.app(scope, receiving, sending)

    async def _cancel(self, scope: dict, request_id: Any) -> None:
        log.info("request %s: its client went away before the reply; cancelling it", request_id)
        keep = {b"host", b"origin", b"mcp-session-id", b"mcp-protocol-version"}
        headers = [(k, v) for k, v in scope["headers"] if k.lower() in keep]
        headers += [(b"content-type", b"application/json"), (b"accept", b"application/json, text/event-stream")]
        body = json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                           "params": {"requestId": request_id, "reason": "the client disconnected"}}).encode()
        sent = False

        async def receiving() -> dict:
            nonlocal sent
            message = {"type": "http.disconnect"} if sent else {"type": "http.request", "body": body, "more_body": False}
            sent = True
            return message

        async def discard(message: dict) -> None:
            pass

        await self.app({**scope, "headers": headers}, receiving, discard)


def _request_id(body: bytes) -> Any:
    """The id of the JSON-RPC request in a POST body; None for anything else (a notification, a
    response, a batch, not JSON)."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if isinstance(message, dict) and "method" in message and isinstance(message.get("id"), (str, int)):
        return message["id"]
    return None
