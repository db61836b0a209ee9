"""The shared mode (several servers, one set of agents): time to first token of a follow-up for an
agent last used on another server (tier remote: its blocks from Redis) against the same agent on
its own server's disk and hot tiers, and against no cache at all (cold); Redis bytes per token;
aggregate tokens/s of one server against two on this machine; and what each turn costs the
shared stores (PostgreSQL transactions, Redis commands and bytes, lease traffic).

    python benchmarks/bench_shared.py [--contexts 2048 4096] [--runs 3] [--clients 8]

It starts a PostgreSQL and a redis-server of its own (tests/servers.py: Debian's `postgresql`
and `redis-server`, as `install.sh --dev` installs them) and two `mcp-semantic serve` processes
over stdio, A and B, on the default model, each with a cache dir of its own. TTFT is the
server's own (`timings_ms.ttft`: from the call's arrival to its first token, the lease and the
cache load included), median of `--runs`, each run a new agent of about `context` tokens:
- cold: its first call on A, the whole history prefilled;
- then one follow-up on A, not timed (a new agent's first turn is no typical turn), and, each a
  ~20-token follow-up asked once the agent is saved and no server holds it:
- hot: on A;
- disk: on A, after evict_cache(memory) there;
- remote: on B, which never saw the agent (its blocks come from Redis).
Throughput: `--clients` threads, each its own agent, `--turns` turns of `--max-tokens` tokens,
all against A, then split between A and B (new agents), then against one embedded server (no
shared stores: the baseline). Target: remote within 1.5x of disk.
Writes benchmarks/results/<date>-<machine>-shared.json and .png.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import redis

from report import RESULTS, header, pyplot, save

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import Postgres, Redis, StdioServer  # noqa: E402  (the tests' real servers)

WORDS = ("river mill town bridge weir garden harbour market tower road field orchard forest lake valley "
         "station library school bakery meadow castle chapel quarry canal lock ferry island").split()
FOLLOW_UP = "Now answer in one short sentence: which place did I mention first?"


def history(tokens: int, seed: int) -> str:
    """About `tokens` tokens of text, different for every seed (so no agent shares another's blocks)."""
    rng = random.Random(seed)
    words = [f"{rng.choice(WORDS)}{rng.randrange(100)}" for _ in range(tokens // 3)]  # about 3 tokens a word
    return "Remember these places: " + " ".join(words)


def start_server(name: str, root: Path, pg: str | None, rd: str | None, model: str | None) -> StdioServer:
    """Server `name` of the shared mode; without `pg`, an embedded one (the baseline)."""
    shared = ["--store", pg, "--block-store", rd, "--server-id", name] if pg else []
    args = ["-m", "mcp_semantic", "serve", "--cache-dir", str(root / name), *shared, "--max-tokens-limit", "4096",
            *(["--model", model] if model else [])]
    return StdioServer(args)


def ask(server: StdioServer, agent: str, message: str, max_tokens: int = 8) -> dict:
    return server.call("ask_agent", {"agent": agent, "message": message, "max_tokens": max_tokens})


def released(pg_url: str, agent: str, timeout_s: float = 120) -> None:
    """Wait until no server holds the agent: the last one has saved it and let it go (a call
    that came sooner would wait for that, which is the lease's time, not the tier's)."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(pg_url, autocommit=True) as db:
        while db.execute("SELECT 1 FROM leases WHERE agent = %s AND expires_at > now()", (agent,)).fetchone():
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent {agent} still leased after {timeout_s} s")
            time.sleep(0.05)


def ttft_runs(a: StdioServer, b: StdioServer, pg_url: str, context: int, runs: int) -> dict:
    """TTFT per tier for `runs` new agents of about `context` tokens: cold (the history's first
    call), then after one follow-up (a new agent's first turn is not a typical one) hot, disk
    (evicted from A's memory) and remote (on B), each once the agent is saved and idle."""
    tiers: dict[str, list[float]] = {"cold": [], "hot": [], "disk": [], "remote": []}
    cached: dict[str, list[int]] = {k: [] for k in tiers}
    for run in range(runs):
        agent = f"ctx{context}-{run}-{random.randrange(1 << 30):x}"
        steps = [("cold", a, history(context, run + context)), (None, a, FOLLOW_UP), ("hot", a, FOLLOW_UP),
                 ("disk", a, FOLLOW_UP), ("remote", b, FOLLOW_UP)]
        for tier, server, message in steps:
            if tier == "disk":
                a.call("evict_cache", {"agent": agent, "level": "memory"})
            released(pg_url, agent)
            out = ask(server, agent, message)
            if tier is None:
                continue
            expected = "new" if tier == "cold" else tier
            if out["tier"] != expected or out["warnings"]:
                raise RuntimeError(f"{tier}: got tier {out['tier']}, warnings {out['warnings']}")
            tiers[tier].append(out["timings_ms"]["ttft"])
            cached[tier].append(out["tokens"]["cached"])
    return {"context": context, "runs": runs,
            "ttft_ms": {k: round(statistics.median(v), 1) for k, v in tiers.items()},
            "ttft_all_ms": tiers, "cached_tokens": {k: statistics.median(v) for k, v in cached.items()}}


def throughput(servers: list[StdioServer], clients: int, turns: int, max_tokens: int, tag: str) -> dict:
    """`clients` threads, each its own agent on servers[i % len], `turns` turns each: generated tokens a second."""
    generated, errors = [0] * clients, []

    def client(i: int) -> None:
        server = servers[i % len(servers)]
        try:
            for t in range(turns):
                out = ask(server, f"{tag}-{i}", f"Tell me about place {i}, part {t}.", max_tokens)
                generated[i] += out["tokens"]["generated"]
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(errors[0])
    return {"servers": len(servers), "clients": clients, "calls": clients * turns, "generated": sum(generated),
            "wall_s": round(wall, 2), "tokens_per_s": round(sum(generated) / wall, 1)}


def stats(pg_url: str, rd: redis.Redis) -> dict:
    """Counters of the shared stores: PostgreSQL transactions and rows, Redis commands and bytes."""
    with psycopg.connect(pg_url) as db:
        commits, ins, upd, dele = db.execute(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    info = rd.info()
    return {"pg_commits": commits, "pg_rows_written": ins + upd + dele, "redis_commands": info["total_commands_processed"],
            "redis_in_bytes": info["total_net_input_bytes"], "redis_out_bytes": info["total_net_output_bytes"]}


def per_call(before: dict, after: dict, calls: int) -> dict:
    return {k: round((after[k] - before[k]) / calls, 1) for k in before}


def redis_bytes_per_token(rd: redis.Redis, pg_url: str) -> dict:
    """Bytes of the block values in Redis (and Redis's own memory) per token the stored lists hold."""
    keys = list(rd.scan_iter("mcp-semantic:block:*", count=1000))
    values = sum(rd.strlen(k) for k in keys)
    with psycopg.connect(pg_url) as db:  # tokens of distinct blocks: a block's tokens once, however many lists name it
        blocks = [r[0] for r in db.execute("SELECT DISTINCT block FROM kv_blocks")]
    memory = rd.info("memory")["used_memory"]
    tokens = 0
    for key in keys:  # a block file's header names its tokens
        head = rd.getrange(key, 8, 7 + int.from_bytes(rd.getrange(key, 0, 7), "little"))  # GETRANGE: end inclusive
        meta = json.loads(head)["__metadata__"]
        tokens += int(meta["n_tokens"])
    return {"blocks": len(keys), "blocks_named": len(blocks), "value_bytes": values, "tokens": tokens,
            "bytes_per_token": round(values / tokens, 1) if tokens else 0, "redis_used_memory": memory,
            "used_memory_per_token": round(memory / tokens, 1) if tokens else 0}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    tiers = ["cold", "remote", "disk", "hot"]
    width = 0.8 / len(result["ttft"])
    for i, row in enumerate(result["ttft"]):
        xs = [t + i * width for t in range(len(tiers))]
        bars = a.bar(xs, [row["ttft_ms"][t] for t in tiers], width, label=f"{row['context']} tokens")
        for bar, t in zip(bars, tiers):
            a.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{row['ttft_ms'][t]:.0f}", ha="center",
                   va="bottom", fontsize=7)
    a.set_xticks([t + width * (len(result["ttft"]) - 1) / 2 for t in range(len(tiers))], tiers)
    a.set_yscale("log")
    a.set_ylabel("TTFT, ms (log)")
    a.set_title("a ~20-token follow-up, by where the cache is", fontsize=9)
    a.legend(fontsize=8)
    rows = result["throughput"] + [result["throughput_embedded"]]
    labels = [f"{r['servers']} server{'s' * (r['servers'] > 1)}\nshared" for r in result["throughput"]] + ["1 server\nembedded"]
    bars = b.bar(labels, [r["tokens_per_s"] for r in rows], color=["#48c", "#c84", "#999"])
    for bar, r in zip(bars, rows):
        b.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r['tokens_per_s']:.0f}", ha="center", va="bottom")
    b.set_ylabel("generated tokens/s, all clients")
    b.set_title(f"{rows[0]['clients']} clients on one machine ({result['cores']} cores)", fontsize=9)
    fig.suptitle("shared mode: PostgreSQL + Redis, servers over stdio", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: the server's default model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    pg, rs = Postgres.start(), Redis.start()
    root = Path(tempfile.mkdtemp(prefix="mcp-semantic-shared-"))
    with psycopg.connect(pg.url(), autocommit=True) as db:
        db.execute("CREATE DATABASE agents")
    pg_url, rd = pg.url("agents"), redis.Redis.from_url(rs.url)
    servers: list[StdioServer] = []
    try:
        a = start_server("a", root, pg_url, rs.url, args.model)
        b = start_server("b", root, pg_url, rs.url, args.model)
        servers += [a, b]
        ask(a, "warm-up", "Hello.")  # the model's first call (MLX kernels) is not a tier's
        ask(b, "warm-up-b", "Hello.")
        result = {**header("shared"), "cores": os.cpu_count(), "model": args.model or "smollm2-135m (default)",
                  "ttft": [], "throughput": []}
        for context in args.contexts:
            result["ttft"].append(ttft_runs(a, b, pg_url, context, args.runs))
            row = result["ttft"][-1]
            row["remote_over_disk"] = round(row["ttft_ms"]["remote"] / row["ttft_ms"]["disk"], 2)
            print(f"{context:6} tokens  ttft ms: " + "  ".join(f"{k} {v:8.1f}" for k, v in row["ttft_ms"].items())
                  + f"   remote/disk {row['remote_over_disk']}", flush=True)
        result["redis"] = redis_bytes_per_token(rd, pg_url)
        for group, tag in (([a], "one"), ([a, b], "two")):
            before = stats(pg_url, rd)
            row = throughput(group, args.clients, args.turns, args.max_tokens, tag)
            row["per_call"] = per_call(before, stats(pg_url, rd), row["calls"])
            result["throughput"].append(row)
            print(f"{len(group)} server(s): {row['tokens_per_s']} tokens/s, per call {row['per_call']}", flush=True)
        for s in servers:
            s.close()
        servers.clear()
        embedded = start_server("embedded", root, None, None, args.model)  # the same calls without the shared stores
        servers.append(embedded)
        ask(embedded, "warm-up", "Hello.")
        row = throughput([embedded], args.clients, args.turns, args.max_tokens, "embedded")
        result["throughput_embedded"] = row
        print(f"1 embedded server: {row['tokens_per_s']} tokens/s", flush=True)
        result["targets"] = {f"remote within 1.5x of disk at {r['context']}": r["remote_over_disk"] <= 1.5
                             for r in result["ttft"]}
    finally:
        for s in servers:
            s.close()
        rs.stop()
        pg.stop()
    stem = save(result, args.out, plot)
    print(f"redis: {result['redis']['bytes_per_token']} bytes/token of block values, "
          f"{result['redis']['used_memory_per_token']} of Redis memory")
    for name, met in result["targets"].items():
        print(f"{'met' if met else 'MISSED'}: {name}")
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
