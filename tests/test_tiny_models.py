"""Tiny models of every family: they load through `load_model` as built, with their family's kinds
of layers and caches, and greedy replies are plain, varied text that depends on the conversation."""

from __future__ import annotations

import json
import re

import pytest

from mcp_semantic.models import LoadedModel, load_model
from mcp_semantic.tiny_model import FAMILIES, HARMONY_TOKENS, THINKING_CHAT_TEMPLATE, build_tiny_model, make_tiny_model

import mlx.core as mx  # after mcp_semantic: OpenBLAS goes first
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache

CACHES = {
    "llama": ["KVCache"] * 2,
    "qwen2": ["KVCache"] * 2,
    "qwen3": ["KVCache"] * 2,
    "gemma3_text": ["RotatingKVCache(24)"] * 5 + ["KVCache"],
    "gpt_oss": ["RotatingKVCache(24)", "KVCache"],
    "llama4": ["ChunkedKVCache(32)"] * 3 + ["KVCache"],
    "qwen3_next": ["ArraysCache"] * 3 + ["KVCache"],
    "qwen3_5": ["ArraysCache"] * 3 + ["KVCache"],
    "lfm2": ["ArraysCache"] * 2 + ["KVCache"],
    "nemotron_h": ["ArraysCache", "KVCache", "ArraysCache"],  # layers M * M -: the MLP has no cache
    "mamba2": ["ArraysCache"] * 2,
    "falcon_h1": ["CacheList(ArraysCache, KVCache)"] * 2,
    "baichuan_m1": ["CacheList(ArraysCache, RotatingKVCache(24))", "CacheList(ArraysCache, KVCache)"],
}
"""What `make_prompt_cache` gives each family's default tiny model, layer by layer."""

HISTORY = [
    {"role": "user", "content": "I am planning a small garden this spring. Which vegetables grow well for a beginner, and how often should I water them?"},
    {"role": "assistant", "content": "Tomatoes, beans, lettuce and carrots are easy to start with. Water them in the evening, about twice a week, more often when it is hot and dry."},
    {"role": "user", "content": "Thanks. My neighbour says sunflowers attract bees. Is that true, and would they shade the tomatoes too much?"},
    {"role": "assistant", "content": "Yes, bees love sunflowers. Plant them on the north side of the bed so their shadow falls away from the tomatoes."},
    {"role": "user", "content": "Good idea. Last question for today: what should I write down each week to see how the garden is doing?"},
]
FAR = [{"role": "user", "content": HISTORY[0]["content"].replace("spring", "summer").replace("water", "feed")},
       *HISTORY[1:]]
"""Two words changed some 300 tokens back, far beyond any window; as many tokens as HISTORY."""
NEAR = [
    *HISTORY[:3],
    {"role": "assistant", "content": "No, bees prefer lavender. Sunflowers grow tall, so keep them away from anything that needs the afternoon sun."},
    HISTORY[4],
]
"""The last answer changed."""


def describe(cache) -> str:
    name = type(cache).__name__
    if name == "CacheList":
        return f"CacheList({', '.join(describe(c) for c in cache.caches)})"
    size = getattr(cache, "max_size", None) or getattr(cache, "chunk_size", None)
    return f"{name}({size})" if size else name


def prompt(lm: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    return lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def reply(lm: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    return [r.token for r in stream_generate(lm.model, lm.tokenizer, prompt(lm, messages), max_tokens=24)]


def continuation(model, tokens: list[int], chunk: int, n: int = 24) -> list[int]:
    """Greedy tokens after prefilling `tokens` chunk by chunk into a fresh cache."""
    cache = make_prompt_cache(model)
    for i in range(0, len(tokens), chunk):
        logits = model(mx.array(tokens[i : i + chunk])[None], cache=cache)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array(out[-1:])[None], cache=cache)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, LoadedModel]:
    model_type = request.param
    path = make_tiny_model(tmp_path_factory.mktemp(model_type) / "model", model_type=model_type)
    return model_type, load_model(str(path), tmp_path_factory.mktemp("cache"))


def test_every_family_is_listed():
    assert set(CACHES) == set(FAMILIES)


def test_loads_as_built(family):
    model_type, lm = family
    assert lm.dtype == "float32" and lm.context_length == 2048
    assert [describe(c) for c in make_prompt_cache(lm.model)] == CACHES[model_type]
    built, config, _ = build_tiny_model(model_type=model_type)
    assert json.loads((lm.path / "config.json").read_text())["model_type"] == config["model_type"] == model_type
    x = mx.array(prompt(lm, HISTORY))[None]
    loaded, expected = lm.model(x), built(x)
    if model_type == "baichuan_m1":  # its loader scales lm_head rows to norm 1 again: rounding
        assert mx.allclose(loaded, expected, rtol=1e-5, atol=1e-4).item()
    else:
        assert mx.array_equal(loaded, expected).item()
    assert 2.5 < expected[0].std(axis=-1).mean().item() < 3.5


def test_replies_are_plain_varied_text(family):
    _, lm = family
    tokens = reply(lm, HISTORY)
    assert len(tokens) == 24 and min(tokens) >= 3  # never a special token, so never stops early
    assert len(set(tokens)) > 8
    text = lm.tokenizer.decode(tokens)
    assert all(" " <= c <= "~" or c == "\n" for c in text)  # no lone byte (U+FFFD), no control character


def test_reply_depends_on_the_history(family):
    model_type, lm = family
    tokens = reply(lm, HISTORY)
    assert reply(lm, NEAR) != tokens
    assert len(prompt(lm, FAR)) == len(prompt(lm, HISTORY))
    if model_type != "mamba2":  # its random state fades: a change 300 tokens back seldom shows
        assert reply(lm, FAR) != tokens  # past any window: through global or recurrent layers


def test_chunked_prefill_matches_one_pass(family):
    _, lm = family
    tokens = prompt(lm, HISTORY)
    assert continuation(lm.model, tokens, 16) == continuation(lm.model, tokens, len(tokens))


def test_config_overrides_follow_sizes(tmp_path):
    path = make_tiny_model(
        tmp_path / "m", model_type="qwen3_5", config_overrides={"hidden_size": 128, "num_hidden_layers": 8}
    )
    text_config = json.loads((path / "config.json").read_text())["text_config"]
    assert text_config["head_dim"] == text_config["linear_key_head_dim"] == 32
    lm = load_model(str(path), tmp_path / "cache")
    assert [describe(c) for c in make_prompt_cache(lm.model)] == (["ArraysCache"] * 3 + ["KVCache"]) * 2
    assert len(reply(lm, HISTORY)) == 24


def test_sliding_window_is_an_argument(tmp_path):
    lm = load_model(str(make_tiny_model(tmp_path / "g", model_type="gemma3_text", sliding_window=40)), tmp_path)
    assert [describe(c) for c in make_prompt_cache(lm.model)] == ["RotatingKVCache(40)"] * 5 + ["KVCache"]
    lm = load_model(str(make_tiny_model(tmp_path / "l", model_type="llama4", sliding_window=48)), tmp_path)
    assert [describe(c) for c in make_prompt_cache(lm.model)] == ["ChunkedKVCache(48)"] * 3 + ["KVCache"]


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown model_type"):
        make_tiny_model(tmp_path / "m", model_type="gpt2")


def test_thinking_template(tmp_path):
    path = make_tiny_model(tmp_path / "m", chat_template=THINKING_CHAT_TEMPLATE)
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == THINKING_CHAT_TEMPLATE
    lm = load_model(str(path), tmp_path / "cache")
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nThey greet me.\n</think>\n\nHello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_harmony_template(tmp_path):
    """A gpt-oss-like tiny model: gpt-oss's special tokens (within its vocabulary), end-of-sequence
    tokens and chat template, shortened: an earlier reply shown as its final channel only, a
    transcript that ends with a reply rendered as the model wrote it, channel tags refused."""
    path = make_tiny_model(tmp_path / "m", model_type="gpt_oss", harmony=True)
    lm = load_model(str(path), tmp_path / "cache")
    tok = lm.tokenizer
    vocab = tok.get_vocab()
    assert all(vocab[t] < 512 for t in HARMONY_TOKENS) and len(vocab) == 512
    assert tok.eos_token == "<|return|>" and tok.eos_token_ids == {vocab["<|return|>"], vocab["<|call|>"]}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "thinking": "They greet me."},
        {"role": "user", "content": "Bye"},
    ]
    system = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == system + (
        "<|start|>user<|message|>Hi<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello!<|end|>"
        "<|start|>user<|message|>Bye<|end|>"
        "<|start|>assistant"
    )
    assert tok.apply_chat_template(messages[:3], tokenize=False) == system + (
        "<|start|>user<|message|>Hi<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>They greet me.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>"
    )
    effort = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, reasoning_effort="low")
    assert "\nReasoning: low\n" in effort
    tagged = [*messages[:2], {"role": "assistant", "content": "<|channel|>final<|message|>Hello!"}, messages[3]]
    with pytest.raises(Exception, match=re.escape("containing <|channel|> tags in the content field")):
        tok.apply_chat_template(tagged, add_generation_prompt=True)


def test_a_thinking_tiny_model_s_think_tokens_are_within_its_vocabulary(tmp_path):
    """Every token id has its row of the embedding: `<think>` and `</think>` take reserved places."""
    path = make_tiny_model(tmp_path / "m", thinking=True, chat_template=THINKING_CHAT_TEMPLATE)
    lm = load_model(str(path), tmp_path / "cache")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = [lm.tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
    assert all(isinstance(i, int) and 0 <= i < vocab for i in ids) and lm.tokenizer.has_thinking
