"""Sharing and budgets: fork cost against context length, disk for agents that share a prompt,
memory over a round-robin run under a budget.

Runs on a generated model with SmolLM2-135M's KV shape (30 layers, 3 KV heads of 64, float32:
46,080 bytes per token) but a small hidden size, so caches have real sizes and prefill is cheap.

* fork: agents of 512 to 8K tokens (their blocks cut from generated caches and committed to
  the store, then found by the engine as after a restart), then the time of `fork_agent`, and
  what the fork writes: block bytes (none: it names the source's blocks) and its rows in SQLite;
* sharing: N agents created with one ~1,000-token system prompt and different first messages,
  against N forks of one agent, against N separate copies of one agent's blocks: bytes and
  blocks on disk. Agents share the full blocks of their common prefix; the block where their
  prompts part, and the rest, are each agent's own;
* budget: ten agents used round robin under a budget of about two agents' blocks, memory in
  use after each call.

    python benchmarks/bench_pool.py [--agents 8] [--quick]

Writes benchmarks/results/<date>-<machine>-pool.json and .png, and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import mcp_semantic  # noqa: F401  (OpenBLAS before MLX)
import anyio
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from report import RESULTS, header, pyplot, save

from mcp_semantic.block_pool import Storage, cut_blocks
from mcp_semantic.cache_kinds import Layout
from mcp_semantic.calls import AskRequest
from mcp_semantic.engine import Engine
from mcp_semantic.models import LoadedModel
from mcp_semantic.server import load, open_engine
from mcp_semantic.settings import Settings
from mcp_semantic.block_files import host_block
from mcp_semantic.sqlite_store import SQLiteStore
from mcp_semantic.store import Agent, KVRecord, Store
from mcp_semantic.tiny_model import make_tiny_model

CONTEXTS = [512, 1024, 2048, 4096, 8192]
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
FORKS = 5
"""Forks of each source, for the median time."""

SYSTEM = "You answer questions about this text. " + "The river runs past the old mill and the town. " * 43
NOTE = "Please keep this note about the river, the mill and the town. " * 12


def block_files(blocks_dir: Path) -> dict[str, tuple[int, int]]:
    """Each block file's size and modification time: what a write would change."""
    files = {}
    for entry in os.scandir(blocks_dir):
        st = entry.stat()
        files[entry.name] = (st.st_size, st.st_mtime_ns)
    return files


def written_bytes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> int:
    """Bytes of the files that are new or changed between two `block_files` listings."""
    return sum(size for name, (size, mtime) in after.items() if before.get(name) != (size, mtime))


def disk_bytes(blocks_dir: Path) -> int:
    return sum(size for size, _ in block_files(blocks_dir).values())


def row_bytes(engine: Engine, name: str) -> tuple[int, int]:
    """Bytes of the agent's transcript row and of its block-list row in SQLite (after a flush)."""
    db = engine.store.db
    transcript = db.execute(
        "SELECT length(CAST(messages AS BLOB)) + length(CAST(tokens AS BLOB)) FROM agents WHERE name = ?", (name,)
    ).fetchone()
    blocks = db.execute(
        "SELECT length(CAST(blocks AS BLOB)) + length(CAST(tokens AS BLOB)) FROM kv WHERE agent = ?", (name,)
    ).fetchone()
    return (transcript[0] if transcript else 0), (blocks[0] if blocks else 0)


def write_source(store: Store, lm: LoadedModel, storage: Storage, block_tokens: int, name: str, n: int) -> None:
    """A saved agent of n tokens, as a long conversation would leave it (generated KV: real sizes).

    Each source's tokens start differently, so sources share no blocks with one another.
    """
    tokens = [(i + n) % 500 + 3 for i in range(n)]
    cache = make_prompt_cache(lm.model)
    for c in cache:
        shape = (1, KV_HEADS, n, HEAD_DIM)
        c.update_and_fetch(mx.random.normal(shape), mx.random.normal(shape))
    blocks = cut_blocks(Layout.full_attention(len(cache), KV_HEADS, HEAD_DIM), cache, tokens, storage, block_tokens)
    store.save_agent(Agent(name, messages=[{"role": "user", "content": lm.tokenizer.decode(tokens)}], tokens=tokens))
    store.commit_kv(name, KVRecord([b.id for b in blocks], tokens), [host_block(b) for b in blocks], storage)


async def fork_costs(lm: LoadedModel, model: Path, work: Path, contexts: list[int]) -> list[dict]:
    settings = Settings(model=str(model), cache_dir=work / "fork")
    store = SQLiteStore(settings.cache_dir)
    for n in contexts:
        write_source(store, lm, Storage(lm.fingerprint, lm.dtype), settings.block_tokens, f"src-{n}", n)
    store.close()
    engine = open_engine(settings, lm)  # finds the sources on disk, none in memory
    await engine.flush()
    rows = []
    for n in contexts:
        name = f"src-{n}"
        times, flushed, written = [], [], []
        for i in range(FORKS):
            before = block_files(engine.store.blocks.dir)
            start = time.perf_counter()
            await engine.fork(name, f"{name}-fork{i}")
            times.append((time.perf_counter() - start) * 1000)
            await engine.flush()  # the fork's block list is committed
            flushed.append((time.perf_counter() - start) * 1000)
            written.append(written_bytes(before, block_files(engine.store.blocks.dir)))
        listed = {a.name: a for a in (await engine.list_agents()).agents}
        source, fork = listed[name], listed[f"{name}-fork0"]
        transcript, block_list = row_bytes(engine, fork.name)
        rows.append(
            {
                "context_tokens": n,
                "source_blocks": source.blocks,
                "source_kv_bytes": source.disk_bytes,
                "fork_ms_p50": round(statistics.median(times), 2),
                "fork_and_flush_ms_p50": round(statistics.median(flushed), 2),
                "fork_block_bytes_written": max(written),  # the most any of the forks wrote
                "fork_blocks": fork.blocks,
                "fork_shared_disk_bytes": fork.shared_disk_bytes,
                "fork_transcript_row_bytes": transcript,
                "fork_block_list_row_bytes": block_list,
            }
        )
    await engine.aclose()
    return rows


async def sharing(lm: LoadedModel, model: Path, work: Path, agents: int) -> dict:
    def ask(name: str, i: int) -> AskRequest:
        return AskRequest(name, f"Hello from user {i}.", system=SYSTEM, max_tokens=4)

    engine = open_engine(Settings(model=str(model), cache_dir=work / "separate"), lm)
    for i in range(agents):
        await engine.ask(ask(f"a{i}", i))
    await engine.flush()
    listed = await engine.list_agents()
    one = listed.agents[0]
    separate = {
        "disk_bytes": disk_bytes(engine.store.blocks.dir),
        "blocks_on_disk": listed.memory.blocks_on_disk,
        "block_bytes_in_memory": listed.memory.used_bytes,
    }
    await engine.aclose()

    engine = open_engine(Settings(model=str(model), cache_dir=work / "forked"), lm)
    await engine.ask(ask("base", 0))
    for i in range(agents):
        await engine.fork("base", f"a{i}")
    await engine.flush()
    listed = await engine.list_agents()
    forks = {
        "disk_bytes": disk_bytes(engine.store.blocks.dir),
        "blocks_on_disk": listed.memory.blocks_on_disk,
        "block_bytes_in_memory": listed.memory.used_bytes,
    }
    await engine.aclose()
    return {
        "agents": agents,
        "system_prompt_tokens": len(lm.tokenizer.encode(SYSTEM)),
        "agent_tokens": one.tokens,
        "agent_blocks": one.blocks,
        "agent_disk_bytes": one.disk_bytes,
        "agent_shared_disk_bytes": one.shared_disk_bytes,
        "copies_disk_bytes": agents * one.disk_bytes,
        "copies_blocks_on_disk": agents * one.blocks,
        "separate_agents_disk_bytes": separate["disk_bytes"],
        "separate_agents_blocks_on_disk": separate["blocks_on_disk"],
        "separate_agents_block_bytes_in_memory": separate["block_bytes_in_memory"],
        "forks_disk_bytes": forks["disk_bytes"],
        "forks_blocks_on_disk": forks["blocks_on_disk"],
        "forks_block_bytes_in_memory": forks["block_bytes_in_memory"],
    }


async def budget_run(lm: LoadedModel, model: Path, work: Path, calls: int) -> dict:
    """Each agent's first message is a ~300-token note of its own, so an agent is a few blocks."""
    engine = open_engine(Settings(model=str(model), cache_dir=work / "budget"), lm)

    def message(step: int) -> str:
        return f"I am agent {step}. {NOTE}" if step < 10 else f"Turn {step}: hello again."

    await engine.ask(AskRequest("rr-0", message(0), max_tokens=8))
    first = await engine.list_agents()
    engine.memory_budget = 2 * first.memory.used_bytes
    used, tiers = [], []
    for step in range(1, calls + 1):
        result = await engine.ask(AskRequest(f"rr-{step % 10}", message(step), max_tokens=8))
        memory = (await engine.list_agents()).memory
        used.append(memory.used_bytes)
        tiers.append(result.tier)
    listed = await engine.list_agents()
    await engine.aclose()
    return {
        "agents": 10,
        "agent_block_bytes": first.memory.used_bytes,
        "budget_bytes": engine.memory_budget,
        "used_bytes": used,
        "tiers": tiers,
        "hit_rate": listed.memory.hit_rate,
    }


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="mcp-semantic-pool-") as tmp:  # a full run leaves GBs of blocks
        work = Path(tmp)
        model = make_tiny_model(
            work / "model",
            num_layers=LAYERS,
            hidden_size=192,
            num_heads=KV_HEADS,
            num_kv_heads=KV_HEADS,
            max_position_embeddings=16384,
        )
        settings = Settings(model=str(model), cache_dir=work)
        lm = load(settings)
        return {
            **header("pool"),
            "kv_bytes_per_token": LAYERS * 2 * KV_HEADS * HEAD_DIM * 4,
            "block_tokens": settings.block_tokens,
            "fork": await fork_costs(lm, model, work, CONTEXTS[:2] if args.quick else CONTEXTS),
            "sharing": await sharing(lm, model, work, 2 if args.quick else args.agents),
            "budget": await budget_run(lm, model, work, 12 if args.quick else 40),
        }


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    fork = result["fork"]
    x = [r["context_tokens"] for r in fork]
    a.plot(x, [r["fork_ms_p50"] for r in fork], "o-", label="fork_agent (ms)")
    a.plot(x, [r["fork_and_flush_ms_p50"] for r in fork], "^-", label="with its list on disk (ms)")
    a.set_xscale("log", base=2)
    a.set_xlabel("source context (tokens)")
    a.set_ylabel("ms (p50)")
    a.set_ylim(bottom=0)
    a2 = a.twinx()
    a2.plot(x, [r["source_kv_bytes"] / 1e6 for r in fork], ":", color="#999", label="source blocks (MB)")
    a2.plot(x, [r["fork_block_bytes_written"] / 1e6 for r in fork], "s--", color="#c84", label="block bytes the fork writes (MB)")
    a2.set_ylabel("MB")
    a2.set_ylim(bottom=0)
    lines = a.get_legend_handles_labels()[0] + a2.get_legend_handles_labels()[0]
    a.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="upper left")
    a.set_title("fork cost", fontsize=10)
    s = result["sharing"]
    bars = [
        ("copies", s["copies_disk_bytes"], s["copies_blocks_on_disk"], "#999"),
        ("separate agents", s["separate_agents_disk_bytes"], s["separate_agents_blocks_on_disk"], "#c84"),
        ("forks of one", s["forks_disk_bytes"], s["forks_blocks_on_disk"], "#48c"),
    ]
    b.bar([n for n, *_ in bars], [v / 1e6 for _, v, _, _ in bars], color=[col for *_, col in bars])
    for i, (_, v, blocks, _) in enumerate(bars):
        b.text(i, v / 1e6, f"{blocks} blocks", ha="center", va="bottom", fontsize=8)
    b.set_ylabel("MB on disk")
    b.set_title(f"{s['agents']} agents, one {s['system_prompt_tokens']}-token system prompt", fontsize=10)
    u = result["budget"]
    calls = range(1, len(u["used_bytes"]) + 1)
    c.plot(calls, [v / 1e6 for v in u["used_bytes"]], label="in use")
    c.axhline(u["budget_bytes"] / 1e6, color="r", linestyle="--", label="budget")
    c.set_xlabel("call (10 agents, round robin)")
    c.set_ylabel("MB of KV in memory")
    c.set_title("memory under a budget", fontsize=10)
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the harness")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = anyio.run(run, args)
    stem = save(result, args.out, plot)
    print(f"{'context':>8}{'source KV MB':>14}{'fork ms':>9}{'+flush ms':>11}{'blocks written B':>18}{'rows B':>9}")
    for r in result["fork"]:
        rows = r["fork_transcript_row_bytes"] + r["fork_block_list_row_bytes"]
        print(
            f"{r['context_tokens']:>8}{r['source_kv_bytes'] / 1e6:>14.1f}{r['fork_ms_p50']:>9.2f}"
            f"{r['fork_and_flush_ms_p50']:>11.2f}{r['fork_block_bytes_written']:>18,}{rows:>9,}"
        )
    s = result["sharing"]
    print(
        f"{s['agents']} agents with one {s['system_prompt_tokens']}-token system prompt, on disk: "
        f"{s['copies_disk_bytes'] / 1e6:.1f} MB as copies ({s['copies_blocks_on_disk']} blocks), "
        f"{s['separate_agents_disk_bytes'] / 1e6:.1f} MB as separate agents ({s['separate_agents_blocks_on_disk']} blocks), "
        f"{s['forks_disk_bytes'] / 1e6:.1f} MB as forks ({s['forks_blocks_on_disk']} blocks)"
    )
    u = result["budget"]
    print(
        f"round robin: peak {max(u['used_bytes']) / 1e6:.1f} MB of KV in memory under a budget of "
        f"{u['budget_bytes'] / 1e6:.1f} MB (one agent's blocks: {u['agent_block_bytes'] / 1e6:.1f} MB); "
        f"hit rate {u['hit_rate']:.0%}"
    )
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
