"""Cache load against a plain read: how close loading a saved agent's KV blocks comes to reading
the same files' bytes.

Loading is `Caches.lookup` itself, for an agent whose blocks are all on disk, ready to run:
on the CPU `Store.open_blocks` (header checks) and `cache_build.read_into_cache` (the working
cache made, each file's data read straight into it and checksummed; at --kv-bits converted on
the way, a megabyte at a time); on a GPU the path of the device. The plain reads are
`open(p, 'rb').read()` of each file, all kept until the last is read (the memory malloc gives:
new pages cost here from about as much as the copy to several times it); `readinto` a buffer
per file, the same buffers each time (memory used before, as the load's working cache is:
`read_reused`); and `readinto` one reused buffer (it stays in the CPU's cache: the ceiling).
All with a warm page cache (each is run once before it is timed), median of `runs`; the load
and the reads into memory used before timed in turns (the machine's memory speed drifts), the
`read()` into new pages after them (the kernel zeroing its pages slows whatever runs next).

    python benchmarks/bench_load.py [--tokens 4096] [--runs 9]

By default it saves an agent of `--tokens` tokens with SmolLM2-135M's KV shape (the default
model: 30 layers, 3 KV heads of 64, float32, 46,080 bytes a token; random values), written with
the store's own block writer, and measures it. Writes
benchmarks/results/<date>-<machine>-load.json and .png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import mcp_semantic  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx
from mlx_lm.models.cache import KVCache

from report import RESULTS, header, pyplot, save

from mcp_semantic.block_pool import BLOCK_TOKENS, BlockPool, Storage, cut_blocks
from mcp_semantic.cache_kinds import Layout
from mcp_semantic.caches import Caches
from mcp_semantic.settings import default_memory_budget
from mcp_semantic.block_files import host_block
from mcp_semantic.store import Agent, KVRecord
from mcp_semantic.sqlite_store import SQLiteStore

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


def medians_s(fns: list[Callable[[], object]], runs: int) -> list[float]:
    """Median seconds of `runs` calls of each function, after one untimed call of each (the page
    cache and allocator warm), taken in turns: this VM's memory speed drifts by 2x over minutes,
    and each function then meets the same drift."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, took in zip(fns, times):
            start = time.perf_counter()
            fn()
            took.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def block_storage(path: Path) -> tuple[Storage, Layout, int]:
    """The storage, layout (full attention) and block size a block file of a plain model was
    written for, from its header."""
    with open(path, "rb") as f:
        head = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = head.pop("__metadata__")
    kv_bits = int(meta["kv_bits"]) or None
    storage = Storage(meta["fingerprint"], meta["dtype"], kv_bits)
    quantized = kv_bits in (8, 4)
    keys = head["layers.0.keys.weight" if quantized else "layers.0.keys"]
    head_dim = keys["shape"][3] * 32 // kv_bits if quantized else keys["shape"][3]  # uint32 words of kv_bits each
    layers = len({k.split(".")[1] for k in head})
    return storage, Layout.full_attention(layers, keys["shape"][1], head_dim, getattr(mx, meta["dtype"])), int(meta["n_tokens"])


def measure_load(cache_dir: Path, agent: str, runs: int = 9, storage: Storage | None = None, layout: Layout | None = None,
                 block_tokens: int = BLOCK_TOKENS) -> dict:
    """Time loading `agent`'s saved blocks with `Caches.lookup` against plain reads of the files.

    `storage` and `layout` default to what the first block file says (a plain model's).
    The store is opened on `cache_dir`: no server may be running on it.
    """
    store = SQLiteStore(cache_dir)
    caches = None
    try:
        record = store.kv_record(agent)
        if record is None:
            raise ValueError(f"agent {agent} has no saved KV cache in {cache_dir}")
        paths = [store.blocks.path(b) for b in record.blocks]
        if storage is None or layout is None:
            storage, layout, block_tokens = block_storage(paths[0])
        nbytes = sum(p.stat().st_size for p in paths)
        caches = Caches(layout, store, storage, block_tokens=block_tokens, memory_budget=0)
        # the pool keeps nothing, so each load reads the files; MLX keeps freed buffers for reuse as
        # under the server's default budget (Caches sets its cache limit from it)
        mx.set_cache_limit(max(mx.set_cache_limit(default_memory_budget()), default_memory_budget()))
        prompt = record.tokens + [0]  # the next prompt: the whole cache is reused

        def load() -> None:
            """Caches.lookup for an agent whose blocks are all on disk."""
            caches.pool = BlockPool()  # nothing in memory
            warnings: list[str] = []
            tier, cache, n = caches.lookup(Agent(agent, tokens=record.tokens), prompt, 1, warnings)
            mx.eval([c.state for c in cache])
            if tier != "disk" or n != len(record.tokens):
                raise RuntimeError(f"blocks failed to load: {tier}, {n} tokens, {warnings}")

        def read() -> None:
            kept = []  # as a load keeps its data: in new memory, all of it at once
            for p in paths:
                with open(p, "rb") as f:
                    kept.append(f.read())

        kept = [bytearray(p.stat().st_size) for p in paths]

        def read_kept() -> None:
            for p, b in zip(paths, kept):  # as read() but into memory used before, each file its own
                with open(p, "rb", buffering=0) as f:
                    f.readinto(b)

        buffer = bytearray(max(p.stat().st_size for p in paths))

        def readinto() -> None:
            for p in paths:
                with open(p, "rb", buffering=0) as f:
                    f.readinto(memoryview(buffer)[: os.fstat(f.fileno()).st_size])

        # read() apart: its fresh pages (the kernel zeroing them) slow whatever runs next
        load_s, kept_s, readinto_s = medians_s([load, read_kept, readinto], runs)
        (read_s,) = medians_s([read], runs)
    finally:
        if caches is not None:
            caches.close()
        store.close()
    gbps = lambda s: round(nbytes / s / 1e9, 3)  # noqa: E731
    return {
        "bytes": nbytes,
        "blocks": len(paths),
        "tokens": len(record.tokens),
        "runs": runs,
        "load_s": round(load_s, 4),
        "load_gbps": gbps(load_s),
        "read_s": round(read_s, 4),
        "read_gbps": gbps(read_s),
        "readinto_s": round(readinto_s, 4),
        "readinto_gbps": gbps(readinto_s),
        "read_reused_s": round(kept_s, 4),
        "read_reused_gbps": gbps(kept_s),
        "ratio": round(read_s / load_s, 3),
        "ratio_reused": round(kept_s / load_s, 3),
        "ratio_readinto": round(readinto_s / load_s, 3),
    }


def save_agent(cache_dir: Path, agent: str, tokens: int, storage: Storage, layout: Layout | None = None) -> None:
    """Save an agent of `tokens` tokens of random KV with the store's writer: of a full-attention
    `layout` (by default the default model's)."""
    layout = layout or Layout.full_attention(LAYERS, KV_HEADS, HEAD_DIM)
    cache = []
    for leaf in layout.leaves:
        if leaf.kind != "kv":
            raise ValueError(f"save_agent makes full-attention caches only, not {leaf.kind}")
        c = KVCache()
        (_, heads, _, dim), dtype = layout.shapes[f"{leaf.name}.keys"]
        c.update_and_fetch(mx.random.normal((1, heads, tokens, dim)).astype(dtype), mx.random.normal((1, heads, tokens, dim)).astype(dtype))
        cache.append(c)
    ids = list(range(tokens))
    blocks = cut_blocks(layout, layout.nest(cache), ids, storage, BLOCK_TOKENS)
    store = SQLiteStore(cache_dir)
    try:
        store.commit_kv(agent, KVRecord([b.id for b in blocks], ids), [host_block(b) for b in blocks], storage)
    finally:
        store.close()


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    labels = ["load into a working cache\n(checked)", "read()\n(all kept: malloc's memory)",
              "readinto\n(a buffer per file, reused)", "readinto\n(one reused buffer)"]
    values = [result["load_gbps"], result["read_gbps"], result["read_reused_gbps"], result["readinto_gbps"]]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    bars = ax.bar(labels, values, color=["#48c", "#c84", "#a96", "#aaa"])
    ax.set_ylabel("GB/s (warm page cache)")
    ax.set_title(f"{result['tokens']}-token agent, {result['blocks']} block files, {result['bytes'] / 1e6:.0f} MB", fontsize=10)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom")
    ax.set_ylim(top=max(values) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary dir")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="mcp-semantic-load-"))
    storage = Storage("smollm2-135m-shape", "float32")
    save_agent(cache_dir, "doc", args.tokens, storage)
    result = {**header("load"), "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]}
    result.update(measure_load(cache_dir, "doc", args.runs, storage, Layout.full_attention(LAYERS, KV_HEADS, HEAD_DIM)))
    stem = save(result, args.out, plot)
    print(f"{result['tokens']} tokens, {result['blocks']} blocks, {result['bytes'] / 1e6:.1f} MB, median of {args.runs}")
    for name in ("load", "read", "read_reused", "readinto"):
        print(f"{name:10}{result[name + '_s'] * 1000:9.1f} ms{result[name + '_gbps']:8.2f} GB/s")
    print(f"load / read(): {result['ratio']:.2f}; load / read into reused buffers: {result['ratio_reused']:.2f}; "
          f"load / readinto one buffer: {result['ratio_readinto']:.2f}")
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
