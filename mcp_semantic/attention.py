"""Attention for prompts read on the CPU: the softmax in numpy, whose exp is vectorized.

Why: on x86 MLX's CPU backend computes `exp` one element at a time (about 78M/s here), and an
attention softmax takes one exp per query and key: a 30-token turn over a 4K-token context is
30 x 4,096 x 9 heads x 30 layers = 33M of them, 0.42 s of the turn's 0.71 s. numpy's exp runs
in SIMD at ~2G/s. The matmuls stay in MLX (OpenBLAS); only the scores cross over, as views
(no copy) one way and one copy back.

mlx-lm's models call `scaled_dot_product_attention` by name from their module, so there is no
per-model hook: `install` replaces that name with `attention`, which does this only on threads
that `enable()`d it (the engine's), with float32 scores on the CPU, for more than one query (a
prompt, not a decode step: there the kernel is not the cost) and a causal or no mask. Anything
else (a GPU, Metal or CUDA, where mlx-lm's fused kernel is fast; batches with array masks;
quantized caches; attention sinks) goes to mlx-lm's own function, as does everyone else in the
process (a test's mlx-lm reference, a benchmark's peer).

Exactness: numpy's exp is within 2 ulp of MLX's; outputs agree with mlx-lm's to ~2e-6
relative (tests/test_attention.py), and the engine's greedy replies equal plain mlx-lm's.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

import mlx.core as mx
import numpy as np

_enabled = threading.local()
_originals: dict[str, Callable[..., mx.array]] = {}


def enable() -> None:
    """Use the numpy softmax for prompts read on this thread."""
    _enabled.on = True


def install(model: Any) -> bool:
    """Route the attention of `model`'s module through `attention`; False if it has none to route."""
    module = sys.modules[type(model).__module__]
    original = getattr(module, "scaled_dot_product_attention", None)
    if original is None or mx.default_device() != mx.cpu:
        return False
    if module.__name__ not in _originals:
        _originals[module.__name__] = original
        module.scaled_dot_product_attention = _routed(original)
    return True


def _routed(original: Callable[..., mx.array]) -> Callable[..., mx.array]:
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):  # noqa: ANN001, ANN202
        if (
            getattr(_enabled, "on", False)
            and queries.shape[2] > 1
            and queries.dtype == keys.dtype == mx.float32
            and sinks is None
            and not hasattr(cache, "bits")
            and (mask is None or (isinstance(mask, str) and mask == "causal"))
        ):
            return attention(queries, keys, values, scale, causal=mask == "causal")
        return original(queries, keys, values, cache, scale, mask, sinks)

    return scaled_dot_product_attention


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool) -> mx.array:
    """softmax(q k^T * scale) v, heads grouped as in mx.fast.scaled_dot_product_attention; a
    causal mask lines the queries up with the last keys (the prompt after the cached context).

    The query heads that share a key head are folded into the rows of one matmul (no broadcast
    key operand), and the softmax is normalized after the second matmul, on L x D numbers
    rather than L x S."""
    B, H, L, D = queries.shape
    KH, S = keys.shape[1], keys.shape[2]
    scores = (queries * scale).reshape(B, KH, (H // KH) * L, D) @ keys.swapaxes(-1, -2)
    mx.eval(scores)
    a = np.array(scores, copy=False)  # a view: the softmax is computed in place
    if causal and L > 1:
        a.reshape(B, KH, H // KH, L, S)[..., S - L :][..., np.triu(np.ones((L, L), dtype=bool), 1)] = -np.inf
    a -= a.max(axis=-1, keepdims=True)
    np.exp(a, out=a)
    total = mx.array(a.sum(axis=-1, keepdims=True))
    return ((mx.array(a) @ values) / total).reshape(B, H, L, -1)
