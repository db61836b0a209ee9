"""The on-disk store: transcripts in SQLite, and one KV cache file per agent.

Layout under the cache dir::

    store.db                         transcripts (SQLite): messages, token ids, metadata (the truth)
    agents/<name>/kv.safetensors     KV cache of `tokens` (only a cache: may be missing or stale):
                                     layers.<i>.keys / layers.<i>.values, (1, kv_heads, slots, head_dim),
                                     the first n_tokens slots used, then spare room (zeros);
                                     at --kv-bits 8 or 4: .weight, .scales, .biases of each

Every file write goes to a temporary file, is fsynced and renamed over the old one,
so a crash leaves either the old or the new file, never half of one; every transcript
write is one SQLite transaction.
The KV file records the token ids it holds and the model fingerprint, so a stale
or foreign cache is detected and the caller re-prefills instead of answering wrong.

Why not mlx-lm's `save_prompt_cache`: it must run on the thread that owns MLX and
writes each KVCache's whole buffer (up to 255 unused token slots). Here the engine
thread only takes a snapshot (views of the evaluated arrays, no copy) and the
`Writer` thread serializes it with the safetensors library, so saving never delays
the next token. Caches other than plain KVCache (sliding windows, SSM state) are
not persisted yet.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache
from safetensors import TensorSpec, serialize_file

log = logging.getLogger(__name__)

NAME_RULE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_RULE)
KV_FORMAT = "mcp-semantic-kv/3"
MIN_ROOM = 32
"""Spare token slots, at least, in a KV file: see room_for."""


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


@dataclass
class LoadedKV:
    cache: list[Any]
    tokens: list[int]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


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
class KVSnapshot:
    """An evaluated cache as host arrays that nothing mutates, to be written on any thread."""

    arrays: dict[str, tuple[str, np.ndarray]]  # name -> (safetensors dtype, array)
    metadata: dict[str, str]


def _encode(a: mx.array, kv_bits: int | None) -> dict[str, mx.array]:
    """How one layer's keys or values are stored: as they are, as float16, or quantized.

    8 and 4 bits use MLX's affine quantization along head_dim (group size 64, or 32 for
    smaller heads), as mlx-lm's QuantizedKVCache does.
    """
    if kv_bits == 16 and a.dtype not in (mx.float16, mx.bfloat16):
        return {"": a.astype(mx.float16)}
    if kv_bits in (8, 4):
        w, scales, biases = mx.quantize(a, group_size=_group_size(a.shape[-1]), bits=kv_bits)
        return {".weight": w, ".scales": scales, ".biases": biases}
    return {"": a}


def _group_size(head_dim: int) -> int:
    return 64 if head_dim % 64 == 0 else 32


def _decode(arrays: dict[str, mx.array], name: str, meta: dict[str, str], dtype: mx.Dtype) -> mx.array:
    if name + ".weight" in arrays:
        w, scales, biases = (arrays[f"{name}.{part}"] for part in ("weight", "scales", "biases"))
        group = int(meta["group_size"])
        return mx.dequantize(w, scales, biases, group_size=group, bits=int(meta["kv_bits"])).astype(dtype)
    a = arrays[name]
    return a if a.dtype == dtype else a.astype(dtype)


def kv_bits_supported(head_dim: int, kv_bits: int | None) -> bool:
    return kv_bits not in (8, 4) or head_dim % 32 == 0


def snapshot_kv(cache: list[Any], tokens: list[int], fingerprint: str, kv_bits: int | None = None) -> KVSnapshot | None:
    """On the engine thread: views of the first len(tokens) positions (no copy when lossless).

    The views keep their buffers shared, so MLX copies rather than updates them in place
    when the engine appends to the cache later. None if the cache kind is not persisted.
    `kv_bits` None stores the cache as it is; 16, 8 and 4 store it smaller and lossy.
    """
    if not cache or any(type(c) is not KVCache or c.keys is None for c in cache):
        return None
    n = len(tokens)
    head_dim = cache[0].keys.shape[-1]
    if not kv_bits_supported(head_dim, kv_bits):
        raise ValueError(f"--kv-bits {kv_bits} needs a head dimension divisible by 32, the model's is {head_dim}")
    views = {}
    for i, c in enumerate(cache):
        for kind, a in (("keys", c.keys), ("values", c.values)):
            for suffix, part in _encode(a[..., :n, :], kv_bits).items():
                # numpy has no bfloat16: carry its bits as uint16, labelled bfloat16 in the file
                dtype = str(part.dtype).removeprefix("mlx.core.")
                views[f"layers.{i}.{kind}{suffix}"] = (dtype, part.view(mx.uint16) if part.dtype == mx.bfloat16 else part)
    mx.eval([a for _, a in views.values()])
    metadata = {
        "format": KV_FORMAT,
        "fingerprint": fingerprint,
        "dtype": str(cache[0].keys.dtype).removeprefix("mlx.core."),
        "kv_bits": str(kv_bits or 0),
        "group_size": str(_group_size(head_dim)),
        "n_tokens": str(n),
        "tokens": json.dumps(tokens, separators=(",", ":")),
    }
    return KVSnapshot({k: (d, np.array(a, copy=False)) for k, (d, a) in views.items()}, metadata)


def room_for(n: int) -> int:
    """Token slots a KV file has for `n` tokens: n plus an eighth (at least 32), in steps of 32.

    Why spare slots on disk: a cache loaded from a file of exactly n slots must be copied
    into a larger buffer before its first new token, and filling fresh memory costs more
    than the load (measured here: 80 to 160 ms for a 2K-token cache, against a 25 ms load).
    Loaded with its spare slots, the cache takes a turn of up to n/8 tokens in place. The
    slots are zeros on disk: an eighth more bytes, and little for short caches, which are
    cheap to copy anyway.
    """
    return -(-(n + max(MIN_ROOM, n // 8)) // MIN_ROOM) * MIN_ROOM


def _write_snapshot(snapshot: KVSnapshot, path: Path) -> None:
    n = int(snapshot.metadata["n_tokens"])
    pad = [(0, 0), (0, 0), (0, room_for(n) - n), (0, 0)]
    arrays = {k: np.pad(a, pad) for k, (_, a) in snapshot.arrays.items()}  # contiguous, with room
    specs = {
        k: TensorSpec(dtype=snapshot.arrays[k][0], shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
        for k, a in arrays.items()
    }
    serialize_file(specs, str(path), metadata=snapshot.metadata)  # `arrays` keeps the data alive


def _kv_cache(keys: mx.array, values: mx.array, n: int) -> KVCache:
    """A KVCache of the first n positions of `keys` and `values`, using their spare slots as room."""
    c = KVCache()
    c.keys, c.values, c.offset = keys, values, n
    return c


class Writer:
    """Writes KV files on its own thread, in the order given: snapshots, and links for forks.

    `wait(name)` returns once nothing is pending for that agent: callers use it before
    they read or delete the agent's file, so no file is used while half written.
    """

    def __init__(self, store: Store):
        self.store = store
        self._jobs: deque[tuple[str, Callable[[], object]] | None] = deque()
        self._pending: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mcp-semantic-writer", daemon=True)
        self._thread.start()

    def put(self, name: str, snapshot: KVSnapshot) -> None:
        self._add(name, lambda: self.store.write_kv(name, snapshot))

    def link(self, source: str, target: str) -> None:
        """Give `target` the source's file once the source's pending writes are done: a fork
        returns at once, whatever the length of the source's context."""
        self._add(target, lambda: self.store.link_kv(source, target))

    def _add(self, name: str, job: Callable[[], object]) -> None:
        with self._cond:
            self._jobs.append((name, job))
            self._pending[name] += 1
            self._cond.notify_all()

    def pending(self, name: str) -> bool:
        with self._cond:
            return self._pending[name] > 0

    def wait(self, name: str | None = None) -> None:
        with self._cond:
            self._cond.wait_for(lambda: (self._pending[name] == 0) if name else not self._jobs)

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
            except OSError as e:  # e.g. a full disk: the transcript stays the truth
                log.error("could not save the KV cache of agent %s: %s", name, e)
            with self._cond:
                self._jobs.popleft()
                self._pending[name] -= 1
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
    tokens TEXT NOT NULL,     -- JSON list of the token ids its KV cache holds
    created_at REAL NOT NULL,
    last_used_at REAL NOT NULL
)
"""


class Store:
    """Transcripts in SQLite (`store.db`, WAL, written by the engine thread only); KV files beside them.

    Why SQLite rather than a JSON file per agent: a turn is one transaction, and what later
    ties several rows together (an agent and the blocks it holds) commits or not as a whole.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = lock_cache_dir(self.root)  # first: nothing is read or cleaned in another server's dir
        self.agents_dir = self.root / "agents"
        self.agents_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        self.db = self._open_db(self.root / "store.db")

    def _open_db(self, path: Path) -> sqlite3.Connection:
        """Open the database; one that is not a database is moved aside, and the loss said."""
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a turn answered is a turn on disk
            db.execute(_SCHEMA)
            return db
        except sqlite3.DatabaseError as e:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            os.replace(path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            lost = sorted(p.name for p in self.agents_dir.iterdir() if p.is_dir())
            log.error(
                "the transcript database %s cannot be read (%s): moved to %s; transcripts lost for: %s",
                path, e, aside.name, ", ".join(lost) or "none",
            )
            return self._open_db(path)

    def close(self) -> None:
        self.db.close()
        unlock_cache_dir(self._lock)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files are only ever left by a crash mid-write: the renamed file is the truth."""
        for tmp in self.agents_dir.glob("*/.*.tmp*"):
            log.info("removing stale temporary file %s", tmp)
            tmp.unlink(missing_ok=True)

    def _dir(self, name: str) -> Path:
        return self.agents_dir / check_name(name)

    def kv_path(self, name: str) -> Path:
        return self._dir(name) / "kv.safetensors"

    # transcripts

    def names(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT name FROM agents ORDER BY name")]

    def exists(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM agents WHERE name = ?", (check_name(name),)).fetchone() is not None

    def load_agent(self, name: str) -> Agent | None:
        """The stored transcript, or None if there is none or it cannot be read (logged)."""
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
        """Forget the agent: its transcript, then its folder. Returns the bytes freed on disk."""
        self.db.execute("DELETE FROM agents WHERE name = ?", (check_name(name),))
        freed = self.delete_kv(name)
        shutil.rmtree(self._dir(name), ignore_errors=True)
        return freed

    # KV caches

    def kv_bytes(self, name: str) -> tuple[int, int]:
        """Bytes of the agent's KV file, and how many of them it shares with other agents (forks)."""
        try:
            st = self.kv_path(name).stat()
        except FileNotFoundError:
            return 0, 0
        return st.st_size, st.st_size if st.st_nlink > 1 else 0

    def write_kv(self, name: str, snapshot: KVSnapshot) -> int:
        """Write a snapshot as the agent's KV file (atomically); returns the bytes written."""
        path = self.kv_path(name)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, lambda p: _write_snapshot(snapshot, p))
        return path.stat().st_size

    def load_kv(
        self, name: str, fingerprint: str, n_layers: int, kv_bits: int | None = None
    ) -> tuple[LoadedKV | None, str | None]:
        """Load the agent's KV cache: (kv, None), or (None, why not) when it is missing or unusable.

        A file stored at another precision than `kv_bits` is a miss: a lossy cache must not
        quietly stand in for a lossless one, nor the other way round.
        """
        path = self.kv_path(name)
        if not path.exists():
            return None, None
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
            if meta.get("format") != KV_FORMAT:
                return None, f"cache file {path.name} has format {meta.get('format')!r}, expected {KV_FORMAT}"
            if meta.get("fingerprint") != fingerprint:
                return None, f"cache file {path.name} was made by another model or dtype"
            if meta.get("kv_bits") != str(kv_bits or 0):
                stored = meta.get("kv_bits")
                return None, f"cache file {path.name} is stored at kv_bits={stored}, the server uses {kv_bits or 0}"
            tokens = json.loads(meta["tokens"])
            n = len(tokens)
            if not isinstance(tokens, list) or n != int(meta["n_tokens"]):
                return None, f"cache file {path.name} has an inconsistent token list"
            dtype = getattr(mx, meta["dtype"])
            cache = []
            for i in range(n_layers):
                keys = _decode(arrays, f"layers.{i}.keys", meta, dtype)
                values = _decode(arrays, f"layers.{i}.values", meta, dtype)
                if keys.ndim != 4 or keys.shape[2] < n or values.shape[:3] != keys.shape[:3]:
                    return None, f"cache file {path.name} holds {keys.shape[2]} positions for {n} tokens"
                cache.append(_kv_cache(keys, values, n))
            stored_layers = len({k.split(".")[1] for k in arrays})
            if stored_layers != n_layers:
                return None, f"cache file {path.name} has {stored_layers} layers, the model {n_layers}"
            mx.eval([c.state for c in cache])
            return LoadedKV(cache, tokens), None
        except Exception as e:  # noqa: BLE001 - any unreadable file is a cache miss, never a crash
            return None, f"cache file {path.name} is unreadable ({type(e).__name__}: {e})"

    def delete_kv(self, name: str) -> int:
        """Remove the agent's KV file; returns the bytes freed (none while a fork shares them)."""
        size, shared = self.kv_bytes(name)
        self.kv_path(name).unlink(missing_ok=True)
        return size - shared

    def link_kv(self, source: str, target: str) -> None:
        """Give `target` the source's KV file: a hard link shares the bytes (files are never
        modified in place, only replaced), a copy where links are not supported."""
        src, dst = self.kv_path(source), self.kv_path(target)
        if not src.exists():
            return
        dst.parent.mkdir(exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            atomic_write(dst, lambda p: shutil.copyfile(src, p))
