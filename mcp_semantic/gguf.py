"""GGUF files into mlx-lm directories: tensors renamed, config and tokenizer (with its chat
template) rebuilt from the file's metadata, written once per file under the cache dir.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import mlx_lm.utils
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from mcp_semantic.models import DEFAULT_CONTEXT_LENGTH, ModelError, is_gguf

log = logging.getLogger(__name__)

LOADABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q6_K", "Q4_K", "Q2_K")
"""GGUF tensor types MLX's loader reads (measured with MLX 0.30, a tensor of each type written by
llama.cpp's `gguf` package): Q8_0, Q4_0 and Q4_1 stay quantized (MLX's own affine format, groups
of 32), BF16 and the K-quants here come back as float16. So a Q4_K_M file (Q4_K and Q6_K) loads,
Q5_K_M or Q3_K_M does not. MLX refuses Q5_0, Q5_1, Q3_K, Q5_K and the IQ types, and drops some
others without a word (TQ1_0, TQ2_0, MXFP4): why the types are checked here first."""

IMPORT_FORMAT = 1
"""Bump when the importer writes something different, so older imports are rebuilt."""
_IMPORT_MARKER = "gguf_import.json"

# GGUF architecture -> (mlx-lm model type, its class in config.json). Their tensors are llama's,
# with Qwen2's Q/K/V biases and Qwen3's Q/K norms; llama.cpp permutes Q and K rows for its
# interleaved rope only for "llama" (Llama, SmolLM, Mistral), not for the Qwens (NeoX rope).
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# llama.cpp tensor names -> mlx-lm names; the suffix (.weight, .scales, .biases, .bias) is kept.
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
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
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
    # Qwen2's and Qwen3's tokenizer.json split (llama.cpp runs a rewrite of the same regex)
    "qwen2": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
                behavior="isolated",
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
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
    if not is_gguf(gguf_path):
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
            raise ModelError(f"{gguf_path} does not convert to an mlx-lm model: {e}") from e
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


def check_tensor_types(gguf_path: Path) -> None:
    """A file holding tensors of a type MLX cannot load is a ModelError naming the types."""
    from gguf import GGUFReader

    try:
        types = Counter(t.tensor_type.name for t in GGUFReader(gguf_path).tensors)
    except (ValueError, OSError, KeyError) as e:  # a damaged header; KeyError: a type this reader lacks
        raise ModelError(f"{gguf_path} has a GGUF header that cannot be read ({type(e).__name__}: {e})") from None
    if bad := {k: n for k, n in types.items() if k not in LOADABLE}:
        listed = ", ".join(f"{k} ({n} tensors)" for k, n in sorted(bad.items()))
        raise ModelError(f"{gguf_path} holds tensors of types MLX cannot load: {listed}. It loads "
                         f"{', '.join(LOADABLE)}: pick a file of one of those (e.g. Q4_K_M, Q4_0 or Q8_0).")


def _write_mlx_lm_dir(gguf_path: Path, out: Path) -> None:
    check_tensor_types(gguf_path)
    try:
        tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"MLX cannot read {gguf_path}: {e}") from e
    meta = {k: (v.item() if isinstance(v, mx.array) and v.ndim == 0 else v) for k, v in meta.items()}

    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"{gguf_path} holds a {arch!r} model; the GGUF importer handles the architectures "
            f"{', '.join(ARCHITECTURES)} (Llama, SmolLM, Qwen2, Qwen3, ...). For other models give an "
            "mlx-lm directory or a Hugging Face repo id (e.g. from mlx-community)."
        )
    weights = {_mlx_name(k, gguf_path): v for k, v in tensors.items()}
    config = _gguf_config(meta, weights, gguf_path, arch)
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
        f"{gguf_path} has tensor {gguf_name!r}{hint}, which the imported model has no place for; "
        "load this model from its Hugging Face repo id instead."
    )


def _gguf_config(meta: dict[str, Any], weights: dict[str, mx.array], gguf_path: Path, arch: str) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"{gguf_path} lacks metadata '{arch}.{key}'; the file looks incomplete.")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    config: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch][0],
        "architectures": [ARCHITECTURES[arch][1]],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(meta.get(f"{arch}.vocab_size") or weights["model.embed_tokens.weight"].shape[0]),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        # llama.cpp stores a llama's Q and K rows permuted for its interleaved ("traditional") rope
        "rope_traditional": arch == "llama",
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "max_position_embeddings": int(get("context_length", DEFAULT_CONTEXT_LENGTH)),
    }
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    if head_dim and int(head_dim) != hidden // heads or arch == "qwen3":  # Qwen3's config always names it
        config["head_dim"] = int(head_dim or hidden // heads)
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
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
