"""The systems that run_all.py compares, each behind the same calls: `new(name, system)` starts
a conversation; `ask(name, message, max_tokens) -> Turn` appends a user message and the greedy
reply (each system keeps its own); `restart()` drops what the process holds in memory; `close()`.
Ours and MlxServer take asks for different conversations from several threads at once.

    Ours       the engine in this process; a restart closes it and opens one on the same cache dir
    MlxPlain   mlx_lm.stream_generate, no cache between turns: every turn prefills it all
    MlxServer  `python -m mlx_lm server`: a prompt cache in memory only (none after a restart)
    LlamaCpp   llama-cpp-python on the same GGUF file, fed our chat template's token ids:
               in-context prefix reuse, and LlamaDiskCache (a state saved after each completion)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mcp_semantic  # noqa: F401  (OpenBLAS before MLX)
import anyio.from_thread
import mlx.core as mx
import mlx_lm
import mlx_lm.utils

from mcp_semantic import blas
from mcp_semantic.calls import AskRequest
from mcp_semantic.models import LoadedModel
from mcp_semantic.server import open_engine
from mcp_semantic.settings import Settings

Messages = list[dict[str, str]]


@dataclass
class Turn:
    ttft_ms: float
    total_ms: float
    reply: str
    prompt_tokens: int
    generated: int
    cached: int | None = None  # prompt tokens reused from a cache, where the system says
    tier: str | None = None  # ours: where its cache came from


def chat_prompt(lm: LoadedModel, messages: Messages) -> list[int]:
    """The token ids every system reads: our tokenizer's chat template, generation prompt added."""
    return list(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def streamed(pieces: Iterator[str], start: float) -> tuple[float, float, str]:
    """(TTFT ms, total ms, text) of a stream of text pieces: TTFT at the first non-empty one."""
    first, parts = None, []
    for text in pieces:
        if text and first is None:
            first = time.perf_counter()
        parts.append(text)
    end = time.perf_counter()
    return ((first or end) - start) * 1000, (end - start) * 1000, "".join(parts)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def rss_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    """A process's resident memory (VmRSS) or its peak (VmHWM), from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Ours:
    """The engine, called through a blocking portal so that threads can ask it at once."""

    def __init__(self, settings: Settings, lm: LoadedModel):
        self.settings, self.lm = settings, lm
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self.engine = open_engine(settings, lm)
        self._systems: dict[str, str] = {}

    def new(self, name: str, system: str) -> None:
        self._systems[name] = system  # the engine creates the agent on its first call

    def ask(self, name: str, message: str, max_tokens: int) -> Turn:
        req = AskRequest(name, message, system=self._systems.pop(name, None), max_tokens=max_tokens)
        r = self._portal.call(self.engine.ask, req)
        t = r.tokens
        return Turn(r.timings_ms.ttft, r.timings_ms.total, r.reply, t.context, t.generated, t.cached, r.tier)

    def list_agents(self) -> Any:
        self._portal.call(self.engine.flush)
        return self._portal.call(self.engine.list_agents)

    def restart(self) -> None:
        self._portal.call(self.engine.aclose)  # writes every unsaved block
        mx.clear_cache()  # MLX's freed buffers go back, as a new process would start without them
        self.engine = open_engine(self.settings, self.lm)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._portal.call(self.engine.aclose)
        self._portal_cm.__exit__(None, None, None)


class MlxPlain:
    """mlx-lm as a stateless caller uses it: the whole conversation is prefilled every turn."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm  # the engine's own model object: same weights, same dtype
        self.conversations: dict[str, Messages] = {}

    def new(self, name: str, system: str) -> None:
        self.conversations[name] = [{"role": "system", "content": system}]

    def ask(self, name: str, message: str, max_tokens: int) -> Turn:
        messages = self.conversations[name]
        messages.append({"role": "user", "content": message})
        prompt, counts = chat_prompt(self.lm, messages), []
        start = time.perf_counter()
        stream = mlx_lm.stream_generate(self.lm.model, self.lm.tokenizer, prompt, max_tokens=max_tokens)
        ttft, total, reply = streamed((counts.append(r.generation_tokens) or r.text for r in stream), start)
        messages.append({"role": "assistant", "content": reply})
        return Turn(ttft, total, reply, len(prompt), counts[-1] if counts else 0, 0)

    def restart(self) -> None:
        """Nothing to drop: no cache is kept between turns."""

    def close(self) -> None:
        """Nothing to free: the model is the engine's."""


def float32_model_dir(lm: LoadedModel, out: Path) -> Path:
    """The engine's weights (float32 on a CPU) as an mlx-lm directory, for mlx_lm.server.

    Why: the imported default model is Q4_1; mlx_lm.server would run it quantized, and MLX's
    quantized matmuls on a CPU are many times slower than the float32 ones the engine runs.
    """
    if mx.default_device() != mx.cpu:
        return lm.path  # the engine runs the weights as stored
    out.mkdir(parents=True, exist_ok=True)
    mlx_lm.utils.save_model(out, lm.model)
    config = json.loads((lm.path / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    mlx_lm.utils.save_config(config, out / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (lm.path / f).exists():
            shutil.copy(lm.path / f, out / f)
    return out


class MlxServer:
    """`python -m mlx_lm server` in a subprocess, on OpenAI chat completions with streaming."""

    def __init__(self, model_dir: Path, lm: LoadedModel, log: Path, decode_concurrency: int = 4, timeout_s: float = 180):
        import httpx2

        self.model_dir, self.lm, self.log = model_dir, lm, log
        self.decode_concurrency, self.timeout_s = decode_concurrency, timeout_s
        self.conversations: dict[str, Messages] = {}
        self.proc: subprocess.Popen | None = None
        self.client = httpx2.Client(timeout=httpx2.Timeout(600.0, connect=10.0))
        self._start()

    def _start(self) -> None:
        with socket.socket() as sock:  # a free port
            sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if blas.loaded:  # the same BLAS as ours: MLX's bundled one is ~20x slower
            env["LD_PRELOAD"] = blas.loaded
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(self.model_dir), "--port", self.url.rsplit(":", 1)[1],
               "--decode-concurrency", str(self.decode_concurrency), "--log-level", "WARNING"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Poll /health, then a 1-token request: the model loads in the server's generation thread."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                if self.client.get(self.url + "/health", timeout=2).status_code == 200:
                    body = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
                    self.client.post(self.url + "/v1/completions", json=body, timeout=max(1, deadline - time.monotonic()))
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"mlx_lm.server did not answer within {self.timeout_s:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def new(self, name: str, system: str) -> None:
        self.conversations[name] = [{"role": "system", "content": system}]

    def ask(self, name: str, message: str, max_tokens: int) -> Turn:
        messages = self.conversations[name]
        messages.append({"role": "user", "content": message})
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        usage: dict[str, Any] = {}

        def pieces(resp) -> Iterator[str]:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage.update(chunk.get("usage") or {})
                    yield from ((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or [])

        start = time.perf_counter()
        with self.client.stream("POST", self.url + "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            ttft, total, reply = streamed(pieces(resp), start)
        messages.append({"role": "assistant", "content": reply})
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return Turn(ttft, total, reply, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), cached)

    def peak_rss(self) -> int:
        return rss_bytes(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """A new process: its prompt cache is gone (it keeps none on disk)."""
        self.stop()
        self._start()

    def close(self) -> None:
        self.stop()
        self.client.close()


def llama_cpp_unavailable() -> str | None:
    """Why llama-cpp-python (and diskcache, which LlamaDiskCache needs) cannot be used, or None."""
    try:
        import diskcache  # noqa: F401
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a missing or broken build
        return f"cannot import llama_cpp: {type(e).__name__}: {e}"
    return None


def _without_weight_repacking() -> None:
    """Load models without llama.cpp's extra buffer types (weight repacking, AMX). Why: on this
    VM's AMX CPU (Sapphire Rapids) a source build's AMX matmul segfaults on the first decode;
    the plain CPU kernels (AVX-512) run the same GGUF."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params
    if default.__name__ != "no_repacking":

        def no_repacking():
            params = default()
            params.use_extra_bufts = False
            return params

        C.llama_model_default_params = no_repacking


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on the same GGUF file, one context, conversations in turn."""

    def __init__(self, gguf: Path, lm: LoadedModel, cache_dir: Path | None, n_ctx: int = 8192):
        _without_weight_repacking()
        self.gguf, self.lm, self.cache_dir, self.n_ctx = gguf, lm, cache_dir, n_ctx
        self.conversations: dict[str, Messages] = {}
        self._open()

    def _open(self) -> None:
        from llama_cpp import Llama, LlamaDiskCache

        self.llm = Llama(model_path=str(self.gguf), n_ctx=self.n_ctx, n_threads=os.cpu_count(), verbose=False)
        if self.cache_dir is not None:
            self.llm.set_cache(LlamaDiskCache(str(self.cache_dir), capacity_bytes=64 << 30))

    def new(self, name: str, system: str) -> None:
        self.conversations[name] = [{"role": "system", "content": system}]

    def ask(self, name: str, message: str, max_tokens: int, disk: bool = True) -> Turn:
        """`disk=False` skips the disk cache for this call: only the in-context prefix is reused
        (with it attached, every call first reads the longest-prefix state from disk)."""
        messages = self.conversations[name]
        messages.append({"role": "user", "content": message})
        prompt = chat_prompt(self.lm, messages)
        cache, self.llm.cache = self.llm.cache, (self.llm.cache if disk else None)
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # LlamaDiskCache prints debug lines
                start = time.perf_counter()
                stream = self.llm.create_completion(prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
                ttft, total, reply = streamed((c["choices"][0]["text"] for c in stream), start)
        finally:
            self.llm.cache = cache
        messages.append({"role": "assistant", "content": reply})
        generated = len(self.lm.tokenizer.encode(reply, add_special_tokens=False))
        return Turn(ttft, total, reply, len(prompt), generated)

    def clear_disk_cache(self) -> None:
        if self.llm.cache is not None:
            self.llm.cache.cache.clear()

    def restart(self) -> None:
        """A new Llama on the same cache dir: the in-context KV is gone, the disk cache stays."""
        self.llm.close()
        self._open()

    def close(self) -> None:
        self.llm.close()
        if self.llm.cache is not None:
            self.llm.cache.cache.close()
