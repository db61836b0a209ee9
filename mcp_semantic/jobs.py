"""A call as the engine holds it: queued for the engine thread (`Job`), then an ask call
started there (`Running`: reading its prompt, then decoding in the batch); and `post`, which
hands results back to the caller's event loop from the engine thread; `wait_for_exit`, for the
engine thread's end; `forwarding_progress`, which brings a call's progress reports from there."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import mlx.core as mx

from mcp_semantic.batch import Row
from mcp_semantic.caches import Checkpoints, Tier
from mcp_semantic.calls import AskRequest
from mcp_semantic.models import HarmonyReader, harmony_tokens
from mcp_semantic.store import Agent

T = TypeVar("T")


@dataclass
class Job:
    """A call waiting for the engine thread. `agents`: those it names (it runs after their
    earlier calls); None: every agent. `req` is set for ask calls, `fn` for the others."""

    token: Any
    agents: frozenset[str] | None
    fn: Callable[[], Any] | None = None
    req: AskRequest | None = None
    report: Callable[[float, float, str], None] | None = None
    submitted: float = field(default_factory=time.perf_counter)
    done: anyio.Event = field(default_factory=anyio.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    fresh: frozenset[str] = frozenset()  # agents whose lease it took anew: another server may have served them


@dataclass
class Running:
    """An ask call the engine has started: reading its prompt (`pending`, into `cache`), then
    decoding in the batch (`row`)."""

    job: Job
    agent: Agent
    messages: list[dict[str, str]]
    prompt: list[int]
    max_new: int
    sampler: Callable[[mx.array], mx.array]
    started: float
    tier: Tier = "new"
    reuse: int = 0
    cache_load: float = 0.0
    cache: list[Any] | None = None
    checkpoints: Checkpoints = field(default_factory=dict)  # recurrent states at block ends (caches.py)
    turn: int = 0  # with recurrent layers: where the prompt's generation prompt (the reply's turn) begins
    kept: int = 0  # with recurrent layers: prompt tokens whose blocks are kept with their states already
    pending: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    row: Row | None = None  # set once it decodes in the batch
    generated: list[int] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    longest_pause: float = 0.0
    opened: bool = False  # its prompt ends inside a thinking block (models.thinking_opened)
    detokenizer: Any = None  # the reply's text so far, for progress messages (text_so_far); a HarmonyReader for gpt-oss
    detokenized: int = 0  # tokens of `generated` it has taken

    def text_so_far(self, tokenizer: Any) -> str:
        """The reply as written so far, for progress messages (hosts show the answer growing):
        a streaming detokenizer of its own (mlx-lm's `detokenizer` is a copy) takes each token once.

        A harmony reply (gpt-oss) shows its final channel's text once that starts, and before only
        how far the reasoning has got: so the message is always the beginning of the `reply` the
        call returns, and the analysis channel, which OpenAI says is not meant for end users (hosts
        show progress messages to them), comes only in the result's `reasoning`."""
        if self.detokenizer is None:
            harmony = harmony_tokens(tokenizer)
            self.detokenizer = HarmonyReader(tokenizer, harmony, self.prompt) if harmony else tokenizer.detokenizer
        for token in self.generated[self.detokenized:]:
            self.detokenizer.add_token(token)
        self.detokenized = len(self.generated)
        if isinstance(self.detokenizer, HarmonyReader):
            answer = self.detokenizer.final_text()
            return f"reasoning, {len(self.generated)} tokens so far" if answer is None else answer
        return self.detokenizer.text


def post(token: Any, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on the caller's event loop; a loop that has gone away is not an error."""
    try:
        anyio.from_thread.run_sync(fn, *args, token=token)
    except (anyio.RunFinishedError, anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError):
        pass


ProgressFn = Callable[[float, float, str], Awaitable[None]]


async def forwarding_progress(run: Callable[[Callable[[float, float, str], None]], Awaitable[T]], on_progress: ProgressFn) -> T:
    """`run(report)`, each report(done, total, message) it makes on the engine thread passed on to
    `on_progress` on this event loop, in order."""
    token = anyio.lowlevel.current_token()
    send, receive = anyio.create_memory_object_stream[tuple[float, float, str]](64)

    def report(done: float, total: float, message: str) -> None:
        post(token, send.send_nowait, (done, total, message))

    async def forward() -> None:
        async with receive:
            async for item in receive:
                await on_progress(*item)

    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward)
        try:
            result = await run(report)
        except Exception as e:  # raised below, not wrapped in the task group's ExceptionGroup
            error = e
        finally:
            send.close()
    if error is not None:
        raise error
    return result


def wait_for_exit(native_id: int | None, timeout_s: float = 2.0) -> None:
    """Wait until a thread has ended for the OS too, past its C++ thread-local destructors.

    Why: MLX keeps a compile cache per thread (mlx-lm compiles its activations) whose destructor
    takes the GIL, and Python's join returns before those destructors run; a process that
    finalizes meanwhile aborts ("terminate called without an active exception"). Linux lists a
    live thread under /proc; elsewhere a short sleep, which lets go of the GIL, has to do."""
    task = Path(f"/proc/self/task/{native_id}")
    if not task.parent.is_dir():
        time.sleep(0.05)
        return
    deadline = time.monotonic() + timeout_s
    while task.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
