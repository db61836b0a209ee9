"""Resume from disk against recompute on a GPU: is reading a saved KV cache back the faster
way to the next token?

A random-weight Llama-3.1-8B-shaped model (mlx-lm's llama, bfloat16: 32 layers, hidden 4096,
32 heads, 8 KV heads of 128, MLP 14336, vocab 128256), random token ids. For each context:

  recompute - prefill the context in chunks of 2048, then a 20-token follow-up's first token;
  resume    - the same cache cut into blocks of 256 (`block_pool.cut_blocks`), written with the
              store (`Store.commit_kv`), then loaded as the engine loads an agent after a restart
              (`Caches.lookup` on an empty pool: on CUDA `Store.read_into_one`, straight into one
              GPU buffer by DMA through pinned buffers (cuda.py), then `cache_build.reconstruct`) and
              the follow-up's first token; at --kv-bits lossless, 8 and 4, each with the page
              cache warm (the blocks just read) and cold (each file's pages dropped with
              posix_fadvise DONTNEED before each load, where the kernel allows: the JSON says
              how fast a plain read ran after it).

The limit column: the bytes a load moves divided by its time, against the host-to-GPU copy
bandwidth measured in the same run (pinned memory, one 1 GiB cudaMemcpy).

Each timing is the median of --repeats after one untimed warm-up. Runs on any MLX device; CI
never runs it (a GPU and about 40 GB of memory for 32K tokens).

    python benchmarks/bench_gpu_resume.py [--contexts 1024,2048,...] [--out results.json]
    python benchmarks/bench_gpu_resume.py --plot results.json   # the PNG from a results file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mcp_semantic import cuda
from mcp_semantic.block_pool import BlockPool, Storage, cut_blocks
from mcp_semantic.cache_kinds import Layout, probe
from mcp_semantic.caches import Caches
from mcp_semantic.block_files import host_block
from mcp_semantic.sqlite_store import SQLiteStore
from mcp_semantic.store import Agent, KVRecord, Store

LLAMA_8B = dict(
    model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, vocab_size=128256, rope_theta=500000.0,
    tie_word_embeddings=False,
)
CHUNK = 2048
FOLLOW_UP = 20
BLOCK = 256


def random_model(config: dict):
    """The model with random bfloat16 weights, made without ever holding float32 copies."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models.llama import Model, ModelArgs

    model = Model(ModelArgs(**config))
    params = [(k, (mx.random.normal(v.shape) * 0.02).astype(mx.bfloat16)) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    assert isinstance(model, nn.Module)
    return model


def median_ms(fn: Callable[[], object], repeats: int, before: Callable[[], object] = lambda: None) -> float:
    """Median ms of `fn` over `repeats` runs after one untimed run; `before` each, untimed."""
    before()
    fn()
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def prefill(model, tokens: mx.array):
    cache = make_prompt_cache(model)
    for start in range(0, tokens.size, CHUNK):
        model(tokens[None, start : start + CHUNK], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def first_token(model, cache, follow: mx.array) -> int:
    logits = model(follow[None], cache=cache)
    return mx.argmax(logits[0, -1]).item()


def drop_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to drop the files' pages (clean pages: the files were synced when written)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read_gbps(paths: list[Path], nbytes: int, repeats: int, cold: bool) -> float:
    """A plain read of the files into one reused buffer, one after another."""
    buf = bytearray(max(p.stat().st_size for p in paths))

    def read() -> None:
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                f.readinto(memoryview(buf)[: os.fstat(f.fileno()).st_size])

    return round(nbytes / median_ms(read, repeats, (lambda: drop_page_cache(paths)) if cold else (lambda: None)) / 1e6, 2)


def host_to_gpu_gbps() -> float | None:
    """cudaMemcpy of 1 GiB from pinned host memory into a GPU buffer MLX made (None off CUDA)."""
    if not cuda.available():
        return None
    n = 1 << 30
    pinned = cuda.Pinned(n)
    buffer, address = cuda.gpu_buffer((n,))
    ms = median_ms(lambda: cuda.copy_in(address, pinned, n), 5)
    mx.eval(buffer)  # kept until the copies are timed
    return round(n / ms / 1e6, 1)


def breakdown(store: Store, load: Callable[[], object]) -> dict[str, float]:
    """Where one load's time goes: the headers checked (`Store.open_blocks`), the files read
    (`Store.read_into_one`: reads, checksums, copies to the GPU), and the rest (the cache built
    from them, evaluated)."""
    spent = {"headers": 0.0, "read": 0.0}

    def timed(key: str, f: Callable) -> Callable:
        def call(*a, **k):
            start = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[key] += (time.perf_counter() - start) * 1000

        return call

    store.open_blocks, store.read_into_one = timed("headers", store.open_blocks), timed("read", store.read_into_one)
    try:
        start = time.perf_counter()
        load()
        total = (time.perf_counter() - start) * 1000
    finally:
        del store.open_blocks, store.read_into_one  # the class's methods again
    return {k: round(v, 1) for k, v in spent.items()} | {"build": round(total - sum(spent.values()), 1), "total": round(total, 1)}


def run_context(model, layout: Layout, n: int, args, root: Path, h2d: float | None) -> dict:
    vocab = model.args.vocab_size
    tokens = mx.random.randint(0, vocab, (n,))
    follow = mx.random.randint(0, vocab, (FOLLOW_UP,))
    mx.eval(tokens, follow)

    recompute_ms = median_ms(lambda: first_token(model, prefill(model, tokens), follow), args.repeats)
    prefill_ms = median_ms(lambda: prefill(model, tokens), 1)
    cache = prefill(model, tokens)
    ids = tokens.tolist()
    prompt = ids + follow.tolist()
    row = {"tokens": n, "recompute_ms": round(recompute_ms, 1), "prefill_tokens_per_s": round(n / prefill_ms * 1000), "resume": {}}
    for bits in args.kv_bits:
        storage = Storage("llama-3.1-8b-random", "bfloat16", bits)
        store_dir = root / f"kv{bits or 0}"
        store = SQLiteStore(store_dir)
        blocks = cut_blocks(layout, cache, ids, storage, BLOCK)
        record = KVRecord([b.id for b in blocks], ids)
        start = time.perf_counter()
        store.commit_kv("a", record, [host_block(b) for b in blocks], storage)
        write_s = time.perf_counter() - start
        del blocks
        paths = [store.blocks.path(b) for b in record.blocks]
        nbytes = sum(p.stat().st_size for p in paths)
        caches = Caches(layout, store, storage, block_tokens=BLOCK, memory_budget=1 << 40)
        agent = Agent("a", tokens=ids)

        def resume() -> list:
            """The engine's load of an agent whose blocks are all on disk (nothing in memory)."""
            caches.pool = BlockPool()
            warnings: list[str] = []
            tier, c, reuse = caches.lookup(agent, prompt, FOLLOW_UP, warnings)
            if tier != "disk" or reuse != n:
                raise RuntimeError(f"blocks failed to load: {tier}, {reuse} tokens, {warnings}")
            return c

        key = "lossless" if bits is None else str(bits)
        row["resume"][key] = {"bytes": nbytes, "write_s": round(write_s, 2)}
        for page_cache in args.page_cache:
            before = (lambda: drop_page_cache(paths)) if page_cache == "cold" else (lambda: None)
            load_ms = median_ms(lambda: mx.eval([c.state for c in resume()]), args.repeats, before)
            before()
            parts = breakdown(store, lambda: mx.eval([c.state for c in resume()]))
            ttft_ms = median_ms(lambda: first_token(model, resume(), follow), args.repeats, before)
            gbps = nbytes / load_ms / 1e6
            row["resume"][key][page_cache] = {
                "load_ms": round(load_ms, 1),
                "load_gbps": round(gbps, 2),
                "of_host_to_gpu": round(gbps / h2d, 2) if h2d else None,
                "ttft_ms": round(ttft_ms, 1),
                "recompute_over_resume": round(recompute_ms / ttft_ms, 2),
                "plain_read_gbps": plain_read_gbps(paths, nbytes, args.repeats, page_cache == "cold"),
                "breakdown_ms": parts,
            }
        caches.close()
        store.close()
        shutil.rmtree(store_dir)
    print(json.dumps(row), flush=True)
    return row


def crossover(rows: list[dict], key: str, page_cache: str) -> int | None:
    """The first context at which resuming is no faster than recomputing (None: never)."""
    for row in rows:
        if key in row["resume"] and row["resume"][key][page_cache]["recompute_over_resume"] <= 1:
            return row["tokens"]
    return None


def plot(result: dict, path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from report import pyplot

    plt = pyplot()
    rows = result["contexts"]
    x = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(x, [r["recompute_ms"] for r in rows], "o-", color="#c44", label="recompute (prefill)")
    styles = {"lossless": "#48c", "8": "#4a4", "4": "#a4c"}
    for key, color in styles.items():
        for page_cache, style in (("warm", "o-"), ("cold", "o--")):
            if all(page_cache in r["resume"].get(key, {}) for r in rows):
                ax.plot(x, [r["resume"][key][page_cache]["ttft_ms"] for r in rows], style, color=color,
                        label=f"resume, kv-bits {key}, page cache {page_cache}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{t // 1024}K" for t in x])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time to first token (ms, log)")
    ax.set_title(f"Llama-3.1-8B shape (random bf16) on {result['device'].split(': ')[-1]}:\nrecompute vs resume from disk", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--kv-bits", default="lossless,8,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--page-cache", default="warm,cold", help="warm, cold or both")
    parser.add_argument("--layers", type=int, default=32, help="fewer for a quick try")
    parser.add_argument("--tiny", action="store_true", help="a small model of the same kind, to try the script on a CPU")
    parser.add_argument("--dir", type=Path, default=None, help="where blocks are written (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=Path("gpu-resume.json"))
    parser.add_argument("--plot", type=Path, default=None, help="only draw the PNG of this results file")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.kv_bits = [None if b == "lossless" else int(b) for b in args.kv_bits.split(",")]
    args.page_cache = args.page_cache.split(",")
    config = LLAMA_8B | {"num_hidden_layers": args.layers}
    if args.tiny:
        config |= {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000}
    import importlib.metadata as md

    device = mx.default_device()
    result = {
        "benchmark": "gpu-resume",
        "date": time.strftime("%Y-%m-%d"),
        "device": f"{device.type.name}: {_device_name()}",
        "machine": f"{platform.system().lower()}-{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {p: md.version(p) for p in ("mlx", "mlx-lm", "xxhash") if _installed(p)},
        "model": f"Llama-3.1-8B shape, random bf16 weights, {args.layers} layers",
        "config": config,
        "chunk": CHUNK,
        "follow_up_tokens": FOLLOW_UP,
        "block_tokens": BLOCK,
        "repeats": args.repeats,
        "host_to_gpu_gbps": host_to_gpu_gbps(),
        "contexts": [],
    }
    model = random_model(config)
    layout = probe(model)
    root = Path(tempfile.mkdtemp(prefix="gpu-resume-", dir=args.dir))
    try:
        for n in args.contexts:
            result["contexts"].append(run_context(model, layout, n, args, root, result["host_to_gpu_gbps"]))
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # what is done so far survives a timeout
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["crossover"] = {f"{key} {page_cache}": crossover(result["contexts"], key, page_cache)
                           for key in result["contexts"][0]["resume"] for page_cache in args.page_cache}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["crossover"]))


def _device_name() -> str:
    try:
        return str(mx.device_info().get("device_name", "?"))
    except Exception:  # noqa: BLE001 - only a label
        return "?"


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
