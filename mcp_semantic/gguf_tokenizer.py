"""A GGUF file's tokenizer rebuilt from its metadata, as llama.cpp runs it, for mlx-lm's
tokenizer.json and tokenizer_config.json: byte-level BPE split as tokenizer.ggml.pre names, or
SentencePiece's BPE; the special tokens, the BOS and EOS added, the tokens generation ends on.

Built with `tokenizers`, not transformers' GGUF converter: that is private API that changes
between releases, needs torch to read the file, and does not split digits singly as SmolLM does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from mcp_semantic.models import ModelError

# Llama 3's split (llama.cpp runs a rewrite of the same regex)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's and Qwen3's tokenizer.json split (llama.cpp runs a rewrite of the same regex)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


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
    "qwen2": lambda: _split(_QWEN2_SPLIT),
    "llama-bpe": lambda: _split(_LLAMA3_SPLIT),
    "llama3": lambda: _split(_LLAMA3_SPLIT),
    "llama-v3": lambda: _split(_LLAMA3_SPLIT),
    "dbrx": lambda: _split(_LLAMA3_SPLIT),
    "smaug-bpe": lambda: _split(_LLAMA3_SPLIT),
}
# llama.cpp's Llama 3 splits: a piece that is a whole token is that token, whatever the merges
# would make of it (tokenizers' ignore_merges); and a BOS unless the file says otherwise.
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")

# Token types (tokenizer.ggml.token_type, llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4  # (5: unused, 6: a byte, <0xNN>)

# Tokens llama.cpp ends generation on, by their text (llama-vocab.cpp), and makes control tokens.
_END_OF_GENERATION = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
)


@dataclass
class Vocab:
    """A GGUF file's vocabulary, with llama.cpp's defaults where the file is silent."""

    kind: str | None  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SentencePiece), ...
    tokens: list[str]
    types: list[int]
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool


def read_vocab(meta: dict[str, Any], gguf_path: Path) -> Vocab:
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelError(f"{gguf_path} has no tokenizer (tokenizer.ggml.tokens); the file looks incomplete.")
    # llama.cpp names empty tokens so, and makes the tokens it ends generation on control tokens
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    types = [_NORMAL] * len(tokens)
    if "tokenizer.ggml.token_type" in meta:
        types = meta["tokenizer.ggml.token_type"].tolist()
    if len(types) != len(tokens):
        raise ModelError(f"{gguf_path} has {len(tokens)} tokens and {len(types)} token types.")
    types = [_CONTROL if t in _END_OF_GENERATION else k for t, k in zip(tokens, types)]

    spm = kind == "llama"
    defaults = {"bos": 1, "eos": 2, "unk": 0} if spm else {}  # llama.cpp's, for SentencePiece

    def token_id(key: str, name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else defaults.get(name)

    add_bos = spm or (kind == "gpt2" and meta.get("tokenizer.ggml.pre") in _LLAMA3_PRE)
    return Vocab(
        kind=kind, tokens=tokens, types=types,
        bos=token_id("bos_token_id", "bos"), eos=token_id("eos_token_id", "eos"),
        unk=token_id("unknown_token_id", "unk"), pad=token_id("padding_token_id", "pad"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )


def special_ids(meta: dict[str, Any], vocab: Vocab) -> dict[str, Any]:
    """bos_token_id and eos_token_id for config.json; the latter all the tokens generation ends on.

    That is the file's eos, its eot and eom tokens, and those llama.cpp also ends generation on
    by their text (<|eot_id|>, <end_of_turn>, ...) that the chat template writes: Gemma's files
    name <eos> as eos, but a turn ends with <end_of_turn>.
    """
    ids: dict[str, Any] = {}
    if vocab.bos is not None:
        ids["bos_token_id"] = vocab.bos
    stops = [vocab.eos] if vocab.eos is not None else []
    for key in ("eot_token_id", "eom_token_id"):
        if (value := meta.get(f"tokenizer.ggml.{key}")) is not None and 0 <= int(value) < len(vocab.tokens):
            stops.append(int(value))
    template = meta.get("tokenizer.chat_template") or ""
    stops += [i for i, t in enumerate(vocab.tokens) if t in _END_OF_GENERATION and t in template]
    stops = list(dict.fromkeys(stops))
    if stops:
        ids["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return ids


def build_tokenizer(meta: dict[str, Any], vocab: Vocab, gguf_path: Path) -> Tokenizer:
    """Rebuild the tokenizer a GGUF file describes, with `tokenizers`, as llama.cpp runs it."""
    pre = meta.get("tokenizer.ggml.pre")
    if vocab.kind == "gpt2" and pre in _PRE_TOKENIZERS and "tokenizer.ggml.merges" in meta:
        tokenizer = _byte_level_bpe(meta, vocab, pre)
    elif vocab.kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, vocab, gguf_path)
    else:
        raise ModelError(
            f"{gguf_path} has a tokenizer the GGUF importer does not handle (model {vocab.kind!r}, "
            f"pre-tokenizer {pre!r}; handled: SentencePiece ('llama') and byte-level BPE ('gpt2') with "
            f"pre-tokenizer {', '.join(sorted(_PRE_TOKENIZERS))}). "
            "Load this model from its Hugging Face repo id instead."
        )
    tokenizer.post_processor = _post_processor(vocab)
    _add_special_tokens(tokenizer, meta, vocab)
    if tokenizer.get_vocab_size() != len(vocab.tokens):
        raise ModelError(
            f"{gguf_path}: the rebuilt tokenizer has {tokenizer.get_vocab_size()} tokens, the file {len(vocab.tokens)}."
        )
    return tokenizer


def _byte_level_bpe(meta: dict[str, Any], vocab: Vocab, pre: str) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    model = BPE(ids, merges, ignore_merges=True) if pre in _LLAMA3_PRE else BPE(ids, merges)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any], vocab: Vocab, gguf_path: Path) -> Tokenizer:
    """SentencePiece's BPE as llama.cpp runs it (llama-vocab.cpp, llm_tokenizer_spm).

    There, spaces become "▁", and a "▁" goes before the text that starts the input or follows a
    special token (unless add_space_prefix is false, as in Gemma's files); then, from single
    characters, the adjacent pair whose joined text is the highest-scoring token merges, until
    none does; a character outside the vocabulary becomes its UTF-8 bytes, tokens <0xNN>. A
    `tokenizers` BPE with byte fallback and merges ranked by those scores does the same (as
    transformers' GGUF converter builds it), its normalizer doing the "▁".
    """
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(vocab.tokens):
        raise ModelError(f"{gguf_path} has a SentencePiece vocabulary without a score for each token "
                         "(tokenizer.ggml.scores), which its merges go by; the file looks incomplete.")
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    unk = vocab.tokens[vocab.unk] if vocab.unk is not None else None
    tokenizer = Tokenizer(BPE(ids, _merges_by_score(vocab.tokens, np.array(scores, np.float32), ids),
                              unk_token=unk, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    spaces = [normalizers.Replace(" ", "▁")]
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), *spaces] if prefix else spaces)
    # As in Llama's and Gemma's tokenizer.json, which mlx-lm streams with its SentencePiece detokenizer
    pieces = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence([*pieces, decoders.Strip(" ", 1, 0)] if prefix else pieces)
    return tokenizer


def _merges_by_score(tokens: list[str], scores: np.ndarray, ids: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, as BPE merges, the best-scoring token's first.

    llama.cpp merges the adjacent pair whose joined text is the highest-scoring token (the
    leftmost on a tie); a BPE merges the adjacent pair of lowest rank, so with merges ranked by
    the score of the token they make it merges the same pair. Different tokens of equal score
    rank by id, where llama.cpp would take the leftmost pair: SentencePiece gives each token
    made by merging a score of its own, so such ties are rare.
    """
    found = []
    for i, token in enumerate(tokens):
        if ids[token] != i:
            continue  # a text listed twice: llama.cpp, like `ids`, takes its last id
        for k in range(1, len(token)):
            if token[:k] in ids and token[k:] in ids:
                found.append((-float(scores[i]), i, k))
    found.sort()
    return [(tokens[i][:k], tokens[i][k:]) for _, i, k in found]


def _post_processor(vocab: Vocab) -> processors.PostProcessor | None:
    """The BOS (and EOS) llama.cpp adds to a text, as the file says; byte-level offsets."""
    steps: list[processors.PostProcessor] = [processors.ByteLevel(trim_offsets=False)] if vocab.kind == "gpt2" else []
    ends = [(vocab.add_bos, vocab.bos, "bos"), (vocab.add_eos, vocab.eos, "eos")]
    for add, token_id, name in ends:
        if add and token_id is None:
            raise ModelError(f"The GGUF file says to add a {name} token but names none "
                             f"(tokenizer.ggml.{name}_token_id).")
    first = [vocab.tokens[vocab.bos]] if vocab.add_bos else []
    last = [vocab.tokens[vocab.eos]] if vocab.add_eos else []
    if first or last:
        single = " ".join([*first, "$A", *last])
        special = {vocab.tokens[i]: i for add, i, _ in ends if add}
        steps.append(processors.TemplateProcessing(
            single=single, pair=f"{single} {' '.join([*first, '$B', *last])}", special_tokens=list(special.items())
        ))
    if len(steps) < 2:
        return steps[0] if steps else None
    return processors.Sequence(steps)


def _add_special_tokens(tokenizer: Tokenizer, meta: dict[str, Any], vocab: Vocab) -> None:
    """Control, unknown and user-defined tokens, which llama.cpp finds whole in a text before
    anything else (control and unknown ones are special: a decode may skip them).

    For a model named Phi-3, llama.cpp also drops the whitespace after them (but <unk>, <s>
    and <|endoftext|>): a rule of llama-vocab.cpp, keyed on the name, not in the file.
    """
    name = str(meta.get("general.name", "")).lower()
    rstrip = set()
    if "phi-3" in name or "phi3" in name:
        rstrip = {t for t, k in zip(vocab.tokens, vocab.types) if k in (_UNKNOWN, _CONTROL, _USER_DEFINED)}
        rstrip -= {"<unk>", "<s>", "<|endoftext|>"}
    typed = list(zip(vocab.tokens, vocab.types))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in rstrip)
                                  for t, k in typed if k in (_UNKNOWN, _CONTROL)])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, rstrip=t in rstrip)
                          for t, k in typed if k == _USER_DEFINED])


def tokenizer_config(meta: dict[str, Any], vocab: Vocab, config: dict[str, Any]) -> dict[str, Any]:
    def token(token_id: int | None) -> str | None:
        return vocab.tokens[token_id] if token_id is not None else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(vocab.bos),
        "eos_token": token(vocab.eos),
        "pad_token": token(vocab.pad),
        "unk_token": token(vocab.unk),
        "add_bos_token": vocab.add_bos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if vocab.add_eos:
        tokenizer_config["add_eos_token"] = True
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer_config
