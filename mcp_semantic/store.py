"""The store: transcripts and block lists in a database (SQLite, sqlite_store.py, embedded; or
PostgreSQL, postgres.py, shared by several servers); the blocks' bytes in safetensors files
(block_files.py), and in the shared mode in Redis behind them (block_redis.py).

Layout under the cache dir::

    store.db                      SQLite (WAL; the embedded mode): agents (messages, token ids:
                                  the truth) and kv (per agent, the ids of the blocks its KV
                                  cache is made of and the token ids they hold: only a cache)
    blocks/<id>.safetensors       one KV block (block_files.py)

A block is named by its content (block_pool.chain_ids), so a block that several agents hold
(a shared system prompt, a fork and its source) is one file, written once. Saving an agent
writes its missing block files (each to a temporary file, fsynced and renamed), then commits
its block list in one transaction, then deletes the blocks no list references any more.
A crash at any point leaves the old list with its blocks, or the new one with its blocks; block
files that no list names are removed at the next start.

Why not mlx-lm's `save_prompt_cache`: it writes one file per cache, so nothing is shared
between agents, and it must run on the thread that owns MLX. Here the engine thread hands
evaluated blocks to the `Writer` thread, which serializes them with the safetensors library,
so saving never delays the next token.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mcp_semantic.block_files import BLOCK_ID_RE, BlockFiles, HostBlock, Remote
from mcp_semantic.block_pool import Storage

log = logging.getLogger(__name__)

NAME_RULE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_RULE)


class InvalidName(ValueError):
    pass


class StoreUnavailable(RuntimeError):
    """The shared store (PostgreSQL or Redis) cannot be reached: the message names it (its
    password masked) and says that the call changed nothing."""


class AgentBusy(RuntimeError):
    """The shared mode: the agent is being served by another server past the wait (leases.py);
    nothing was changed."""


class LeaseLost(StoreUnavailable):
    """A transcript save refused: this server's lease of the agent expired (PostgreSQL out of its
    reach for longer than the lease lasts) and another server may serve the agent now."""


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


def _record(blocks: str, tokens: str, branch: str | None) -> KVRecord:
    """A kv row as a KVRecord (json errors and wrong types raise ValueError or TypeError)."""
    record = KVRecord(json.loads(blocks), json.loads(tokens))
    if branch is not None:
        record.branch, record.branch_tokens = json.loads(branch)
        if not isinstance(record.branch_tokens, int):
            raise ValueError("a branch's token count that is not an integer")
    return record


def checked_record(agent: str, row: list | tuple) -> KVRecord | None:
    """A kv row as a KVRecord, or None if it cannot be read (logged)."""
    try:
        record = _record(*row)
        if not all(isinstance(b, str) and BLOCK_ID_RE.fullmatch(b) for b in record.ids):
            raise ValueError("a block id that is not 32 hex digits")
        if not all(isinstance(t, int) for t in record.tokens):
            raise ValueError("a token id that is not an integer")
        return record
    except (ValueError, TypeError) as e:
        log.warning("cannot read the block list of agent %s: %s", agent, e)
        return None



def agent_row(agent: Agent) -> tuple:
    """The agent as a row of `agents` (the same columns in SQLite and PostgreSQL)."""
    return (agent.name, agent.system, agent.parent, json.dumps(agent.messages, ensure_ascii=False),
            json.dumps(agent.tokens, separators=(",", ":")), agent.created_at, agent.last_used_at)


def kv_row(name: str, record: KVRecord) -> tuple:
    """The record as a row of `kv`."""
    return (name, json.dumps(record.blocks), json.dumps(record.tokens, separators=(",", ":")),
            json.dumps([record.branch, record.branch_tokens]) if record.branch else None)


class Store:
    """Transcripts and block lists in a database, the blocks' bytes in files beside them (and,
    in the shared mode, in Redis behind the files: `remote`).

    Two databases implement it: SQLiteStore (sqlite_store.py, the embedded default: `store.db`
    in the cache dir) and PostgresStore (postgres.py, the shared mode). This class holds what
    they share: names checked, rows read back and checked, and the order of a save: the block
    files written, then the list committed (the blocks Redis lacks sent first, in the shared
    mode), then the blocks no list names any more deleted. Subclasses give the SQL.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock_key = lock_cache_dir(self.root)  # first: nothing is read or cleaned in another server's dir
        self._lock = threading.RLock()
        self.blocks = BlockFiles(self.root / "blocks")
        self._remove_old_layout()

    def close(self) -> None:
        self.blocks.close()
        unlock_cache_dir(self._lock_key)

    def _remove_old_layout(self) -> None:
        """Version 0.1 kept one KV file per agent under agents/: only a cache, so it goes."""
        old = self.root / "agents"
        if old.is_dir():
            log.info("removing KV caches of the old per-agent layout in %s (agents re-read their history once)", old)
            shutil.rmtree(old, ignore_errors=True)

    # what each database gives

    def names(self, after: str | None = None, limit: int | None = None) -> list[str]:
        """Agents' names in order: all, or a page of at most `limit` after the name `after`."""
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def save_agent(self, agent: Agent) -> None:
        """Insert or replace the agent's row, committed when this returns."""
        raise NotImplementedError

    def _agent_row(self, name: str) -> tuple | None:
        """(system, parent, messages, tokens, created_at, last_used_at), or None."""
        raise NotImplementedError

    def _kv_row(self, name: str) -> tuple | None:
        """(blocks, tokens, branch) of the agent's block list, or None."""
        raise NotImplementedError

    def _put_record(self, name: str, record: KVRecord) -> list[str] | None:
        """Commit the agent's block list; returns the blocks of its old list that may now be
        unnamed, or None (logged) where a block it names is nowhere: the old list stays."""
        raise NotImplementedError

    def _delete_rows(self, name: str, agent_too: bool) -> list[str]:
        """Delete the agent's block list (and row); returns its blocks that may now be unnamed."""
        raise NotImplementedError

    def _unnamed(self, bids: list[str]) -> list[str]:
        """Of `bids`, those no list names: gone from the shared tier too when this returns."""
        raise NotImplementedError

    def _ref_counts(self, bids: list[str]) -> dict[str, int]:
        """How many lists name each block."""
        raise NotImplementedError

    def disk_blocks(self) -> int:
        """Blocks the lists name."""
        raise NotImplementedError

    shared = False  # whether blocks missing here may be in a tier other servers share (`remote_blocks`)

    def remote_blocks(self, bids: list[str]) -> dict[str, Remote]:
        """Those of `bids` that no local file holds and the shared tier has, ready to open
        (BlockFiles.open_blocks); none here."""
        return {}

    def in_shared_tier(self, bids: list[str]) -> set[str]:
        """Those of `bids` the shared tier has (none here)."""
        return set()

    # transcripts

    def load_agent(self, name: str) -> Agent | None:
        """The stored transcript, or None if there is none or it cannot be read (logged)."""
        row = self._agent_row(check_name(name))
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

    def delete_agent(self, name: str) -> int:
        """Forget the agent: its transcript and block list in one transaction, then the blocks
        only it held. Returns the bytes freed on disk."""
        with self._lock:
            return self._collect(self._delete_rows(check_name(name), agent_too=True))

    # block lists

    def kv_record(self, name: str) -> KVRecord | None:
        """The agent's stored block list; None if it has none, or it cannot be read (logged)."""
        row = self._kv_row(check_name(name))
        return checked_record(name, row) if row else None

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
            released = self._put_record(name, record)
            if released is None:
                return 0
            self._collect(released)
        return written

    def _write_blocks(self, name: str, record: KVRecord, blocks: list[HostBlock], storage: Storage) -> int | None:
        """Write the record's blocks that are not on disk; None (logged) where one is neither
        given nor on disk, nor perhaps in the shared tier (_put_record checks there)."""
        given = {b.id: b for b in blocks}
        written = 0
        for bid in record.ids:
            if self.blocks.exists(bid):
                continue
            if bid in given:
                written += self.blocks.write(given[bid], storage)
            elif not self.shared:
                log.warning("agent %s: block %s is neither in memory nor on disk; its cache is not saved", name, bid)
                return None
        return written

    def delete_kv(self, name: str) -> int:
        """Forget the agent's stored cache; returns the bytes freed (its blocks no other list names)."""
        with self._lock:
            return self._collect(self._delete_rows(check_name(name), agent_too=False))

    def _collect(self, bids: list[str]) -> int:
        """Delete the files of the blocks of `bids` no list names; returns the bytes freed."""
        return sum(self.blocks.delete(bid) for bid in self._unnamed(sorted(set(bids)))) if bids else 0

    # blocks

    def has_block(self, bid: str) -> bool:
        return self.blocks.size(bid) > 0  # BlockFiles' own lock guards its sizes

    def kv_bytes(self, name: str) -> tuple[int, int]:
        """Bytes of the agent's stored blocks, and how many of them other agents' lists also name."""
        with self._lock:
            record = self.kv_record(name)
            if record is None:
                return 0, 0
            ids = sorted(set(record.ids))
            refs = self._ref_counts(ids)
            total = sum(self.blocks.size(b) for b in ids)
            shared = sum(self.blocks.size(b) for b in ids if refs.get(b, 0) > 1)
            return total, shared
