"""Benchmarks against the peers, in one run: ours, plain mlx-lm, mlx_lm.server and llama.cpp.

All on the default model, greedy, each system keeping its own conversations (see peers.py):
  resume       contexts of ~1K, 2K, 4K, 7K tokens: `cold` (the first turn reads it all), then a
               restart, `disk` (a ~20-token follow-up) and `hot` (the next one, cache in memory),
               three times (medians) for the systems that keep a cache across a restart
  multi-turn   one agent, 10 turns of ~300-token messages, 32-token replies
  delegation   4 sub-agents given one ~2K-token system prompt, 5 questions each, agents at once
  concurrency  1, 2, 4 conversations at once, 64 tokens each: aggregate decode tokens/s
  persistence  our disk bytes per token for each --kv-bits, and cache load against a plain read
Targets (issue 8), computed in the same run: resume after restart at 4K at least 100x faster
than plain mlx-lm's re-prefill; faster than llama.cpp's disk-cache resume at 4K; hot no slower
than mlx_lm.server's cache hit at each context; cache load at least 70% of a sequential read.

    python benchmarks/run_all.py [--quick] [--model M] [--out DIR] [--skip PEER ...]

--quick checks the harness (CI runs it; its timings mean little): contexts 128 and 256, 2 turns of
~40 tokens, 2 agents x 2 questions on ~128 tokens, 1 and 2 at once, lossless and 8-bit, shorter
replies. Writes
<out>/<date>-<machine>-peers.json and two PNGs beside it, and prints the tables.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

import peers
from bench_resume import FOLLOW_UPS  # of one length: the disk and hot turns read as many new tokens
from peers import LlamaCpp, MlxPlain, MlxServer, Ours, Turn, dir_bytes, rss_bytes
from report import RESULTS, header, pyplot, save

from mcp_semantic import blas
from mcp_semantic.cache_kinds import probe
from mcp_semantic.models import default_gguf_path
from mcp_semantic.server import load
from mcp_semantic.settings import DEFAULT_MODEL, Settings

# Quick mode also shortens the replies (time to first token does not depend on their length).
FULL = dict(contexts=[1000, 2000, 4000, 7000], reply=16, repeats=3, turns=10, turn_tokens=300, turn_reply=32, agents=4, questions=5,
            shared_prompt=2000, levels=[1, 2, 4], decode_tokens=64, kv_bits=["lossless", "16", "8", "4"], persist_tokens=2000,
            load_runs=9, load_tokens=[4000, 7000])
QUICK = dict(contexts=[128, 256], reply=4, repeats=1, turns=2, turn_tokens=40, turn_reply=8, agents=2, questions=2,
             shared_prompt=128, levels=[1, 2], decode_tokens=16, kv_bits=["lossless", "8"], persist_tokens=256, load_runs=3, load_tokens=[512])
PEERS = ["mlx-lm", "mlx_lm.server", "llama.cpp"]
SYSTEMS = ["ours", *PEERS]
PARAGRAPHS = [
    "The river town of Millbrook grew around a mill built in 1821. Its water wheel ground wheat for farms "
    "along the valley, and barges carried flour downstream to the port.",
    "In 1888 a flood broke the dam, and the town rebuilt it in stone. The railway arrived in 1902 and the "
    "barges slowly disappeared from the river.",
    "Today the mill is a museum, the dam holds a small lake, and the old towpath is a trail for walkers "
    "and cyclists who stop at the lock keeper's cottage.",
    "The market square hosts a fair every October, when farmers bring apples, cheese and honey, and the "
    "brass band plays on the steps of the town hall.",
    "The school by the bridge opened in 1874 with forty pupils; its bell came from a ship that sank at "
    "the river mouth, and it still rings at nine each morning.",
]
QUESTIONS = [
    "When was the mill built, and what did it grind?",
    "What happened to the dam in 1888, and how was it rebuilt?",
    "How did the railway change the river trade in the town?",
    "What is the old mill used for today, and who visits it?",
    "Where did the barges carry the flour, and why did they stop?",
    "What happens in the market square every October?",
]
NOTES = {
    "ours": "the engine in this process (float32 weights on a CPU); restart = a new engine on the same cache dir",
    "mlx-lm": "mlx_lm.stream_generate on the engine's own model object; every turn prefills the whole conversation",
    "mlx_lm.server": "python -m mlx_lm server on a float32 copy of the same weights (MLX's quantized CPU matmuls are "
    "far slower), the same OpenBLAS (LD_PRELOAD), --decode-concurrency 4; its prompt cache is in memory only",
    "llama.cpp": "llama-cpp-python on the same GGUF file (Q4_1, its own CPU kernels, no weight repacking), fed our chat "
    "template's token ids, n_ctx 8192; disk = LlamaDiskCache; hot = in-context prefix reuse with the disk cache "
    "detached (attached, each call first reads its longest-prefix state from disk); multi-turn and concurrency "
    "without the disk cache; one context, so delegation runs one call at a time",
}
TOPICS = ["the river", "the old mill", "the dam", "the railway", "the market", "the school"]


def document(lm, n_tokens: int, tag: str) -> str:
    """About n_tokens of varied text (numbered sections), starting with `tag` so that no two
    documents share a prefix: no system reuses one context's cache for another."""
    sections, i = [f"Document {tag}. Answer from this document."], 0
    while len(lm.tokenizer.encode("\n\n".join(sections))) < n_tokens:
        sections.append(f"Section {i + 1}. {PARAGRAPHS[i % len(PARAGRAPHS)]}")
        i += 1
    return "\n\n".join(sections[:-1] if i > 1 else sections)


class Factory:
    """Makes a fresh instance of each system per workload, each on its own directories."""

    def __init__(self, args: argparse.Namespace, lm, work: Path):
        self.args, self.lm, self.work, self.n = args, lm, work, 0
        self.unavailable = {p: "skipped (--skip)" for p in args.skip}
        if "llama.cpp" not in self.unavailable and (why := peers.llama_cpp_unavailable()):
            self.unavailable["llama.cpp"] = why
        self.gguf = default_gguf_path(work) if args.model == DEFAULT_MODEL else None
        if self.gguf is None and "llama.cpp" not in self.unavailable:
            self.unavailable["llama.cpp"] = "runs only on the default model's GGUF file"
        self.server_dir = None if "mlx_lm.server" in self.unavailable else peers.float32_model_dir(lm, work / "float32")

    def systems(self) -> list[str]:
        return [s for s in SYSTEMS if s not in self.unavailable]

    def make(self, name: str, disk_cache: bool = True, **kw: Any):
        self.n += 1
        d = self.work / f"{name}-{self.n}"
        if name == "ours":
            return Ours(Settings(model=self.args.model, cache_dir=d, **kw), self.lm)
        if name == "mlx-lm":
            return MlxPlain(self.lm)
        if name == "mlx_lm.server":
            return MlxServer(self.server_dir, self.lm, self.work / "mlx_lm.server.log", decode_concurrency=4)
        return LlamaCpp(self.gguf, self.lm, d if disk_cache else None)


def each_system(f: Factory, run: Callable[[str], dict], skip: dict[str, str] | None = None) -> dict[str, dict]:
    """run(system) for each system; an unavailable, skipped or failing one gets a `why`."""
    out = {}
    for name in SYSTEMS:
        why = f.unavailable.get(name) or (skip or {}).get(name)
        if why is None:
            try:
                out[name] = {"available": True, **run(name)}
                continue
            except Exception as e:  # noqa: BLE001 - one peer failing must not lose the others' numbers
                why = f"failed: {type(e).__name__}: {e}"
        out[name] = {"available": False, "why": why}
    return out


def resume(f: Factory, contexts: list[int], reply: int, repeats: int, bar: tqdm) -> dict:
    def one(system, name: str, ctx: int) -> dict:
        if isinstance(system, LlamaCpp):  # each lookup reads the longest-prefix state: not another context's
            system.clear_disk_cache()
        conv = f"doc-{ctx}"  # each context's document starts differently: no system reuses another's cache
        system.new(conv, document(f.lm, ctx, f"{name} {ctx}"))
        cold = system.ask(conv, "Summarise the document in one sentence.", reply)
        row = {"context": ctx, "context_tokens": cold.prompt_tokens, "cold_ms": cold.ttft_ms}
        # Systems that keep a cache across a restart are measured `repeats` times (restart, then
        # two follow-ups); for the others a restart means reading it all again: once.
        n = repeats if name in ("ours", "llama.cpp") else 1
        disk, hot = [], []
        for i in range(n):
            system.restart()
            disk.append(system.ask(conv, FOLLOW_UPS[2 * i % len(FOLLOW_UPS)], reply))
            if name == "mlx-lm":  # its follow-up re-prefills it all (`disk`); a hot turn would do the same: not run
                continue
            kw = {"disk": False} if name == "llama.cpp" else {}  # llama.cpp: its in-context prefix reuse
            hot.append(system.ask(conv, FOLLOW_UPS[(2 * i + 1) % len(FOLLOW_UPS)], reply, **kw))
        med = lambda turns: statistics.median(t.ttft_ms for t in turns)  # noqa: E731
        row.update(disk_ms=med(disk), disk_runs_ms=[t.ttft_ms for t in disk], disk_cached_tokens=disk[-1].cached,
                   disk_tier=disk[-1].tier)
        if name == "mlx-lm":
            return {**row, "hot_ms": row["disk_ms"], "same_computation": {"hot": "disk"}}
        row.update(hot_ms=med(hot), hot_runs_ms=[t.ttft_ms for t in hot], hot_cached_tokens=hot[-1].cached, hot_tier=hot[-1].tier)
        if name == "llama.cpp":
            row["disk_cache_bytes"] = dir_bytes(system.cache_dir)
        return row

    def run(name: str) -> dict:
        system, rows = f.make(name), []
        try:
            for ctx in contexts:
                rows.append(one(system, name, ctx))
                bar.update()
        finally:
            system.close()
        return {"rows": rows}

    return {"contexts": contexts, "max_tokens": reply, "repeats": repeats, "systems": each_system(f, run)}


def multi_turn(f: Factory, turns: int, turn_tokens: int, reply: int, bar: tqdm) -> dict:
    messages = [document(f.lm, turn_tokens, f"turn {i}") + f"\n\nQuestion: {QUESTIONS[i % len(QUESTIONS)]}" for i in range(turns)]

    def run(name: str) -> dict:
        system = f.make(name, disk_cache=False)  # llama.cpp: its in-context prefix reuse
        try:
            system.new("chat", "You are a concise assistant for a local history society.")
            start, ttft = time.perf_counter(), []
            for m in messages:
                ttft.append(system.ask("chat", m, reply).ttft_ms)
                bar.update()
            return {"wall_s": time.perf_counter() - start, "ttft_ms": ttft}
        finally:
            system.close()

    return {"turns": turns, "message_tokens": len(f.lm.tokenizer.encode(messages[0])), "max_tokens": reply,
            "systems": each_system(f, run)}


def at_once(system, jobs: list[tuple[str, list[str]]], max_tokens: int, threads: bool) -> tuple[list[Turn], float, float]:
    """Each job (conversation, questions) asks its questions in order, the jobs at once (threads)
    or one after another; the turns, the wall time, and the aggregate decode tokens/s."""
    spans: list[tuple[float, float, Turn]] = []

    def one(conv: str, questions: list[str]) -> None:
        for q in questions:
            sent = time.perf_counter()
            t = system.ask(conv, q, max_tokens)
            spans.append((sent + t.ttft_ms / 1000, time.perf_counter(), t))

    start = time.perf_counter()
    if threads:
        with ThreadPoolExecutor(len(jobs)) as pool:
            for fut in [pool.submit(one, c, qs) for c, qs in jobs]:
                fut.result()
    else:
        for c, qs in jobs:
            one(c, qs)
    decoded = sum(max(0, t.generated - 1) for _, _, t in spans)  # from the first first token to the last reply
    rate = decoded / (max(e for _, e, _ in spans) - min(s for s, _, _ in spans))
    return [t for _, _, t in spans], time.perf_counter() - start, rate


def delegation(f: Factory, agents: int, questions: int, prompt_tokens: int, bar: tqdm) -> dict:
    shared = document(f.lm, prompt_tokens, "delegation")
    jobs = [(f"sub-{i}", [QUESTIONS[(i + j) % len(QUESTIONS)] for j in range(questions)]) for i in range(agents)]

    def run(name: str) -> dict:
        rss_before = rss_bytes()
        system = f.make(name)
        try:
            for conv, _ in jobs:
                system.new(conv, shared)
            turns, wall, _ = at_once(system, jobs, 16, threads=name != "llama.cpp")
            bar.update()
            out = {"wall_s": wall, "ttft_ms": [t.ttft_ms for t in turns], "concurrent": name != "llama.cpp"}
            if name == "ours":
                mem = system.list_agents().memory
                out.update(disk_bytes=dir_bytes(system.settings.cache_dir), memory_bytes=mem.used_bytes,
                           blocks_in_memory=mem.blocks_in_memory, blocks_on_disk=mem.blocks_on_disk)
            elif name == "mlx_lm.server":
                out.update(disk_bytes=0, peak_rss_bytes=system.peak_rss())
            else:
                out.update(disk_bytes=dir_bytes(system.cache_dir), rss_increase_bytes=rss_bytes() - rss_before)
            return out
        finally:
            system.close()

    skip = {"mlx-lm": f"not run: {agents * questions} full re-prefills of the whole conversation, no cache to share"}
    return {"agents": agents, "questions": questions, "prompt_tokens": len(f.lm.tokenizer.encode(shared)),
            "systems": each_system(f, run, skip)}


def concurrency(f: Factory, levels: list[int], max_tokens: int, bar: tqdm) -> dict:
    def run(name: str) -> dict:
        system, rows = f.make(name, disk_cache=False), []
        try:
            for n in levels if name != "llama.cpp" else [1]:  # llama.cpp: one context, one at a time
                jobs = [(f"c{n}-{i}", [f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."]) for i in range(n)]
                for i, (conv, _) in enumerate(jobs):
                    system.new(conv, f"You are storyteller number {i} of Millbrook. {PARAGRAPHS[i % len(PARAGRAPHS)]}")
                turns, _, rate = at_once(system, jobs, max_tokens, threads=True)
                rows.append({"conversations": n, "aggregate_decode_tokens_per_s": rate, "generated": [t.generated for t in turns]})
                bar.update()
        finally:
            system.close()
        return {"rows": rows}

    skip = {"mlx-lm": "not run: plain stream_generate serves one request at a time"}
    return {"levels": levels, "max_tokens": max_tokens, "systems": each_system(f, run, skip)}


def persistence(f: Factory, modes: list[str], tokens: int, runs: int, load_tokens: list[int], bar: tqdm) -> dict:
    """Our bytes per token on disk for each --kv-bits, and the load benchmark's measurement of
    loading the saved agent against plain reads of the same files; then the same for agents of
    `load_tokens` tokens of random K/V of the model's shape, saved by the store's writer (what a
    load costs does not depend on the values; a prefill of each would take minutes here)."""
    from mcp_semantic.block_pool import Storage

    try:
        from bench_load import measure_load, save_agent
    except ImportError as e:
        measure_load, why = None, f"benchmarks/bench_load.py cannot be imported: {e}"
    layout = probe(f.lm.model)
    rows = []
    for bits in modes:
        system = f.make("ours", kv_bits=bits)
        try:
            system.new("p", document(f.lm, tokens, f"persistence {bits}"))
            system.ask("p", QUESTIONS[0], 8)
            info = next(a for a in system.list_agents().agents if a.name == "p")
        finally:
            system.close()  # the store must be closed before measure_load opens it
        storage = Storage(f.lm.fingerprint, f.lm.dtype, None if bits == "lossless" else int(bits))
        load = (measure_load(system.settings.cache_dir, "p", runs=runs, storage=storage, layout=probe(f.lm.model))
                if measure_load else {"available": False, "why": why})
        loads = {}
        for n in load_tokens if measure_load else []:
            cache_dir = f.work / f"load-{bits}-{n}"
            try:
                save_agent(cache_dir, "p", n, storage, layout)
                loads[n] = measure_load(cache_dir, "p", runs=runs, storage=storage, layout=layout)
            except ValueError as e:  # not a full-attention model
                loads[n] = {"available": False, "why": str(e)}
            shutil.rmtree(cache_dir, ignore_errors=True)
        rows.append({"kv_bits": bits, "tokens": info.tokens, "disk_bytes": info.disk_bytes, "memory_bytes": info.memory_bytes,
                     "disk_bytes_per_token": info.disk_bytes / info.tokens, "load": load, "loads": loads})
        bar.update()
    return {"rows": rows, "load_tokens": load_tokens}


def targets(r: dict) -> dict:
    """Each target: {"met": bool, and the numbers it compares}, or {"met": None, "why"} when a
    result it needs is missing. In quick mode the "4K" targets use the largest context."""
    res, out = r["resume"], {}
    at = 4000 if 4000 in res["contexts"] else max(res["contexts"])
    rows = {s: {x["context"]: x for x in v.get("rows", [])} for s, v in res["systems"].items()}
    why = lambda s: f"no {s} result: {res['systems'][s].get('why')}"  # noqa: E731
    ours = rows["ours"].get(at)
    for peer, name, ok in (("mlx-lm", "resume_4k_at_least_100x_plain_mlx_lm", lambda x: x >= 100),
                           ("llama.cpp", "resume_4k_faster_than_llama_cpp_disk_cache", lambda x: x > 1)):
        other = rows[peer].get(at)
        speedup = other["disk_ms"] / ours["disk_ms"] if ours and other else None
        out[name] = {"met": ok(speedup), "context": at, "ours_disk_ms": ours["disk_ms"], f"{peer}_disk_ms": other["disk_ms"],
                     "speedup": speedup} if speedup else {"met": None, "why": why(peer)}
    pairs = [(c, x["hot_ms"], rows["mlx_lm.server"][c]["hot_ms"]) for c, x in rows["ours"].items() if c in rows["mlx_lm.server"]]
    out["hot_no_slower_than_mlx_lm_server_hit"] = {
        "met": all(a <= b for _, a, b in pairs), "contexts": [c for c, _, _ in pairs],
        "ours_hot_ms": [a for _, a, _ in pairs], "server_hot_ms": [b for _, _, b in pairs],
    } if pairs else {"met": None, "why": why("mlx_lm.server")}
    pairs = [(c, x["hot_ms"], x["disk_ms"]) for c, x in rows["ours"].items()]
    out["hot_no_slower_than_after_restart"] = {
        "met": all(a <= b for _, a, b in pairs), "contexts": [c for c, _, _ in pairs],
        "hot_ms": [a for _, a, _ in pairs], "after_restart_ms": [b for _, _, b in pairs],
    } if pairs else {"met": None, "why": why("ours")}
    pers = r["persistence"]
    modes = {x["kv_bits"]: x for x in pers["rows"]}
    sizes = [n for n in pers["load_tokens"] if all("load_s" in x["loads"].get(n, {}) for x in pers["rows"])]
    if "lossless" in modes and sizes:
        lossless = modes["lossless"]["loads"]
        # whichever memory the read gets: malloc's (read()), or memory used before (read_reused)
        out["lossless_load_at_least_90pct_of_plain_read"] = {
            "met": all(min(lossless[n]["ratio"], lossless[n].get("ratio_reused", 0)) >= 0.9 for n in sizes), "tokens": sizes,
            "load_gbps": [lossless[n]["load_gbps"] for n in sizes], "read_gbps": [lossless[n]["read_gbps"] for n in sizes],
            "read_reused_gbps": [lossless[n].get("read_reused_gbps") for n in sizes],
            "ratio": [lossless[n]["ratio"] for n in sizes], "ratio_reused": [lossless[n].get("ratio_reused") for n in sizes],
        }
        out["every_kv_bits_load_no_slower_than_lossless"] = {
            "met": all(x["loads"][n]["load_s"] <= lossless[n]["load_s"] for x in pers["rows"] for n in sizes), "tokens": sizes,
            **{f"{bits}_load_ms": [round(x["loads"][n]["load_s"] * 1000, 1) for n in sizes] for bits, x in modes.items()},
        }
    else:
        why_not = {"met": None, "why": "no lossless loads measured"}
        out["lossless_load_at_least_90pct_of_plain_read"] = out["every_kv_bits_load_no_slower_than_lossless"] = why_not
    return out


COLORS = {"ours": "#2a7", "mlx-lm": "#c44", "mlx_lm.server": "#48c", "llama.cpp": "#c84"}


def plot(r: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for name, s in r["resume"]["systems"].items():
        for tier, style in (("cold", ":"), ("disk", "-"), ("hot", "--")):
            rows = [x for x in s.get("rows", []) if not (tier in x.get("same_computation", {}))]
            if rows:
                ax.plot([x["context_tokens"] for x in rows], [x[f"{tier}_ms"] for x in rows], style, marker="o",
                        color=COLORS[name], label=f"{name} {tier if tier != 'disk' else 'after restart'}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(r["resume"]["contexts"], [f"{c:,}" for c in r["resume"]["contexts"]], minor=False)
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    ax.set_xlabel("context tokens (about)")
    ax.set_ylabel("time to first token (ms, log)")
    ax.set_title(f"{r['model']}: cold = first turn, after restart and hot = ~20-token follow-ups", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in r["concurrency"]["systems"].items():
        rows = s.get("rows", [])
        if rows:
            a.plot([x["conversations"] for x in rows], [x["aggregate_decode_tokens_per_s"] for x in rows], "o-", color=COLORS[name], label=name)
    a.set_xticks(r["concurrency"]["levels"])
    a.set_xlabel("conversations at once")
    a.set_ylabel("aggregate decode tokens/s")
    a.set_title(f"{r['concurrency']['max_tokens']} tokens each", fontsize=10)
    a.legend(fontsize=8)
    for name, s in r["multi_turn"]["systems"].items():
        if s.get("ttft_ms"):
            b.plot(range(1, len(s["ttft_ms"]) + 1), s["ttft_ms"], "o-", color=COLORS[name], label=name)
    b.set_yscale("log")
    b.set_xticks(range(1, r["multi_turn"]["turns"] + 1))
    b.set_xlabel("turn")
    b.set_ylabel("time to first token (ms, log)")
    b.set_title(f"multi-turn: ~{r['multi_turn']['message_tokens']}-token messages", fontsize=10)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "-concurrency.png"), dpi=120)


def tidy(x: Any) -> Any:
    """Floats rounded for reading: 0.1 from 100 up, else 0.001."""
    if isinstance(x, dict):
        return {k: tidy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [tidy(v) for v in x]
    return round(x, 1 if abs(x) >= 100 else 3) if isinstance(x, float) else x


def table(r: dict) -> None:
    def each(workload: dict, show: Callable[[dict], str]) -> None:
        for name, x in workload["systems"].items():
            print(f"{name:15}{show(x) if x['available'] else '  ' + x['why']}")

    print(f"\n{r['model']} ({r['dtype']}, OpenBLAS: {r['openblas']}), {r['machine']}, {r['wall_s']:.0f} s{' [quick]' * r['quick']}")
    print("\nresume: TTFT ms (cold = first turn, disk = after a restart, hot = cache in memory)")
    print(f"{'system':15}{'context':>8}{'cold':>10}{'disk':>10}{'hot':>10}")
    for name, s in r["resume"]["systems"].items():
        for x in s.get("rows", []):
            print(f"{name:15}{x['context_tokens']:>8}{x['cold_ms']:>10.0f}{x['disk_ms']:>10.0f}{x['hot_ms']:>10.0f}"
                  + ("  (hot = disk: every turn re-prefills)" if x.get("same_computation") else ""))
        if not s["available"]:
            print(f"{name:15}  {s['why']}")
    m = r["multi_turn"]
    print(f"\nmulti-turn: {m['turns']} turns of ~{m['message_tokens']} tokens, {m['max_tokens']}-token replies: wall time, TTFT per turn")
    each(m, lambda s: f"{s['wall_s']:>8.1f} s   TTFT ms " + " ".join(f"{t:.0f}" for t in s["ttft_ms"]))
    d = r["delegation"]
    print(f"\ndelegation: {d['agents']} agents x {d['questions']} questions, ~{d['prompt_tokens']}-token shared prompt")
    memory = {"memory_bytes": "KV in memory", "peak_rss_bytes": "peak RSS", "rss_increase_bytes": "RSS increase"}
    each(d, lambda s: f"{s['wall_s']:>8.1f} s   disk {s['disk_bytes'] / 1e6:,.1f} MB   "
         + "   ".join(f"{v} {s[k] / 1e6:,.1f} MB" for k, v in memory.items() if k in s)
         + f"   TTFT p50 {statistics.median(s['ttft_ms']):.0f} ms")
    c = r["concurrency"]
    print(f"\nconcurrency: aggregate decode tokens/s by conversations at once, {c['max_tokens']} tokens each")
    each(c, lambda s: "   ".join(f"{x['conversations']}: {x['aggregate_decode_tokens_per_s']:.1f}" for x in s["rows"]))
    print("\npersistence (ours): disk bytes per token; loading the saved cache against a plain read of its files")
    for x in r["persistence"]["rows"]:
        loads = [(x["tokens"], x["load"]), *x["loads"].items()]
        print(f"{x['kv_bits']:>8}  {x['disk_bytes_per_token']:>8,.0f} B/token   " + "   ".join(
            f"{n} tokens: load {ld['load_s'] * 1000:.0f} ms ({ld['load_gbps']:.2f} GB/s), read {ld['read_gbps']:.2f} GB/s, "
            f"into memory used before {ld.get('read_reused_gbps', 0):.2f}, "
            f"ratios {ld['ratio']:.2f} / {ld.get('ratio_reused', 0):.2f}"
            if "ratio" in ld else f"{n} tokens: {ld['why']}" for n, ld in loads))
    print("\ntargets")
    for name, t in r["targets"].items():
        nums = ", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items() if k != "met")
        print(f"  {'met   ' if t['met'] else 'MISSED' if t['met'] is False else 'n/a   '} {name}: {nums}")


def stage(desc: str, total: int, run: Callable[..., dict], *args: Any) -> dict:
    with tqdm(total=total, desc=desc) as bar:
        return run(*args, bar)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the harness (about a minute)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip", nargs="*", default=[], choices=PEERS, metavar="PEER", help=f"peers not to run: {', '.join(PEERS)}")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mcp-semantic-peers-"))
    try:
        lm = load(Settings(model=args.model, cache_dir=work / "model"))
        f = Factory(args, lm, work)
        n, levels, on = len(f.systems()), cfg["levels"], set(f.systems())
        res = stage("resume", n * len(cfg["contexts"]), resume, f, cfg["contexts"], cfg["reply"], cfg["repeats"])
        multi = stage("multi-turn", n * cfg["turns"], multi_turn, f, cfg["turns"], cfg["turn_tokens"], cfg["turn_reply"])
        deleg = stage("delegation", len(on - {"mlx-lm"}), delegation, f, cfg["agents"], cfg["questions"], cfg["shared_prompt"])
        total = len(levels) * len(on & {"ours", "mlx_lm.server"}) + ("llama.cpp" in on)
        conc = stage("concurrency", total, concurrency, f, levels, cfg["decode_tokens"])
        pers = stage("persistence", len(cfg["kv_bits"]), persistence, f, cfg["kv_bits"], cfg["persist_tokens"], cfg["load_runs"],
                     cfg["load_tokens"])
        systems = {s: {"available": s not in f.unavailable, "how": NOTES[s], **({"why": f.unavailable[s]} if s in f.unavailable else {})}
                   for s in SYSTEMS}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {**header("peers"), "model": lm.name, "dtype": lm.dtype, "openblas": blas.loaded, "quick": args.quick,
              "systems": systems, "resume": res, "multi_turn": multi, "delegation": deleg, "concurrency": conc,
              "persistence": pers}
    result["targets"] = targets(result)
    result = tidy({**result, "wall_s": time.perf_counter() - started})
    stem = save(result, args.out, plot)
    table(result)
    print(f"\nwrote {stem}.json, {stem}.png and {stem}-concurrency.png")


if __name__ == "__main__":
    main()
