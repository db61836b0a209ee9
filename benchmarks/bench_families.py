"""Resume for models that are not plain attention: a hybrid (Qwen3.5-class) and a sliding-window
(Gemma-3-class) model, against reading the conversation again and against mlx_lm.server.

Random-weight models of two real shapes, float32 (tiny_model.make_tiny_model with their sizes and
our small tokenizer: the vocabulary, so the embedding, is the one thing not to scale):
  qwen3.5-0.8b  24 layers, hidden 1024: 18 gated delta-net layers (a recurrent state each) and 6
                full-attention layers (8 heads, 2 KV heads of 256), as Qwen3.5-0.8B
  gemma3-1b     26 layers, hidden 1152: 22 sliding-window layers (512 tokens) and 4 global ones
                (4 heads, 1 KV head of 256), as Gemma-3-1B
For each, at about 2K and 8K tokens of conversation (a document as the system prompt), with a
~20-token follow-up, the time to first token (TTFT) of:
  cold    a new agent reading it all (what any system without a cache does on every turn)
  disk    the next turn after a server restart (median of --repeats restarts)
  hot     the turn after that, the agent's blocks in memory
  fork    the first turn of a fork of the agent, made right after a restart's turn
  mlx_lm.server  the peer: its second turn (its prompt cache in memory; it keeps none on disk,
          so after a restart it reads everything again, as `cold`)
and the bytes: state checkpoint bytes per block, K/V bytes per token, disk bytes per token.
Thinking templates: with a template that drops the `<think>` a reply's prompt opened (as
Qwen3's), the second turn's cached tokens against where the prompt first changes.
Targets (issue 13), in one run: after a restart at least 25x faster than cold at 8K for both
shapes, and the disk tier within 1.5x of hot.

    python benchmarks/bench_families.py [--quick] [--repeats 3] [--skip-peer]

--quick runs tiny models of the two families at ~300 and ~600 tokens, to check the harness (CI
runs it; its timings mean little). Writes benchmarks/results/<date>-<machine>-families.json and
.png, and prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mcp_semantic  # noqa: F401  (OpenBLAS before MLX)
from mlx_lm.utils import common_prefix_len

import peers
from peers import MlxServer, Ours
from report import RESULTS, header, pyplot, save
from run_all import QUESTIONS, document

from mcp_semantic import blas
from mcp_semantic.cache_kinds import probe
from mcp_semantic.models import load_model
from mcp_semantic.settings import Settings
from mcp_semantic.tiny_model import THINKING_CHAT_TEMPLATE, make_tiny_model

SHAPES = {
    "qwen3.5-0.8b": dict(model_type="qwen3_5", num_layers=24, hidden_size=1024, num_heads=8, num_kv_heads=2,
                         intermediate_size=3584, max_position_embeddings=32768, config_overrides={
                             "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
                             "linear_key_head_dim": 128, "linear_value_head_dim": 128}),
    "gemma3-1b": dict(model_type="gemma3_text", num_layers=26, hidden_size=1152, num_heads=4, num_kv_heads=1,
                      intermediate_size=6912, sliding_window=512, max_position_embeddings=32768,
                      config_overrides={"head_dim": 256}),
}
QUICK_SHAPES = {"qwen3.5-tiny": dict(model_type="qwen3_5"), "gemma3-tiny": dict(model_type="gemma3_text")}
REPLY = 8  # tokens per reply: TTFT does not depend on it
THINKING_CONTEXT = 1000


def ttfts(turns: list[peers.Turn]) -> dict:
    return {"ms": statistics.median(t.ttft_ms for t in turns), "runs_ms": [t.ttft_ms for t in turns],
            "cached_tokens": turns[-1].cached, "context_tokens": turns[-1].prompt_tokens, "tier": turns[-1].tier}


def resume(ours: Ours, lm, name: str, ctx: int, repeats: int) -> dict:
    conv = f"doc-{ctx}"
    ours.new(conv, document(lm, ctx, f"{name} {ctx}"))
    cold = ours.ask(conv, "Summarise the document in one sentence.", REPLY)
    disk, hot, q = [], [], iter(QUESTIONS * repeats * 2)
    fork = None
    for i in range(repeats):
        ours.restart()
        disk.append(ours.ask(conv, next(q), REPLY))
        if fork is None:  # a fork of the agent just resumed: its turn builds from the blocks in memory
            ours._portal.call(ours.engine.fork, conv, f"{conv}-fork")
            fork = ours.ask(f"{conv}-fork", next(q), REPLY)
        hot.append(ours.ask(conv, next(q), REPLY))
    listed = {a.name: a for a in ours.list_agents().agents}[conv]
    return {"context": ctx, "context_tokens": cold.prompt_tokens, "cold": ttfts([cold]), "disk": ttfts(disk),
            "hot": ttfts(hot), "fork": ttfts([fork]), "disk_bytes_per_token": round(listed.disk_bytes / listed.tokens, 1)}


def thinking(lm, spec: dict, work: Path) -> dict:
    """The second turn of a thinking template, which drops the `<think>` the first prompt opened:
    reused up to the change (attention) or where the first reply's turn began (recurrent state)."""
    model = make_tiny_model(work / "thinking", chat_template=THINKING_CHAT_TEMPLATE, **spec)
    ours = Ours(Settings(model=str(model), cache_dir=work / "thinking-cache"), load_model(str(model), work))
    try:
        ours.new("t", document(lm, THINKING_CONTEXT, "thinking"))
        first = ours.ask("t", QUESTIONS[0], 32)
        second = ours.ask("t", QUESTIONS[1], REPLY)
        agent = ours.engine.agents.memory["t"]
        tok = ours.lm.tokenizer
        before = tok.apply_chat_template(agent.messages[:2], add_generation_prompt=True)
        after = tok.apply_chat_template(agent.messages[:3], add_generation_prompt=True)
        changed = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
        turn = common_prefix_len(before, tok.apply_chat_template(agent.messages[:2], add_generation_prompt=False))
        block = ours.engine.caches.block_tokens
        return {"first_context_tokens": first.prompt_tokens, "second_context_tokens": second.prompt_tokens,
                "first_change_at": changed, "last_block_end_before_change": changed // block * block,
                "first_turn_start": turn, "cached_tokens": second.cached, "second_ttft_ms": second.ttft_ms,
                "tier": second.tier}
    finally:
        ours.close()


def peer(model: Path, lm, name: str, contexts: list[int], work: Path) -> dict:
    server = MlxServer(model, lm, work / "mlx_lm.server.log", decode_concurrency=1)
    rows = []
    try:
        for ctx in contexts:
            conv = f"doc-{ctx}"
            server.new(conv, document(lm, ctx, f"{name} {ctx}"))
            cold = server.ask(conv, "Summarise the document in one sentence.", REPLY)
            hot = server.ask(conv, QUESTIONS[0], REPLY)
            rows.append({"context": ctx, "cold_ms": cold.ttft_ms, "hot_ms": hot.ttft_ms, "hot_cached_tokens": hot.cached,
                         "context_tokens": hot.prompt_tokens})
    finally:
        server.close()
    return {"available": True, "how": "python -m mlx_lm server on the same model directory, the same OpenBLAS; "
            "its prompt cache is in memory only", "rows": rows}


def shape(name: str, spec: dict, contexts: list[int], repeats: int, with_peer: bool, work: Path) -> dict:
    model = make_tiny_model(work / name, **spec)
    lm = load_model(str(model), work)
    layout = probe(lm.model)
    block = Settings().block_tokens
    state = sum(_nbytes(s, d) for n, (s, d) in layout.shapes.items() if ".state." in n)
    kv = sum(_nbytes(s, d) for n, (s, d) in layout.shapes.items() if ".state." not in n)
    ours = Ours(Settings(model=str(model), cache_dir=work / f"{name}-cache"), lm)
    try:
        rows = [resume(ours, lm, name, ctx, repeats) for ctx in contexts]
    finally:
        ours.close()
    out = {"model_type": spec["model_type"], "layers": layout.describe(), "parameters": _parameters(lm.model),
           "block_tokens": block, "state_bytes_per_block": state, "kv_bytes_per_token": kv,
           "block_bytes": state + kv * block, "rows": rows, "thinking": thinking(lm, spec, work)}
    out["mlx_lm.server"] = peer(model, lm, name, contexts, work) if with_peer else {"available": False, "why": "--skip-peer"}
    return out


def _nbytes(shape: tuple[int, ...], dtype) -> int:
    n = dtype.size
    for d in shape:
        n *= d
    return n


def _parameters(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def targets(r: dict) -> dict:
    out = {}
    for name, s in r["shapes"].items():
        last = s["rows"][-1]
        speedup = last["cold"]["ms"] / last["disk"]["ms"]
        out[f"{name}: after a restart at least 25x faster than cold at {last['context_tokens']} tokens"] = {
            "cold_ms": last["cold"]["ms"], "disk_ms": last["disk"]["ms"], "speedup": speedup, "met": speedup >= 25}
        ratios = [x["disk"]["ms"] / x["hot"]["ms"] for x in s["rows"]]
        out[f"{name}: disk within 1.5x of hot"] = {"disk_over_hot": ratios, "met": max(ratios) <= 1.5}
    return out


def plot(r: dict, path: Path) -> None:
    plt = pyplot()
    shapes = list(r["shapes"].items())
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    tiers = [("cold", "#c44"), ("disk", "#48c"), ("hot", "#4a4"), ("fork", "#a6c")]
    for ax, (name, s) in zip(axes[0], shapes):
        rows = s["rows"]
        width = 0.8 / (len(tiers) + 1)
        for i, (tier, color) in enumerate(tiers):
            ax.bar([j + i * width for j in range(len(rows))], [x[tier]["ms"] for x in rows], width, label=tier, color=color)
        server = s["mlx_lm.server"]
        if server.get("available"):
            ax.bar([j + len(tiers) * width for j in range(len(rows))], [x["hot_ms"] for x in server["rows"]], width,
                   label="mlx_lm.server hot", color="#999")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [f"{x['context_tokens']} tokens" for x in rows])
        ax.set_yscale("log")
        ax.set_ylabel("time to first token (ms)")
        ax.set_title(f"{name}: {s['layers']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"resume by tier, {r['machine']}, float32", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(r: dict) -> None:
    print(f"\n{r['machine']}, OpenBLAS: {r['openblas']}, {r['wall_s']:.0f} s{' [quick]' * r['quick']}")
    for name, s in r["shapes"].items():
        print(f"\n{name} ({s['parameters'] / 1e6:.0f}M parameters; {s['layers']}): state {s['state_bytes_per_block'] / 1e6:.2f} MB "
              f"a block of {s['block_tokens']}, K/V {s['kv_bytes_per_token']:,} B a token")
        print(f"{'context':>8}{'cold':>10}{'disk':>10}{'hot':>10}{'fork':>10}{'server hot':>12}{'cold/disk':>10}{'disk/hot':>10}{'disk B/tok':>12}")
        server = {x["context"]: x for x in s["mlx_lm.server"].get("rows", [])}
        for x in s["rows"]:
            hot_peer = server.get(x["context"], {}).get("hot_ms")
            print(f"{x['context_tokens']:>8}{x['cold']['ms']:>10.0f}{x['disk']['ms']:>10.0f}{x['hot']['ms']:>10.0f}{x['fork']['ms']:>10.0f}"
                  f"{hot_peer if hot_peer is not None else float('nan'):>12.0f}{x['cold']['ms'] / x['disk']['ms']:>10.1f}"
                  f"{x['disk']['ms'] / x['hot']['ms']:>10.2f}{x['disk_bytes_per_token']:>12,.0f}")
        t = s["thinking"]
        print(f"thinking template, second turn: {t['cached_tokens']} of {t['second_context_tokens']} tokens cached; the prompt "
              f"changes at {t['first_change_at']} (the first reply's turn began at {t['first_turn_start']}, the last "
              f"block end before the change is {t['last_block_end_before_change']})")
    print("\ntargets")
    for name, t in r["targets"].items():
        print(f"  {'met   ' if t['met'] else 'MISSED'} {name}: " + ", ".join(
            f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items() if k != "met"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, short contexts: checks the harness")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-peer", action="store_true", help="do not run mlx_lm.server")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    shapes, contexts = (QUICK_SHAPES, [300, 600]) if args.quick else (SHAPES, [2000, 8000])
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mcp-semantic-families-"))
    try:
        result = {**header("families"), "quick": args.quick, "openblas": blas.loaded, "repeats": args.repeats,
                  "follow_up": "one of run_all.QUESTIONS (~15-20 tokens)", "reply_tokens": REPLY,
                  "shapes": {name: shape(name, spec, contexts, args.repeats, not args.skip_peer, work / name)
                             for name, spec in shapes.items()}}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["targets"] = targets(result)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    stem = save(result, args.out, plot)
    table(result)
    print(f"\nwrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
