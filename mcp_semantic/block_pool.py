"""KV blocks: fixed-size token blocks named by their content, and the pool that holds them in
memory (the working cache built from them: cache_build.py).

An agent's cache is a list of blocks of `block_tokens` tokens (the last one may be partial).
A block's id hashes its parent block's id, its token ids and the storage key (the model
fingerprint and the precision the block is stored at), so an id names a whole prefix, as in
vLLM's prefix caching: two agents whose histories start with the same tokens get the same ids
for those blocks and share them, in memory and on disk (store.py, block_files.py). What a block
holds for each kind of layer (full attention, sliding window, chunked attention, recurrent
state) is in cache_kinds.py.

Why not mlx-lm's cache classes for the blocks themselves: KVCache and QuantizedKVCache hold
one growing buffer per layer, the shape the model needs while it runs, and `save_prompt_cache`
writes that whole buffer. A block is a fixed slice shared by many caches, so the pool keeps
plain arrays and builds a working cache (cache_kinds.py) for each call. At --kv-bits 8 or 4
the blocks' K/V stay quantized in memory and on disk, but the working cache is dequantized to
the model's dtype rather than made a QuantizedKVCache: on a CPU, quantized matmuls run 30 to 80
times slower than float32 ones, and attention over a long context would pay that every token.
Recurrent states are kept as the model computes them at every --kv-bits: they are a few
arrays per block, and an error in one carries into every later token.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import mlx.core as mx
import numpy as np

from mcp_semantic.cache_kinds import Layout, Leaf, span_start

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

    @property
    def suffixes(self) -> tuple[str, ...]:
        """How one layer's keys or values are named in a block: as is, or quantized in three parts."""
        return (".weight", ".scales", ".biases") if self.kv_bits in (8, 4) else ("",)

    def encode(self, a: mx.array, view: bool = False) -> dict[str, mx.array]:
        """One layer's keys or values as stored: new arrays, or with `view` `a` itself where it is
        stored as computed (a slice of a working cache: see cut_blocks)."""
        if self.kv_bits == 16 and a.dtype not in (mx.float16, mx.bfloat16):
            return {"": a.astype(mx.float16)}
        if self.kv_bits in (8, 4):
            w, scales, biases = mx.quantize(mx.contiguous(a), group_size=group_size(a.shape[-1]), bits=self.kv_bits)
            return {".weight": w, ".scales": scales, ".biases": biases}
        return {"": a if view else mx.array(a)}  # mx.array copies (mx.contiguous keeps a contiguous view)

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
    for part in (parent.encode(), key.encode(), np.asarray(tokens, dtype=np.int64).tobytes()):
        h.update(len(part).to_bytes(8, "little"))  # lengths too: no two inputs run together
        h.update(part)
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
    """One block: its id, parent, token ids, and its arrays as stored, named as in its file:
    `<leaf>.keys` and `<leaf>.values` of every attention layer (or their `.weight`, `.scales`,
    `.biases` when quantized), `<leaf>.state.<j>` of every recurrent one (cache_kinds.py).

    A block read from disk for one call may hold only the arrays that call needed (the K/V of a
    window's last blocks, the state of the last block): its file has the rest. A block cut
    lazily from a working cache may hold `views` of it until `own` copies them out."""

    id: str
    parent: str
    tokens: list[int]
    arrays: dict[str, mx.array]
    views: set[str] = field(default_factory=set)

    def own(self) -> None:
        """Copy the arrays that are views of a working cache into memory of their own (so that
        cache's memory can go), and compute those cut lazily."""
        for name in self.views:
            self.arrays[name] = mx.array(self.arrays[name])
        self.views = set()
        mx.eval(list(self.arrays.values()))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def host_view(a: mx.array) -> np.ndarray:
    """numpy's view of an evaluated CPU array's memory (bfloat16, which numpy lacks, as uint16)."""
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a, copy=False)


def block_names(layout: Layout, storage: Storage | None = None) -> dict[str, list[str]]:
    """Per leaf, the names of the arrays a whole block holds for it (stored by `storage`, or as the
    model computes them)."""
    suffixes = storage.suffixes if storage else ("",)
    names = {}
    for leaf in layout.leaves:
        if leaf.attention:
            names[leaf.name] = [f"{leaf.name}.{kind}{suffix}" for kind in ("keys", "values") for suffix in suffixes]
        else:
            names[leaf.name] = [n for n in layout.shapes if n.startswith(f"{leaf.name}.state.")]
    return names


def array_names(layout: Layout, storage: Storage) -> set[str]:
    """Every array a whole block holds: what a block file is checked against."""
    return {n for names in block_names(layout, storage).values() for n in names}


def wanted_leaves(layout: Layout, ends: list[int], reuse: int, block_tokens: int) -> list[list[Leaf]]:
    """Which leaves each of the blocks ending at `ends` must give a working cache of `reuse`
    tokens: all of them full attention, those from a window's or chunk's span start the rest,
    and the block ending at `reuse` the states."""
    out: list[list[Leaf]] = [[] for _ in ends]
    for leaf in layout.leaves:
        first = span_start(leaf, reuse, block_tokens)
        for j, end in enumerate(ends):
            if (end == reuse) if leaf.kind == "state" else end > first:
                out[j].append(leaf)
    return out


def cut_blocks(
    layout: Layout,
    cache: list[Any],
    tokens: list[int],
    storage: Storage,
    block_tokens: int,
    checkpoints: dict[int, list[list[mx.array | None]]] | None = None,
    skip: Iterable[str] = (),
    evaluate: bool = True,
    views: bool = False,
) -> list[Block]:
    """The blocks of a working cache holding `tokens`, copied out of it, except the ids in `skip`.

    `checkpoints`: by token count, the states of the recurrent leaves then (cache_kinds
    Layout.states). A block whose tokens a window's cache no longer holds, or whose end has no
    checkpoint, is cut with the arrays there are: such a block came from disk, which has the rest.
    The engine passes the blocks it already holds as `skip`: a turn copies only its new tokens.
    With `evaluate` False the copies are left to MLX's lazy evaluation, made when the blocks are
    first used or `Block.own` makes them (Caches.settle, when no call waits for its next token),
    and with `views` K/V stored as computed are not copied at all until then: they are views of
    the cache (`Block.views`), which a next turn or a fork builds from with one copy. Either way
    the cache's arrays must not change until the blocks own their memory.
    """
    skip, checkpoints = set(skip), checkpoints or {}
    leaves = layout.flatten(cache)
    ids = chain_ids(tokens, storage.key, block_tokens)
    blocks = []
    for i, bid in enumerate(ids):
        if bid in skip:
            continue
        start, end = i * block_tokens, min((i + 1) * block_tokens, len(tokens))
        arrays, kept, states = {}, set(), iter(checkpoints.get(end) or ())
        for leaf, c in zip(layout.leaves, leaves):
            if leaf.kind == "state":
                for j, a in enumerate(next(states, ())):
                    if a is not None:
                        arrays[f"{leaf.name}.state.{j}"] = mx.contiguous(a)
                continue
            first = getattr(c, "first", 0)
            if start < first:
                continue
            for kind, a in (("keys", c.keys), ("values", c.values)):
                piece = a[..., start - first : end - first, :]
                for suffix, part in storage.encode(piece, view=views).items():
                    arrays[f"{leaf.name}.{kind}{suffix}"] = part
                    if part is piece:
                        kept.add(f"{leaf.name}.{kind}{suffix}")
        blocks.append(Block(bid, ids[i - 1] if i else "", tokens[start:end], arrays, kept))
    if evaluate:
        mx.eval([a for b in blocks for a in b.arrays.values()])
    return blocks



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
        """Hold `block`; for one held already, add the arrays it lacked (see Block)."""
        held = self._blocks.get(block.id)
        if held is None:
            self.nbytes += block.nbytes
            self._blocks[block.id] = block
        elif held is not block:
            new = {k: a for k, a in block.arrays.items() if k not in held.arrays}
            held.arrays.update(new)
            held.views |= block.views & new.keys()
            self.nbytes += sum(a.nbytes for a in new.values())
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
