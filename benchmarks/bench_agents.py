"""Start-up with many agents in the store: time and memory of opening the engine, and of a page
of list_agents, against reading every agent at start (what the engine did before issue 15).

    python benchmarks/bench_agents.py [--agents 10000] [--tokens 600] [--postgresql]

It fills a temporary cache dir with `--agents` agents (a transcript of two turns and a block
list of `--tokens` token ids each; no block files: loading them is bench_load's), then, each in
a fresh process with the model loaded first: opens the engine (`open_engine`) and lists a page;
and, the baseline, reads every transcript and block list the way start-up used to
(`Store.load_agent` for each name, `Store.kv_records`). With `--postgresql`, the same agents
are also put in a PostgreSQL of its own (tests/servers.py) and the engine opened on it (the
shared mode, `--store`). Memory is the process's resident set after, less before (Linux:
/proc/self/statm). Writes benchmarks/results/<date>-<machine>-agents.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import RESULTS, header, pyplot, save

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(cache_dir: Path, agents: int, tokens: int) -> tuple[list, list]:
    """`agents` agents with two turns and a block list of `tokens` ids each, written in one transaction."""
    import mcp_semantic  # noqa: F401
    from mcp_semantic.sqlite_store import SQLiteStore

    store = SQLiteStore(cache_dir)
    text = "A question about the garden and the weather this week, with some detail. " * 6
    rows, kv = [], []
    for i in range(agents):
        name = f"agent-{i:06d}"
        messages = [{"role": "system", "content": "You are terse."}]
        for _ in range(2):
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
        ids = list(range(i, i + tokens))
        rows.append((name, "You are terse.", None, json.dumps(messages), json.dumps(ids), time.time(), time.time()))
        blocks = [f"{i:016x}{b:016x}" for b in range(-(-tokens // 256))]
        kv.append((name, json.dumps(blocks), json.dumps(ids), None))
    with store.db:
        store.db.executemany("INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        store.db.executemany("INSERT INTO kv VALUES (?, ?, ?, ?)", kv)
    store.close()
    return rows, kv


def fill_postgresql(url: str, rows: list, kv: list) -> None:
    """The same agents in PostgreSQL (the schema made by a store opened on it)."""
    import json as _json

    import psycopg

    from mcp_semantic.postgres import connect

    connect(url).close()  # the schema
    with psycopg.connect(url) as db, db.cursor() as cur:
        with cur.copy("COPY agents FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        with cur.copy("COPY kv FROM STDIN") as copy:
            for row in kv:
                copy.write_row(row)
        with cur.copy("COPY kv_blocks FROM STDIN") as copy:
            for name, blocks, _, _ in kv:
                for bid in _json.loads(blocks):
                    copy.write_row((name, bid))


def measure(cache_dir: Path, model: str, what: str, store: str | None = None) -> dict:
    """In this process: the model loaded, then `what` ("engine" or "read-all") timed, with the
    memory it added."""
    import mcp_semantic  # noqa: F401
    from mcp_semantic.server import load, open_engine
    from mcp_semantic.settings import Settings
    from mcp_semantic.sqlite_store import SQLiteStore

    settings = Settings(cache_dir=cache_dir, store=store, **({"model": model} if model else {}))
    lm = load(settings)
    before, start = rss_bytes(), time.perf_counter()
    out: dict = {}
    if what == "engine":
        import anyio

        engine = open_engine(settings, lm)
        out["start_s"] = time.perf_counter() - start
        out["memory_bytes"] = rss_bytes() - before
        start = time.perf_counter()
        page = anyio.run(engine.list_agents)
        out["list_page_s"] = time.perf_counter() - start
        out["listed"], out["total"] = len(page.agents), page.total
        engine.close()
    else:
        store = SQLiteStore(cache_dir)
        agents = [store.load_agent(n) for n in store.names()]
        records = store.kv_records()
        out["start_s"] = time.perf_counter() - start
        out["memory_bytes"] = rss_bytes() - before
        out["total"], out["records"] = len(agents), len(records)
        store.close()
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = ["on demand\n(SQLite)", "every agent read\nat start (before)"]
    rows = [result["on_demand"], result["read_all"]]
    if "on_demand_postgresql" in result:
        labels.append("on demand\n(PostgreSQL)")
        rows.append(result["on_demand_postgresql"])
    for ax, key, unit, scale in ((a, "start_s", "start-up, s", 1), (b, "memory_bytes", "memory added, MB", 1e-6)):
        values = [r[key] * scale for r in rows]
        bars = ax.bar(labels, values, color=["#2a7", "#c44", "#48c"][: len(values)])
        ax.set_title(unit, fontsize=10)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:,.2f}", ha="center", va="bottom")
    fig.suptitle(f"{result['agents']:,} agents in the store, {result['tokens']} tokens each", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--model", default=None, help="default: the server's default model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--postgresql", action="store_true", help="also the shared mode: the agents in PostgreSQL")
    parser.add_argument("--measure", nargs=2, metavar=("DIR", "WHAT"), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--store", help=argparse.SUPPRESS)  # the child process's PostgreSQL
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.model, args.measure[1], args.store)))
        return
    cache_dir = Path(tempfile.mkdtemp(prefix="mcp-semantic-agents-"))
    start = time.perf_counter()
    rows, kv = fill(cache_dir, args.agents, args.tokens)
    result = {**header("agents"), "agents": args.agents, "tokens": args.tokens, "fill_s": round(time.perf_counter() - start, 2),
              "store_bytes": (cache_dir / "store.db").stat().st_size}
    model = ["--model", args.model] if args.model else []
    for key, what in (("on_demand", "engine"), ("read_all", "read-all")):
        out = subprocess.run([sys.executable, __file__, *model, "--measure", str(cache_dir), what],
                             capture_output=True, text=True, check=True)
        result[key] = json.loads(out.stdout.strip().splitlines()[-1])
    keys = ["on_demand", "read_all"]
    if args.postgresql:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import psycopg
        from servers import Postgres  # the tests' real server: Debian's postgresql, a directory of its own

        pg = Postgres.start()
        try:
            with psycopg.connect(pg.url(), autocommit=True) as db:
                db.execute("CREATE DATABASE agents")
            fill_postgresql(pg.url("agents"), rows, kv)
            shared_dir = Path(tempfile.mkdtemp(prefix="mcp-semantic-agents-pg-"))
            out = subprocess.run([sys.executable, __file__, *model, "--measure", str(shared_dir), "engine",
                                  "--store", pg.url("agents")], capture_output=True, text=True, check=True)
            result["on_demand_postgresql"] = json.loads(out.stdout.strip().splitlines()[-1])
            keys.append("on_demand_postgresql")
        finally:
            pg.stop()
    stem = save(result, args.out, plot)
    for key in keys:
        r = result[key]
        print(f"{key:10} start {r['start_s'] * 1000:8.1f} ms   memory {r['memory_bytes'] / 1e6:8.1f} MB"
              + (f"   list page {r['list_page_s'] * 1000:.1f} ms" if "list_page_s" in r else ""))
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
