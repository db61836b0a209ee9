"""GGUF files as llama.cpp writes them, for test_gguf.py and test_gguf_tokenizer.py: a tiny
mlx-lm folder's tensors, config and byte-level BPE vocabulary under llama.cpp's names; a
SentencePiece model trained on the tiny corpus, written as llama.cpp writes one; and llama.cpp's
SentencePiece tokenizer, ported, to check the imported tokenizers against.
"""

from __future__ import annotations

import heapq
import io
import json
import math
import random
from pathlib import Path

from mcp_semantic.tiny_model import CORPUS

import gguf  # noqa: I001  after mcp_semantic: OpenBLAS goes first
import mlx.core as mx

TEXTS = [
    "Hello, world!",
    "  two spaces,\ttabs\n\nand newlines  ",
    "Digits 1234567 and 3.14159",
    "Ünïcödé — 日本語 🎉",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x**2",
]
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPM_CONTROL = ["[INST]", "[/INST]", "<start_of_turn>", "<end_of_turn>", "<|end|>", "<|user|>"]
SPM_USER_DEFINED = ["<think>"]


# ---------------------------------------------------------------------------------------------
# writing a model folder as llama.cpp's convert_hf_to_gguf.py would


def _permute(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp's convert_hf_to_gguf permutation of Q and K rows (for its interleaved rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model_dir: Path, architecture: str) -> dict[str, mx.array]:
    """The folder's weights under llama.cpp's names (from the `gguf` package's own name map), a
    llama's Q and K rows permuted, Gemma's norms plus 1: what the convert script does."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[architecture]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    tensors = {}
    for key, w in mx.load(str(model_dir / "model.safetensors")).items():
        base, suffix = key.rsplit(".", 1)
        if architecture == "llama" and base.endswith("self_attn.q_proj"):
            w = _permute(w, config["num_attention_heads"])
        elif architecture == "llama" and base.endswith("self_attn.k_proj"):
            w = _permute(w, config["num_key_value_heads"])
        if architecture == "gemma3" and base.endswith("norm"):
            w = w + 1
        tensors[f"{names.get_name(base)}.{suffix}"] = w
    return tensors


def gguf_metadata(model_dir: Path, architecture: str) -> dict:
    """The folder's config as llama.cpp writes it under the architecture's name."""
    config = json.loads((model_dir / "config.json").read_text())
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    f32 = lambda v: mx.array(v, dtype=mx.float32)  # noqa: E731
    p = architecture if architecture in ("qwen2", "qwen3", "gemma3", "phi3") else "llama"
    meta = {
        "general.architecture": architecture,
        f"{p}.block_count": u32(config["num_hidden_layers"]),
        f"{p}.embedding_length": u32(config["hidden_size"]),
        f"{p}.feed_forward_length": u32(config["intermediate_size"]),
        f"{p}.attention.head_count": u32(config["num_attention_heads"]),
        f"{p}.attention.head_count_kv": u32(config["num_key_value_heads"]),
        f"{p}.attention.layer_norm_rms_epsilon": f32(config["rms_norm_eps"]),
        f"{p}.rope.freq_base": f32(config["rope_theta"]),
        f"{p}.context_length": u32(config["max_position_embeddings"]),
    }
    if "head_dim" in config:
        meta[f"{p}.attention.key_length"] = meta[f"{p}.attention.value_length"] = u32(config["head_dim"])
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "linear":
        meta[f"{p}.rope.scaling.type"] = "linear"
        meta[f"{p}.rope.scaling.factor"] = f32(scaling["factor"])
    if architecture == "gemma3":
        meta["gemma3.attention.sliding_window"] = u32(config["sliding_window"])
    if architecture == "phi3":
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        meta["phi3.rope.dimension_count"] = u32(int(config.get("partial_rotary_factor", 1.0) * head_dim))
        meta["phi3.attention.sliding_window"] = u32(0)
        if "original_max_position_embeddings" in config:
            original = config["original_max_position_embeddings"]
            meta["phi3.rope.scaling.original_context_length"] = u32(original)
            scale = config["max_position_embeddings"] / original
            meta["phi3.rope.scaling.attn_factor"] = f32(math.sqrt(1 + math.log(scale) / math.log(original)))
    return meta


def gpt2_vocab(model_dir: Path, pre: str) -> dict:
    """The folder's byte-level BPE tokenizer as llama.cpp writes it."""
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tok["added_tokens"]})
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]],
        "tokenizer.ggml.token_type": mx.array([3 if t in special else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.padding_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"],
    }


def write_gguf(model_dir: Path, path: Path, architecture: str = "llama", extra: dict | None = None,
               pre: str = "gpt-2", vocab: dict | None = None, tensors: dict | None = None) -> Path:
    """The tiny model at `model_dir` as llama.cpp's converter writes it: tensors renamed, metadata
    under the architecture's name, the tokenizer (its own byte-level BPE unless `vocab` is given)."""
    meta = {**gguf_metadata(model_dir, architecture), **(vocab or gpt2_vocab(model_dir, pre)), **(extra or {})}
    mx.save_gguf(str(path), {**gguf_tensors(model_dir, architecture), **(tensors or {})}, meta)
    return path


# ---------------------------------------------------------------------------------------------
# SentencePiece: a real model trained on the tiny corpus, and llama.cpp's tokenizer ported


def train_sentencepiece():
    """A SentencePiece BPE model as Llama's and Mistral's: byte fallback, digits split, spaces
    kept, a dummy prefix; with control symbols and a user-defined one."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=proto, model_type="bpe", vocab_size=512,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, control_symbols=SPM_CONTROL,
        user_defined_symbols=SPM_USER_DEFINED, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


def spm_vocab(sp, add_space_prefix: bool = True, name: str = "Tiny", template: str = GEMMA_TEMPLATE) -> dict:
    """The SentencePiece model as llama.cpp's convert script writes it (_create_vocab_sentencepiece)."""
    tokens = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if tokens[i] in SPM_USER_DEFINED else 1 for i in range(len(tokens))]
    return {
        "general.name": name,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": mx.array([sp.get_score(i) for i in range(len(tokens))], dtype=mx.float32),
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(sp.bos_id(), dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(sp.eos_id(), dtype=mx.uint32),
        "tokenizer.ggml.unknown_token_id": mx.array(sp.unk_id(), dtype=mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(True),
        "tokenizer.ggml.add_eos_token": mx.array(False),
        "tokenizer.ggml.add_space_prefix": mx.array(add_space_prefix),
        "tokenizer.chat_template": template,
    }


def llama_cpp_spm(text: str, vocab: dict, rstrip: frozenset[str] = frozenset()) -> list[int]:
    """llama.cpp's tokenize of a SentencePiece vocabulary (llama-vocab.cpp), parse_special on, no BOS.

    Control, unknown and user-defined tokens are cut out of the text first, longest first (and
    the whitespace after those in `rstrip` dropped); a text fragment at the start or after one
    of them gets a space in front when add_space_prefix; spaces become ▁; then symbols of one
    character merge, the adjacent pair whose joined text is the best-scoring token first (the
    leftmost on a tie); what is left outside the vocabulary becomes byte tokens.
    """
    tokens, types = vocab["tokenizer.ggml.tokens"], vocab["tokenizer.ggml.token_type"].tolist()
    scores = vocab["tokenizer.ggml.scores"].tolist()
    ids = {t: i for i, t in enumerate(tokens)}
    fragments: list[str | int] = [text] if text else []
    for special in sorted((i for i, k in enumerate(types) if k in (2, 3, 4)), key=lambda i: -len(tokens[i])):
        cut: list[str | int] = []
        for f in fragments:
            while isinstance(f, str) and (k := f.find(tokens[special])) >= 0:
                cut += [f[:k], special] if k else [special]
                f = f[k + len(tokens[special]):]
                if tokens[special] in rstrip:
                    f = f.lstrip(" \t\n\v\f\r")
            if f != "":
                cut.append(f)
        fragments = cut
    output, after_special = [], True
    for f in fragments:
        if isinstance(f, int):
            output.append(f)
        else:
            prefix = " " if vocab["tokenizer.ggml.add_space_prefix"].item() and after_special else ""
            output += _spm_merge((prefix + f).replace(" ", "\u2581"), ids, scores)
        after_special = isinstance(f, int)
    return output


def _spm_merge(text: str, ids: dict[str, int], scores: list[float]) -> list[int]:
    """llm_tokenizer_spm_session: symbols [text, prev, next] in a list, merged by a priority queue."""
    symbols = [[c, i - 1, i + 1 if i + 1 < len(text) else -1] for i, c in enumerate(text)]
    queue: list[tuple[float, int, int, int]] = []

    def bigram(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and (joined := symbols[left][0] + symbols[right][0]) in ids:
            heapq.heappush(queue, (-scores[ids[joined]], left, right, len(joined)))

    for i in range(1, len(symbols)):
        bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not symbols[left][0] or not symbols[right][0] or len(symbols[left][0] + symbols[right][0]) != size:
            continue  # one of them merged since
        symbols[left][0] += symbols[right][0]
        symbols[right][0] = ""
        symbols[left][2] = symbols[right][2]
        if symbols[right][2] >= 0:
            symbols[symbols[right][2]][1] = left
        bigram(symbols[left][1], left)
        bigram(left, symbols[left][2])
    out = []
    for text, _, _ in symbols:
        if text:
            out += [ids[text]] if text in ids else [ids[f"<0x{b:02X}>"] for b in text.encode()]
    return out


def tricky_texts(seed: int = 0, n: int = 300) -> list[str]:
    """Leading and repeated spaces, newlines and tabs, digits, unicode the vocabulary lacks (byte
    fallback), a literal ▁, special tokens inside words; and random mixes of them and the corpus."""
    texts = [*TEXTS, "", " ", "  ", "\n", " leading", "  two leading", "trailing  ", "\n\nnewlines\n",
             "tabs\tand\rreturns", "emoji 🎉🦙 and ñ", "digits 1234567890", "[INST] hi [/INST]", "a<think>b",
             "<think>\nplan</think>", "ends with control[/INST]", "literal \u2581 mark", "<s>bos</s> text",
             "<start_of_turn>user\nhi<end_of_turn>\n", "<|user|>\n  hello<|end|>\n<|assistant|>"]
    rnd = random.Random(seed)
    words = CORPUS.split(" ")
    pieces = [" ", "  ", "\n", "\t", "é", "日本", "🎉", "\u2581", "42", *SPM_CONTROL, *SPM_USER_DEFINED,
              "<s>", "</s>"]
    for _ in range(n):
        parts = [rnd.choice(words) if rnd.random() < 0.6 else rnd.choice(pieces) for _ in range(rnd.randint(1, 10))]
        texts.append(rnd.choice(["", " "]).join(parts))
    return texts
