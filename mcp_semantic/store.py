"""The on-disk store: one folder per agent with its transcript and its KV cache.

Layout under the cache dir::

    agents/<name>/agent.json         transcript: messages, token ids, metadata (the truth)
    agents/<name>/kv.safetensors     KV cache of `tokens` (only a cache: may be missing or stale)

Every write goes to a temporary file, is fsynced and renamed over the old one,
so a crash leaves either the old or the new file, never half of one.
The KV file records the token ids it holds and the model fingerprint, so a stale
or foreign cache is detected and the caller re-prefills instead of answering wrong.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache

log = logging.getLogger(__name__)

NAME_RULE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_RULE)
KV_FORMAT = "mcp-semantic-kv/1"
TRANSCRIPT_FORMAT = 1


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
    nbytes: int


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Write through `write(tmp_path)`, fsync, and rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
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


def _compact(cache: Any) -> Any:
    """A KVCache without the unused tail of its buffer (it grows in steps of 256 tokens)."""
    if type(cache) is not KVCache or cache.keys is None or cache.keys.shape[2] == cache.offset:
        return cache
    n = cache.offset
    out = KVCache()
    out.state = (cache.keys[..., :n, :], cache.values[..., :n, :], n)
    return out


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.agents_dir = self.root / "agents"
        self.agents_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

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
        return sorted(
            p.name for p in self.agents_dir.iterdir() if _NAME_RE.fullmatch(p.name) and (p / "agent.json").exists()
        )

    def exists(self, name: str) -> bool:
        return (self._dir(name) / "agent.json").exists()

    def load_agent(self, name: str) -> Agent | None:
        """The stored transcript, or None if there is none or it cannot be read (logged)."""
        path = self._dir(name) / "agent.json"
        try:
            data = json.loads(path.read_text())
            if data.pop("format", None) != TRANSCRIPT_FORMAT:
                raise ValueError("unknown transcript format")
            agent = Agent(**data)
            if agent.name != name:
                raise ValueError(f"transcript names agent {agent.name!r}")
            return agent
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as e:
            log.warning("cannot read transcript %s: %s", path, e)
            return None

    def save_agent(self, agent: Agent) -> None:
        folder = self._dir(agent.name)
        folder.mkdir(exist_ok=True)
        text = json.dumps({"format": TRANSCRIPT_FORMAT, **asdict(agent)}, ensure_ascii=False)
        atomic_write(folder / "agent.json", lambda p: p.write_text(text))

    def delete_agent(self, name: str) -> int:
        """Remove the agent's folder; returns the bytes freed."""
        folder = self._dir(name)
        freed = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.exists() else 0
        shutil.rmtree(folder, ignore_errors=True)
        return freed

    # KV caches

    def kv_bytes(self, name: str) -> int:
        try:
            return self.kv_path(name).stat().st_size
        except FileNotFoundError:
            return 0

    def save_kv(self, name: str, cache: list[Any], tokens: list[int], fingerprint: str) -> int:
        """Save the cache of `tokens`; returns the bytes written."""
        metadata = {
            "format": KV_FORMAT,
            "fingerprint": fingerprint,
            "n_tokens": str(len(tokens)),
            "tokens": json.dumps(tokens, separators=(",", ":")),
        }
        path = self.kv_path(name)
        path.parent.mkdir(exist_ok=True)
        # save_prompt_cache appends ".safetensors" to names without it, hence the suffix.
        compact = [_compact(c) for c in cache]
        atomic_write(path, lambda p: save_prompt_cache(str(p), compact, metadata), suffix=".safetensors")
        return path.stat().st_size

    def load_kv(self, name: str, fingerprint: str) -> tuple[LoadedKV | None, str | None]:
        """Load the agent's KV cache: (kv, None), or (None, why not) when it is missing or unusable."""
        path = self.kv_path(name)
        if not path.exists():
            return None, None
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
            if meta.get("format") != KV_FORMAT:
                return None, f"cache file {path.name} has format {meta.get('format')!r}, expected {KV_FORMAT}"
            if meta.get("fingerprint") != fingerprint:
                return None, f"cache file {path.name} was made by another model or dtype"
            tokens = json.loads(meta["tokens"])
            if not isinstance(tokens, list) or len(tokens) != int(meta["n_tokens"]):
                return None, f"cache file {path.name} has an inconsistent token list"
            offsets = {c.offset for c in cache if hasattr(c, "offset")}
            if offsets and offsets != {len(tokens)}:
                return None, f"cache file {path.name} holds {sorted(offsets)} positions for {len(tokens)} tokens"
            mx.eval([c.state for c in cache])
            return LoadedKV(cache, tokens, sum(c.nbytes for c in cache)), None
        except Exception as e:  # noqa: BLE001 - any unreadable file is a cache miss, never a crash
            return None, f"cache file {path.name} is unreadable ({type(e).__name__}: {e})"

    def delete_kv(self, name: str) -> int:
        freed = self.kv_bytes(name)
        self.kv_path(name).unlink(missing_ok=True)
        return freed

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
