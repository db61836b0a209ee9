"""Every cache kind mlx-lm models make, as the engine keeps them.

mlx-lm's `make_prompt_cache(model)` gives each layer a KVCache (full attention), a
RotatingKVCache (a sliding window), a ChunkedKVCache (Llama 4's chunked attention), an
ArraysCache (recurrent state: SSM, conv and gated-delta layers) or a CacheList of these. `probe`
flattens that list into `Leaf`s, each named by where its arrays go in a block (`layers.3`, or
`layers.3.1` inside a CacheList), and runs one token to learn their shapes. Per kind, a block
(block_pool.py) holds:

- kv, window, chunked: its tokens' keys and values, whatever the layer's attention span;
- state: the layer's state after the block's last token (a checkpoint); a recurrent state
  cannot be trimmed back, so a cache resumes only where a block ends.

Why our own working caches for windows and chunks (`WindowCache`, `ChunkCache`) rather than
RotatingKVCache and ChunkedKVCache: those drop or overwrite tokens as the window moves, so by
the end of a call the K/V of its older tokens are gone before its blocks are cut. Ours keep every
token since the window of the resume point, and show attention exactly the tokens and mask
mlx-lm's would (the K/V in temporal order; RotatingKVCache's ring holds them rotated, which only
changes the order of a sum). Their batched form, `BatchWindowCache`, is mlx-lm's BatchKVCache
showing the window. ChunkedKVCache has no batched form in mlx-lm, and Llama 4 builds its chunk
mask for one sequence, so a model with one decodes one call at a time (`Layout.batchable`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import (
    ArraysCache,
    BatchKVCache,
    CacheList,
    ChunkedKVCache,
    KVCache,
    RotatingKVCache,
    _BaseCache,
    make_prompt_cache,
)

Kind = Literal["kv", "window", "chunked", "state"]


class UnsupportedCache(ValueError):
    """A model whose cache mcp-semantic cannot keep; the message names the model type and cache."""


@dataclass(frozen=True)
class Leaf:
    """One cache of the model's: its kind, its window or chunk length, where its arrays go."""

    name: str  # its arrays in a block: `<name>.keys`, `<name>.values`, `<name>.state.<j>`
    kind: Kind
    size: int = 0  # the window (window) or chunk (chunked) length

    @property
    def attention(self) -> bool:
        return self.kind != "state"


@dataclass
class Layout:
    """The model's cache: its leaves in order, how they nest, and every array's shape."""

    leaves: list[Leaf]
    nesting: list[int]  # per entry of the model's cache list: 0, or the length of its CacheList
    shapes: dict[str, tuple[tuple[int, ...], mx.Dtype]]  # per array: (1, heads, 1, dim) for K/V, whole for states
    model_type: str = ""

    @classmethod
    def full_attention(cls, layers: int, heads: int, head_dim: int, dtype: mx.Dtype = mx.float32) -> Layout:
        """The layout of a plain model (KVCache in every layer), for caches made without one."""
        leaves = [Leaf(f"layers.{i}", "kv") for i in range(layers)]
        shapes = {f"{leaf.name}.{kind}": ((1, heads, 1, head_dim), dtype) for leaf in leaves for kind in ("keys", "values")}
        return cls(leaves, [0] * layers, shapes)

    @property
    def recurrent(self) -> bool:
        """Whether a cache can resume only where a block ends (a state cannot be trimmed)."""
        return any(leaf.kind == "state" for leaf in self.leaves)

    @property
    def batchable(self) -> bool:
        return not any(leaf.kind == "chunked" for leaf in self.leaves)

    @property
    def attention(self) -> list[Leaf]:
        return [leaf for leaf in self.leaves if leaf.attention]

    def describe(self) -> str:
        """E.g. "24 layers: 18 state, 6 kv" (for the log and the README)."""
        counts: dict[str, int] = {}
        for leaf in self.leaves:
            label = f"{leaf.kind}({leaf.size})" if leaf.size else leaf.kind
            counts[label] = counts.get(label, 0) + 1
        return f"{len(self.nesting)} layers: " + ", ".join(f"{n} {k}" for k, n in counts.items())

    def new_cache(self) -> list[Any]:
        """An empty working cache for a call that reuses nothing."""
        return self.nest([_new_leaf(leaf) for leaf in self.leaves])

    def flatten(self, cache: list[Any]) -> list[Any]:
        """The leaf caches of a working (or batch) cache, in `leaves` order."""
        out = []
        for c in cache:
            out.extend(c.caches if isinstance(c, CacheList) else (c,))
        return out

    def nest(self, leaves: list[Any]) -> list[Any]:
        """A cache list as the model takes it, from leaf caches in `leaves` order."""
        out, it = [], iter(leaves)
        for n in self.nesting:
            out.append(CacheList(*(next(it) for _ in range(n))) if n else next(it))
        return out

    def states(self, cache: list[Any], row: int | None = None) -> list[list[mx.array | None]]:
        """Each state leaf's arrays now (of batch row `row`): a checkpoint. The models replace
        a state's arrays rather than write into them, so holding them is enough."""
        out = []
        for leaf, c in zip(self.leaves, self.flatten(cache)):
            if leaf.kind == "state":
                out.append([a if a is None or row is None else a[row : row + 1] for a in c.cache])
        return out


def probe(model: Any) -> Layout:
    """The model's cache layout, from `make_prompt_cache` and one token run through it; a cache
    kind mcp-semantic cannot keep raises UnsupportedCache naming the model type and the kind."""
    model_type = type(model).__module__.rsplit(".", 1)[-1]
    cache = make_prompt_cache(model)
    leaves, nesting, flat = [], [], []
    for i, c in enumerate(cache):
        children = list(c.caches) if isinstance(c, CacheList) else [c]
        nesting.append(len(children) if isinstance(c, CacheList) else 0)
        for j, child in enumerate(children):
            name = f"layers.{i}.{j}" if isinstance(c, CacheList) else f"layers.{i}"
            leaves.append(_leaf(name, child, model_type))
            flat.append(child)
    # On a thread of its own, joined here: MLX keeps a compile cache per thread (mlx-lm compiles its
    # activations) whose destructor takes the GIL, and a thread that ran the model and ends while
    # the interpreter finalizes aborts the process ("terminate called without an active
    # exception"), as anyio's worker threads, which open the engine, do at shutdown.
    def one_token() -> None:
        model(mx.array([[0]]), cache=cache)
        mx.eval([c.state for c in cache])

    with ThreadPoolExecutor(1) as thread:
        thread.submit(one_token).result()
    shapes: dict[str, tuple[tuple[int, ...], mx.Dtype]] = {}
    for leaf, c in zip(leaves, flat):
        if leaf.attention:
            keys, values = c.keys, c.values
            shapes[f"{leaf.name}.keys"] = ((1, keys.shape[1], 1, keys.shape[3]), keys.dtype)
            shapes[f"{leaf.name}.values"] = ((1, values.shape[1], 1, values.shape[3]), values.dtype)
        else:
            for j, a in enumerate(c.cache):
                if a is not None:
                    shapes[f"{leaf.name}.state.{j}"] = (tuple(a.shape), a.dtype)
    return Layout(leaves, nesting, shapes, model_type)


def _leaf(name: str, c: Any, model_type: str) -> Leaf:
    kind = type(c)
    if kind is KVCache:
        return Leaf(name, "kv")
    if kind is RotatingKVCache and c.keep == 0:
        return Leaf(name, "window", c.max_size)
    if kind is ChunkedKVCache:
        return Leaf(name, "chunked", c.chunk_size)
    if kind is ArraysCache:
        return Leaf(name, "state", len(c.cache))
    what = f"{kind.__name__}(keep={c.keep})" if kind is RotatingKVCache else kind.__name__
    raise UnsupportedCache(
        f"model type {model_type!r} makes a {what} cache (layer {name.split('.')[1]}), which mcp-semantic "
        "cannot keep yet; it keeps KVCache, RotatingKVCache (keep=0), ChunkedKVCache, ArraysCache and CacheLists of these"
    )


def _new_leaf(leaf: Leaf) -> Any:
    if leaf.kind == "kv":
        return KVCache()
    if leaf.kind == "window":
        return WindowCache(leaf.size)
    if leaf.kind == "chunked":
        return ChunkCache(leaf.size)
    return ArraysCache(leaf.size)


def span_start(leaf: Leaf, n: int, block_tokens: int) -> int:
    """The first token a working cache of `leaf` holding `n` tokens keeps, at a block start:
    0 for full attention; for a window, the block where the last `size - 1` tokens begin (what
    the next token sees); for a chunk, the block of the last `size` tokens (what
    ChunkedKVCache keeps). States keep nothing per token (n: the state is at the end)."""
    if leaf.kind == "kv":
        return 0
    if leaf.kind == "state":
        return n
    keep = leaf.size - 1 if leaf.kind == "window" else leaf.size
    return max(0, n - keep) // block_tokens * block_tokens


class _SpanCache(_BaseCache):
    """Keys and values of the tokens from `first` to `offset`, in a buffer grown as KVCache's."""

    step = 256

    def __init__(self, keys: mx.array | None = None, values: mx.array | None = None, offset: int = 0, first: int = 0):
        self.keys, self.values, self.offset, self.first = keys, values, offset, first

    def _append(self, keys: mx.array, values: mx.array) -> int:
        prev = self.offset - self.first
        if self.keys is None or prev + keys.shape[2] > self.keys.shape[2]:
            B, H, S, _ = keys.shape
            grow = (self.step + S - 1) // self.step * self.step
            new_k = mx.zeros((B, H, grow, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.keys[..., prev : prev + keys.shape[2], :] = keys
        self.values[..., prev : prev + keys.shape[2], :] = values
        self.offset += keys.shape[2]
        return prev

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None]:
        return self.keys, self.values

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class WindowCache(_SpanCache):
    """A sliding-window layer's working cache: what RotatingKVCache(max_size, keep=0) shows
    attention (a token sees itself and the `max_size - 1` before it), over a buffer that keeps
    every token since `first`."""

    def __init__(self, max_size: int, keys: mx.array | None = None, values: mx.array | None = None, offset: int = 0,
                 first: int = 0):
        super().__init__(keys, values, offset, first)
        self.max_size = max_size
        self._seen = 0  # where the keys last shown begin, in the buffer

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self._append(keys, values)
        self._seen = max(0, prev - (self.max_size - 1))
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        end = self.offset - self.first
        return self.keys[..., self._seen : end, :], self.values[..., self._seen : end, :]

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> Any:
        """RotatingKVCache's mask for the keys the next update shows."""
        shown = min(self.max_size - 1, self.offset - self.first)
        window_size = window_size or self.max_size
        if N == 1 and window_size > shown and not return_array:
            return None
        if N > 1 and shown + N <= window_size and not return_array:
            return "causal"
        return create_causal_mask(N, shown, window_size=window_size)


class ChunkCache(_SpanCache):
    """Llama 4's chunked-attention working cache: what ChunkedKVCache shows (the tokens from
    `start_position`, which the model moves with `maybe_trim_front` and masks by chunk), over a
    buffer that keeps every token since `first`."""

    def __init__(self, chunk_size: int, keys: mx.array | None = None, values: mx.array | None = None, offset: int = 0,
                 first: int = 0):
        super().__init__(keys, values, offset, first)
        self.chunk_size = chunk_size
        self.start_position = max(first, offset - chunk_size) if offset > chunk_size else first

    def maybe_trim_front(self) -> None:
        if self.offset - self.start_position > self.chunk_size:
            self.start_position = self.offset - self.chunk_size

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._append(keys, values)
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        begin, end = self.start_position - self.first, self.offset - self.first
        return self.keys[..., begin:end, :], self.values[..., begin:end, :]


class BatchWindowCache(BatchKVCache):
    """mlx-lm's BatchKVCache (rows left-padded to a common length), showing attention each
    row's window: the last `max_size - 1` columns before the new tokens, and the new tokens."""

    def __init__(self, max_size: int, left_padding: list[int]):
        super().__init__(left_padding)
        self.max_size = max_size
        self._seen = 0

    def _shown_from(self) -> int:
        return max(0, self._idx - (self.max_size - 1))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._seen = self._shown_from()
        super().update_and_fetch(keys, values)
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        return self.keys[..., self._seen : self._idx, :], self.values[..., self._seen : self._idx, :]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **kwargs: Any) -> mx.array:
        seen = self._shown_from()
        return create_causal_mask(N, offset=self._idx - seen, window_size=window_size or self.max_size,
                                  left_padding=self.left_padding - seen)


# The decode batch's forms of the working caches (batch.py)


def to_batch(layout: Layout, cache: list[Any]) -> list[Any]:
    """A one-row batch over a call's working cache, without copying it."""
    out = []
    for leaf, c in zip(layout.leaves, layout.flatten(cache)):
        if leaf.kind == "state":
            out.append(c)  # an ArraysCache is its own batched form (rows along axis 0)
            continue
        b = BatchKVCache([0]) if leaf.kind == "kv" else BatchWindowCache(leaf.size, [0])
        b.keys, b.values = c.keys, c.values
        b.offset, b._idx = mx.array([c.offset]), c.offset - getattr(c, "first", 0)
        out.append(b)
    return layout.nest(out)


def whole_of(layout: Layout, cache: list[Any]) -> list[tuple[mx.array, mx.array]] | None:
    """A lone call's cache arrays whole, room included (its own KVCaches, or a one-row batch over
    them starting at token 0), for its agent's next call to write on in place (Caches.remember);
    None for other caches (windows, recurrent state, rows of a batch of several)."""
    out = []
    for leaf, c in zip(layout.leaves, layout.flatten(cache)):
        if leaf.kind != "kv" or c.keys is None:
            return None
        if isinstance(c, BatchKVCache) and (c.keys.shape[0] != 1 or c.left_padding[0].item() != 0):
            return None
        out.append((c.keys, c.values))
    return out


def row_of(layout: Layout, batch: list[Any], i: int, n: int) -> list[Any]:
    """Row `i`'s working cache, holding its `n` tokens, as views of the batch's arrays (valid
    until the batch changes)."""
    out = []
    for leaf, b in zip(layout.leaves, layout.flatten(batch)):
        if leaf.kind == "state":
            c = ArraysCache(leaf.size)
            c.cache = [None if a is None else a[i : i + 1] for a in b.cache]
            out.append(c)
            continue
        pad = b.left_padding[i].item()
        keys, values = b.keys[i : i + 1, :, pad : b._idx], b.values[i : i + 1, :, pad : b._idx]
        if leaf.kind == "kv":
            c = KVCache()
            c.keys, c.values, c.offset = keys, values, n
        else:
            c = WindowCache(leaf.size, keys, values, n, n - keys.shape[2])
        out.append(c)
    return layout.nest(out)
