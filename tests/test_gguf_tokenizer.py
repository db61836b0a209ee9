"""A GGUF file's tokenizer, rebuilt on import (gguf_tokenizer.py): byte-level BPE split as
llama.cpp splits it, with its BOS; SentencePiece vocabularies checked against llama.cpp's
tokenizer (ported in gguf_files.py) and SentencePiece itself; tokenizers the importer refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_files import SPM_CONTROL, SPM_USER_DEFINED, gpt2_vocab, llama_cpp_spm, spm_vocab, tricky_texts, write_gguf
from mcp_semantic.gguf import import_gguf
from mcp_semantic.models import ModelError, load_model
from mcp_semantic.tiny_model import make_tiny_model

from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer  # noqa: I001  after mcp_semantic: OpenBLAS goes first


# ---------------------------------------------------------------------------------------------
# byte-level BPE


def test_a_llama3_tokenizer_splits_digits_in_threes_and_adds_bos(tiny, tiny_model_dir, tmp_path):
    """Llama 3's pre-tokenizer ("llama-bpe"): numbers in pieces of up to three digits; a BOS,
    llama.cpp's default for it, when the file does not say."""
    vocab = gpt2_vocab(tiny_model_dir, "llama-bpe")
    del vocab.special.add_special_token["bos"]  # the file does not say
    lm = load_model(str(write_gguf(tiny_model_dir, tmp_path / "llama3.gguf", vocab=vocab)), tmp_path / "cache")
    plain = lambda t: tiny.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    assert lm.tokenizer.encode("1234567", add_special_tokens=False) == plain("123") + plain("456") + plain("7")
    assert lm.tokenizer.encode("hi there") == [1, *plain("hi there")]


# ---------------------------------------------------------------------------------------------
# SentencePiece vocabularies (Llama 2, Mistral, Gemma, Phi-3)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    """The tiny llama with as many tokens as the SentencePiece vocabulary."""
    return make_tiny_model(tmp_path_factory.mktemp("spm") / "model", vocab_size=512)


@pytest.mark.parametrize("prefix", [True, False])  # Llama 2 and Mistral; Gemma
def test_a_sentencepiece_vocabulary_tokenizes_as_llama_cpp(sentencepiece, spm_dir, tmp_path, prefix):
    """Tricky and random texts give llama.cpp's tokens (its SPM tokenizer, ported in gguf_files.py), and
    SentencePiece's own where no control token is in the text; they decode back; mlx-lm streams
    them with its SentencePiece detokenizer; a BOS is added as the file says."""
    vocab = spm_vocab(sentencepiece, add_space_prefix=prefix)
    lm = load_model(str(write_gguf(spm_dir, tmp_path / "spm.gguf", vocab=vocab)), tmp_path / "cache")
    tok = lm.tokenizer
    specials = [*SPM_CONTROL, *SPM_USER_DEFINED, "<s>", "</s>", "<unk>"]
    for t in tricky_texts():
        ids = tok.encode(t, add_special_tokens=False)
        assert ids == llama_cpp_spm(t, vocab), t
        if not any(s in t for s in specials):
            if prefix:  # SentencePiece's dummy prefix is llama.cpp's space prefix
                assert ids == sentencepiece.encode(t), t
            if "\u2581" not in t:  # a ▁ in the text decodes as the space it stands for
                assert tok.decode(ids) == t
    assert tok.encode("hello") == [sentencepiece.bos_id(), *tok.encode("hello", add_special_tokens=False)]
    assert isinstance(tok._detokenizer, SPMStreamingDetokenizer)
    detokenizer = tok.detokenizer
    detokenizer.reset()
    for i in tok.encode("  Ünïcödé 🎉 and spaces", add_special_tokens=False):
        detokenizer.add_token(i)
    detokenizer.finalize()
    assert detokenizer.text == "  Ünïcödé 🎉 and spaces"
    assert tok.eos_token_ids == {sentencepiece.eos_id(), sentencepiece.piece_to_id("<end_of_turn>")}


@pytest.mark.parametrize("name, stripped", [
    ("Phi-3-mini-4k-instruct", True), ("Phi 3.5 Mini", False), ("Mistral", False),
])
def test_phi3_drops_whitespace_after_special_tokens_as_llama_cpp(sentencepiece, spm_dir, tmp_path, name, stripped):
    """llama.cpp drops the whitespace after a special token for a model named Phi-3 (but after
    <unk>, <s> and <|endoftext|>), a rule it keys on the name; other models keep it."""
    vocab = spm_vocab(sentencepiece)
    tok = load_model(str(write_gguf(spm_dir, tmp_path / "phi.gguf", vocab=vocab, name=name)), tmp_path / "cache").tokenizer
    rstrip = frozenset(SPM_CONTROL + SPM_USER_DEFINED + ["</s>"]) if stripped else frozenset()
    text = "<|user|>\n  hello<|end|>\n<|assistant|>\n<s> hi"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == llama_cpp_spm(text, vocab, rstrip)
    assert (ids != llama_cpp_spm(text, vocab)) == stripped
    for t in tricky_texts(n=100):
        assert tok.encode(t, add_special_tokens=False) == llama_cpp_spm(t, vocab, rstrip), t


# ---------------------------------------------------------------------------------------------
# files refused


@pytest.mark.parametrize("extra, error", [
    (lambda w: w.add_tokenizer_model("t5"), "tokenizer the GGUF importer does not handle \\(model 't5'"),  # unigram
    (lambda w: w.add_tokenizer_pre("deepseek-llm"), "pre-tokenizer 'deepseek-llm'"),  # byte-level BPE, another split
    (lambda w: w.add_tokenizer_model("llama"), "without a score for each token"),  # SentencePiece without scores
], ids=["t5", "deepseek-llm", "spm-without-scores"])
def test_import_refuses_a_tokenizer_it_cannot_rebuild(tiny_model_dir, tmp_path, extra, error):
    gguf_path = write_gguf(tiny_model_dir, tmp_path / "tok.gguf", extra=extra)
    with pytest.raises(ModelError, match=error):
        import_gguf(gguf_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
