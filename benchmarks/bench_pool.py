"""Sharing and budgets: fork cost against context length, disk for agents that share a prompt,
memory over a round-robin run under a budget.

Runs on a generated model with SmolLM2-135M's KV shape (30 layers, 3 KV heads of 64, float32:
46,080 bytes per token) but a small hidden size, so caches have real sizes and prefill is cheap.

* fork: agents of 512 to 8K tokens (their caches written through the store), then the time of
  `fork_agent` and the bytes the fork adds on disk;
* sharing: N agents with one ~1,000-token system prompt, asked once each, against N forks of
  one agent: disk bytes;
* budget: ten agents used round robin under a budget for about two, memory in use after each call.

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

from mcp_semantic.engine import AskRequest
from mcp_semantic.server import open_engine
from mcp_semantic.settings import Settings
from mcp_semantic.store import Agent, snapshot_kv
from mcp_semantic.tiny_model import make_tiny_model

CONTEXTS = [512, 1024, 2048, 4096, 8192]


def disk_bytes(root: Path) -> int:
    """Bytes on disk under root, each file counted once however many names it has."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


async def fork_costs(model: Path, work: Path, contexts: list[int]) -> list[dict]:
    settings = Settings(model=str(model), cache_dir=work / "fork")
    engine = open_engine(settings)
    rows = []
    for n in contexts:
        name = f"src-{n}"
        tokens = [i % 500 + 3 for i in range(n)]
        cache = make_prompt_cache(engine.lm.model)
        for c in cache:  # a cache of n tokens, as a long conversation would leave
            kv = mx.random.normal((1, 3, n, 64))
            c.update_and_fetch(kv, kv)
        engine.store.save_agent(Agent(name, messages=[{"role": "user", "content": "x"}], tokens=tokens))
        engine.store.write_kv(name, snapshot_kv(cache, tokens, engine.lm.fingerprint))
        engine._agents[name] = engine.store.load_agent(name)  # as a restart would find it
        times = []
        for i in range(5):
            before = disk_bytes(settings.cache_dir)
            start = time.perf_counter()
            await engine.fork(name, f"{name}-fork{i}")
            await engine.evict(f"{name}-fork{i}", "memory")  # waits until the link is on disk
            times.append((time.perf_counter() - start) * 1000)
            added = disk_bytes(settings.cache_dir) - before
        rows.append(
            {
                "context_tokens": n,
                "source_kv_bytes": engine.store.kv_bytes(name)[0],
                "fork_ms_p50": round(statistics.median(times), 2),
                "fork_added_disk_bytes": added,
            }
        )
    await engine.aclose()
    return rows


async def sharing(model: Path, work: Path, agents: int) -> dict:
    system = "You answer questions about this text. " + "The river runs past the old mill and the town. " * 43
    separate = Settings(model=str(model), cache_dir=work / "separate")
    engine = open_engine(separate)
    for i in range(agents):
        await engine.ask(AskRequest(f"a{i}", "Hello.", system=system, max_tokens=4))
    await engine.aclose()
    forked = Settings(model=str(model), cache_dir=work / "forked")
    engine = open_engine(forked)
    await engine.ask(AskRequest("base", "Hello.", system=system, max_tokens=4))
    for i in range(agents):
        await engine.fork("base", f"a{i}")
    await engine.aclose()
    return {
        "agents": agents,
        "system_prompt_tokens": len(engine.lm.tokenizer.encode(system)),
        "separate_agents_disk_bytes": disk_bytes(separate.cache_dir / "agents"),
        "forks_disk_bytes": disk_bytes(forked.cache_dir / "agents"),
    }


async def budget_run(model: Path, work: Path, calls: int) -> dict:
    settings = Settings(model=str(model), cache_dir=work / "budget")
    engine = open_engine(settings)
    await engine.ask(AskRequest("rr-0", "Hello there, number 0.", max_tokens=8))
    engine.memory_budget = int(2.5 * (await engine.list_agents()).memory.used_bytes)
    used = []
    for step in range(calls):
        await engine.ask(AskRequest(f"rr-{step % 10}", f"Turn {step}: hello again.", max_tokens=8))
        used.append((await engine.list_agents()).memory.used_bytes)
    listed = await engine.list_agents()
    await engine.aclose()
    return {"budget_bytes": engine.memory_budget, "used_bytes": used, "hit_rate": listed.memory.hit_rate}


async def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="mcp-semantic-pool-"))
    model = make_tiny_model(
        work / "model", num_layers=30, hidden_size=192, num_heads=3, num_kv_heads=3, max_position_embeddings=16384
    )
    return {
        **header("pool"),
        "kv_bytes_per_token": 30 * 2 * 3 * 64 * 4,
        "fork": await fork_costs(model, work, CONTEXTS[:2] if args.quick else CONTEXTS),
        "sharing": await sharing(model, work, 2 if args.quick else args.agents),
        "budget": await budget_run(model, work, 12 if args.quick else 40),
    }


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.6))
    fork = result["fork"]
    a.plot([r["context_tokens"] for r in fork], [r["fork_ms_p50"] for r in fork], "o-", label="fork_agent (ms)")
    a.plot([r["context_tokens"] for r in fork], [r["fork_added_disk_bytes"] / 1e6 for r in fork], "s--", label="disk added (MB)")
    a.set_xscale("log", base=2)
    a.set_xlabel("source context (tokens)")
    a.set_title("fork cost", fontsize=10)
    a.legend(fontsize=8)
    s = result["sharing"]
    b.bar(["separate agents", "forks of one"], [s["separate_agents_disk_bytes"] / 1e6, s["forks_disk_bytes"] / 1e6], color=["#c84", "#48c"])
    b.set_ylabel("MB on disk")
    b.set_title(f"{s['agents']} agents, one {s['system_prompt_tokens']}-token system prompt", fontsize=10)
    u = result["budget"]
    c.plot(range(1, len(u["used_bytes"]) + 1), [x / 1e6 for x in u["used_bytes"]], label="in use")
    c.axhline(u["budget_bytes"] / 1e6, color="r", linestyle="--", label="budget")
    c.set_xlabel("call (10 agents, round robin)")
    c.set_ylabel("MB of hot KV")
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
    print(f"{'context':>8}{'source KV MB':>14}{'fork ms':>9}{'fork adds B':>13}")
    for r in result["fork"]:
        print(f"{r['context_tokens']:>8}{r['source_kv_bytes'] / 1e6:>14.1f}{r['fork_ms_p50']:>9.2f}{r['fork_added_disk_bytes']:>13,}")
    s = result["sharing"]
    print(
        f"{s['agents']} agents with one {s['system_prompt_tokens']}-token system prompt: "
        f"{s['separate_agents_disk_bytes'] / 1e6:.1f} MB as separate agents, {s['forks_disk_bytes'] / 1e6:.1f} MB as forks"
    )
    u = result["budget"]
    print(
        f"round robin: peak {max(u['used_bytes']) / 1e6:.1f} MB of hot KV under a budget of "
        f"{u['budget_bytes'] / 1e6:.1f} MB; hit rate {u['hit_rate']:.0%}"
    )
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
