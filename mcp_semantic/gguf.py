"""GGUF files into mlx-lm directories: tensors renamed, config and tokenizer (with its chat
template) rebuilt from the file's metadata, written once per file under the cache dir. The
tokenizer is gguf_tokenizer.py's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import mlx_lm.utils
import numpy as np
from mlx_lm.models.rope_utils import initialize_rope

from mcp_semantic.gguf_tokenizer import build_tokenizer, read_vocab, special_ids, tokenizer_config
from mcp_semantic.models import DEFAULT_CONTEXT_LENGTH, ModelError, is_gguf

log = logging.getLogger(__name__)

LOADABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q6_K", "Q4_K", "Q2_K")
"""GGUF tensor types MLX's loader reads (measured with MLX 0.30, a tensor of each type written by
llama.cpp's `gguf` package): Q8_0, Q4_0 and Q4_1 stay quantized (MLX's own affine format, groups
of 32), BF16 and the K-quants here come back as float16. So a Q4_K_M file (Q4_K and Q6_K) loads,
Q5_K_M or Q3_K_M does not. MLX refuses Q5_0, Q5_1, Q3_K, Q5_K and the IQ types, and drops some
others without a word (TQ1_0, TQ2_0, MXFP4): why the types are checked here first."""

IMPORT_FORMAT = 2
"""Bump when the importer writes something different, so older imports are rebuilt."""
_IMPORT_MARKER = "gguf_import.json"


@dataclass(frozen=True)
class Family:
    """How llama.cpp writes one GGUF architecture, and the mlx-lm model it becomes."""

    model_type: str
    architecture: str
    block: dict[str, str]
    """llama.cpp's tensor names in a block -> mlx-lm's, after `model.layers.N.`"""
    interleaved_rope: bool = False
    """llama.cpp's convert script permutes Q and K rows for its interleaved rope (llama only)."""
    norm_shift: float = 0.0
    """What the convert script adds to every norm weight (Gemma's norms scale by 1 + weight)."""
    rope_tensors: tuple[str, ...] = ()
    """Tensors of rope frequencies rather than weights: read into the config."""


_LLAMA_BLOCK = {
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

FAMILIES = {
    # Llama, SmolLM, Mistral; llama.cpp's rope_freqs is Llama 3.1's rope scaling
    "llama": Family("llama", "LlamaForCausalLM", _LLAMA_BLOCK, interleaved_rope=True, rope_tensors=("rope_freqs",)),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCK),  # with Q/K/V biases
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", _LLAMA_BLOCK),  # with Q/K norms
    "gemma3": Family(
        "gemma3_text", "Gemma3ForCausalLM",
        {**_LLAMA_BLOCK, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
         "post_ffw_norm": "post_feedforward_layernorm"},
        norm_shift=1.0,
    ),
    # Q, K and V in one tensor, gate and up in another (ffn_up), as in mlx-lm's phi3; Phi-3's
    # long-context rope factors come as two tensors
    "phi3": Family(
        "phi3", "Phi3ForCausalLM",
        {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
        rope_tensors=("rope_factors_long", "rope_factors_short"),
    ),
}
"""The GGUF architectures the importer reads (`general.architecture`)."""

_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file of one of `FAMILIES` into an mlx-lm directory at `out_dir`; return `out_dir`.

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
    """A file holding tensors of a type MLX cannot load is a ModelError naming the types; so is one
    with float64 metadata, which MLX's GGUF reader (0.32) takes for 4 bytes where the file has 8: it
    loses its place in the file and crashes the process (a segfault). GGUF allows float64 values and
    llama.cpp's `gguf` writer writes them (add_float64), though its convert script writes float32."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(gguf_path)
        types = Counter(t.tensor_type.name for t in reader.tensors)
    except (ValueError, OSError, KeyError) as e:  # a damaged header; KeyError: a type this reader lacks
        raise ModelError(f"{gguf_path} has a GGUF header that cannot be read ({type(e).__name__}: {e})") from None
    if doubles := [name for name, field in reader.fields.items() if GGUFValueType.FLOAT64 in field.types]:
        raise ModelError(f"{gguf_path} has float64 metadata ({', '.join(doubles)}), which MLX's GGUF reader cannot "
                         "read (it would crash); load this model from its Hugging Face repo id instead.")
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
    if arch not in FAMILIES:
        raise ModelError(
            f"{gguf_path} holds a {arch!r} model; the GGUF importer handles the architectures "
            f"{', '.join(FAMILIES)} (Llama, SmolLM, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3, ...). For other models "
            "give an mlx-lm directory or a Hugging Face repo id (e.g. from mlx-community)."
        )
    family = FAMILIES[arch]
    rope = {name: np.array(tensors.pop(f"{name}.weight").astype(mx.float32))
            for name in family.rope_tensors if f"{name}.weight" in tensors}
    weights = {_mlx_name(k, family, gguf_path): v for k, v in tensors.items()}
    if "model.embed_tokens.weight" not in weights:
        raise ModelError(f"{gguf_path} has no token embeddings (token_embd.weight); the file looks incomplete.")
    if family.norm_shift:
        _unshift_norms(weights, family.norm_shift, gguf_path)
    vocab = read_vocab(meta, gguf_path)
    config = _gguf_config(meta, weights, rope, gguf_path, arch)
    config.update(special_ids(meta, vocab))
    tokenizer = build_tokenizer(meta, vocab, gguf_path)

    mlx_lm.utils.save_config(config, out / "config.json")
    _save_weights(weights, out)
    tokenizer.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config(meta, vocab, config), f, indent=2)


def _mlx_name(gguf_name: str, family: Family, gguf_path: Path) -> str:
    """llama.cpp's tensor name -> mlx-lm's; the suffix (.weight, .scales, .biases, .bias) is kept."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if base in _GGUF_TOP:
        return f"{_GGUF_TOP[base]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in family.block:
        return f"model.layers.{parts[1]}.{family.block[parts[2]]}.{suffix}"
    raise ModelError(
        f"{gguf_path} has tensor {gguf_name!r}, which the imported {family.model_type} model has no place for; "
        "load this model from its Hugging Face repo id instead."
    )


def _unshift_norms(weights: dict[str, mx.array], shift: float, gguf_path: Path) -> None:
    """Take back what llama.cpp's convert script added to every norm weight.

    Gemma's RMSNorm scales by 1 + weight and llama.cpp's by the weight, so convert_hf_to_gguf.py
    adds 1 to each weight whose name ends in "norm.weight"; mlx-lm's Gemma norms add the 1 themselves.
    """
    for name, w in weights.items():
        if not name.endswith("norm.weight"):
            continue
        if f"{name.removesuffix('.weight')}.scales" in weights:
            raise ModelError(f"{gguf_path} has the norm {name!r} quantized; llama.cpp never writes one so.")
        weights[name] = (w.astype(mx.float32) - shift).astype(w.dtype)


def _gguf_config(
    meta: dict[str, Any], weights: dict[str, mx.array], rope: dict[str, np.ndarray], gguf_path: Path, arch: str
) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"{gguf_path} lacks metadata '{arch}.{key}'; the file looks incomplete.")
        return value

    family = FAMILIES[arch]
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    config: dict[str, Any] = {
        "model_type": family.model_type,
        "architectures": [family.architecture],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(meta.get(f"{arch}.vocab_size") or weights["model.embed_tokens.weight"].shape[0]),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        # llama.cpp stores a llama's Q and K rows permuted for its interleaved ("traditional") rope
        "rope_traditional": family.interleaved_rope,
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "max_position_embeddings": int(get("context_length", DEFAULT_CONTEXT_LENGTH)),
    }
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None and arch != "phi3":  # Phi-3's rope dimension count is its rotary part only
        head_dim = meta.get(f"{arch}.rope.dimension_count")
    head_dim = int(head_dim or hidden // heads)
    if head_dim != hidden // heads or arch in ("qwen3", "gemma3"):  # their configs always name it
        config["head_dim"] = head_dim
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
    if arch == "phi3":
        config.update(_phi3_config(meta, rope_dims, head_dim, config, gguf_path))
    if arch == "gemma3":
        config.update(_gemma3_config(meta, config, gguf_path))
    config.update(_rope_scaling(meta, rope, rope_dims, config, gguf_path, arch))
    if any(k.endswith(".bias") for k in weights if ".self_attn." in k):
        config["attention_bias"] = True
    if any(k.endswith(".bias") for k in weights if ".mlp." in k):
        config["mlp_bias"] = True

    quantized = [k.removesuffix(".scales") for k in weights if k.endswith(".scales")]
    if quantized:
        # MLX reads GGUF's Q4_0/Q4_1/Q8_0 blocks of 32 as affine groups of 32, so bits is the
        # ratio of packed weight words to scales. mlx-lm infers each layer's own group size and
        # bits from its shapes and leaves layers without scales unquantized, so a top-level
        # default is all a mix of types needs.
        bits = Counter(weights[f"{k}.weight"].shape[-1] // weights[f"{k}.scales"].shape[-1] for k in quantized)
        config["quantization"] = {"group_size": 32, "bits": int(bits.most_common(1)[0][0])}
    return config


def _gemma3_config(meta: dict[str, Any], config: dict[str, Any], gguf_path: Path) -> dict[str, Any]:
    """Gemma 3 as llama.cpp runs it (llama-model.cpp, which the file does not spell out): with a
    sliding window, five local layers to each global one, the local ones' rope unscaled with base
    10000; queries scaled by 1/sqrt(head_dim), the 27B's (62 layers) by 1/sqrt(hidden / heads)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if meta.get(f"gemma3.{key}"):
            raise ModelError(f"{gguf_path} has gemma3.{key}, which mlx-lm's gemma3_text does not apply.")
    window = int(meta.get("gemma3.attention.sliding_window") or 0)
    per_head = config["hidden_size"] // config["num_attention_heads"]
    return {
        "sliding_window": window or config["max_position_embeddings"],
        "sliding_window_pattern": 6 if window else 1,  # 1: every layer global
        "rope_local_base_freq": _float32(meta.get("gemma3.rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": per_head if config["num_hidden_layers"] == 62 else config["head_dim"],
    }


def _phi3_config(meta: dict[str, Any], rope_dims: int, head_dim: int, config: dict[str, Any],
                 gguf_path: Path) -> dict[str, Any]:
    if head_dim != config["hidden_size"] // config["num_attention_heads"]:
        raise ModelError(f"{gguf_path}: a phi3 head of {head_dim} is not hidden size / heads, as mlx-lm's phi3 needs.")
    extra: dict[str, Any] = {}
    if rope_dims != head_dim:  # Phi-4-mini rotates part of each head
        extra["partial_rotary_factor"] = rope_dims / head_dim
        if int(head_dim * extra["partial_rotary_factor"]) != rope_dims:
            raise ModelError(f"{gguf_path}: mlx-lm's phi3 cannot rotate {rope_dims} of a head's {head_dim} dimensions.")
    if "phi3.rope.scaling.original_context_length" in meta:
        extra["original_max_position_embeddings"] = int(meta["phi3.rope.scaling.original_context_length"])
    return extra


def _rope_scaling(meta: dict[str, Any], rope: dict[str, np.ndarray], rope_dims: int, config: dict[str, Any],
                  gguf_path: Path, arch: str) -> dict[str, Any]:
    """mlx-lm's rope_scaling from the file's rope metadata and rope tensors, or a ModelError."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind not in (None, "none", "linear"):
        raise ModelError(f"{gguf_path} uses rope scaling {kind!r}, which the GGUF importer does not handle.")
    # llama.cpp scales linearly by a factor the file gives without a type
    linear = kind == "linear" or (kind is None and factor not in (None, 0.0, 1.0))
    if linear and rope:
        raise ModelError(f"{gguf_path} has both linear rope scaling and {', '.join(rope)}, "
                         "which mlx-lm cannot combine.")
    if "rope_freqs" in rope:
        original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))  # the convert script's default
        scaling = _llama3_rope(rope["rope_freqs"], config["rope_theta"], rope_dims, original, gguf_path)
        return {"rope_scaling": scaling} if scaling else {}
    if rope:
        return _phi3_longrope(meta, rope, rope_dims, config, gguf_path)
    if linear:
        if factor is None:
            raise ModelError(f"{gguf_path} lacks metadata '{arch}.rope.scaling.factor'; the file looks incomplete.")
        return {"rope_scaling": {"type": "linear", "factor": float(factor)}}
    return {}


def _llama3_rope(factors: np.ndarray, base: float, dims: int, original: int, gguf_path: Path) -> dict[str, Any] | None:
    """Llama 3.1's rope scaling from llama.cpp's rope_freqs tensor, checked against it.

    llama.cpp's convert script turns the config's factor, low_freq_factor, high_freq_factor and
    original_max_position_embeddings into one divisor per rope frequency and keeps none of the
    numbers; mlx-lm wants the numbers. High frequencies keep a divisor of 1, low ones `factor`;
    between, 1 / divisor moves from 1 to 1 / factor linearly in 1 / wavelength, a line that gives
    the low and high frequency factors back. Then mlx-lm's own rope must give every divisor again.
    """
    name = f"{gguf_path}'s rope_freqs"
    if factors.shape != (dims // 2,) or not np.all(np.isfinite(factors)) or factors.min() <= 0:
        raise ModelError(f"{name} (shape {factors.shape}) is not {dims // 2} positive rope frequency divisors.")
    if np.all(factors == 1.0):
        return None  # no scaling at all
    factor = float(factors.max())
    if factor <= 1.0:
        raise ModelError(f"{name} is not Llama 3's rope scaling, which divides low frequencies by a factor over 1.")
    wavelength = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    # 1 where a frequency is kept, 0 where it is divided by factor, in between (Llama 3's "smooth")
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
    band = (smooth > 1e-3) & (smooth < 1 - 1e-3)
    if band.sum() < 2:
        raise ModelError(f"{name} has {band.sum()} frequencies between the kept and the scaled ones: too few to tell "
                         "Llama 3's rope scaling from it; load this model from its Hugging Face repo id instead.")
    # smooth = (original / wavelength - low) / (high - low)
    slope, intercept = np.polyfit(1 / wavelength[band], smooth[band], 1)
    low = -intercept * original / slope
    scaling = {
        "rope_type": "llama3",
        "factor": _float32(factor),
        "low_freq_factor": float(f"{low:.6g}"),
        "high_freq_factor": float(f"{low + original / slope:.6g}"),
        "original_max_position_embeddings": original,
    }
    periods = base ** (np.arange(0, dims, 2) / dims)  # what mlx's rope divides positions by
    got = np.array(initialize_rope(dims, base, False, scaling, original)._freqs)
    if not np.allclose(got, periods * factors, rtol=1e-4, atol=0):
        raise ModelError(f"{name} is not Llama 3's rope scaling (the closest, {scaling}, gives other frequencies); "
                         "load this model from its Hugging Face repo id instead.")
    return scaling


def _phi3_longrope(meta: dict[str, Any], rope: dict[str, np.ndarray], rope_dims: int, config: dict[str, Any],
                   gguf_path: Path) -> dict[str, Any]:
    """Phi-3's long-context rope ("longrope"): per-frequency factors for long and short contexts.

    mlx-lm always uses the long ones (as with the Hugging Face model), where llama.cpp picks by the
    context it runs with; both scale queries and keys by the same attention factor, checked here.
    """
    long, short = rope.get("rope_factors_long"), rope.get("rope_factors_short")
    original = meta.get("phi3.rope.scaling.original_context_length")
    if long is None or short is None or original is None:
        raise ModelError(f"{gguf_path} has Phi-3 rope factors without both long and short ones and "
                         "phi3.rope.scaling.original_context_length; the file looks incomplete.")
    if long.shape != (rope_dims // 2,) or short.shape != (rope_dims // 2,):
        raise ModelError(f"{gguf_path}: Phi-3 rope factors of {long.shape} and {short.shape}, "
                         f"for {rope_dims // 2} frequencies.")
    scale = config["max_position_embeddings"] / int(original)
    expected = math.sqrt(1 + math.log(scale) / math.log(int(original))) if scale > 1 else 1.0
    attn_factor = meta.get("phi3.rope.scaling.attn_factor")
    if attn_factor is not None and not math.isclose(float(attn_factor), expected, rel_tol=1e-5):
        raise ModelError(f"{gguf_path} scales Phi-3's attention by {attn_factor}, mlx-lm would by {expected}.")
    return {"rope_scaling": {"type": "longrope", "long_factor": [_float32(v) for v in long],
                             "short_factor": [_float32(v) for v in short]}}


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
