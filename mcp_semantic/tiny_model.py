"""Tiny llama models with random weights, for fast tests, benchmarks and examples.

They are ordinary mlx-lm directories, loaded by `models.load_model` like any other model,
with a real byte-level BPE tokenizer and a ChatML chat template like SmolLM2's.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.utils import save_config
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""ids 0, 1, 2, as in SmolLM2."""

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
EMBED_SCALE = 0.25
Q_SCALE = 12.0
OUTPUT_NORM = 16.0
_MUTED = 0.01
"""Embedding rows of tokens the model must not say are scaled by this, so they are never predicted."""


def make_tiny_model(
    out_dir: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random float32 llama model with a trained BPE tokenizer to `out_dir`; return it.

    Same arguments, same files. The built-in text yields about 730 BPE tokens; a larger
    `vocab_size` is filled with `<|reserved_N|>` special tokens.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes and special tokens)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(vocab_size)
    speakable = [_plain_text(tokenizer, i) for i in range(tokenizer.get_vocab_size())]
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - len(speakable))])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": max_position_embeddings,
                "chat_template": CHAT_TEMPLATE,
            },
            f,
            indent=2,
        )

    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    speakable += [False] * (vocab_size - len(speakable))
    muted = ~mx.array(speakable)[:, None]
    embed = model.model.embed_tokens
    embed.weight = embed.weight * mx.where(muted, _MUTED * EMBED_SCALE, EMBED_SCALE)
    model.model.norm.weight = mx.full((hidden_size,), OUTPUT_NORM)
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight = layer.self_attn.q_proj.weight * Q_SCALE
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, out_dir / "config.json")
    return out_dir


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
