"""The on-disk store: transcripts and block lists in SQLite, KV blocks in safetensors files.

Layout under the cache dir::

    store.db                      SQLite (WAL): agents (messages, token ids: the truth) and
                                  kv (per agent, the ids of the blocks its KV cache is made of
                                  and the token ids they hold: only a cache)
    blocks/<id>.safetensors       one KV block: every attention layer's keys and values for its
                                  tokens (layers.<i>.keys / .values, (1, kv_heads, tokens,
                                  head_dim); at --kv-bits 8 or 4, .weight, .scales and .biases
                                  of each), every recurrent layer's state after its last token
                                  (layers.<i>.state.<j>; see cache_kinds.py), with its parent id,
                                  token ids, storage key and a checksum per array in the metadata

A block is named by its content (block_pool.chain_ids), so a block that several agents hold
(a shared system prompt, a fork and its source) is one file, written once. Saving an agent
writes its missing block files (each to a temporary file, fsynced and renamed), then commits
its block list in one SQLite transaction, then deletes the blocks no list references any more.
A crash at any point leaves the old list with its blocks, or the new one with its blocks; block
files that no list names are removed at the next start.

Every block file is checked when read: its id is recomputed from the parent, tokens and storage
key in its metadata, its arrays must be the model's and hold the block's tokens, and the data of
each array read must match its xxh3_64 checksum in the metadata. Any mismatch is a cache miss (the
engine re-prefills from the block before), never a crash or a wrong answer. A reader takes only
the arrays it needs: a resumed agent needs every block's full-attention K/V, but a window's K/V
only from its last blocks and a recurrent state only from the last block.

Why blocks are written and read here rather than with `safetensors`/`mx.load`: loading is on the
way to a resumed agent's first token, so a block file is read once, in large chunks, straight
into the buffer its arrays then view (or the working cache), checksummed chunk by chunk while the chunk is still
in the CPU's cache; `read_blocks` reads several files at once on threads (the reads and the
checksum release the GIL). The files stay plain safetensors, readable by any safetensors tool.

Why not mlx-lm's `save_prompt_cache`: it writes one file per cache, so nothing is shared
between agents, and it must run on the thread that owns MLX. Here the engine thread hands
evaluated blocks to the `Writer` thread, which serializes them with the safetensors library,
so saving never delays the next token.
"""

from __future__ import annotations

import json
import math
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import numpy as np
import orjson
import xxhash

from mcp_semantic import cuda
from mcp_semantic.block_pool import Block, Storage, block_id, host_view

log = logging.getLogger(__name__)

NAME_RULE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_RULE)
# /3: an xxh3_64 checksum per array, so a reader can take only the arrays it needs (a window's
# last blocks, the state of the last block); blocks hold every cache kind (cache_kinds.py).
# /2 (one checksum over the data region) and /1 (a CRC-32 per array) read as a miss: the agent
# re-prefills once.
BLOCK_FORMAT = "mcp-semantic-block/3"
_BLOCK_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class InvalidName(ValueError):
    pass


def check_name(name: str) -> str:
    """Refuse any agent name that is not a plain file name: no path is built from anything else."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid agent name {name!r}: names are 1 to 64 characters of letters, digits, "
            f"'.', '_' and '-', starting with a letter or digit (rule {NAME_RULE})"
        )
    return name


@dataclass
class Agent:
    """An agent's transcript. `tokens` are the ids of its last prompt and reply: what its KV covers."""

    name: str
    system: str | None = None
    parent: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "assistant")


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


class Writer:
    """Runs the store's writes on its own thread, in the order given (saves, forks' lists).

    `wait()` returns once nothing is pending: callers use it before they read or delete what a
    job writes.
    """

    def __init__(self) -> None:
        self._jobs: deque[tuple[str, Callable[[], object]] | None] = deque()
        self.errors: dict[str, str] = {}  # agent -> why its last save failed (until it is read)
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mcp-semantic-writer", daemon=True)
        self._thread.start()

    def put(self, name: str, job: Callable[[], object]) -> None:
        """Run `job` (a write for agent `name`) after every job put before it."""
        with self._cond:
            self._jobs.append((name, job))
            self._cond.notify_all()

    def take_error(self, name: str) -> str | None:
        """Why the agent's last save failed, once; None if it did not."""
        with self._cond:
            return self.errors.pop(name, None)

    def wait(self) -> None:
        """Return once every job put so far is done."""
        with self._cond:
            self._cond.wait_for(lambda: not self._jobs)

    def close(self) -> None:
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        try:  # below the engine thread: writing may wait, the next token may not (Linux: per thread)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs))
                item = self._jobs[0]
            if item is None:
                return
            name, job = item
            try:
                job()
            except Exception as e:  # noqa: BLE001 - e.g. a full disk: the transcript stays the truth
                log.error("could not save the KV cache of agent %s: %s", name, e)
                with self._cond:
                    self.errors[name] = str(e)
            del item, job  # the blocks' arrays go now, not when the next job comes (MLX writes a cache in place only when nothing else refers to it)
            with self._cond:
                self._jobs.popleft()
                self._cond.notify_all()


class CacheDirLocked(RuntimeError):
    """Another process serves this cache dir."""


_locks: dict[Path, list] = {}  # cache dir -> [open lock file, users in this process]
_locks_guard = threading.Lock()


def lock_cache_dir(root: Path) -> Path:
    """Take the cache dir for this process, or raise CacheDirLocked naming the holder.

    Two servers on one cache dir would each keep their own copy of an agent and overwrite the
    other's turns. An advisory lock on `<root>/lock` (released by the OS when a process dies)
    keeps that out; in one process the lock is shared and counted (SSE sessions, restarts).
    """
    import fcntl  # POSIX, as MLX itself: macOS and Linux

    key = Path(root).resolve()
    with _locks_guard:
        if key in _locks:
            _locks[key][1] += 1
            return key
        key.mkdir(parents=True, exist_ok=True)
        f = open(key / "lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise CacheDirLocked(
                f"another mcp-semantic server (pid {holder}) is using the cache dir {key}; "
                "stop it, or give this one its own --cache-dir"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        _locks[key] = [f, 1]
        return key


def unlock_cache_dir(key: Path) -> None:
    with _locks_guard:
        entry = _locks.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()  # closing the file releases the lock
            del _locks[key]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    system TEXT,
    parent TEXT,
    messages TEXT NOT NULL,   -- JSON list of {role, content}
    tokens TEXT NOT NULL,     -- JSON list of the token ids of its last prompt and reply
    created_at REAL NOT NULL,
    last_used_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    agent TEXT PRIMARY KEY,
    blocks TEXT NOT NULL,     -- JSON list of block ids, in order
    tokens TEXT NOT NULL,     -- JSON list of the token ids those blocks hold
    branch TEXT               -- JSON [block id, tokens] of a partial block ending inside them, or null
);
"""


@dataclass
class KVRecord:
    """An agent's KV cache as the store knows it: its blocks' ids, and the tokens they hold.

    `branch`: the id of a partial block that ends a shorter cache, of the first `branch_tokens`
    of `tokens` (the blocks before it are the first ones of `blocks`): with recurrent layers, the
    cache at the start of the last reply, which the next prompt reaches even when it renders the
    reply with other tokens than were generated (caches.py)."""

    blocks: list[str]
    tokens: list[int]
    branch: str | None = None
    branch_tokens: int = 0

    @property
    def ids(self) -> list[str]:
        """Every block the record holds."""
        return self.blocks + [self.branch] if self.branch else self.blocks


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


def _write_block(block: HostBlock, storage: Storage, path: Path) -> None:
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
class _Pending:
    """A block file whose header passed every check, waiting for its data to be read."""

    path: Path
    bid: str
    parent: str
    tokens: list[int]
    start: int  # where the data region starts in the file
    checksums: dict[str, str]  # name -> xxh3_64 of its data
    layout: dict[str, tuple[mx.Dtype, list[int], int, int]]  # name -> (dtype, shape, begin, end), in file order


def _record(blocks: str, tokens: str, branch: str | None) -> KVRecord:
    """A kv row as a KVRecord (json errors and wrong types raise ValueError or TypeError)."""
    record = KVRecord(json.loads(blocks), json.loads(tokens))
    if branch is not None:
        record.branch, record.branch_tokens = json.loads(branch)
        if not isinstance(record.branch_tokens, int):
            raise ValueError("a branch's token count that is not an integer")
    return record


def _checked_record(agent: str, row: list | tuple) -> KVRecord | None:
    """A kv row as a KVRecord, or None if it cannot be read (logged)."""
    try:
        record = _record(*row)
        if not all(isinstance(b, str) and _BLOCK_ID_RE.fullmatch(b) for b in record.ids):
            raise ValueError("a block id that is not 32 hex digits")
        if not all(isinstance(t, int) for t in record.tokens):
            raise ValueError("a token id that is not an integer")
        return record
    except (ValueError, TypeError) as e:
        log.warning("cannot read the block list of agent %s: %s", agent, e)
        return None


class _Unusable(Exception):
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
            raise _Unusable(f"{name} has shape {tuple(shape)} for {n_tokens} tokens")
        if begin != end or stop - begin != math.prod(shape) * dtype.size or begin % dtype.size:
            raise _Unusable(f"is unreadable ({name} has data offsets {[begin, stop]})")
        layout[name], end = (dtype, shape, begin, stop), stop
    return layout, end


def _parse_header(path: Path, f, size: int, bid: str, storage: Storage, names: set[str]) -> _Pending:
    """Check everything the header says before any data is read: `names` are the arrays a
    block of this model holds (a file always holds them all)."""
    head = f.read(8)
    if len(head) < 8:
        raise _Unusable("is unreadable (too short for a safetensors header)")
    n = int.from_bytes(head, "little")
    if not 2 <= n <= min(_MAX_HEADER, size - 8):
        raise _Unusable(f"is unreadable (a header of {n} bytes in a file of {size})")
    try:
        header = orjson.loads(f.read(n))
    except ValueError as e:  # orjson's JSONDecodeError, invalid UTF-8 too
        raise _Unusable(f"is unreadable (its header is not JSON: {e})") from None
    if not isinstance(header, dict) or not isinstance(meta := header.pop("__metadata__", None), dict):
        raise _Unusable("is unreadable (its header has no metadata)")
    if meta.get("format") != BLOCK_FORMAT:
        raise _Unusable(f"has format {meta.get('format')!r}, expected {BLOCK_FORMAT}")
    if meta.get("storage") != storage.key:
        raise _Unusable("was stored for another model or precision")
    tokens, parent = orjson.loads(meta["tokens"]), meta["parent"]
    if not isinstance(tokens, list) or not set(map(type, tokens)) <= {int} or len(tokens) != int(meta["n_tokens"]):
        raise _Unusable("has an inconsistent token list")
    if not isinstance(parent, str) or block_id(parent, tokens, storage.key) != bid:
        raise _Unusable("does not hold the tokens its name says")
    if header.keys() != names:
        missing, extra = sorted(names - set(header)), sorted(set(header) - names)
        raise _Unusable(f"holds other arrays than the model's cache (missing {missing[:3]}, extra {extra[:3]})")
    known = _checked.get((storage.key, len(tokens)))
    if known is not None and known[0] == header:  # one comparison in C, not a check per array
        layout, end = known[1], known[2]
    else:
        layout, end = _check_arrays(header, len(tokens))
        if len(_checked) >= 64:
            _checked.clear()
        _checked[(storage.key, len(tokens))] = (header, layout, end)
    if 8 + n + end != size:
        raise _Unusable(f"is unreadable ({size} bytes, its header says {8 + n + end})")
    try:
        checksums = orjson.loads(meta["xxh3_64"])
    except (KeyError, TypeError, ValueError):
        checksums = None
    if not isinstance(checksums, dict) or checksums.keys() != names or not set(map(type, checksums.values())) <= {str}:
        raise _Unusable("has no checksum for each array")
    return _Pending(path, bid, parent, tokens, 8 + n, checksums, layout)


Target = memoryview | tuple[int, int]  # host memory, or (address, bytes) on a CUDA GPU (cuda.py)


def _fill(p: _Pending, targets: list[tuple[str, list[memoryview] | np.ndarray]] | Target) -> None:
    """Read the named arrays into their targets, checksummed: a list of contiguous buffers (bytes,
    in file order, as many as the array holds) or a numpy region of the array's shape (a working
    cache's, a run of bytes per head); or, given one target, the file's whole data region into it
    (_fill_whole). No MLX call: this runs on the reading threads."""
    with open(p.path, "rb", buffering=0) as f:
        if not isinstance(targets, list):
            _fill_whole(p, f, targets)
            return
        group: list[tuple[str, list[Any]]] = []
        for name, into in sorted(targets, key=lambda t: p.layout[t[0]][2]):
            if isinstance(into, np.ndarray):
                into = [into[0, h] for h in range(into.shape[1])] if into.ndim == 4 else [into]
            begin = p.layout[name][2]
            if group and (begin - p.layout[group[0][0]][2] >= _GROUP_BYTES or p.layout[group[-1][0]][3] != begin
                          or sum(len(bufs) for _, bufs in group) + len(into) > _GROUP_BUFFERS):
                _fill_group(p, f.fileno(), group)
                group = []
            group.append((name, into))
        if group:
            _fill_group(p, f.fileno(), group)


# What one call reads: arrays one after another, about 1 MB, few calls (an array is a call's
# work under the GIL) while what is read stays in the CPU's cache to checksum; at most
# IOV_MAX buffers (1024 on Linux)
_GROUP_BYTES, _GROUP_BUFFERS = 1 << 20, 512


def _fill_group(p: _Pending, fd: int, group: list[tuple[str, list[Any]]]) -> None:
    """Arrays one after another in the file, read by one call straight into their buffers (the
    bytes copied once, where they go), then checksummed there."""
    begin, end = p.layout[group[0][0]][2], p.layout[group[-1][0]][3]
    _preadv(fd, [b for _, into in group for b in into], p.start + begin, end - begin)
    for name, into in group:
        checksum = xxhash.xxh3_64()
        for b in into:
            checksum.update(b)
        if checksum.hexdigest() != p.checksums[name]:
            raise _Unusable(f"fails its checksum ({name}): its data was damaged on disk")


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
                raise _Unusable("is unreadable (shorter than when it was opened)")
            filled, at = filled + got, at + got


def _readv(fd: int, buffers: list[Any], offset: int) -> int:
    """os.preadv; where Python lacks it (macOS before 11), a seek and os.readv: each read
    opens the file anew, so no other thread moves its position."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, buffers, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.readv(fd, buffers)


def _fill_whole(p: _Pending, f, target: Target) -> None:
    """The file's data region read at once, then each array checksummed where it landed: a few
    calls per file, where a call per array under the GIL was most of a load (a block of a
    quantized 8B model has 192 arrays, some of 8 KB). A GPU target goes through this thread's
    pinned buffer and one DMA copy."""
    n = max((end for *_, end in p.layout.values()), default=0)
    staging = None if isinstance(target, memoryview) else cuda.staging(n)
    view = target[:n] if staging is None else staging.view[:n]
    _preadv(f.fileno(), [view], p.start, n)
    for name, (_, _, begin, end) in p.layout.items():
        if xxhash.xxh3_64_hexdigest(view[begin:end]) != p.checksums[name]:
            raise _Unusable(f"fails its checksum ({name}): its data was damaged on disk")
    if staging is not None:
        cuda.copy_in(target[0], staging, n, 0)


def _spans(p: _Pending, names: list[str]) -> list[tuple[str, int, int]]:
    """Where each of the block's arrays `names` goes in a buffer that holds them one after another."""
    spans, at = [], 0
    for name in names:
        _, _, begin, end = p.layout[name]
        spans.append((name, at, at + end - begin))
        at += end - begin
    return spans


def _arrays(p: _Pending, buffer: mx.array, spans: list[tuple[str, int, int]]) -> dict[str, mx.array]:
    """The block's arrays, read into `buffer` at `spans`: views of it, no copy."""
    arrays = {name: buffer[begin:end].view(p.layout[name][0]).reshape(p.layout[name][1]) for name, begin, end in spans}
    mx.eval(list(arrays.values()))
    return arrays


class Store:
    """Transcripts and block lists in SQLite (`store.db`, WAL); KV blocks in files beside them.

    The engine thread writes transcripts, the writer thread blocks and block lists; one lock
    orders them. Why SQLite rather than a JSON file per agent: a turn is one transaction, and an
    agent's block list commits or not as a whole.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock_key = lock_cache_dir(self.root)  # first: nothing is read or cleaned in another server's dir
        self._lock = threading.RLock()
        self.blocks_dir = self.root / "blocks"
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        self._remove_old_layout()
        self.db = self._open_db(self.root / "store.db")
        self.refs: Counter[str] = Counter()  # block id -> block lists on disk naming it
        with self._lock:  # the lists' block ids only: their token lists are read when an agent is used
            rows = self.db.execute("SELECT agent, blocks, '[]', branch FROM kv").fetchall()
        for agent, *row in rows:
            if (record := _checked_record(agent, row)) is not None:
                self.refs.update(record.ids)
        self._sizes: dict[str, int] = {}
        self._collect_garbage()
        # Block files are read on these threads, several at once (fill_blocks): a read from the
        # page cache runs at about 5.6 GB/s on one thread of the GPU device's host and 41 on 16
        self._readers = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="mcp-semantic-read")

    def _open_db(self, path: Path) -> sqlite3.Connection:
        """Open the database; one that is not a database is moved aside, and the loss said."""
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a turn answered is a turn on disk
            db.executescript(_SCHEMA)
            if "branch" not in {row[1] for row in db.execute("PRAGMA table_info(kv)")}:  # a store of before 0.2
                db.execute("ALTER TABLE kv ADD COLUMN branch TEXT")
            return db
        except sqlite3.DatabaseError as e:
            lost = []
            try:
                lost = [row[0] for row in db.execute("SELECT name FROM agents")]
            except sqlite3.DatabaseError:
                pass
            db.close()
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            os.replace(path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            log.error(
                "the transcript database %s cannot be read (%s): moved to %s; transcripts lost for: %s",
                path, e, aside.name, ", ".join(lost) or "all agents it held",
            )
            return self._open_db(path)

    def close(self) -> None:
        self._readers.shutdown()
        self.db.close()
        unlock_cache_dir(self._lock_key)

    def _remove_old_layout(self) -> None:
        """Version 0.1 kept one KV file per agent under agents/: only a cache, so it goes."""
        old = self.root / "agents"
        if old.is_dir():
            log.info("removing KV caches of the old per-agent layout in %s (agents re-read their history once)", old)
            shutil.rmtree(old, ignore_errors=True)

    def _collect_garbage(self) -> None:
        """Remove temporaries (left only by a crash mid-write) and blocks no list names
        (left by a crash between the block files and the commit of the list)."""
        for path in self.blocks_dir.iterdir():
            if path.name.startswith("."):
                log.info("removing stale temporary file %s", path.name)
                path.unlink(missing_ok=True)
            elif path.suffix == ".safetensors" and path.stem not in self.refs:
                log.info("removing unreferenced KV block %s", path.name)
                path.unlink(missing_ok=True)

    def block_path(self, bid: str) -> Path:
        if not _BLOCK_ID_RE.fullmatch(bid):  # ids come from our own database; still, no odd paths
            raise ValueError(f"invalid block id {bid!r}")
        return self.blocks_dir / f"{bid}.safetensors"

    # transcripts

    def names(self, after: str | None = None, limit: int | None = None) -> list[str]:
        """Agents' names in order: all, or a page of at most `limit` after the name `after`."""
        with self._lock:
            return [row[0] for row in self.db.execute(
                "SELECT name FROM agents WHERE name > ? ORDER BY name LIMIT ?", (after or "", -1 if limit is None else limit))]

    def count(self) -> int:
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM agents").fetchone()[0]

    def exists(self, name: str) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM agents WHERE name = ?", (check_name(name),)).fetchone() is not None

    def load_agent(self, name: str) -> Agent | None:
        """The stored transcript, or None if there is none or it cannot be read (logged)."""
        with self._lock:
            row = self.db.execute(
                "SELECT system, parent, messages, tokens, created_at, last_used_at FROM agents WHERE name = ?",
                (check_name(name),),
            ).fetchone()
        if row is None:
            return None
        try:
            system, parent, messages, tokens, created_at, last_used_at = row
            agent = Agent(name, system, parent, json.loads(messages), json.loads(tokens), created_at, last_used_at)
            if not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in agent.messages):
                raise ValueError("a message without role or content")
            if not all(isinstance(t, int) for t in agent.tokens):
                raise ValueError("a token id that is not an integer")
            return agent
        except (ValueError, TypeError) as e:
            log.warning("cannot read the transcript of agent %s: %s", name, e)
            return None

    def save_agent(self, agent: Agent) -> None:
        check_name(agent.name)
        with self._lock:
            self.db.execute(
                "INSERT OR REPLACE INTO agents VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    agent.name,
                    agent.system,
                    agent.parent,
                    json.dumps(agent.messages, ensure_ascii=False),
                    json.dumps(agent.tokens, separators=(",", ":")),
                    agent.created_at,
                    agent.last_used_at,
                ),
            )

    def delete_agent(self, name: str) -> int:
        """Forget the agent: its transcript and block list in one transaction, then the blocks
        only it held. Returns the bytes freed on disk."""
        with self._lock:
            record = self.kv_record(name)
            with self._transaction():
                self.db.execute("DELETE FROM agents WHERE name = ?", (check_name(name),))
                self.db.execute("DELETE FROM kv WHERE agent = ?", (name,))
            return self._release(record.ids if record else [])

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT on the autocommit connection; ROLLBACK if anything fails."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # block lists

    def kv_records(self) -> dict[str, KVRecord]:
        """Every agent's stored block list; unreadable rows are left out (logged)."""
        with self._lock:
            rows = self.db.execute("SELECT agent, blocks, tokens, branch FROM kv").fetchall()
        return {agent: record for agent, *row in rows if (record := _checked_record(agent, row)) is not None}

    def kv_record(self, name: str) -> KVRecord | None:
        """The agent's stored block list; None if it has none, or it cannot be read (logged)."""
        with self._lock:
            row = self.db.execute("SELECT blocks, tokens, branch FROM kv WHERE agent = ?", (check_name(name),)).fetchone()
        return _checked_record(name, row) if row else None

    def commit_kv(self, name: str, record: KVRecord, blocks: list[HostBlock], storage: Storage) -> int:
        """Save an agent's cache: write the blocks of `record` that are not on disk yet (from
        `blocks`), commit the list, then delete blocks no list names any more. Returns the
        bytes written. A block neither given nor on disk leaves the old list in place."""
        check_name(name)
        # The files are written outside the lock, so the engine thread never waits for a save:
        # only the writer thread writes blocks, and nothing deletes blocks while it has work
        # (the engine waits for it first), so no block written here is collected before the commit.
        written = self._write_blocks(name, record, blocks, storage)
        if written is None:
            return 0
        with self._lock:
            self._commit_record(name, record)
        return written

    def _write_blocks(self, name: str, record: KVRecord, blocks: list[HostBlock], storage: Storage) -> int | None:
        given = {b.id: b for b in blocks}
        written = 0
        for bid in record.ids:
            path = self.block_path(bid)
            if path.exists():
                continue
            if bid not in given:
                log.warning("agent %s: block %s is neither in memory nor on disk; its cache is not saved", name, bid)
                return None
            atomic_write(path, lambda p, b=given[bid]: _write_block(b, storage, p))
            written += path.stat().st_size
        return written

    def _commit_record(self, name: str, record: KVRecord) -> None:
        old = self.kv_record(name)
        self.db.execute(
            "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)",
            (name, json.dumps(record.blocks), json.dumps(record.tokens, separators=(",", ":")),
             json.dumps([record.branch, record.branch_tokens]) if record.branch else None),
        )
        self.refs.update(record.ids)
        self._release(old.ids if old else [])

    def delete_kv(self, name: str) -> int:
        """Forget the agent's stored cache; returns the bytes freed (its blocks no other list names)."""
        with self._lock:
            record = self.kv_record(name)
            self.db.execute("DELETE FROM kv WHERE agent = ?", (check_name(name),))
            return self._release(record.ids if record else [])

    def _release(self, blocks: list[str]) -> int:
        """Drop one reference to each block; delete the files no list names any more."""
        freed = 0
        self.refs.subtract(blocks)
        for bid in set(blocks):
            if self.refs[bid] <= 0:
                del self.refs[bid]
                path = self.block_path(bid)
                freed += self._size(bid)
                self._sizes.pop(bid, None)
                path.unlink(missing_ok=True)
        return freed

    # blocks

    def _size(self, bid: str) -> int:
        if bid not in self._sizes:
            try:
                self._sizes[bid] = self.block_path(bid).stat().st_size
            except FileNotFoundError:
                return 0
        return self._sizes[bid]

    def has_block(self, bid: str) -> bool:
        with self._lock:
            return self._size(bid) > 0

    def kv_bytes(self, name: str) -> tuple[int, int]:
        """Bytes of the agent's stored blocks, and how many of them other agents' lists also name."""
        with self._lock:
            record = self.kv_record(name)
            if record is None:
                return 0, 0
            ids = set(record.ids)
            total = sum(self._size(b) for b in ids)
            shared = sum(self._size(b) for b in ids if self.refs[b] > 1)
            return total, shared

    def disk_blocks(self) -> int:
        with self._lock:
            return len(self.refs)

    def read_block(self, bid: str, storage: Storage, names: set[str]) -> tuple[Block | None, str | None]:
        """Load a block file whose arrays are `names`: (block, None), or (None, why not) when it
        is missing or unusable.

        An unusable file is deleted (and logged), so that the next save of an agent holding the
        block writes it anew rather than finding its name taken by the damaged one."""
        return self.read_blocks([bid], storage, names)[0]

    def read_blocks(self, bids: list[str], storage: Storage, names: set[str],
                    wanted: list[set[str]] | None = None) -> list[tuple[Block | None, str | None]]:
        """`read_block` for several blocks, each into a buffer of its own, the files read at once
        on the reading threads; of block i only the arrays `wanted[i]` (all by default). MLX is
        called on this thread only."""
        opened = self.open_blocks(bids, storage, names)
        files = []  # (file, its arrays' spans in its buffer, the buffer)
        for i, p in enumerate(opened):
            if isinstance(p, _Pending):
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

    def read_into_one(self, files: list[_Pending], gpu: bool) -> tuple[mx.array, list[str | None]]:
        """Each file's data, whole, into one buffer, file i in row i (with `gpu`, in CUDA GPU memory
        by DMA: cuda.py): a load of many blocks makes one allocation, and its arrays come out of
        it by strided views (block_pool.reconstruct), not an array per block and layer.
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
    def blocks_in_one(files: list[_Pending], buffer: mx.array) -> list[Block]:
        """The blocks `read_into_one` read into `buffer`, their arrays MLX's views of it (MLX's work
        per array is about a millisecond a block: done after the call, for the pool)."""
        spans = lambda p: [(name, begin, end) for name, (_, _, begin, end) in p.layout.items()]  # noqa: E731
        return [Block(p.bid, p.parent, p.tokens, _arrays(p, buffer[i], spans(p))) for i, p in enumerate(files)]

    def open_blocks(self, bids: list[str], storage: Storage, names: set[str]) -> list[_Pending | str]:
        """Each block file with its header checked (nothing of its data read yet), or why it
        cannot be used (a missing file; a damaged or foreign one, which is deleted)."""
        opened: list[_Pending | str] = []
        for bid in bids:
            path = self.block_path(bid)
            try:
                with open(path, "rb", buffering=0) as f:
                    opened.append(_parse_header(path, f, os.fstat(f.fileno()).st_size, bid, storage, names))
            except FileNotFoundError:
                opened.append(f"KV block {path.name} is missing")
            except Exception as e:  # noqa: BLE001 - any unreadable file is a cache miss, never a crash
                opened.append(self._unusable(path, bid, e))
        return opened

    def fill_blocks(self, files: list[_Pending], targets: list[list[tuple[str, list[memoryview] | np.ndarray]] | Target]) -> list[str | None]:
        """Read each file's named arrays into their views (or its whole data into one target) on
        the reading threads, checksummed: None for a block whose arrays were read whole, else why
        not (and the file is deleted)."""
        errors = self._readers.map(self._try_fill, files, targets)
        return [None if e is None else self._unusable(p.path, p.bid, e) for p, e in zip(files, errors)]

    @staticmethod
    def _try_fill(p: _Pending, targets: list[tuple[str, list[memoryview] | np.ndarray]] | Target) -> Exception | None:
        try:
            _fill(p, targets)
            return None
        except Exception as e:  # noqa: BLE001
            return e

    def _unusable(self, path: Path, bid: str, e: Exception) -> str:
        """Say why the file cannot be used, and delete it."""
        if isinstance(e, _Unusable):
            problem = f"KV block {path.name} {e}"
        else:
            why = str(e).replace(str(path.parent), "")  # the file's name is enough; its place is the server's
            problem = f"KV block {path.name} is unreadable ({type(e).__name__}: {why})"
        log.warning("%s: deleting it, it is rebuilt when an agent holding it is saved", problem)
        with self._lock:
            path.unlink(missing_ok=True)
            self._sizes.pop(bid, None)
        return problem
