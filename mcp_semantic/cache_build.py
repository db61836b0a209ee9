"""The working cache an agent's call runs in, built from its blocks (block_pool.py): on a GPU by
MLX (`reconstruct`: a few strided operations per layer), on the host by numpy straight into the
cache's memory (`read_into_cache`: block files read into it, quantized blocks dequantized into
it by dequantize.py), with the arrays of working caches gone reused (`Spares`).

Why numpy on the host: its copies (and dequantize.py's kernels) let go of the GIL, so they run on
every core beside the reading threads, and a strided copy into the cache's memory runs about
twice as fast as MLX's on this CPU; MLX's own arrays would be filled with zeros first.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, KVCache

from mcp_semantic.block_pool import Block, Storage, block_names, host_view
from mcp_semantic.block_files import Into, Sink
from mcp_semantic.cache_kinds import ChunkCache, Layout, Leaf, WindowCache, span_start
from mcp_semantic.dequantize import copy_into, dequantize_into, dequantize_rows, outputs, row, widen_rows

def reconstruct(layout: Layout, storage: Storage, parts: list[Any], reuse: int, size: int, block_tokens: int,
                buffer: mx.array | None = None, rows: dict[int, int] | None = None) -> list[Any]:
    """A working cache holding the first `reuse` tokens of `parts`, with room up to `size`
    tokens, built with MLX (any device, any --kv-bits): per leaf one concatenation of the
    parts it needs (wanted_leaves) and the room, each byte written once.

    Parts are blocks, or block files read whole into one `buffer` (`Store.read_into_one`; part
    i's data in row `rows[i]`): each run of files alike gives a layer's keys (or values) as one
    strided view of the buffer, so a load of a long cache is a few array operations per layer,
    not one per block and layer (on a GPU each is a kernel launch and Python's work: they were
    most of a 32K-token load).

    Why not KVCache.update_and_fetch block by block: it grows its buffer in steps and copies the
    whole prefix each time; one copy per layer writes every byte once, and the room lets the
    call's prompt and reply go in place. On the CPU, blocks stored at the model's dtype are
    copied by numpy instead (read_into_cache).
    """
    ends = list(itertools.accumulate(len(p.tokens) for p in parts))
    typed: dict[mx.Dtype, mx.array] = {}

    def from_file(i: int, name: str, count: int = 0) -> mx.array:
        """The array `name` of part i, or of `count` files alike from it on, stacked on its first axis."""
        dtype, shape, begin, _ = parts[i].layout[name]
        rows_of = typed.setdefault(dtype, buffer.view(dtype))
        strides = _steps(shape).tolist()
        span = max(count, 1)  # files of a run are in rows one after another (_continues)
        if count:
            shape, strides = [count, *shape[1:]], [rows_of.shape[1] if count > 1 else 0, *strides[1:]]
        # as_strided over the rows it reads (MLX's offsets are 32-bit: not over the whole buffer)
        return mx.as_strided(rows_of[rows[i] : rows[i] + span], shape, strides, begin // dtype.size)

    out = []
    for leaf in layout.leaves:
        if leaf.kind == "state":
            c = ArraysCache(leaf.size)
            i = len(parts) - 1
            c.cache = [None] * leaf.size
            if ends[-1] == reuse:
                for j in range(leaf.size):
                    name = f"{leaf.name}.state.{j}"
                    if isinstance(parts[i], Block):
                        c.cache[j] = parts[i].arrays.get(name)
                    elif name in parts[i].layout:
                        c.cache[j] = from_file(i, name)
            if any(f"{leaf.name}.state.{j}" in layout.shapes and a is None for j, a in enumerate(c.cache)):
                raise ValueError(f"no block holds the state of {leaf.name} after {reuse} tokens")
            out.append(c)
            continue
        first = span_start(leaf, reuse, block_tokens)
        use = [i for i, end in enumerate(ends) if end > first]
        kv = []
        for kind in ("keys", "values"):
            name, pieces, k = f"{leaf.name}.{kind}", [], 0
            shape, dtype = layout.shapes[name]
            while k < len(use):
                i = use[k]
                if isinstance(parts[i], Block):
                    pieces.append(storage.decode(parts[i].arrays, name))
                    k += 1
                    continue
                n = 1
                while (k + n < len(use) and _continues(parts, rows, use[k + n - 1], use[k + n], name + storage.suffixes[0])
                       and (n + 1) * buffer.shape[1] < 1 << 31):
                    n += 1
                stacked = storage.decode({name + sfx: from_file(i, name + sfx, n) for sfx in storage.suffixes}, name)
                g, heads, t, dim = stacked.shape
                pieces.append(stacked.transpose(1, 0, 2, 3).reshape(1, heads, g * t, dim))
                k += n
            for a in pieces:
                if a.shape[:2] != shape[:2] or a.shape[3] != shape[3]:
                    raise ValueError(f"a block's {name} of shape {a.shape} does not fit {shape}")
            pieces.append(mx.zeros((1, shape[1], size - first - sum(a.shape[2] for a in pieces), shape[3]), pieces[0].dtype))
            kv.append(mx.concatenate(pieces, axis=2))
        out.append(_working(leaf, kv[0], kv[1], reuse, first))
    mx.eval([c.state for c in out])
    return layout.nest(out)


def _working(leaf: Leaf, keys: mx.array, values: mx.array, offset: int, first: int) -> Any:
    """An attention leaf's working cache over `keys` and `values` (tokens from `first`)."""
    if leaf.kind == "kv":
        c = KVCache()
        c.keys, c.values, c.offset = keys, values, offset
        return c
    cls = WindowCache if leaf.kind == "window" else ChunkCache
    return cls(leaf.size, keys, values, offset, first)


def read_into_cache(layout: Layout, store: Any, parts: list[Any], wanted: list[list[Leaf]], reuse: int, size: int,
                    block_tokens: int, storage: Storage, spares: Spares | None = None) -> tuple[list[Any], dict[int, str]]:
    """A working cache of `reuse` tokens with room up to `size`, built on the host (CPU) from
    `parts`, one after another, each giving its `wanted` leaves: blocks (copied in by numpy, about
    twice as fast as MLX's strided copy here, and dequantized by `dequantize_into`; their arrays
    MLX's or numpy's) and block files from `Store.open_blocks`, read by
    `store.blocks.fill_blocks` and checksummed: arrays stored as computed straight into the
    cache, quantized or float16 ones a few at a time into the reading thread's scratch memory
    and converted from there into the cache (`_Converted`: no buffer of the whole files, and
    each byte read from memory once). Its K/V arrays are `spares`' where it has them. Returns the
    cache and, by the token where it begins, why each file that failed could not be used."""
    mx.eval([a for part in parts if isinstance(part, Block) for a in part.arrays.values() if isinstance(a, mx.array)])  # cut lazily
    firsts = {leaf.name: span_start(leaf, reuse, block_tokens) for leaf in layout.leaves}
    names = block_names(layout)  # the arrays as the model computes them
    shapes = {}
    for leaf in layout.leaves:
        for name in names[leaf.name]:
            shape, dtype = layout.shapes[name]
            shapes[name] = ((1, shape[1], size - firsts[leaf.name], shape[3]) if leaf.attention else tuple(shape)), dtype
    # K/V arrays (every token they hold is written below) of a working cache that is gone, if
    # any; the rest new, filled with zeros: fresh memory is filled at about 2.5 GB/s by one
    # thread here (page faults), so two streams, each a thread of its own, fill half each
    buffers = spares.take({k: v for k, v in shapes.items() if ".state." not in k}) if spares is not None else {}
    streams = _fill_streams()
    for i, name in enumerate(k for k in shapes if k not in buffers):
        buffers[name] = mx.zeros(*shapes[name], stream=streams[i % len(streams)])
    mx.eval(list(buffers.values()))
    if spares is not None:
        spares.keep([a for k, a in buffers.items() if ".state." not in k])
    views = {k: host_view(a) for k, a in buffers.items()}
    fits: set[tuple[str, tuple[int, ...], int]] = set()

    def runs(name: str, at: int, shape: list[int], itemsize: int, per_token: bool) -> list[np.ndarray] | np.ndarray:
        """Where a block file's array goes (block_files.Into): its heads at its tokens, rows of
        an array, or a state whole; the fit checked once per array shape, then the tokens'
        place per file."""
        key = (name, tuple(shape), itemsize)
        if key not in fits or not per_token or not 0 <= at <= views[name].shape[2] - shape[2]:
            region = _region(views, name, at, shape, itemsize, per_token)  # raises where it does not fit
            fits.add(key)
            if not per_token:
                return [region]
        return views[name][0, :, at : at + shape[2]]

    files, targets, quantized, copies = [], [], [], []

    def file_targets(start: int, leaves: list[Leaf], part: Any) -> list[tuple[str, Into] | Sink]:
        """A block file's arrays and where they go: made on the reading thread that reads the file."""
        heads: list[tuple[str, Into] | Sink] = []
        convert: list[tuple[str, int]] = []  # K/V stored quantized or as float16, and the token where each goes
        for leaf in leaves:
            at = start - firsts[leaf.name]
            for name in names[leaf.name]:
                if name in part.layout and part.layout[name][0] == buffers[name].dtype:  # stored as computed
                    dtype, shape, _, _ = part.layout[name]
                    heads.append((name, runs(name, at, shape, dtype.size, leaf.attention)))
                elif leaf.attention and (name in part.layout or name + ".weight" in part.layout):
                    convert.append((name, at))
                else:
                    raise ValueError(f"block file {part.path.name} lacks {name}")
        if convert:
            heads.append(converted.sink(part, convert))
        return heads

    for start, part, leaves in zip(starts(parts), parts, wanted):
        if not isinstance(part, Block):
            files.append((start, part))
            targets.append(partial(file_targets, start, leaves))
            continue
        for leaf in leaves:
            at = start - firsts[leaf.name]
            for name in names[leaf.name]:
                if name + ".weight" in part.arrays:
                    w, scales, biases = (host_view(part.arrays[f"{name}.{k}"]) for k in ("weight", "scales", "biases"))
                    shape = w.shape[:-1] + (w.shape[-1] * 32 // storage.kv_bits,)
                    quantized.append((_region(views, name, at, shape, views[name].itemsize, True), w, scales, biases))
                else:
                    if name not in part.arrays:
                        raise ValueError(f"block {part.id} lacks {name}")
                    data = host_view(part.arrays[name])
                    itemsize = views[name].itemsize if data.dtype == np.float16 else data.itemsize  # copy_into widens float16
                    copies.append((_region(views, name, at, data.shape, itemsize, leaf.attention), data))
    # numpy lets go of the GIL in its loops: the copies (a conversion at --kv-bits 16) and the
    # dequantization run on every core, a share each
    jobs = [partial(copy_into, region, data) for region, data in copies]
    jobs += [partial(dequantize_into, *job, storage.kv_bits) for job in quantized]
    n = os.cpu_count() or 1
    list(_host_threads().map(lambda share: [job() for job in share], [jobs[i::n] for i in range(n)]))
    problems = []
    if files:  # their targets are made on the reading threads, converted ones by `converted`
        converted = _Converted(views, storage.kv_bits)
        problems = store.blocks.fill_blocks([f for _, f in files], targets)
    failed = {start: problem for (start, _), problem in zip(files, problems) if problem}
    out = []
    for leaf in layout.leaves:
        if leaf.kind == "state":
            c = ArraysCache(leaf.size)
            c.cache = [buffers.get(f"{leaf.name}.state.{j}") for j in range(leaf.size)]
            out.append(c)
        else:
            out.append(_working(leaf, buffers[f"{leaf.name}.keys"], buffers[f"{leaf.name}.values"], reuse, firsts[leaf.name]))
    return layout.nest(out), failed


class _Converted:
    """The Sinks (block_files) that convert block files' K/V stored quantized (--kv-bits 8, 4) or
    as float16 (16) into a float32 working cache (`views`, numpy's views of its arrays), with
    dequantize.py's row kernels: a call per megabyte read. The blocks of a load share their
    layout (block_files checks a header like the last one by one comparison), so what each array
    needs, its shapes checked against the cache, is worked out once per layout (a plan); a
    file's sink is then its tokens' places."""

    def __init__(self, views: dict[str, np.ndarray], kv_bits: int | None):
        self.views = views
        self.kv_bits = kv_bits
        self.index = {name: i for i, name in enumerate(views)}
        self.outs = outputs([v.reshape(-1) for v in views.values()]) if kv_bits else None
        self.plans: dict[tuple, tuple[list[int], list[tuple[int, int, list[str]]], np.ndarray, np.ndarray, np.ndarray]] = {}

    def sink(self, part: Any, convert: list[tuple[str, int]]) -> Sink:
        """A sink for the file `part`: each of `convert` (name, token where it goes) into the cache."""
        key = (id(part.layout), tuple(name for name, _ in convert))  # the parts outlive the load: ids stay theirs
        if key not in self.plans:
            self.plans[key] = self._plan(part.layout, [name for name, _ in convert])
        order, units, template, widths, room = self.plans[key]
        ats = np.array([convert[i][1] for i in order], np.int64)
        if not ((0 <= ats) & (ats <= room)).all():
            k = int(np.argmax((ats < 0) | (ats > room)))
            raise ValueError(f"a block's {convert[order[k]][0]} does not fit its cache from token {ats[k]}")
        places = ats * widths
        bits = self.kv_bits

        def write(scratch: np.ndarray, base: int, first: int, last: int) -> None:
            rows = template[first:last].copy()
            rows[:, 1] += places[first:last]
            if bits in (8, 4):
                rows[:, 6] -= base  # q in bytes, scales and biases in float32s
                rows[:, [11, 16]] -= base // 4
                dequantize_rows(self.outs, rows, scratch, bits)
            else:
                rows[:, 6] -= base // 2  # float16s
                widen_rows(self.outs, rows, scratch)
        return Sink(units, write)

    def _plan(self, layout: dict[str, tuple[mx.Dtype, list[int], int, int]], names: list[str]) -> tuple:
        """For a layout: the names' order in the file, their units (block_files.Sink), a row
        each (dequantize.row: places in the file's data region, the output's from its token 0),
        each output's elements a token, and the room each leaves in the cache for its first token."""
        found = []
        for name in names:
            arrays = [f"{name}.{k}" for k in ("weight", "scales", "biases")] if name + ".weight" in layout else [name]
            x, tokens = self._row(name, [(a, *layout[a]) for a in arrays])
            found.append(((min(layout[a][2] for a in arrays), max(layout[a][3] for a in arrays), arrays), x,
                          self.views[name].shape[3], self.views[name].shape[2] - tokens))
        order = sorted(range(len(names)), key=lambda i: found[i][0][0])
        return (order, [found[i][0] for i in order], np.stack([found[i][1] for i in order]),
                np.array([found[i][2] for i in order], np.int64), np.array([found[i][3] for i in order], np.int64))

    def _row(self, name: str, stored: list[tuple[str, mx.Dtype, list[int], int, int]]) -> tuple[np.ndarray, int]:
        """The row of the array `name` from its stored arrays (name, dtype, shape, begin, end), and
        its tokens: checked against the cache, or a ValueError saying why it does not fit."""
        target, bits = self.views[name], self.kv_bits
        _, dtype, shape, begin, _ = stored[0]
        _, heads, tokens, last = shape if len(shape) == 4 else (0, 0, 0, 0)
        if len(stored) == 3:  # .weight (uint32 words of `bits` each), .scales, .biases (float32, a group each)
            dim, groups = (last * 32 // bits if bits in (8, 4) else 0), stored[1][2][-1]
            fits = (dtype == mx.uint32 and all(d == mx.float32 and s == [1, heads, tokens, groups] for _, d, s, *_ in stored[1:])
                    and groups > 0 and dim % groups == 0)
        else:
            dim, groups, fits = last, 1, dtype == mx.float16 and bits == 16
        if not fits or target.dtype != np.float32:
            raise ValueError(f"a block's {name} stored as {[(str(d), s) for _, d, s, *_ in stored]} does not fit a cache of "
                             f"{target.shape} {target.dtype}")
        _region(self.views, name, 0, (1, heads, tokens, dim), target.itemsize, True)  # raises where it does not fit
        out = (0, _steps(target.shape))
        if len(stored) == 3:
            group_steps = _steps((1, heads, tokens, groups))
            operands = [out, (begin, _steps((1, heads, tokens, dim * bits // 8))), (stored[1][3] // 4, group_steps),
                        (stored[2][3] // 4, group_steps)]
        else:
            operands = [out, (begin // 2, _steps((1, heads, tokens, dim)))]
        return row(self.index[name], operands, [1, heads, tokens, dim, groups]), tokens


def _steps(shape: tuple[int, ...]) -> np.ndarray:
    """A contiguous array's strides, in elements."""
    return np.array([math.prod(shape[k + 1 :]) for k in range(len(shape))], np.int64)


class Spares:
    """The K/V arrays of the working caches read_into_cache made, for the next that needs arrays of
    the same shape once their cache is gone: MLX fills every new array (zeros; on this CPU about
    a fifth of a lossless load, and into fresh memory far more), where a build overwrites every
    token it holds anyway (the room after them is never read: the caches show keys up to their
    offset). Caches.cache_size rounds sizes, so an agent's next builds mostly match.

    An array is taken only when nothing else refers to it (Python's count; the caller holds no
    view of it), and MLX confirms that nothing shares its memory, such as a block cut from it as
    a view: `mx.slice_update` writes in place only then, and otherwise copies (correct, slower)."""

    def __init__(self) -> None:
        self.arrays: list[mx.array] = []  # oldest first; those in use too
        self._keys: list[tuple[tuple[int, ...], mx.Dtype]] = []  # each one's (shape, dtype)
        self.room = 0  # bytes of idle arrays kept: the last working cache's

    def _idle(self, i: int) -> bool:
        return sys.getrefcount(self.arrays[i]) == 2  # this list's reference, and getrefcount's argument

    def take(self, shapes: dict[str, tuple[tuple[int, ...], mx.Dtype]]) -> dict[str, mx.array]:
        """For each name, an idle array of its (shape, dtype) if there is one, ours to write."""
        idle: dict[tuple, list[int]] = {}  # by (shape, dtype), the idle arrays' places
        wanted = set(shapes.values())
        for i, key in enumerate(self._keys):
            if key in wanted and self._idle(i):
                idle.setdefault(key, []).append(i)
        taken = {name: idle[key].pop() for name, key in shapes.items() if idle.get(key)}
        found = {name: self.arrays[i] for name, i in taken.items()}
        for i in sorted(taken.values(), reverse=True):
            del self.arrays[i], self._keys[i]
        for name, (shape, dtype) in shapes.items():
            if name in found:  # the list's reference is gone: MLX may donate the memory to the update
                found[name] = mx.slice_update(found[name], mx.zeros((1,) * len(shape), dtype), mx.array([0] * len(shape)),
                                              tuple(range(len(shape))))
        mx.eval(list(found.values()))
        return found

    def keep(self, arrays: list[mx.array]) -> None:
        """Keep a new working cache's arrays; of those idle, at most as many bytes as these."""
        self.arrays.extend(arrays)
        self._keys.extend((tuple(a.shape), a.dtype) for a in arrays)
        self.room = sum(a.nbytes for a in arrays)
        self.trim()

    def trim(self) -> None:
        """Let idle arrays beyond `room` bytes (the last working cache's) go, the oldest first (to
        MLX's buffer cache): calls that ran together and ended leave one cache's worth."""
        room = self.room
        for i in reversed(range(len(self.arrays))):
            if self._idle(i):
                room -= self.arrays[i].nbytes
                if room < 0:
                    del self.arrays[i], self._keys[i]

    def clear(self) -> None:
        self.arrays.clear()
        self._keys.clear()


def _continues(parts: list[Any], rows: dict[int, int], i: int, j: int, name: str) -> bool:
    """Whether part j, a file read into one buffer, continues a run of files through part i: the
    next part, in the next row, with its array `name` at the same place and of the same shape. A
    run is then one strided view of the buffer (reconstruct)."""
    return (j == i + 1 and j in rows and rows[j] == rows[i] + 1
            and parts[j].layout[name][1:3] == parts[i].layout[name][1:3])


_local = threading.local()


def _fill_streams() -> list[mx.Stream]:
    """This thread's default CPU stream, and a second one where there is a second core (MLX's
    streams belong to the thread that made them)."""
    if not hasattr(_local, "streams"):
        _local.streams = [mx.default_stream(mx.cpu)]
        if (os.cpu_count() or 1) > 1:
            _local.streams.append(mx.new_stream(mx.cpu))
    return _local.streams


@functools.cache
def _host_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="mcp-semantic-copy")


def starts(parts: list[Any]) -> list[int]:
    """The token position where each part begins."""
    starts, n = [], 0
    for part in parts:
        starts.append(n)
        n += len(part.tokens)
    return starts


def _region(views: dict[str, np.ndarray], name: str, at: int, shape: tuple[int, ...] | list[int], itemsize: int,
            per_token: bool) -> np.ndarray:
    """Where a block's array `name` of `shape` goes in the working cache: for K/V (`per_token`)
    from token `at`, for a state the whole of it. An array that does not fit (other heads, head
    size, state shape or item size) raises ValueError."""
    target = views[name]
    shape = list(shape)
    if per_token:
        fits = len(shape) == 4 and shape[:2] == list(target.shape[:2]) and shape[3] == target.shape[3] \
            and 0 <= at and at + shape[2] <= target.shape[2]
    else:
        fits = shape == list(target.shape)
    if not fits or itemsize != target.dtype.itemsize:
        raise ValueError(f"a block's {name} of shape {tuple(shape)} does not fit a cache of {target.shape}")
    return target[:, :, at : at + shape[2], :] if per_token else target
