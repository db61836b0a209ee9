"""KV blocks as safetensors files in one directory: the format, and writing, checking and
reading them (`BlockFiles`). The store decides which blocks exist (block lists in store.db);
this module holds their bytes.

    blocks/<id>.safetensors       one KV block: every attention layer's keys and values for its
                                  tokens (layers.<i>.keys / .values, (1, kv_heads, tokens,
                                  head_dim); at --kv-bits 8 or 4, .weight, .scales and .biases
                                  of each), every recurrent layer's state after its last token
                                  (layers.<i>.state.<j>; see cache_kinds.py), with its parent id,
                                  token ids, storage key and a checksum per array in the metadata

Every block file is checked when read: its id is recomputed from the parent, tokens and storage
key in its metadata, its arrays must be the model's and hold the block's tokens, and the data of
each array read must match its xxh3_64 checksum in the metadata. Any mismatch is a cache miss (the
engine re-prefills from the block before), never a crash or a wrong answer. A reader takes only
the arrays it needs: a resumed agent needs every block's full-attention K/V, but a window's K/V
only from its last blocks and a recurrent state only from the last block.

Why blocks are written and read here rather than with `safetensors`/`mx.load`: loading is on the
way to a resumed agent's first token, so a block file is read once, straight into the buffer its
arrays then view (or the working cache), each array checksummed while it is still in the CPU's
cache: by one native call per file where numba is installed (checked_read.py), else by Python's
calls; files are read several at once on threads (the reads and the checksums release the GIL).
The files stay plain safetensors, readable by any safetensors tool.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
import orjson
import xxhash

from mcp_semantic import checked_read, cuda
from mcp_semantic.block_pool import Block, Storage, block_id, host_view

log = logging.getLogger(__name__)

# /3: an xxh3_64 checksum per array, so a reader can take only the arrays it needs (a window's
# last blocks, the state of the last block); blocks hold every cache kind (cache_kinds.py).
# /2 (one checksum over the data region) and /1 (a CRC-32 per array) read as a miss: the agent
# re-prefills once.
BLOCK_FORMAT = "mcp-semantic-block/3"
BLOCK_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp_path)`, fsync, and rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class HostBlock:
    """A block as the writer thread takes it: its arrays as host (numpy) views, so writing it
    needs no MLX call off the engine thread. bfloat16, which numpy lacks, travels as uint16."""

    id: str
    parent: str
    tokens: list[int]
    arrays: dict[str, tuple[str, np.ndarray]]  # name -> (safetensors dtype, data)


# safetensors' names for MLX's dtypes (bfloat16 travels as uint16 to the writer, see HostBlock)
_ST_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "uint32": "U32",
    "int32": "I32", "uint64": "U64", "int64": "I64", "float16": "F16", "bfloat16": "BF16",
    "float32": "F32", "float64": "F64",
}
_MX_DTYPES = {code: getattr(mx, "bool_" if name == "bool" else name) for name, code in _ST_DTYPES.items()}
_MAX_HEADER = 1 << 24


def host_block(block: Block) -> HostBlock:
    """On the thread that owns MLX: views of the block's evaluated arrays (no copy)."""
    arrays = {name: (str(a.dtype).removeprefix("mlx.core."), host_view(a)) for name, a in block.arrays.items()}
    return HostBlock(block.id, block.parent, block.tokens, arrays)


def write_block(block: HostBlock, storage: Storage, path: Path) -> None:
    """Write a safetensors file: an 8-byte header length, the JSON header, then the arrays.

    The arrays go in order of item size, then name (as the safetensors library orders them), so
    each starts aligned; each has its checksum, which a reader checks while it reads the array."""
    names = sorted(block.arrays, key=lambda n: (-block.arrays[n][1].itemsize, n))
    header: dict[str, object] = {}
    chunks, offset, checksums = [], 0, {}
    for name in names:
        dtype, a = block.arrays[name]
        data = memoryview(np.ascontiguousarray(a)).cast("B")
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        checksums[name] = xxhash.xxh3_64_hexdigest(data)
        chunks.append(data)
    header["__metadata__"] = {
        "format": BLOCK_FORMAT,
        "storage": storage.key,  # checked on read; the three below are for people and tools
        "fingerprint": storage.fingerprint,
        "dtype": storage.dtype,
        "kv_bits": str(storage.kv_bits or 0),
        "parent": block.parent,
        "n_tokens": str(len(block.tokens)),
        "tokens": json.dumps(block.tokens, separators=(",", ":")),
        "xxh3_64": json.dumps(checksums, separators=(",", ":")),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in chunks:  # block.arrays keeps the data alive
            f.write(data)


@dataclass
class BlockFile:
    """A block file whose header passed every check, waiting for its data to be read."""

    path: Path
    bid: str
    parent: str
    tokens: list[int]
    start: int  # where the data region starts in the file
    checksums: dict[str, str]  # name -> xxh3_64 of its data
    layout: dict[str, tuple[mx.Dtype, list[int], int, int]]  # name -> (dtype, shape, begin, end), in file order
    source: Any = None  # where its bytes are read from when not from its file: the shared tier (Remote)


@dataclass
class Remote:
    """A block in the shared tier (block_redis.RedisBlocks) rather than in a file here: its size
    and first bytes (the header), and the tier, whose `read_into(bid, buffers, offset, n)` reads
    the rest and `damaged(bid)` deletes one that fails its checks."""

    size: int
    head: bytes
    source: Any


class Unusable(Exception):
    """A block file that must not be used; the message says why."""


# The arrays' names, dtypes, shapes and offsets of headers checked before, by storage key and
# token count: one model's full blocks repeat them (only their metadata differs), so a header
# that does is checked by one dict comparison. A load of a 32K-token agent of a quantized 8B
# model reads 128 headers of 192 arrays each; checking each array took most of the header time.
_checked: dict[tuple[str, int], tuple[dict, dict, int]] = {}


def _check_arrays(header: dict, n_tokens: int) -> tuple[dict[str, tuple[mx.Dtype, list[int], int, int]], int]:
    """Each array's (dtype, shape, begin, end) in file order, and where the data ends: every
    K/V array holds the block's tokens, and the arrays follow one another with no gap."""
    layout, end = {}, 0
    for name, t in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        dtype, shape, (begin, stop) = _MX_DTYPES[t["dtype"]], t["shape"], t["data_offsets"]
        per_token = ".state." not in name
        if not all(type(d) is int and d >= 0 for d in shape) or per_token and (len(shape) != 4 or shape[2] != n_tokens):
            raise Unusable(f"{name} has shape {tuple(shape)} for {n_tokens} tokens")
        if begin != end or stop - begin != math.prod(shape) * dtype.size or begin % dtype.size:
            raise Unusable(f"is unreadable ({name} has data offsets {[begin, stop]})")
        layout[name], end = (dtype, shape, begin, stop), stop
    return layout, end


def _parse_header(path: Path, f, size: int, bid: str, storage: Storage, names: set[str]) -> BlockFile:
    """Check everything the header says before any data is read: `names` are the arrays a
    block of this model holds (a file always holds them all)."""
    head = f.read(8)
    if len(head) < 8:
        raise Unusable("is unreadable (too short for a safetensors header)")
    n = int.from_bytes(head, "little")
    if not 2 <= n <= min(_MAX_HEADER, size - 8):
        raise Unusable(f"is unreadable (a header of {n} bytes in a file of {size})")
    try:
        header = orjson.loads(f.read(n))
    except ValueError as e:  # orjson's JSONDecodeError, invalid UTF-8 too
        raise Unusable(f"is unreadable (its header is not JSON: {e})") from None
    if not isinstance(header, dict) or not isinstance(meta := header.pop("__metadata__", None), dict):
        raise Unusable("is unreadable (its header has no metadata)")
    if meta.get("format") != BLOCK_FORMAT:
        raise Unusable(f"has format {meta.get('format')!r}, expected {BLOCK_FORMAT}")
    if meta.get("storage") != storage.key:
        raise Unusable("was stored for another model or precision")
    tokens, parent = orjson.loads(meta["tokens"]), meta["parent"]
    if not isinstance(tokens, list) or not set(map(type, tokens)) <= {int} or len(tokens) != int(meta["n_tokens"]):
        raise Unusable("has an inconsistent token list")
    if not isinstance(parent, str) or block_id(parent, tokens, storage.key) != bid:
        raise Unusable("does not hold the tokens its name says")
    if header.keys() != names:
        missing, extra = sorted(names - set(header)), sorted(set(header) - names)
        raise Unusable(f"holds other arrays than the model's cache (missing {missing[:3]}, extra {extra[:3]})")
    known = _checked.get((storage.key, len(tokens)))
    if known is not None and known[0] == header:  # one comparison in C, not a check per array
        layout, end = known[1], known[2]
    else:
        layout, end = _check_arrays(header, len(tokens))
        if len(_checked) >= 64:
            _checked.clear()
        _checked[(storage.key, len(tokens))] = (header, layout, end)
    if 8 + n + end != size:
        raise Unusable(f"is unreadable ({size} bytes, its header says {8 + n + end})")
    try:
        checksums = orjson.loads(meta["xxh3_64"])
    except (KeyError, TypeError, ValueError):
        checksums = None
    if not isinstance(checksums, dict) or checksums.keys() != names or not set(map(type, checksums.values())) <= {str}:
        raise Unusable("has no checksum for each array")
    return BlockFile(path, bid, parent, tokens, 8 + n, checksums, layout)


def _read_into(p: BlockFile, fd: int | None, buffers: list[Any], offset: int, n: int) -> None:
    """`n` bytes of the block at `offset` into `buffers`: from its file, or the shared tier."""
    if p.source is None:
        _preadv(fd, buffers, offset, n)
    else:
        p.source.read_into(p.bid, buffers, offset, n)


Target = memoryview | tuple[int, int]  # host memory, or (address, bytes) on a CUDA GPU (cuda.py)


@dataclass
class Sink:
    """Arrays of a block file that go where they are needed through a function, not as they are
    (quantized K/V dequantized into a working cache): `units`, each (begin, end) in the file's
    data region and its arrays, in file order, are read a few at a time (about 1 MB) into this
    reading thread's scratch memory, checksummed there while it is in the CPU's cache, then
    handed on by one `write(scratch, base, first, last)`: units first to last (exclusive), the
    scratch holding the data region from byte `base` on (a multiple of 8: arrays keep their
    alignment). One call per read, not per array: Python's work per array was most of a load."""

    units: list[tuple[int, int, list[str]]]
    write: Callable[[np.ndarray, int, int, int], None]


def _fill(p: BlockFile, targets: list[tuple[str, Into] | Sink] | Target) -> None:
    """Read the named arrays into their targets, checksummed: each `Into` (where an array's
    bytes go, in file order), or a Sink; or, given one target, the file's whole data region into
    it (_fill_whole). From a file, by one native call where it can (checked_read), else by
    Python's calls. No MLX call: this runs on the reading threads."""
    with open(p.path, "rb", buffering=0) if p.source is None else contextlib.nullcontext() as f:
        if not isinstance(targets, list):
            _fill_whole(p, f, targets)
            return
        plain = sorted((t for t in targets if not isinstance(t, Sink)), key=lambda t: p.layout[t[0]][2])
        native = f and checked_read.available() and _fill_native(p, f.fileno(), [(n, checked_read.runs_of(i)) for n, i in plain])
        if not native:
            group: list[tuple[str, Into]] = []
            for name, into in plain:
                begin = p.layout[name][2]
                if group and (begin - p.layout[group[0][0]][2] >= _GROUP_BYTES or p.layout[group[-1][0]][3] != begin
                              or sum(len(bufs) for _, bufs in group) + len(into) > _GROUP_BUFFERS):
                    _fill_group(p, f and f.fileno(), group)
                    group = []
                group.append((name, into))
            if group:
                _fill_group(p, f and f.fileno(), group)
        for sink in targets:
            if isinstance(sink, Sink):
                _fill_sink(p, f and f.fileno(), sink)


Into = list[Any] | np.ndarray
"""Where a block file's array goes, its bytes in order: a list of contiguous buffers (a buffer
of its own, one of many in a working cache), or an array of 2 or more axes whose rows (first
axis) are contiguous (a working cache's heads at the block's tokens)."""


def _fill_native(p: BlockFile, fd: int, arrays: list[tuple[str, list[tuple[int, int]] | None]]) -> bool:
    """The arrays, in file order, each with its runs (address, bytes), read and checked by one
    native call (checked_read, which the caller found available): False where that cannot be
    done (the Python calls then do it, and raise what went wrong), Unusable where a checksum fails."""
    if not arrays or any(runs is None for _, runs in arrays):
        return False
    rows, places = [], []
    for name, runs in arrays:
        _, _, begin, end = p.layout[name]
        if sum(n for _, n in runs) != end - begin:
            return False
        checksum = int(p.checksums[name], 16)
        rows.append((p.start + begin, end - begin, checksum - (checksum >> 63 << 64), len(places), len(runs)))
        places += runs
    failed = checked_read.read_checked(fd, np.array(rows, np.int64), np.array(places, np.int64).reshape(-1, 2))
    if failed >= 0:
        raise Unusable(f"fails its checksum ({arrays[failed][0]}): its data was damaged on disk")
    return failed == checked_read.OK


# What one of Python's calls reads (where checked_read cannot): arrays one after another, about
# 1 MB, few calls (an array is a call's work under the GIL); at most IOV_MAX buffers (1024 on Linux)
_GROUP_BYTES, _GROUP_BUFFERS = 1 << 20, 512


def _fill_group(p: BlockFile, fd: int | None, group: list[tuple[str, Into]]) -> None:
    """Arrays one after another in the file, read by one call straight into their buffers (the
    bytes copied once, where they go), then checksummed there."""
    begin, end = p.layout[group[0][0]][2], p.layout[group[-1][0]][3]
    group = [(name, list(into) if isinstance(into, np.ndarray) and into.ndim > 1 else into) for name, into in group]
    _read_into(p, fd, [b for _, into in group for b in into], p.start + begin, end - begin)
    for name, into in group:
        checksum = xxhash.xxh3_64()
        for b in into:
            checksum.update(b)
        if checksum.hexdigest() != p.checksums[name]:
            raise Unusable(f"fails its checksum ({name}): its data was damaged on disk")


def _fill_sink(p: BlockFile, fd: int | None, sink: Sink) -> None:
    """The sink's units, about 1 MB at a time, read by one call each into this thread's scratch
    memory, checksummed there, and handed to the sink."""
    units, first = sink.units, 0
    while first < len(units):
        base, last = units[first][0] // 8 * 8, first + 1
        while last < len(units) and units[last][1] - base <= _GROUP_BYTES:
            last += 1
        end = units[last - 1][1]
        scratch = _scratch(end - base)
        _read_into(p, fd, [memoryview(scratch)[: end - base]], p.start + base, end - base)
        view = memoryview(scratch)
        for _, _, names in units[first:last]:
            for name in names:
                _, _, begin, stop = p.layout[name]
                if xxhash.xxh3_64_hexdigest(view[begin - base : stop - base]) != p.checksums[name]:
                    raise Unusable(f"fails its checksum ({name}): its data was damaged on disk")
        sink.write(scratch, base, first, last)
        first = last


_local = threading.local()


def _scratch(n: int) -> np.ndarray:
    """This reading thread's scratch memory, at least `n` bytes (a multiple of 8 long, so that it
    views as any dtype), reused from file to file: a group of arrays, about 1 MB, stays in the
    CPU's cache from its read to its sink."""
    if getattr(_local, "scratch", None) is None or len(_local.scratch) < n:
        _local.scratch = np.empty(-(-n // 8) * 8, np.uint8)
    return _local.scratch


def _preadv(fd: int, buffers: list[Any], offset: int, n: int) -> None:
    """Fill `buffers` (each contiguous, `n` bytes in all) from the file at `offset`."""
    done = _readv(fd, buffers, offset)
    if done == n:
        return
    at = offset  # a short read (rare): the rest, a buffer at a time
    for view in (memoryview(b).cast("B") for b in buffers):
        filled = min(done, len(view))
        done, at = done - filled, at + filled
        while filled < len(view):
            got = _readv(fd, [view[filled:]], at)
            if not got:
                raise Unusable("is unreadable (shorter than when it was opened)")
            filled, at = filled + got, at + got


def _readv(fd: int, buffers: list[Any], offset: int) -> int:
    """os.preadv; where Python lacks it (macOS before 11), a seek and os.readv: each read
    opens the file anew, so no other thread moves its position."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, buffers, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.readv(fd, buffers)


def _fill_whole(p: BlockFile, f, target: Target) -> None:
    """The file's data region read at once, then each array checksummed where it landed: a few
    calls per file, where a call per array under the GIL was most of a load (a block of a
    quantized 8B model has 192 arrays, some of 8 KB); from a file, by one native call where it
    can (checked_read: a few arrays a read, each checksummed while in the CPU's cache). A GPU
    target goes through this thread's pinned buffer and one DMA copy."""
    n = max((end for *_, end in p.layout.values()), default=0)
    staging = None if isinstance(target, memoryview) else cuda.staging(n)
    view = target[:n] if staging is None else staging.view[:n]
    spans = sorted(((name, begin, end) for name, (_, _, begin, end) in p.layout.items()), key=lambda s: s[1])
    whole = f and checked_read.available() and checked_read.runs_of([view])
    if not (whole and _fill_native(p, f.fileno(), [(name, [(whole[0][0] + b, e - b)]) for name, b, e in spans])):
        _read_into(p, f and f.fileno(), [view], p.start, n)
        for name, begin, end in spans:
            if xxhash.xxh3_64_hexdigest(view[begin:end]) != p.checksums[name]:
                raise Unusable(f"fails its checksum ({name}): its data was damaged on disk")
    if staging is not None:
        cuda.copy_in(target[0], staging, n, 0)


def _spans(p: BlockFile, names: list[str]) -> list[tuple[str, int, int]]:
    """Where each of the block's arrays `names` goes in a buffer that holds them one after another."""
    spans, at = [], 0
    for name in names:
        _, _, begin, end = p.layout[name]
        spans.append((name, at, at + end - begin))
        at += end - begin
    return spans


def _arrays(p: BlockFile, buffer: mx.array, spans: list[tuple[str, int, int]]) -> dict[str, mx.array]:
    """The block's arrays, read into `buffer` at `spans`: views of it, no copy."""
    arrays = {name: buffer[begin:end].view(p.layout[name][0]).reshape(p.layout[name][1]) for name, begin, end in spans}
    mx.eval(list(arrays.values()))
    return arrays


class _Misfit(Exception):
    """A file's targets could not be made: the caller's error (ValueError), not the file's."""

    def __init__(self, error: ValueError):
        super().__init__(str(error))
        self.error = error


class BlockFiles:
    """The block files of one directory: written once (a temporary file, fsynced and renamed),
    read on the reading threads and checked, deleted when the store says no list names them."""

    def __init__(self, root: Path):
        self.dir = Path(root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}  # of files seen, by block id
        # Block files are read on these threads, several at once (fill_blocks): a read from the
        # page cache runs at about 5.6 GB/s on one thread of the GPU device's host and 41 on 16
        self._readers = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="mcp-semantic-read")

    def close(self) -> None:
        self._readers.shutdown()

    def path(self, bid: str) -> Path:
        if not BLOCK_ID_RE.fullmatch(bid):  # ids come from the store's own lists; still, no odd paths
            raise ValueError(f"invalid block id {bid!r}")
        return self.dir / f"{bid}.safetensors"

    def size(self, bid: str) -> int:
        """The file's bytes; 0 if there is none."""
        with self._lock:
            if bid not in self._sizes:
                try:
                    self._sizes[bid] = self.path(bid).stat().st_size
                except FileNotFoundError:
                    return 0
            return self._sizes[bid]

    def exists(self, bid: str) -> bool:
        return self.path(bid).exists()

    def write(self, block: HostBlock, storage: Storage) -> int:
        """Write the block's file; returns its bytes."""
        path = self.path(block.id)
        atomic_write(path, lambda p: write_block(block, storage, p))
        return path.stat().st_size

    def delete(self, bid: str) -> int:
        """Delete the block's file; returns the bytes freed."""
        freed = self.size(bid)
        with self._lock:
            self._sizes.pop(bid, None)
            self.path(bid).unlink(missing_ok=True)
        return freed

    def collect(self, named: Callable[[str], bool]) -> None:
        """Remove temporaries (left only by a crash mid-write) and the blocks no list names (left
        by a crash between the block files and the commit of the list)."""
        for path in self.dir.iterdir():
            if path.name.startswith("."):
                log.info("removing stale temporary file %s", path.name)
                path.unlink(missing_ok=True)
            elif path.suffix == ".safetensors" and not named(path.stem):
                log.info("removing unreferenced KV block %s", path.name)
                path.unlink(missing_ok=True)

    # reading

    def read_block(self, bid: str, storage: Storage, names: set[str]) -> tuple[Block | None, str | None]:
        """Load a block file whose arrays are `names`: (block, None), or (None, why not) when it
        is missing or unusable.

        An unusable file is deleted (and logged), so that the next save of an agent holding the
        block writes it anew rather than finding its name taken by the damaged one."""
        return self.read_blocks([bid], storage, names)[0]

    def read_blocks(self, bids: list[str], storage: Storage, names: set[str], wanted: list[set[str]] | None = None,
                    remote: dict[str, Remote] | None = None) -> list[tuple[Block | None, str | None]]:
        """`read_block` for several blocks, each into a buffer of its own, the files read at once
        on the reading threads; of block i only the arrays `wanted[i]` (all by default); those in
        `remote` from the shared tier. MLX is called on this thread only."""
        opened = self.open_blocks(bids, storage, names, remote)
        files = []  # (file, its arrays' spans in its buffer, the buffer)
        for i, p in enumerate(opened):
            if isinstance(p, BlockFile):
                spans = _spans(p, [n for n in p.layout if wanted is None or n in wanted[i]])
                files.append((p, spans, mx.zeros((spans[-1][2] if spans else 0,), mx.uint8, stream=mx.cpu)))
        mx.eval([buffer for _, _, buffer in files])
        targets = [[(n, [memoryview(buffer)[begin:end]]) for n, begin, end in spans] for _, spans, buffer in files]
        problems = iter(zip(files, self.fill_blocks([p for p, _, _ in files], targets)))
        results: list[tuple[Block | None, str | None]] = []
        for p in opened:
            if isinstance(p, str):
                results.append((None, p))
                continue
            (_, spans, buffer), problem = next(problems)
            results.append((None, problem) if problem else (Block(p.bid, p.parent, p.tokens, _arrays(p, buffer, spans)), None))
        return results

    def read_into_one(self, files: list[BlockFile], gpu: bool) -> tuple[mx.array, list[str | None]]:
        """Each file's data, whole, into one buffer, file i in row i (with `gpu`, in CUDA GPU memory
        by DMA: cuda.py): a load of many blocks makes one allocation, and its arrays come out of
        it by strided views (cache_build.reconstruct), not an array per block and layer.
        Returns the buffer and, per file, None or why it could not be used."""
        row = -(-max((end for p in files for *_, end in p.layout.values()), default=1) // 16) * 16  # aligned
        shape = (max(len(files), 1), row)  # 2-D: MLX's dimensions are 32-bit, a 32K-token load is 4 GB
        if gpu:
            buffer, address = cuda.gpu_buffer(shape)
            targets: list[Any] = [(address + i * row, row) for i in range(len(files))]
        else:
            buffer = mx.zeros(shape, mx.uint8, stream=mx.cpu)
            mx.eval(buffer)
            view = memoryview(buffer).cast("B")
            targets = [view[i * row : (i + 1) * row] for i in range(len(files))]
        return buffer, self.fill_blocks(files, targets)

    @staticmethod
    def blocks_in_one(files: list[BlockFile], buffer: mx.array) -> list[Block]:
        """The blocks `read_into_one` read into `buffer`, their arrays MLX's views of it (MLX's work
        per array is about a millisecond a block: done after the call, for the pool)."""
        spans = lambda p: [(name, begin, end) for name, (_, _, begin, end) in p.layout.items()]  # noqa: E731
        return [Block(p.bid, p.parent, p.tokens, _arrays(p, buffer[i], spans(p))) for i, p in enumerate(files)]

    def open_blocks(self, bids: list[str], storage: Storage, names: set[str],
                    remote: dict[str, Remote] | None = None) -> list[BlockFile | str]:
        """Each block file with its header checked (nothing of its data read yet), or why it
        cannot be used (a missing file; a damaged or foreign one, which is deleted). A block in
        `remote` is read from the shared tier instead, its header from the bytes given."""
        opened: list[BlockFile | str] = []
        for bid in bids:
            path, r = self.path(bid), (remote or {}).get(bid)
            try:
                if r is not None:
                    header = _parse_header(path, io.BytesIO(r.head), r.size, bid, storage, names)
                    opened.append(replace(header, source=r.source))
                    continue
                with open(path, "rb", buffering=0) as f:
                    opened.append(_parse_header(path, f, os.fstat(f.fileno()).st_size, bid, storage, names))
            except FileNotFoundError:
                opened.append(f"KV block {path.name} is missing")
            except Exception as e:  # noqa: BLE001 - any unreadable file is a cache miss, never a crash
                opened.append(self._unusable(path, bid, e, r and r.source))
        return opened

    def fill_blocks(self, files: list[BlockFile], targets: list[Any]) -> list[str | None]:
        """Read each file's named arrays into their buffers (or its whole data into one target) on
        the reading threads, checksummed: None for a block whose arrays were read whole, else why
        not (and the file is deleted). A file's targets may be a function of the opened file."""
        errors = list(self._readers.map(self._try_fill, files, targets))
        for e in errors:
            if isinstance(e, _Misfit):  # not the file's fault: the caller's
                raise e.error
        return [None if e is None else self._unusable(p.path, p.bid, e, p.source) for p, e in zip(files, errors)]

    @staticmethod
    def _try_fill(p: BlockFile, targets: Any) -> Exception | None:
        """Fill one file's targets; they may be a function of the file, made here (on the reading
        thread, beside the other threads' reads), whose ValueError is the caller's (_Misfit)."""
        if callable(targets):
            try:
                targets = targets(p)
            except ValueError as e:
                return _Misfit(e)
        try:
            _fill(p, targets)
            return None
        except Exception as e:  # noqa: BLE001
            return e

    def _unusable(self, path: Path, bid: str, e: Exception, source: Any = None) -> str:
        """Say why the block cannot be used, and delete it: its file, or in the shared tier
        (`source`) one that failed its checks (not one out of reach)."""
        where = f"KV block {path.name}" if source is None else f"KV block {bid} in the shared tier"
        if isinstance(e, Unusable):
            problem = f"{where} {e}"
            if source is not None:
                source.damaged(bid)
        else:
            why = str(e).replace(str(path.parent), "")  # the file's name is enough; its place is the server's
            problem = f"{where} is unreadable ({type(e).__name__}: {why})"
        if source is None or isinstance(e, Unusable):
            log.warning("%s: deleting it, it is rebuilt when an agent holding it is saved", problem)
        else:
            log.warning("%s: a miss", problem)
        with self._lock:
            path.unlink(missing_ok=True)
            self._sizes.pop(bid, None)
        return problem
