"""KV blocks: fixed-size token blocks named by their content, the pool that holds them in
memory, and the contiguous cache built from them.

An agent's KV cache is a list of blocks of `block_tokens` tokens (the last one may be partial).
A block's id hashes its parent block's id, its token ids and the storage key (the model
fingerprint and the precision the block is stored at), so an id names a whole prefix, as in
vLLM's prefix caching: two agents whose histories start with the same tokens get the same ids
for those blocks and share them, in memory and on disk (see store.py).

Why not mlx-lm's cache classes for the blocks themselves: KVCache and QuantizedKVCache hold
one growing buffer per layer, the shape the model needs while it runs, and `save_prompt_cache`
writes that whole buffer. A block is a fixed slice shared by many caches, so the pool keeps
plain arrays and builds a KVCache (mlx-lm's, unchanged) for each call. At --kv-bits 8 or 4
the blocks stay quantized in memory and on disk, but the working cache is dequantized to the
model's dtype rather than made a QuantizedKVCache: on a CPU, quantized matmuls run 30 to 80
times slower than float32 ones, and attention over a long context would pay that every token.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

BLOCK_TOKENS = 256


@dataclass(frozen=True)
class Storage:
    """How blocks are stored: for which model, in which dtype, at which precision.

    `kv_bits` None keeps the dtype the model computes in (lossless); 16 stores float16; 8 and 4
    use MLX's affine quantization along head_dim (group size 64, or 32 for smaller heads), as
    mlx-lm's QuantizedKVCache does.
    """

    fingerprint: str
    dtype: str  # the model's compute dtype, e.g. "float32"
    kv_bits: int | None = None

    @property
    def key(self) -> str:
        """What a block's id depends on besides its tokens: another model or precision, other ids."""
        return f"{self.fingerprint}|{self.dtype}|kv{self.kv_bits or 0}"

    def encode(self, a: mx.array) -> dict[str, mx.array]:
        """One layer's keys or values as stored (always a new array: a block owns its memory)."""
        if self.kv_bits == 16 and a.dtype not in (mx.float16, mx.bfloat16):
            return {"": a.astype(mx.float16)}
        if self.kv_bits in (8, 4):
            w, scales, biases = mx.quantize(mx.contiguous(a), group_size=group_size(a.shape[-1]), bits=self.kv_bits)
            return {".weight": w, ".scales": scales, ".biases": biases}
        return {"": mx.contiguous(a)}

    def decode(self, arrays: dict[str, mx.array], name: str) -> mx.array:
        dtype = getattr(mx, self.dtype)
        if name + ".weight" in arrays:
            w, scales, biases = (arrays[f"{name}.{part}"] for part in ("weight", "scales", "biases"))
            group = group_size(w.shape[-1] * 32 // self.kv_bits)
            return mx.dequantize(w, scales, biases, group_size=group, bits=self.kv_bits).astype(dtype)
        a = arrays[name]
        return a if a.dtype == dtype else a.astype(dtype)


def group_size(head_dim: int) -> int:
    return 64 if head_dim % 64 == 0 else 32


def kv_bits_supported(head_dim: int, kv_bits: int | None) -> bool:
    return kv_bits not in (8, 4) or head_dim % 32 == 0


def block_id(parent: str, tokens: list[int], key: str) -> str:
    """A block's id: a hash of its parent's id, its storage key and its token ids (128 bits)."""
    h = hashlib.sha256()
    for field in (parent.encode(), key.encode(), np.asarray(tokens, dtype=np.int64).tobytes()):
        h.update(len(field).to_bytes(8, "little"))  # lengths too: no two inputs run together
        h.update(field)
    return h.hexdigest()[:32]


def chain_ids(tokens: list[int], key: str, block_tokens: int = BLOCK_TOKENS) -> list[str]:
    """The ids of the blocks of `tokens`, in order; a partial last block gets one too.

    A partial block's id differs from the full block it may grow into (the token count is
    hashed), so a block's content never changes under its id.
    """
    ids = []
    for start in range(0, len(tokens), block_tokens):
        ids.append(block_id(ids[-1] if ids else "", tokens[start : start + block_tokens], key))
    return ids


def block_ids(tokens: list[int], key: str, block_tokens: int = BLOCK_TOKENS) -> list[str]:
    """The ids of the full blocks of `tokens` only: the ones another prompt can share."""
    return chain_ids(tokens[: len(tokens) // block_tokens * block_tokens], key, block_tokens)


@dataclass(eq=False)
class Block:
    """One block: its id, parent, token ids, and every layer's keys and values as stored,
    named as in its file: `layers.<i>.keys` (or `.weight`, `.scales`, `.biases` when quantized)."""

    id: str
    parent: str
    tokens: list[int]
    arrays: dict[str, mx.array]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def cut_blocks(
    cache: list[Any],
    tokens: list[int],
    storage: Storage,
    block_tokens: int,
    skip: Iterable[str] = (),
    evaluate: bool = True,
) -> list[Block]:
    """The blocks of a cache holding `tokens`, copied out of it, except the ids in `skip`.

    The engine passes the blocks it already holds as `skip`: a turn copies only its new tokens.
    With `evaluate` False the copies are left to MLX's lazy evaluation: they are made when the
    blocks are first used (saved, or built into a cache), not while other calls wait for their
    next token; the cache's arrays must not change until then.
    """
    skip = set(skip)
    ids = chain_ids(tokens, storage.key, block_tokens)
    blocks = []
    for i, bid in enumerate(ids):
        if bid in skip:
            continue
        start, end = i * block_tokens, min((i + 1) * block_tokens, len(tokens))
        arrays = {}
        for layer, c in enumerate(cache):
            for kind, a in (("keys", c.keys), ("values", c.values)):
                for suffix, part in storage.encode(a[..., start:end, :]).items():
                    arrays[f"layers.{layer}.{kind}{suffix}"] = part
        blocks.append(Block(bid, ids[i - 1] if i else "", tokens[start:end], arrays))
    if evaluate:
        mx.eval([a for b in blocks for a in b.arrays.values()])
    return blocks


def reconstruct(blocks: list[Block], storage: Storage, n_layers: int, room: int = 0) -> list[KVCache]:
    """One contiguous KVCache per layer from `blocks`, with `room` spare slots for the new tokens.

    Why not KVCache.update_and_fetch block by block: it grows its buffer in steps and copies the
    whole prefix each time; one copy per layer writes every byte once, and the room lets the
    call's prompt and reply go in place. On the CPU, blocks stored at the model's dtype are
    copied by numpy (read_into_cache).
    """
    dtype = getattr(mx, storage.dtype)
    if mx.default_device() == mx.cpu and (len(blocks) > 1 or room) and all(
            a.dtype == dtype for b in blocks for a in b.arrays.values()):
        return read_into_cache(None, blocks, n_layers, sum(len(b.tokens) for b in blocks) + room)[0]
    caches = []
    for layer in range(n_layers):
        c = KVCache()
        parts = {}
        for kind in ("keys", "values"):
            name = f"layers.{layer}.{kind}"
            arrays = [storage.decode(b.arrays, name) for b in blocks]
            if room:
                shape = list(arrays[-1].shape)
                shape[2] = room
                arrays.append(mx.zeros(shape, arrays[-1].dtype))
            # One block without room is used without a copy, through a new array object: KVCache
            # writes into its arrays in place (`keys[...] = new`), which must not reach the block.
            parts[kind] = mx.concatenate(arrays, axis=2) if len(arrays) > 1 else arrays[0][:]
        c.keys, c.values, c.offset = parts["keys"], parts["values"], sum(len(b.tokens) for b in blocks)
        caches.append(c)
    mx.eval([(c.keys, c.values) for c in caches])
    return caches


def host_view(a: mx.array) -> np.ndarray:
    """numpy's view of an evaluated CPU array's memory (bfloat16, which numpy lacks, as uint16)."""
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a, copy=False)


def read_into_cache(store: Any, parts: list[Any], n_layers: int, size: int) -> tuple[list[KVCache], int, dict[int, str]]:
    """A working cache of `size` slots per layer holding `parts` one after another, built on the
    host (CPU): blocks (copied in by numpy, about twice as fast as MLX's strided copy here) and
    block files from `Store.open_blocks` (their data read straight in by `store.fill_blocks`,
    checksummed). Returns the cache, the tokens it holds (up to the first file that failed) and,
    by token position, why each failed file could not be used."""
    mx.eval([a for part in parts if isinstance(part, Block) for a in part.arrays.values()])  # cut lazily, maybe
    first = parts[0]
    shapes = {k: (a.dtype, a.shape) for k, a in first.arrays.items()} if isinstance(first, Block) else {
        k: (dtype, shape) for k, (dtype, shape, _, _) in first.layout.items()}
    # Fresh memory is filled at about 2.5 GB/s by one thread here (page faults): two streams,
    # each a thread of its own, fill half the buffers each.
    streams = _fill_streams()
    buffers = {k: mx.zeros((shape[0], shape[1], size, shape[3]), dtype, stream=streams[i % len(streams)])
               for i, (k, (dtype, shape)) in enumerate(shapes.items())}
    mx.eval(list(buffers.values()))
    views = {k: host_view(a) for k, a in buffers.items()}
    files, targets = [], []
    for start, part in zip(starts(parts), parts):
        names = part.arrays if isinstance(part, Block) else part.layout
        if names.keys() != views.keys():
            raise ValueError(f"a block holds {sorted(names)}, the cache {sorted(views)}")
        if isinstance(part, Block):
            for k, a in part.arrays.items():
                _place(views, k, start, host_view(a))
        else:
            files.append((start, part))
            targets.append([memoryview(head).cast("B") for k, (dtype, shape, _, _) in part.layout.items()
                            for head in _place(views, k, start, None, shape, dtype)])
    problems = store.fill_blocks([f for _, f in files], targets) if files else []
    failed = {start: problem for (start, _), problem in zip(files, problems) if problem}
    n = min([*failed, sum(len(part.tokens) for part in parts)])
    caches = []
    for layer in range(n_layers):
        c = KVCache()
        c.keys, c.values, c.offset = buffers[f"layers.{layer}.keys"], buffers[f"layers.{layer}.values"], n
        caches.append(c)
    return caches, n, failed


_local = threading.local()


def _fill_streams() -> list[mx.Stream]:
    """This thread's default CPU stream, and a second one where there is a second core (MLX's
    streams belong to the thread that made them)."""
    if not hasattr(_local, "streams"):
        _local.streams = [mx.default_stream(mx.cpu)]
        if (os.cpu_count() or 1) > 1:
            _local.streams.append(mx.new_stream(mx.cpu))
    return _local.streams


def starts(parts: list[Any]) -> list[int]:
    """The token position where each part begins."""
    starts, n = [], 0
    for part in parts:
        starts.append(n)
        n += len(part.tokens)
    return starts


def _place(views: dict[str, np.ndarray], name: str, at: int, data: np.ndarray | None, shape: list[int] | None = None,
           dtype: Any = None) -> list[np.ndarray]:
    """Where a block's `name` goes in the working cache, from token `at`: `data` copied there,
    or (data None) the per-head regions a file's data is read into, in its order. A block
    that does not fit (other heads, head size or dtype) raises ValueError."""
    target = views.get(name)
    shape = list(data.shape) if data is not None else shape
    itemsize = data.dtype.itemsize if data is not None else dtype.size
    if target is None or len(shape) != 4 or shape[:2] != list(target.shape[:2]) or shape[3] != target.shape[3] \
            or itemsize != target.dtype.itemsize or at + shape[2] > target.shape[2]:
        raise ValueError(f"a block's {name} of shape {tuple(shape)} does not fit a cache of {target.shape if target is not None else 'no such array'}")
    region = target[:, :, at : at + shape[2], :]
    if data is not None:
        region[...] = data
        return []
    return [region[b, h] for b in range(shape[0]) for h in range(shape[1])]


class BlockPool:
    """The blocks held in memory, least recently used first, and how many agents hold each.

    The engine decides when to drop blocks (it writes dirty ones first); the pool keeps the
    order, the bytes and the references. A block no agent references is dropped at once.
    """

    def __init__(self) -> None:
        self._blocks: OrderedDict[str, Block] = OrderedDict()
        self.refs: Counter[str] = Counter()
        self.nbytes = 0

    def __contains__(self, bid: str) -> bool:
        return bid in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, bid: str) -> Block | None:
        block = self._blocks.get(bid)
        if block is not None:
            self._blocks.move_to_end(bid)
        return block

    def peek(self, bid: str) -> Block | None:
        return self._blocks.get(bid)

    def add(self, block: Block) -> None:
        if block.id not in self._blocks:
            self.nbytes += block.nbytes
        self._blocks[block.id] = block
        self._blocks.move_to_end(block.id)

    def drop(self, bid: str) -> int:
        block = self._blocks.pop(bid, None)
        if block is None:
            return 0
        self.nbytes -= block.nbytes
        return block.nbytes

    def hold(self, old: list[str], new: list[str]) -> None:
        """An agent's block list changed from `old` to `new`: move its references."""
        self.refs.update(new)
        self.refs.subtract(old)
        for bid in set(old) - set(new):
            if self.refs[bid] <= 0:
                del self.refs[bid]
                self.drop(bid)

    def oldest(self) -> Iterator[str]:
        """Ids from least to most recently used (a snapshot: dropping while iterating is fine)."""
        return iter(list(self._blocks))
