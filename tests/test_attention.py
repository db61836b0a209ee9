"""The CPU attention (numpy softmax) against mlx's own, and where it is used."""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx_lm.models.llama as llama
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mcp_semantic import attention
from mcp_semantic.models import load_model


@pytest.mark.parametrize(
    ("heads", "kv_heads", "queries", "keys", "causal"),
    [(9, 3, 30, 700, True), (4, 4, 17, 17, True), (8, 2, 64, 300, False), (6, 1, 5, 5, True), (2, 1, 2, 1000, True)],
)
def test_attention_equals_mlx(heads: int, kv_heads: int, queries: int, keys: int, causal: bool) -> None:
    mx.random.seed(queries * keys)
    q = mx.random.normal((2, heads, queries, 64)) * 2
    k = mx.random.normal((2, kv_heads, keys, 64)) * 2
    v = mx.random.normal((2, kv_heads, keys, 64))
    mask = "causal" if causal else None
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    out = attention.attention(q, k, v, 0.125, causal=causal)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (mx.abs(out - ref).max() / mx.abs(ref).max()).item() < 1e-5


def test_attention_on_a_strided_cache_view() -> None:
    """The keys and values a KVCache hands over are views of a longer buffer."""
    q = mx.random.normal((1, 4, 8, 32))
    k_buf, v_buf = mx.random.normal((1, 2, 256, 32)), mx.random.normal((1, 2, 256, 32))
    k, v = k_buf[..., :100, :], v_buf[..., :100, :]
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal")
    out = attention.attention(q, k, v, 0.2, causal=True)
    assert (mx.abs(out - ref).max() / mx.abs(ref).max()).item() < 1e-5


def test_only_enabled_threads_take_the_numpy_path(tiny_model_dir, tmp_path, monkeypatch) -> None:
    lm = load_model(str(tiny_model_dir), tmp_path)
    assert attention.install(lm.model)
    calls = []
    real = attention.attention
    monkeypatch.setattr(attention, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    def forward() -> mx.array:
        out = lm.model(mx.array([[5, 6, 7, 8, 9, 10]]), cache=make_prompt_cache(lm.model))
        mx.eval(out)
        return out

    plain = forward()  # this thread has not enabled it: mlx-lm's attention
    assert calls == []
    fast = []

    def engine_like() -> None:
        attention.enable()
        fast.append(forward())

    t = threading.Thread(target=engine_like)
    t.start()
    t.join()
    assert len(calls) == len(lm.model.layers)
    assert (mx.abs(fast[0] - plain).max() / mx.abs(plain).max()).item() < 1e-5
    assert llama.scaled_dot_product_attention is not attention.attention  # routed, not replaced outright
