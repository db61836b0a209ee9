"""Tiny models with random weights, for fast tests, benchmarks and examples.

They are ordinary mlx-lm directories, loaded by `models.load_model` like any other model,
with a real byte-level BPE tokenizer and a ChatML chat template like SmolLM2's. Besides llama,
`FAMILIES` lists the other mlx-lm model types they can be: attention with sliding windows or
chunks, recurrent (SSM, linear attention, short convolution) and hybrids of both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, save_config
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""ids 0, 1, 2, as in SmolLM2."""
THINK_TOKENS = ["<think>", "</think>"]
HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
"""The special tokens of OpenAI's harmony format, as gpt-oss's tokenizer has them."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

THINKING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)
"""ChatML for reasoning models, as Qwen3's: the reply starts inside `<think>`, and earlier replies
are shown without their reasoning (what follows the last `</think>`, without leading newlines)."""

SWITCHABLE_THINKING_CHAT_TEMPLATE = THINKING_CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '\\n</think>\\n\\n' }}{% endif %}{% endif %}",
)
"""THINKING_CHAT_TEMPLATE with Qwen3's switch: `enable_thinking=False` closes the block at once."""


_CHANNEL_TAGS = "'<|channel|>analysis<|message|>' in {0} or '<|channel|>final<|message|>' in {0}"
HARMONY_CHAT_TEMPLATE = (
    "{%- if reasoning_effort is not defined %}{%- set reasoning_effort = 'medium' %}{%- endif %}"
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n"
    "Knowledge cutoff: 2024-06\\n\\nReasoning: ' + reasoning_effort + '\\n\\n' }}"
    "{{- '# Valid channels: analysis, commentary, final. Channel must be included for every message.\\n' }}"
    "{{- \"Calls to these tools must go to the commentary channel: 'functions'.<|end|>\" }}"
    "{%- if messages[0].role == 'developer' or messages[0].role == 'system' %}"
    "{%- set developer_message = messages[0].content %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set developer_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if developer_message %}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + developer_message + '<|end|>' }}"
    "{%- endif %}"
    "{%- for message in loop_messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- if 'content' in message and (" + _CHANNEL_TAGS.format("message.content") + ") %}"
    "{{- raise_exception('You have passed a message containing <|channel|> tags in the content field.') }}"
    "{%- endif %}"
    "{%- if 'thinking' in message and (" + _CHANNEL_TAGS.format("message.thinking") + ") %}"
    "{{- raise_exception('You have passed a message containing <|channel|> tags in the thinking field.') }}"
    "{%- endif %}"
    "{%- if loop.last and not add_generation_prompt %}"
    "{%- if 'thinking' in message %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}"
    "{%- endif %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' }}"
    "{%- else %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}"
    "{%- endif %}"
    "{%- elif message.role == 'user' -%}"
    "{{- '<|start|>user<|message|>' + message.content + '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)
"""gpt-oss's chat template (openai/gpt-oss-20b's chat_template.jinja), shortened: the same system,
developer, user and assistant messages, without tools and without the current date (a test's
prompt must not change at midnight). Earlier replies are shown as their final channel only; a
reply's reasoning is its `thinking`, shown only in a transcript that ends with it."""

# Text to learn the merges from: any English will do; it only needs enough distinct pairs.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model answers questions about the weather,
the news, numbers like 12, 345 and 6789, and the names of cities such as Paris, London and Tokyo.
Memory lets an agent pick up a conversation where it left off: it keeps what was said before,
and it does not have to read the whole history again before it answers the next question.

Once upon a time there was a little robot who lived in a workshop full of tools. Every morning
it swept the floor, sorted the screws and bolts, and wrote down what it had learned the day before.
"What should I build today?" it asked the old clockmaker. "Something that remembers," she said.
So the robot built a box of drawers, one for every friend, and in each drawer it kept their stories.

In the garden the children planted tomatoes, beans, carrots and sunflowers. They watered them
every evening and measured how tall they grew: three centimetres on Monday, five on Wednesday,
and almost ten by the end of the week. The teacher asked them to draw a chart of the numbers.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))

Questions and answers: Who wrote the letter? The captain did. Where is the key? Under the mat.
When does the train leave? At half past seven, from the second platform, if it is on time.
Why is the sky blue? Because air scatters blue light more than red light from the sun.
"""


# Random weights scaled so that greedy decoding is varied, depends on the whole context and
# says only plain text: never a special token (a generation always runs to max_tokens), a lone
# byte of a multi-byte character (U+FFFD once decoded) or a control character. Found by trying seeds:
# - EMBED_SCALE: small embeddings let the attention and MLP outputs, not the current token's own
#   embedding, decide the next token (at 1.0 the tied model repeats its input token forever);
# - Q_SCALE: sharp attention, so the output depends on particular earlier tokens and moves along;
# - OUTPUT_NORM: the final norm weight, so logits have a std of about 3 and sampling at
#   temperature 1 mostly picks from a few tokens (top-1 probability 0.2 to 0.9). Scaling logits
#   cannot change the greedy token, so it cannot widen the top-1 margin relative to rounding
#   error; in float32 the margins are ample anyway: chunked and whole prefill agreed on every
#   model tried (28 seeds and sizes, 3 prompts, chunks of 1, 7 and 64; tests/test_models.py keeps 4).
# The other families get the same treatment through `_shape`, as generically as their layers allow,
# checked the same way (greedy replies to a 365-token conversation, seeds 0-3; without each step):
# - EMBED_SCALE, on every family: the tied ones (qwen3, gemma3_text, qwen3_5, lfm2, mamba2,
#   falcon_h1) repeat a token or two without it; the untied ones do not need it;
# - muting: through the embedding rows when tied, else through the lm_head rows (baichuan_m1, whose
#   loader normalizes lm_head rows, mutes otherwise: see `_baichuan_m1`);
# - Q_SCALE on q_proj, or QK_NORM_SCALE on q_norm where queries are normalized after q_proj:
#   without it qwen3, gpt_oss, llama4, falcon_h1 and baichuan_m1 repeat themselves, and qwen3_next
#   and qwen3_5 forget what was said a few hundred tokens back;
# - SSM_DT and SSM_SKIP on Mamba-2 layers: mamba2 forgets all but the last few tokens without either
#   (the hybrids remember through their attention layers anyway);
# - the final norm is calibrated to logits of std LOGIT_STD, rather than set to OUTPUT_NORM.
# Chunked prefill (chunks of 1, 7, 16 and 64 against one pass) gave the same greedy tokens in every
# family (8 seeds, 3 prompts); logits differed by 1e-5 (1e-4 for gemma3_text) at most.
EMBED_SCALE = 0.25
Q_SCALE = 12.0
OUTPUT_NORM = 16.0
_MUTED = 0.01
"""Embedding rows of tokens the model must not say are scaled by this, so they are never predicted."""
QK_NORM_SCALE = 4.0
"""Instead of Q_SCALE where queries are normalized (q_norm): the weight of that norm."""
LOGIT_STD = 3.0
SSM_DT = (0.001, 0.1)
"""Mamba's initial time steps (log-uniform): the state remembers hundreds of tokens, not a few."""
SSM_SKIP = 0.02
"""The skip (D) of Mamba-2 layers: their output is mostly the state (the past), not the current token."""


def _hd(c: dict) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _every(c: dict, k: int, yes: Any, no: Any) -> list:
    """Per layer: `yes` for every k-th layer (the last of each k), else `no`."""
    return [yes if i % k == k - 1 else no for i in range(c["num_hidden_layers"])]


def _linear_attention(c: dict) -> dict:
    """Qwen3-Next and Qwen3.5: gated delta-net layers, every 4th layer full attention."""
    return {
        "head_dim": _hd(c), "full_attention_interval": min(4, c["num_hidden_layers"]),
        "linear_num_key_heads": c["num_key_value_heads"], "linear_num_value_heads": c["num_attention_heads"],
        "linear_key_head_dim": _hd(c), "linear_value_head_dim": _hd(c), "linear_conv_kernel_dim": 4,
        "partial_rotary_factor": 0.25, "rope_theta": 10_000_000.0,
    }


def _mamba_heads(c: dict) -> int:
    """Mamba-2 heads of head_dim, for an inner width of twice the hidden size, as usual."""
    return 2 * c["hidden_size"] // _hd(c)


FAMILIES: dict[str, Callable[[dict, int | None], dict]] = {
    # model_type -> (config so far: sizes as given or overridden, sliding_window) -> the fields it adds
    "llama": lambda c, w: {},
    "qwen2": lambda c, w: {"architectures": ["Qwen2ForCausalLM"]},  # llama's layers, Q/K/V with biases
    "qwen3": lambda c, w: {"architectures": ["Qwen3ForCausalLM"], "head_dim": _hd(c)},
    "gemma3_text": lambda c, w: {  # 5 sliding-window layers to 1 global, as Gemma 3
        "architectures": ["Gemma3ForCausalLM"], "head_dim": _hd(c), "query_pre_attn_scalar": _hd(c),
        "sliding_window": w or 24, "sliding_window_pattern": min(6, c["num_hidden_layers"]),
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "rms_norm_eps": 1e-6,
    },
    "gpt_oss": lambda c, w: {  # sliding and full attention layers alternate; mixture of experts
        "architectures": ["GptOssForCausalLM"], "head_dim": _hd(c), "tie_word_embeddings": False,
        "sliding_window": w or 24, "layer_types": _every(c, 2, "full_attention", "sliding_attention"),
        "num_local_experts": 4, "num_experts_per_tok": 2, "rope_theta": 150_000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 150_000.0},  # else transformers warns of yarn
    },
    "llama4": lambda c, w: {  # chunked attention, every 4th layer global (NoPE); MoE every 2nd layer
        "architectures": ["Llama4ForConditionalGeneration"], "head_dim": _hd(c), "tie_word_embeddings": False,
        "attention_chunk_size": w or 32, "interleave_moe_layer_step": 2,
        "intermediate_size_mlp": c["intermediate_size"], "num_local_experts": 4, "num_experts_per_tok": 1,
        "attention_bias": False, "use_qk_norm": False, "rope_scaling": None, "rope_theta": 500_000.0,
    },
    "qwen3_next": lambda c, w: {  # linear attention (gated delta net) and full attention; MoE
        "architectures": ["Qwen3NextForCausalLM"], "tie_word_embeddings": False, **_linear_attention(c),
        "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "moe_intermediate_size": c["intermediate_size"] // 2, "norm_topk_prob": True,
        "shared_expert_intermediate_size": c["intermediate_size"] // 2,
    },
    "qwen3_5": lambda c, w: {  # as qwen3_next with dense MLPs, under a multimodal wrapper's text_config
        "architectures": ["Qwen3_5ForConditionalGeneration"], **_linear_attention(c),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
    },
    "lfm2": lambda c, w: {  # short convolutions, every 3rd layer attention; always tied
        "architectures": ["Lfm2ForCausalLM"], "layer_types": _every(c, 3, "full_attention", "conv"),
        "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_dim": c["hidden_size"],
        "block_ff_dim": c["intermediate_size"], "block_multiple_of": 256, "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False, "rope_theta": 1_000_000.0,
    },
    "nemotron_h": lambda c, w: {  # Mamba-2 (M), attention without rope (*) and MLP (-) layers
        "architectures": ["NemotronHForCausalLM"], "tie_word_embeddings": False, "head_dim": _hd(c),
        "hybrid_override_pattern": "".join("M*M-"[i % 4] for i in range(c["num_hidden_layers"])),
        "mamba_num_heads": _mamba_heads(c), "mamba_head_dim": _hd(c), "ssm_state_size": 16, "n_groups": 1,
        "conv_kernel": 4, "mamba_proj_bias": False, "use_bias": False, "use_conv_bias": True,
        "mlp_bias": False, "attention_bias": False, "layer_norm_epsilon": 1e-5,
    },
    "mamba2": lambda c, w: {  # Mamba-2 layers only
        "architectures": ["Mamba2ForCausalLM"], "num_heads": _mamba_heads(c), "head_dim": _hd(c),
        "state_size": 16, "n_groups": 1, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
        "layer_norm_epsilon": 1e-5, "time_step_limit": [0.0, float("inf")], "time_step_rank": "auto",
    },
    "falcon_h1": lambda c, w: {  # Mamba-2 and attention side by side in every layer
        "architectures": ["FalconH1ForCausalLM"], "head_dim": _hd(c), "mamba_n_heads": _mamba_heads(c),
        "mamba_d_head": _hd(c), "mamba_d_ssm": _mamba_heads(c) * _hd(c), "mamba_d_state": 16,
        "mamba_d_conv": 4, "mamba_n_groups": 1, "mamba_conv_bias": True, "mamba_proj_bias": False,
        "mamba_rms_norm": False, "embedding_multiplier": 1.0, "lm_head_multiplier": 1.0,
    },
    "baichuan_m1": lambda c, w: {  # every layer: a 2-tap convolution of keys and values, then attention
        "architectures": ["BaichuanM1ForCausalLM"], "tie_word_embeddings": False, "conv_window": 2,
        "sliding_window": w or 24, "sliding_window_layers": list(range(0, c["num_hidden_layers"], 2)),
    },
}
"""The mlx-lm model types `make_tiny_model` writes: each adds its own fields to llama's config."""

_LAYERS = {"gemma3_text": 6, "llama4": 4, "qwen3_next": 4, "qwen3_5": 4, "lfm2": 3, "nemotron_h": 4}
"""Default layer counts, so that each model has all its family's kinds of layers (else 2)."""
_NESTED = {"llama4": "llama4_text", "qwen3_5": "qwen3_5_text"}
"""Multimodal wrappers: the text model's config goes in `text_config`, of this model_type."""


def make_tiny_model(
    out_dir: Path,
    *,
    model_type: str = "llama",
    num_layers: int | None = None,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    sliding_window: int | None = None,
    chat_template: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    thinking: bool = False,
    harmony: bool = False,
) -> Path:
    """Write a random float32 model of `model_type` with a trained BPE tokenizer to `out_dir`; return it.

    Same arguments, same files. The built-in text yields about 730 BPE tokens; a larger
    `vocab_size` is filled with `<|reserved_N|>` special tokens. `num_layers` defaults to the
    fewest that have every kind of layer of the family (2 for llama). `sliding_window` is the
    window (or llama4's attention chunk) of the families that have one: 24 tokens (32) unless given.
    `thinking` gives the tokenizer `<think>` and `</think>` (in place of two reserved tokens), as a
    reasoning model's has. `harmony` gives it gpt-oss's special tokens (`HARMONY_TOKENS`, within
    `vocab_size`), `<|return|>` and `<|call|>` as its end-of-sequence tokens, and gpt-oss's chat
    template (`HARMONY_CHAT_TEMPLATE`) unless `chat_template` is given; else it is ChatML (`CHAT_TEMPLATE`).
    `config_overrides` are merged into the config last; sizes derived from others (head_dim,
    layer patterns...) follow the overridden sizes. For llama4 and qwen3_5 they apply to `text_config`.
    """
    model, config, tokenizer = build_tiny_model(
        model_type=model_type, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, seed=seed, sliding_window=sliding_window,
        config_overrides=config_overrides, thinking=thinking, harmony=harmony,
    )
    if chat_template is None:
        chat_template = HARMONY_CHAT_TEMPLATE if harmony else CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|return|>" if harmony else "<|im_end|>",
                "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": max_position_embeddings,
                "chat_template": chat_template,
            },
            f,
            indent=2,
        )
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, out_dir / "config.json")
    return out_dir


def build_tiny_model(
    *,
    model_type: str = "llama",
    num_layers: int | None = None,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    sliding_window: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    thinking: bool = False,
    harmony: bool = False,
) -> tuple[nn.Module, dict[str, Any], Tokenizer]:
    """What `make_tiny_model` writes, in memory: the model (as mlx-lm loads it), its config and tokenizer."""
    if model_type not in FAMILIES:
        raise ValueError(f"unknown model_type {model_type!r}: one of {', '.join(FAMILIES)}")
    extra = HARMONY_TOKENS if harmony else []  # special tokens right after the learned ones, as gpt-oss's
    if vocab_size < 256 + len(SPECIAL_TOKENS) + len(extra):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS) + len(extra)} (bytes and special tokens)")
    added = len(extra) + (len(THINK_TOKENS) if thinking else 0)  # room for them within vocab_size
    tokenizer = _train_tokenizer(vocab_size - added)
    speakable = [_plain_text(tokenizer, i) for i in range(tokenizer.get_vocab_size())]
    calibration = tokenizer.encode(CORPUS).ids[:128]
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - len(speakable) - added)]
    if thinking:  # as Qwen3's: added tokens, not special ones (a reply's text keeps them)
        tokenizer.add_tokens(THINK_TOKENS)
    tokenizer.add_special_tokens(extra + reserved)
    if tokenizer.get_vocab_size() != vocab_size:  # every id must have its row of the embedding
        raise ValueError(f"the tiny tokenizer has {tokenizer.get_vocab_size()} tokens for a vocab_size of {vocab_size}")

    overrides = dict(config_overrides or {})
    config = {
        "model_type": model_type,
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers or _LAYERS.get(model_type, 2),
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": 1,
        "eos_token_id": [tokenizer.token_to_id(t) for t in ("<|return|>", "<|call|>")] if harmony else 2,
        **overrides,
    }
    config.update(FAMILIES[model_type](config, sliding_window))
    config.update(overrides)
    if model_type in _NESTED:
        text_config = {**config, "model_type": _NESTED[model_type]}
        config = {
            "model_type": model_type,
            "architectures": text_config.pop("architectures"),
            "text_config": text_config,
            "tie_word_embeddings": text_config["tie_word_embeddings"],
            "bos_token_id": text_config.pop("bos_token_id"),
            "eos_token_id": text_config.pop("eos_token_id"),
        }

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(json.loads(json.dumps(config))))  # from_dict may edit nested dicts
    model.eval()
    # The model as mlx-lm will load it: without lm_head when tied (gemma3_text ties only then).
    weights = dict(tree_flatten(model.parameters()))
    if config.get("tie_word_embeddings"):
        weights = {k: v for k, v in weights.items() if not k.endswith("lm_head.weight")}
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()))

    speakable += [False] * ((config.get("text_config") or config)["vocab_size"] - len(speakable))
    _shape(model, model_type, ~mx.array(speakable)[:, None], mx.array(calibration))
    mx.eval(model.parameters())
    return model, config, tokenizer


def _shape(model: nn.Module, model_type: str, muted: mx.array, calibration: mx.array) -> None:
    """Scale random weights for plain, varied, context-dependent greedy text (see EMBED_SCALE...)."""
    modules = dict(model.named_modules())
    embed_path = next(p for p, m in modules.items() if isinstance(m, nn.Embedding))
    embed = modules[embed_path]
    inner = modules[embed_path.rpartition(".")[0]]
    norm = next(inner[k] for k in ("norm", "norm_f", "final_layernorm", "embedding_norm") if k in inner)
    head = next((m for p, m in modules.items() if p.rpartition(".")[2] == "lm_head"), None)
    if head is None:  # tied: the embedding is the output layer too
        embed.weight = embed.weight * mx.where(muted, _MUTED * EMBED_SCALE, EMBED_SCALE)
    else:
        embed.weight = embed.weight * EMBED_SCALE
        head.weight = head.weight * mx.where(muted, _MUTED, 1.0)
    for m in modules.values():
        if _norm_offset(m):  # mlx-lm starts Gemma's norms (1 + weight) at weight 1, which doubles
            m.weight = mx.zeros_like(m.weight)  # everything; trained ones are near 0
    for m in modules.values():
        q_norm = next((m[k] for k in ("q_norm", "q_layernorm") if k in m), None)
        if q_norm is not None:  # queries normalized after q_proj: scaling q_proj would not show
            _scale_norm(q_norm, QK_NORM_SCALE)
        elif "q_proj" in m:
            m.q_proj.update({k: v * Q_SCALE for k, v in m.q_proj.parameters().items()})  # weight, bias
        elif "W_pack" in m:  # baichuan_m1: q, k and v in one projection
            q = m.num_heads * m.head_dim
            m.W_pack.weight = mx.concatenate([m.W_pack.weight[:q] * Q_SCALE, m.W_pack.weight[q:]])
        if "dt_bias" in m:  # Mamba-2 and gated delta-net layers
            dt = mx.exp(mx.random.uniform(*map(math.log, SSM_DT), m.dt_bias.shape))
            m.dt_bias = dt + mx.log(-mx.expm1(-dt))  # softplus(dt_bias) == dt
        if "D" in m:
            m.D = mx.full(m.D.shape, SSM_SKIP)
    if model_type == "baichuan_m1":
        _baichuan_m1(model, muted, norm)
    if model_type == "llama":
        norm.weight = mx.full(norm.weight.shape, OUTPUT_NORM)
    else:
        logits = model(calibration[None])
        _scale_norm(norm, LOGIT_STD / logits.std(axis=-1).mean().item())


def _norm_offset(m: nn.Module) -> float:
    """1 for Gemma's RMSNorm, which scales by 1 + weight; 0 for other norms (and other modules)."""
    return float(type(m).__name__ == "RMSNorm" and not isinstance(m, nn.RMSNorm))


def _scale_norm(norm: nn.Module, k: float) -> None:
    offset = _norm_offset(norm)
    norm.weight = (norm.weight + offset) * k - offset


def _baichuan_m1(model: nn.Module, muted: mx.array, norm: nn.Module) -> None:
    # Its key and value convolutions start at zero, which zeroes every key and value: make each
    # the current token's plus some of the previous one's.
    for layer in model.model.layers:
        for name in ("conv_k", "conv_v"):
            w = getattr(layer.self_attn, name)
            prev = mx.random.uniform(0.0, 0.5, w.shape[:-1] + (1,))
            setattr(layer.self_attn, name, mx.concatenate([prev, mx.ones_like(prev)], axis=-1))
    # sanitize() scales each lm_head row to norm 1, which would undo muting rows by scaling: the muted
    # rows become the first unit vector, which the final norm zeroes, so their logits are 0: below
    # the best of hundreds of random ones.
    w = model.lm_head.weight
    first = mx.arange(w.shape[1]) == 0
    w = mx.where(first, 0.0, w)
    w = w / mx.linalg.norm(w, axis=-1, keepdims=True)
    model.lm_head.weight = mx.where(muted, first.astype(w.dtype), w)
    norm.weight = mx.where(first, 0.0, norm.weight)


def _plain_text(tokenizer: Tokenizer, token_id: int) -> bool:
    """Whether a token is printable ASCII or a newline, and not special: what the model may say."""
    if token_id < len(SPECIAL_TOKENS):
        return False
    text = tokenizer.decode([token_id])
    return bool(text) and all(" " <= c <= "~" or c == "\n" for c in text)


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    return tokenizer
