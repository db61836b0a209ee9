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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mcp_semantic.tiny_model import CORPUS

import gguf  # noqa: I001  after mcp_semantic: OpenBLAS goes first
import mlx.core as mx
import numpy as np

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
# writing a model folder as llama.cpp's convert_hf_to_gguf.py would, with its own writer


def _permute(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp's convert_hf_to_gguf permutation of Q and K rows (for its interleaved rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


IMPORTED = ("llama", "qwen2", "qwen3", "gemma3", "phi3")
"""The architectures the importer reads; a file of another is written with llama's tensor names."""


def gguf_tensors(model_dir: Path, architecture: str) -> dict[str, mx.array]:
    """The folder's weights under llama.cpp's names (from the `gguf` package's own name map), a
    llama's Q and K rows permuted, Gemma's norms plus 1: what the convert script does."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[architecture if architecture in IMPORTED else "llama"]
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


def _rope_parameters(config: dict) -> dict:
    """TextModel.__init__'s rope_parameters: the rope scaling, rope_theta (and a local one) mirrored in."""
    rope = dict(config.get("rope_parameters", config.get("rope_scaling")) or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        local = next((config[k] for k in ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                                          "rope_local_base_freq") if k in config), None)
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and config.get("rope_theta") is not None:
            rope["rope_theta"] = config["rope_theta"]
        if "rope_type" not in rope and (rope_type := rope.get("type")) is not None:
            rope["rope_type"] = rope_type
    return rope


def add_parameters(writer: gguf.GGUFWriter, config: dict, ftype: gguf.LlamaFileType) -> None:
    """The config as the convert script's set_gguf_parameters adds it for the writer's architecture:
    TextModel's, then LlamaModel's, Gemma3Model's additions; Phi3MiniModel's own."""
    c, rope = config, _rope_parameters(config)
    if writer.arch == "phi3":
        n_embd, n_head = c["hidden_size"], c["num_attention_heads"]
        writer.add_context_length(c["max_position_embeddings"])
        writer.add_rope_scaling_orig_ctx_len(c["original_max_position_embeddings"])
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(c["intermediate_size"])
        writer.add_block_count(c["num_hidden_layers"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(c["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
        writer.add_rope_dimension_count(int(c.get("partial_rotary_factor", 1.0) * n_embd) // n_head)
        writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
        writer.add_file_type(ftype)
        writer.add_sliding_window(c.get("sliding_window") or 0)  # 0: not Phi-4
        if scaling := c.get("rope_scaling"):  # generate_extra_tensors; the factor tensors are the test's
            assert scaling.get("rope_type", scaling.get("type")) in ("su", "longrope")
            original = c["original_max_position_embeddings"]
            scale = c["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        return

    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    params = rope.get("full_attention", rope)
    if (rope_type := params.get("rope_type")) is not None:
        if rope_type == "linear" and params.get("factor") is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(params["factor"])
        elif rope_type in ("su", "longrope"):
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        # llama3: a rope_freqs tensor (generate_extra_tensors), which the tests give
    if (theta := params.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(local)
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if (head_dim := c.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(ftype)

    if writer.arch == "llama":
        writer.add_vocab_size(c["vocab_size"])
        writer.add_rope_dimension_count(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    if writer.arch == "gemma3":  # written again, over TextModel's (the writer warns of each)
        writer.add_context_length(c.get("max_position_embeddings", 131072))
        writer.add_head_count(c.get("num_attention_heads", 8))
        writer.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
        writer.add_key_length(c.get("head_dim", 256))
        writer.add_value_length(c.get("head_dim", 256))
        writer.add_rope_freq_base(params.get("rope_theta", 1_000_000.0))
        if final_logit_softcap := c.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(final_logit_softcap)
        if c.get("sliding_window_pattern") != 1:
            writer.add_sliding_window(c["sliding_window"])
        writer.add_head_count_kv(c.get("num_key_value_heads", 4))


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


@dataclass
class Gpt2Vocab:
    """A byte-level BPE vocabulary as _set_vocab_gpt2 writes it: get_vocab_base's tokens and types,
    and gguf.SpecialVocab's merges, special token ids, add_bos/add_eos and chat template."""

    pre: str
    tokens: list[str]
    types: list[gguf.TokenType]
    special: gguf.SpecialVocab

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)


def gpt2_vocab(model_dir: Path, pre: str) -> Gpt2Vocab:
    """The folder's byte-level BPE tokenizer as llama.cpp writes it, under the pre-tokenizer `pre`
    (the convert script's would come from a hash of known tokenizers' output)."""
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    reverse = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {t["id"]: t for t in tok["added_tokens"]}
    reverse.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(config.get("vocab_size", len(reverse))):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added and (added[i]["special"] or _looks_special(reverse[i])):
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            tokens.append(reverse[i].replace("\u2581", " "))
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return Gpt2Vocab(pre, tokens, types, gguf.SpecialVocab(model_dir, load_merges=True))


def write_gguf(model_dir: Path, path: Path, architecture: str = "llama",
               extra: Callable[[gguf.GGUFWriter], None] | None = None, pre: str = "gpt-2",
               vocab: Gpt2Vocab | SpmVocab | None = None, tensors: dict | None = None, name: str = "Tiny",
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> Path:
    """The tiny model at `model_dir` as llama.cpp's converter writes it, with the `gguf` package's
    GGUFWriter (ModelBase.write): its tensors renamed (and `tensors`), float32 or, for a `qtype`
    such as Q8_0, that type but for 1-D tensors and norms; then the metadata through the writer's
    add_* methods in the convert script's order, the tokenizer (the folder's own byte-level BPE
    unless `vocab` is given) last; then `extra`, a function given the writer, to add or overwrite keys."""
    config = json.loads((model_dir / "config.json").read_text())
    writer = gguf.GGUFWriter(path, architecture)
    for key, w in {**gguf_tensors(model_dir, architecture), **(tensors or {})}.items():  # prepare_tensors
        data = np.array(mx.array(w).astype(mx.float32))
        data_qtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or key.endswith("_norm.weight") else qtype
        writer.add_tensor(key, gguf.quants.quantize(data, data_qtype), raw_dtype=data_qtype)
    ftype = {gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
             gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
             gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer.add_type(gguf.GGUFType.MODEL)  # prepare_metadata
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    add_parameters(writer, config, ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    (vocab or gpt2_vocab(model_dir, pre)).add_to_gguf(writer)  # set_vocab
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
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


@dataclass
class SpmVocab:
    """A SentencePiece vocabulary as the convert script writes it (_set_vocab_sentencepiece)."""

    tokens: list[str]
    scores: list[float]
    types: list[gguf.TokenType]
    bos: int
    eos: int
    unk: int
    add_space_prefix: bool
    template: str

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        """_set_vocab_sentencepiece: the tokens as UTF-8 bytes, their scores and types; then what its
        gguf.SpecialVocab reads from a Llama 2 or Gemma tokenizer_config.json (the special tokens'
        ids, a BOS added and no EOS, the chat template); then, with no space prefix, what Gemma3Model's
        set_vocab adds (Llama 2's and Mistral's files leave it out: llama.cpp's default is true)."""
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([t.encode("utf-8") for t in self.tokens])
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        writer.add_bos_token_id(self.bos)
        writer.add_eos_token_id(self.eos)
        writer.add_unk_token_id(self.unk)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(self.template)
        if not self.add_space_prefix:
            writer.add_add_space_prefix(False)


def spm_vocab(sp, add_space_prefix: bool = True, template: str = GEMMA_TEMPLATE) -> SpmVocab:
    """The SentencePiece model as llama.cpp's convert script takes it (_create_vocab_sentencepiece),
    the user-defined tokens as an added_tokens.json would give them (score -1000)."""
    tokens = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    types = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
             else gguf.TokenType.USER_DEFINED if tokens[i] in SPM_USER_DEFINED else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    scores = [-1000.0 if k == gguf.TokenType.USER_DEFINED else sp.get_score(i) for i, k in enumerate(types)]
    return SpmVocab(tokens, scores, types, sp.bos_id(), sp.eos_id(), sp.unk_id(), add_space_prefix, template)


def llama_cpp_spm(text: str, vocab: SpmVocab, rstrip: frozenset[str] = frozenset()) -> list[int]:
    """llama.cpp's tokenize of a SentencePiece vocabulary (llama-vocab.cpp), parse_special on, no BOS.

    Control, unknown and user-defined tokens are cut out of the text first, longest first (and
    the whitespace after those in `rstrip` dropped); a text fragment at the start or after one
    of them gets a space in front when add_space_prefix; spaces become ▁; then symbols of one
    character merge, the adjacent pair whose joined text is the best-scoring token first (the
    leftmost on a tie); what is left outside the vocabulary becomes byte tokens.
    """
    tokens, types, scores = vocab.tokens, vocab.types, vocab.scores
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
            prefix = " " if vocab.add_space_prefix and after_special else ""
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
