"""GGUF import: tiny random-weight models written as llama.cpp's convert script writes them
(gguf_files.py), imported, and checked against the same weights loaded as an mlx-lm folder.
The tokenizers on their own: test_gguf_tokenizer.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from gguf_files import TEXTS, gguf_tensors, llama_cpp_spm, spm_vocab, tricky_texts, write_gguf
from mcp_semantic import models
from mcp_semantic.gguf import _gemma3_config, _llama3_rope, import_gguf
from mcp_semantic.models import LoadedModel, ModelError, load_model
from mcp_semantic.tiny_model import make_tiny_model

import gguf  # noqa: I001  after mcp_semantic: OpenBLAS goes first
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate_step

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(model: nn.Module, prompt: list[int], max_tokens: int = 16) -> list[int]:
    return [int(token) for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]


def assert_same_model(imported: LoadedModel, original: LoadedModel, prompt: list[int]) -> None:
    """Tight float32 logits and the same greedy tokens, on the same token ids."""
    x = mx.array(prompt)[None]
    a, b = np.array(imported.model(x)), np.array(original.model(x))
    assert a.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)  # logits of std 3; permuted rows sum in another order
    assert greedy(imported.model, prompt) == greedy(original.model, prompt)


# ---------------------------------------------------------------------------------------------
# llama, qwen2, qwen3 with byte-level BPE


def test_import_float_gguf_matches_original(tiny, tiny_model_dir, tmp_path):
    gguf_path = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    imported = load_model(str(gguf_path), cache)
    assert imported.path.parent == cache / "models" and imported.path.name.startswith("tiny-")
    config = json.loads((imported.path / "config.json").read_text())
    assert config["rope_traditional"] is True and "quantization" not in config and "rope_scaling" not in config
    assert config["rms_norm_eps"] == 1e-5 and config["eos_token_id"] == 2

    prompt = tiny.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert imported.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True) == prompt
    for t in TEXTS:
        assert imported.tokenizer.encode(t) == tiny.tokenizer.encode(t)
    # Permuted Q/K rows with rope_traditional compute the same attention as the original.
    assert_same_model(imported, tiny, prompt)
    # The same file resolves to the same directory, imported once.
    assert models.resolve_model_dir(str(gguf_path), cache) == imported.path


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_import_qwen_ggufs_matches_the_same_weights_in_mlx_lm(family: str, tmp_path: Path) -> None:
    """Qwen2 (Q/K/V biases) and Qwen3 (Q/K norms) GGUF files, their rope not permuted, their
    tokenizer's own split: the same logits and greedy tokens as the mlx-lm folder."""
    model_dir = make_tiny_model(tmp_path / family, model_type=family)
    original = load_model(str(model_dir), tmp_path / "c0")
    imported = load_model(str(write_gguf(model_dir, tmp_path / f"{family}.gguf", architecture=family, pre="qwen2")),
                          tmp_path / "cache")
    config = json.loads((imported.path / "config.json").read_text())
    assert config["model_type"] == family and config["rope_traditional"] is False
    prompt = original.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert_same_model(imported, original, prompt)
    assert imported.tokenizer.encode("Qwen splits 123 digits one by one.") == [
        *original.tokenizer.encode("Qwen splits "), *[original.tokenizer.encode(d)[0] for d in "123"],
        *original.tokenizer.encode(" digits one by one.")]



# ---------------------------------------------------------------------------------------------
# Gemma 3


def test_import_gemma3_gguf_matches_the_same_weights_in_mlx_lm(sentencepiece, tmp_path):
    """Gemma 3 as llama.cpp writes it: norms plus 1, post-attention and post-feedforward norms, Q/K
    norms, five sliding-window layers to one global (rope base 1e6, scaled linearly; local 10000),
    tied embeddings, a SentencePiece vocabulary without the space prefix, turns ending with
    <end_of_turn>. The same logits and greedy tokens as the mlx-lm folder, llama.cpp's tokens."""
    model_dir = make_tiny_model(tmp_path / "gemma", model_type="gemma3_text",
                                config_overrides={"rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    original = load_model(str(model_dir), tmp_path / "c0")
    vocab = spm_vocab(sentencepiece, add_space_prefix=False)
    imported = load_model(str(write_gguf(model_dir, tmp_path / "gemma.gguf", "gemma3", vocab=vocab)), tmp_path / "c1")

    config = json.loads((imported.path / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["rope_traditional"] is False
    assert (config["sliding_window"], config["sliding_window_pattern"]) == (24, 6)
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1_000_000.0, 10_000.0)
    assert config["rope_scaling"] == {"type": "linear", "factor": 8.0}
    assert config["query_pre_attn_scalar"] == config["head_dim"] == 16
    end_of_turn = sentencepiece.piece_to_id("<end_of_turn>")
    assert imported.tokenizer.eos_token_ids == {sentencepiece.eos_id(), end_of_turn}

    prompt = imported.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    text = "<s><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    assert prompt == llama_cpp_spm(text, vocab) and prompt[0] == sentencepiece.bos_id()
    assert_same_model(imported, original, prompt)
    for t in tricky_texts(n=100):
        assert imported.tokenizer.encode(t, add_special_tokens=False) == llama_cpp_spm(t, vocab), t


def test_gemma3_config_follows_llama_cpp() -> None:
    """What llama.cpp decides for Gemma 3 beyond the file: the 27B (62 layers) scales queries by
    hidden / heads, not head_dim; without a sliding window every layer is global."""
    config = {"hidden_size": 5376, "num_attention_heads": 32, "num_hidden_layers": 62, "head_dim": 128,
              "max_position_embeddings": 131072}
    big = _gemma3_config({"gemma3.attention.sliding_window": 1024}, config, Path("g.gguf"))
    assert (big["query_pre_attn_scalar"], big["sliding_window"], big["sliding_window_pattern"]) == (168, 1024, 6)
    small = _gemma3_config({}, {**config, "num_hidden_layers": 34}, Path("g.gguf"))
    assert (small["query_pre_attn_scalar"], small["sliding_window_pattern"]) == (128, 1)
    with pytest.raises(ModelError, match="final_logit_softcapping"):
        _gemma3_config({"gemma3.final_logit_softcapping": 30.0}, config, Path("g.gguf"))


# ---------------------------------------------------------------------------------------------
# Phi-3


def make_phi3(tiny_model_dir: Path, out: Path, **overrides) -> Path:
    """A tiny Phi-3 mlx-lm folder: the tiny llama's weights with Q, K, V fused into qkv_proj and
    gate, up into gate_up_proj, as Phi-3 keeps them (the same computation: neither ropes permuted)."""
    weights = mx.load(str(tiny_model_dir / "model.safetensors"))
    fused = {}
    for key, w in weights.items():
        if ".q_proj." in key:
            fused[key.replace("q_proj", "qkv_proj")] = mx.concatenate(
                [weights[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
        elif ".gate_proj." in key:
            fused[key.replace("gate_proj", "gate_up_proj")] = mx.concatenate(
                [w, weights[key.replace("gate_proj", "up_proj")]])
        elif not any(p in key for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            fused[key] = w
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), fused, metadata={"format": "mlx"})
    config = json.loads((tiny_model_dir / "config.json").read_text())
    # as Phi-3's configs, an original context (the convert script requires one)
    config.update(model_type="phi3", architectures=["Phi3ForCausalLM"],
                  original_max_position_embeddings=config["max_position_embeddings"])
    config.update(overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    return out


@pytest.mark.parametrize("long_context", [False, True])
def test_import_phi3_gguf_matches_the_same_weights_in_mlx_lm(tiny_model_dir, tiny, long_context, tmp_path):
    """Phi-3 as llama.cpp writes it: Q, K and V in one attn_qkv, gate and up in one ffn_up, the
    rope not permuted; Phi-3-128k's long-context rope as two factor tensors."""
    overrides = {}
    if long_context:
        rng = np.random.default_rng(0)
        overrides = {"original_max_position_embeddings": 512, "rope_scaling": {
            "type": "longrope", "long_factor": (1 + 3 * rng.random(8)).astype(np.float32).tolist(),
            "short_factor": (1 + rng.random(8)).astype(np.float32).tolist()}}
    model_dir = make_phi3(tiny_model_dir, tmp_path / "phi3", **overrides)
    original = load_model(str(model_dir), tmp_path / "c0")
    tensors = {}
    if long_context:
        tensors = {f"rope_factors_{k}.weight": mx.array(overrides["rope_scaling"][f"{k}_factor"])
                   for k in ("long", "short")}
    path = write_gguf(model_dir, tmp_path / "phi3.gguf", "phi3", tensors=tensors)
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(gguf_tensors(model_dir, "phi3"))
    imported = load_model(str(path), tmp_path / "c1")

    config = json.loads((imported.path / "config.json").read_text())
    assert config["model_type"] == "phi3" and config["rope_traditional"] is False
    if long_context:
        assert config["original_max_position_embeddings"] == 512
        assert config["rope_scaling"]["type"] == "longrope"
        assert type(imported.model.layers[0].self_attn.rope).__name__ == "SuScaledRoPE"
    assert_same_model(imported, original, tiny.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True))


# ---------------------------------------------------------------------------------------------
# Llama 3.1's rope_freqs


def llama3_rope_freqs(base: float, dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: the rope_freqs tensor."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize("base, dim, factor, low, high, original", [
    (500_000.0, 128, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 8B, 70B, 405B; 3.3 70B
    (500_000.0, 64, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
    (500_000.0, 128, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 3B
])
def test_llama3_rope_scaling_is_recovered_from_rope_freqs(base, dim, factor, low, high, original):
    """The numbers the convert script turned into rope_freqs come back exactly."""
    got = _llama3_rope(llama3_rope_freqs(base, dim, factor, low, high, original), base, dim, 8192, Path("l.gguf"))
    assert got == {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": original}


def test_import_llama31_gguf_with_rope_freqs_matches_mlx_lm(tmp_path):
    """A Llama 3.1-style model (llama3 rope scaling) written as llama.cpp does, a rope_freqs tensor
    and no rope metadata: imported with the rope scaling that gives the same frequencies."""
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 128}  # the tiny head's 8 frequencies: 2 in between
    model_dir = make_tiny_model(tmp_path / "llama31", config_overrides={"rope_scaling": scaling})
    original = load_model(str(model_dir), tmp_path / "c0")
    freqs = llama3_rope_freqs(10000.0, 16, 4.0, 1.0, 8.0, 128)
    assert sorted(set(freqs.tolist()))[1:-1]  # some divisors between 1 and the factor
    path = write_gguf(model_dir, tmp_path / "llama31.gguf", tensors={"rope_freqs.weight": mx.array(freqs)})
    imported = load_model(str(path), tmp_path / "c1")
    config = json.loads((imported.path / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_scaling"]["factor"] == 4.0
    prompt = original.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert_same_model(imported, original, prompt)
    # Without the rope scaling, the model is another one: the test can tell.
    plain = load_model(str(make_tiny_model(tmp_path / "plain")), tmp_path / "c2")
    x = mx.array(prompt)[None]
    assert not np.allclose(np.array(plain.model(x)), np.array(imported.model(x)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("freqs, error", [
    (np.ones(8, np.float32), None),  # no scaling at all
    (np.linspace(1, 4, 8, dtype=np.float32)[::-1].copy(), "is not Llama 3's rope scaling"),
    (np.ones(5, np.float32), "is not 8 positive rope frequency divisors"),
    (np.array([1, 1, 1, 1, 1, 1, 4, 4], np.float32), "too few"),
])
def test_a_rope_freqs_tensor_is_used_exactly_or_refused(tiny_model_dir, tmp_path, freqs, error):
    path = write_gguf(tiny_model_dir, tmp_path / "rope.gguf", tensors={"rope_freqs.weight": mx.array(freqs)})
    if error is None:
        config = json.loads((import_gguf(path, tmp_path / "out") / "config.json").read_text())
        assert "rope_scaling" not in config
    else:
        with pytest.raises(ModelError, match=f"rope_freqs.*{error}"):
            import_gguf(path, tmp_path / "out")
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# quantized files


def write_q8_0_gguf(model_dir: Path, path: Path, architecture: str) -> Path:
    """The model as the convert script's Q8_0 file (--outtype q8_0): 2-D weights Q8_0, norms float32."""
    return write_gguf(model_dir, path, architecture, qtype=gguf.GGMLQuantizationType.Q8_0)


@pytest.mark.parametrize("architecture", ["llama", "gemma3", "phi3"])
def test_a_q8_0_gguf_is_the_model_of_its_dequantized_weights(tiny_model_dir, architecture, tmp_path):
    """A quantized file (fused Phi-3 tensors, Gemma's tied embedding, all Q8_0) is stored quantized
    and, loaded as the server loads it on the CPU (dequantized), computes what the mlx-lm folder
    does with each weight rounded through Q8_0."""
    from mlx.utils import tree_flatten

    model_dir = {"llama": lambda: tiny_model_dir, "phi3": lambda: make_phi3(tiny_model_dir, tmp_path / "phi3"),
                 "gemma3": lambda: make_tiny_model(tmp_path / "gemma", model_type="gemma3_text")}[architecture]()
    imported = load_model(str(write_q8_0_gguf(model_dir, tmp_path / "q8.gguf", architecture)), tmp_path / "c1")
    assert json.loads((imported.path / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8}
    stored = mx.load(str(imported.path / "model.safetensors"))
    assert all(f"{k.removesuffix('.weight')}.scales" in stored for k, w in stored.items() if k.endswith("proj.weight"))

    def q8_0(w: mx.array) -> mx.array:
        if w.ndim != 2:
            return w
        q = gguf.quants.quantize(np.array(w), gguf.GGMLQuantizationType.Q8_0)
        return mx.array(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape))

    original = load_model(str(model_dir), tmp_path / "c0")
    original.model.load_weights([(k, q8_0(v)) for k, v in tree_flatten(original.model.parameters())])
    prompt = original.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert_same_model(imported, original, prompt)


# ---------------------------------------------------------------------------------------------
# metadata as MLX reads it


def test_mlx_reads_each_metadata_type_as_llama_cpp_writes_it(tmp_path):
    """What the importer sees of a file's metadata (mx.load): llama.cpp's integers, float32s and bools
    as 0-d arrays of their own type, strings as str (token bytes decoded), arrays of numbers as 1-D
    arrays, arrays of strings as lists; `.item()`, `.tolist()` give Python's. (float64 crashes MLX's
    reader: the importer refuses it, test_float64_metadata_is_refused_before_mlx_reads_it.)"""
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    scalars = [("uint8", 200, mx.uint8), ("int8", -100, mx.int8), ("uint16", 60000, mx.uint16),
               ("int16", -30000, mx.int16), ("uint32", 4_000_000_000, mx.uint32), ("int32", -2_000_000_000, mx.int32),
               ("uint64", 2**40, mx.uint64), ("int64", -(2**40), mx.int64), ("float32", 0.5, mx.float32),
               ("bool", True, mx.bool_)]
    for kind, value, _ in scalars:
        getattr(writer, f"add_{kind}")(f"test.{kind}", value)
    writer.add_name("Ünïcödé")
    writer.add_token_list([b"\xe2\x96\x81a", "<0x0A>"])  # SentencePiece's as bytes, BPE's as str
    writer.add_token_types([gguf.TokenType.NORMAL, gguf.TokenType.BYTE])
    writer.add_token_scores([0.5, -1000.0])
    writer.add_array("test.bools", [True, False])
    writer.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    _, meta = mx.load(str(path), return_metadata=True)
    for kind, value, dtype in scalars:
        got = meta[f"test.{kind}"]
        assert isinstance(got, mx.array) and (got.ndim, got.dtype, got.item()) == (0, dtype, value), kind
        assert type(got.item()) is type(value), kind
    assert (meta["general.architecture"], meta["general.name"]) == ("llama", "Ünïcödé")
    assert meta["tokenizer.ggml.tokens"] == ["\u2581a", "<0x0A>"]
    types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    assert (types.ndim, types.dtype, types.tolist()) == (1, mx.int32, [1, 6])
    assert (scores.ndim, scores.dtype, scores.tolist()) == (1, mx.float32, [0.5, -1000.0])
    assert meta["test.bools"].tolist() == [True, False]


# ---------------------------------------------------------------------------------------------
# files refused


def test_import_refuses_other_architectures(tiny_model_dir, tmp_path):
    gguf_path = write_gguf(tiny_model_dir, tmp_path / "gpt2.gguf", architecture="gpt2")
    with pytest.raises(ModelError, match="'gpt2'.*handles the architectures llama, qwen2, qwen3, gemma3, phi3"):
        import_gguf(gguf_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2.gguf"]  # no temporary directory left


def test_import_refuses_what_mlx_lm_cannot_run(tiny_model_dir, tmp_path):
    """A tensor the model has no place for, a rope scaling mlx-lm lacks: errors naming them."""
    path = write_gguf(tiny_model_dir, tmp_path / "a.gguf", tensors={"blk.0.attn_rot_embd.weight": mx.zeros((4,))})
    with pytest.raises(ModelError, match="tensor 'blk.0.attn_rot_embd.weight'.*no place for"):
        import_gguf(path, tmp_path / "out")
    path = write_gguf(tiny_model_dir, tmp_path / "b.gguf",
                      extra=lambda writer: writer.add_rope_scaling_type(gguf.RopeScalingType.YARN))
    with pytest.raises(ModelError, match="rope scaling 'yarn'"):
        import_gguf(path, tmp_path / "out")
    path = write_gguf(tiny_model_dir, tmp_path / "c.gguf", extra=lambda writer: writer.add_rope_scaling_factor(2.0),
                      tensors={"rope_freqs.weight": mx.ones((8,))})
    with pytest.raises(ModelError, match="both linear rope scaling and rope_freqs"):
        import_gguf(path, tmp_path / "out")


def test_float64_metadata_is_refused_before_mlx_reads_it(tiny_model_dir, tmp_path):
    """GGUF has float64 values, and llama.cpp's writer writes them (add_float64; its convert script
    writes float32): MLX's reader takes them for 4 bytes, loses its place and crashes the process.
    The importer refuses such a file, naming the keys, before MLX reads it."""
    path = write_gguf(tiny_model_dir, tmp_path / "f64.gguf",
                      extra=lambda writer: writer.add_float64("llama.rope.freq_base", 10000.0))
    with pytest.raises(ModelError, match=r"float64 metadata \(llama\.rope\.freq_base\)"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_gguf_of_a_type_mlx_cannot_load_is_an_error_naming_it(tmp_path):
    """MLX refuses some GGUF tensor types and drops others without a word: the importer names them
    all before it reads a byte, and writes nothing."""
    path = tmp_path / "mixed.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(np.ones((4, 64), np.float32), gguf.GGMLQuantizationType.Q5_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.TQ1_0][1]
    writer.add_tensor("blk.0.attn_k.weight", np.zeros((2, size), np.uint8), raw_shape=(2, size),
                      raw_dtype=gguf.GGMLQuantizationType.TQ1_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"types MLX cannot load: Q5_0 \(1 tensors\), TQ1_0 \(1 tensors\)\. It loads F32"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
