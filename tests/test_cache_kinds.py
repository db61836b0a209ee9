"""Every cache kind: the layout a model's cache probes to, working caches that show attention what
mlx-lm's own caches show it, blocks cut from them and rebuilt, and their batched forms."""

from __future__ import annotations


import mlx.core as mx
import pytest
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from mcp_semantic.block_pool import Storage, cut_blocks
from mcp_semantic.cache_build import reconstruct
from mcp_semantic.cache_kinds import UnsupportedCache, probe, row_of, to_batch
from mcp_semantic.models import load_model
from mcp_semantic.tiny_model import make_tiny_model

B = 16  # tokens per block
# family -> the kinds its probe finds (a CacheList's children count one each)
KINDS = {
    "gemma3_text": {"window", "kv"},
    "gpt_oss": {"window", "kv"},
    "qwen3_next": {"state", "kv"},
    "qwen3_5": {"state", "kv"},
    "lfm2": {"state", "kv"},
    "nemotron_h": {"state", "kv"},
    "mamba2": {"state"},
    "falcon_h1": {"state", "kv"},
    "baichuan_m1": {"state", "window", "kv"},
    "llama4": {"chunked", "kv"},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("kinds")
    loaded = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = load_model(str(make_tiny_model(root / family, model_type=family)), root)
        return loaded[family]

    return get


def tokens(n: int, seed: int = 0) -> list[int]:
    return mx.random.randint(3, 400, (n,), key=mx.random.key(seed)).tolist()


def close(a: mx.array, b: mx.array) -> bool:
    """Equal up to the order of a sum: RotatingKVCache keeps a window's keys in a ring (rotated),
    ours in temporal order, which moves gemma3's logits by up to ~5e-4 (of ~10). A wrong window
    or a missing token moves them by whole units."""
    return mx.allclose(a, b, atol=2e-3).item() and mx.argmax(a).item() == mx.argmax(b).item()


def feed(model, cache, ids: list[int], chunks: list[int]) -> mx.array:
    """Run `ids` through the model in chunks of the given sizes; the last position's logits."""
    at = 0
    for n in chunks:
        logits = model(mx.array(ids[at : at + n])[None], cache=cache)
        at += n
    assert at == len(ids)
    return logits[0, -1]


@pytest.mark.parametrize("family", sorted(KINDS))
def test_probe_finds_each_kind(models, family: str) -> None:
    layout = probe(models(family).model)
    assert {leaf.kind for leaf in layout.leaves} == KINDS[family]
    assert layout.recurrent == ("state" in KINDS[family])
    assert layout.batchable == ("chunked" not in KINDS[family])
    for leaf in layout.leaves:
        if leaf.kind in ("window", "chunked"):
            assert leaf.size < 64  # the tiny models' windows are shorter than the prompts below


@pytest.mark.parametrize("family", sorted(KINDS))
def test_working_caches_show_attention_what_mlx_lm_shows(models, family: str) -> None:
    """Chunked prefill past the window, then decode steps past it again: our working caches
    (which keep every token) give the logits mlx-lm's own caches give, step for step."""
    model = models(family).model
    layout = probe(model)
    ids = tokens(100)
    ours, theirs = layout.new_cache(), make_prompt_cache(model)
    a, b = feed(model, ours, ids, [30, 1, 45, 24]), feed(model, theirs, ids, [30, 1, 45, 24])
    assert close(a, b)
    for _ in range(70):  # one token at a time: RotatingKVCache's ring wraps around
        token = mx.argmax(b).item()
        a, b = feed(model, ours, [token], [1]), feed(model, theirs, [token], [1])
        assert close(a, b)


@pytest.mark.parametrize("family", sorted(KINDS))
def test_blocks_rebuild_the_cache_at_a_block_end(models, family: str) -> None:
    """Cut into blocks (states at every block end), rebuilt at an earlier block end (and, where
    nothing is recurrent, mid-block): the continuation is what the original cache gives."""
    model = models(family).model
    layout = probe(model)
    storage = Storage("fp", "float32")
    ids = tokens(90)
    cache, checkpoints = layout.new_cache(), {}
    for start in range(0, 90, B):  # as the engine reads a prompt: chunks end where blocks end
        feed(model, cache, ids[start : start + B], [len(ids[start : start + B])])
        checkpoints[min(start + B, 90)] = layout.states(cache)
    blocks = cut_blocks(layout, cache, ids, storage, B, checkpoints)
    assert all(len(b.arrays) == len(blocks[0].arrays) for b in blocks)  # every block whole
    for reuse in [64, 90] + ([] if layout.recurrent else [57]):
        k = -(-reuse // B)
        rebuilt = reconstruct(layout, storage, blocks[:k], reuse, 128, B)
        reference = layout.new_cache()
        feed(model, reference, ids[:reuse], [reuse])
        follow = tokens(20, seed=1)
        assert close(feed(model, rebuilt, follow, [20]), feed(model, reference, follow, [20]))


@pytest.mark.parametrize("family", sorted(f for f in KINDS if f != "llama4"))
def test_batched_rows_decode_as_they_would_alone(models, family: str) -> None:
    """Rows of different lengths joined into one batch (and one leaving) decode what each would alone."""
    model = models(family).model
    layout = probe(model)
    caches, lasts = [], []
    for n, seed in ((70, 1), (33, 2), (5, 3)):
        c = layout.new_cache()
        lasts.append(mx.argmax(feed(model, c, tokens(n, seed), [n])).item())
        caches.append(c)
    alone = [layout.new_cache() for _ in caches]
    for c, n, seed in zip(alone, (70, 33, 5), (1, 2, 3)):
        feed(model, c, tokens(n, seed), [n])
    batch = to_batch(layout, caches[0])
    for c in caches[1:]:
        for mine, theirs in zip(batch, to_batch(layout, c)):
            mine.extend(theirs)
    inputs = lasts
    for step in range(30):
        logits = model(mx.array(inputs)[:, None], cache=batch)[:, -1]
        singles = [feed(model, c, [t], [1]) for c, t in zip(alone, inputs)]
        for row, single in enumerate(singles):
            assert close(logits[row], single), (step, row)
        inputs = [mx.argmax(s).item() for s in singles]
        if step == 10:  # the middle row leaves; its cache goes on alone, from the batch's views
            (left,) = [row_of(layout, batch, 1, 33 + 11)]
            follow = tokens(5, seed=9)
            assert close(feed(model, left, follow, [5]), feed(model, alone[1], follow, [5]))
            for b in batch:
                b.filter([0, 2])
            alone, inputs = [alone[0], alone[2]], [inputs[0], inputs[2]]


def test_an_unsupported_cache_is_refused_naming_model_type_and_kind(models, monkeypatch) -> None:
    model = models("gemma3_text").model
    monkeypatch.setattr(type(model), "make_cache", lambda self: [RotatingKVCache(8, keep=4) for _ in self.layers])
    with pytest.raises(UnsupportedCache, match=r"model type 'gemma3_text' makes a RotatingKVCache\(keep=4\) cache"):
        probe(model)
