"""Concurrency: agents asked at once share the engine's batch.

In one process, on the default model (greedy, the same requests everywhere):
  * for 1, 2, 4 and 8 agents asked at once: aggregate decode tokens/s (tokens generated after
    the first ones, over the time from the first first-token to the last reply) and p50/p95
    time to first token;
  * the same requests run one after another, by the engine and by plain `mlx_lm.generate`
    (stream_generate, its own generation tokens/s): the sequential aggregate decode rate;
  * the longest pause between two tokens of an agent that is generating while another agent
    reads a ~4,000-token prompt (the engine reads prompts in chunks between decode steps).
Targets (issue 6): at 4 agents, at least 2.5x the sequential aggregate decode rate (the
engine's, one after another); the longest pause under 1 s.

    python benchmarks/bench_concurrency.py [--model M] [--max-tokens 160] [--quick]

Replies are 160 tokens (a paragraph); the same 4-agent comparison is also run with 64-token
replies, where the fixed cost of each call (reading its prompt, joining the batch) weighs more.

Writes benchmarks/results/<date>-<machine>-concurrency.json and .png, and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mcp_semantic  # noqa: F401  (OpenBLAS before MLX)
import anyio
import mlx_lm

from report import RESULTS, header, pyplot, save

from mcp_semantic import blas
from mcp_semantic.calls import AskRequest, AskResult
from mcp_semantic.engine import Engine
from mcp_semantic.server import load, open_engine
from mcp_semantic.settings import DEFAULT_MODEL, Settings

TOPICS = ["the river", "the old mill", "the dam", "the railway", "the harbour", "the market", "the school", "the bridge"]
DOCUMENT = (
    "The river town of Millbrook grew around a mill built in 1821. Its water wheel ground wheat for "
    "farms along the valley, and barges carried flour downstream to the port. In 1888 a flood broke "
    "the dam, and the town rebuilt it in stone. The railway arrived in 1902 and the barges slowly "
    "disappeared. Today the mill is a museum, the dam holds a small lake, and the old towpath is a "
    "trail for walkers and cyclists. "
)


def request(name: str, i: int, max_tokens: int) -> AskRequest:
    """Agent i's question: its own system prompt (~150 tokens), so agents share little."""
    system = f"You are guide number {i} of Millbrook. " + DOCUMENT
    return AskRequest(name, f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}.", system=system, max_tokens=max_tokens)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def at_once(engine: Engine, requests: list[AskRequest]) -> tuple[list[AskResult], float]:
    """Ask all at once; the results and the aggregate decode rate."""
    results: list = [None] * len(requests)
    start = time.perf_counter()
    ends: list[float] = [0.0] * len(requests)

    async def one(i: int) -> None:
        results[i] = await engine.ask(requests[i])
        ends[i] = time.perf_counter()

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    first = min(start + r.timings_ms.ttft / 1000 for r in results)
    decoded = sum(max(0, r.tokens.generated - 1) for r in results)
    return results, decoded / (max(ends) - first)


async def one_after_another(engine: Engine, requests: list[AskRequest]) -> tuple[list[AskResult], float]:
    results = [await engine.ask(r) for r in requests]
    decoded = sum(max(0, r.tokens.generated - 1) for r in results)
    span = sum((r.timings_ms.total - r.timings_ms.ttft) / 1000 for r in results)
    return results, decoded / span


def plain_mlx_lm(engine: Engine, requests: list[AskRequest]) -> float:
    """The same prompts through mlx_lm.stream_generate, one after another: tokens after the
    first over the time after the first."""
    lm = engine.lm
    decoded, span = 0, 0.0
    for req in requests:
        messages = [{"role": "system", "content": req.system}, {"role": "user", "content": req.message}]
        prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        first = None
        n = 0
        for response in mlx_lm.stream_generate(lm.model, lm.tokenizer, prompt, max_tokens=req.max_tokens):
            n += 1
            first = first or time.perf_counter()
        decoded += max(0, n - 1)
        span += time.perf_counter() - first
    return decoded / span


async def stall(engine: Engine, prompt_tokens: int, max_tokens: int) -> dict:
    """An agent generates while another reads a long prompt: the longest pause between its tokens."""
    words = (DOCUMENT * (prompt_tokens // 60 + 2)).split()
    text = " ".join(words)
    while len(engine.lm.tokenizer.encode(text)) > prompt_tokens:
        words = words[: int(len(words) * 0.97)]
        text = " ".join(words)
    results: dict[str, AskResult] = {}

    async def decoder() -> None:
        results["decoder"] = await engine.ask(request("stall-decoder", 0, max_tokens))

    async def reader() -> None:
        await anyio.sleep(1.0)  # the decoder is generating by then
        results["reader"] = await engine.ask(AskRequest("stall-reader", "Summarise: " + text, max_tokens=4))

    async with anyio.create_task_group() as tg:
        tg.start_soon(decoder)
        tg.start_soon(reader)
    d, r = results["decoder"], results["reader"]
    return {
        "reader_prompt_tokens": r.tokens.context,
        "reader_ttft_ms": r.timings_ms.ttft,
        "decoder_generated": d.tokens.generated,
        "decoder_longest_pause_ms": d.timings_ms.longest_pause,
        "reader_finished_first": r.timings_ms.total + 1000 < d.timings_ms.total,
    }


async def run(args: argparse.Namespace) -> dict:
    settings = Settings(model=args.model, cache_dir=Path(tempfile.mkdtemp(prefix="mcp-semantic-bench-")))
    lm = load(settings)
    engine = open_engine(settings, lm)
    await engine.ask(AskRequest("warm-up", "Hello.", max_tokens=8))
    levels = [1, 2, 4] if args.quick else [1, 2, 4, 8]
    rows = []
    for n in levels:
        requests = [request(f"batch{n}-{i}", i, args.max_tokens) for i in range(n)]
        results, rate = await at_once(engine, requests)
        ttfts = [r.timings_ms.ttft for r in results]
        rows.append(
            {
                "agents": n,
                "aggregate_decode_tokens_per_s": round(rate, 1),
                "ttft_ms_p50": round(pct(ttfts, 50), 1),
                "ttft_ms_p95": round(pct(ttfts, 95), 1),
                "generated": [r.tokens.generated for r in results],
            }
        )
    top = levels[-1]
    requests = [request(f"seq-{i}", i, args.max_tokens) for i in range(top)]
    seq_results, seq_rate = await one_after_another(engine, requests)
    mlx_rate = plain_mlx_lm(engine, requests)
    same = [r.reply for r in seq_results] == [r.reply for r in (await at_once(engine, [request(f"check-{i}", i, args.max_tokens) for i in range(top)]))[0]]
    short = [request(f"short-seq-{i}", i, 64) for i in range(4)]
    _, short_seq = await one_after_another(engine, short)
    _, short_batch = await at_once(engine, [request(f"short-{i}", i, 64) for i in range(4)])
    stalled = await stall(engine, args.stall_prompt, args.max_tokens * 3)
    await engine.aclose()
    four = next(r for r in rows if r["agents"] == 4)
    result = {
        **header("concurrency"),
        "model": lm.name,
        "dtype": lm.dtype,
        "openblas": blas.loaded,
        "max_tokens": args.max_tokens,
        "levels": rows,
        "sequential_engine_decode_tokens_per_s": round(seq_rate, 1),
        "sequential_mlx_lm_decode_tokens_per_s": round(mlx_rate, 1),
        "batched_replies_equal_sequential": same,
        "stall": stalled,
        "speedup_4_vs_sequential": round(four["aggregate_decode_tokens_per_s"] / seq_rate, 2),
        "short_replies": {
            "max_tokens": 64,
            "sequential_engine_decode_tokens_per_s": round(short_seq, 1),
            "4_agents_decode_tokens_per_s": round(short_batch, 1),
            "speedup_4_vs_sequential": round(short_batch / short_seq, 2),
        },
    }
    result["targets"] = {
        "4_agents_at_least_2.5x_sequential": result["speedup_4_vs_sequential"] >= 2.5,
        "longest_pause_under_1s": stalled["decoder_longest_pause_ms"] < 1000,
    }
    return result


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    levels = result["levels"]
    x = [r["agents"] for r in levels]
    a.plot(x, [r["aggregate_decode_tokens_per_s"] for r in levels], "o-", label="engine, agents asked at once")
    a.axhline(result["sequential_engine_decode_tokens_per_s"], color="#888", linestyle="--", label="engine, one after another")
    a.axhline(result["sequential_mlx_lm_decode_tokens_per_s"], color="#c84", linestyle=":", label="mlx_lm.generate, one after another")
    a.set_xscale("log", base=2)
    a.set_xticks(x, [str(v) for v in x])
    a.set_xlabel("agents asked at once")
    a.set_ylabel("aggregate decode tokens/s")
    a.set_title(f"{result['model']}, {result['max_tokens']} tokens each", fontsize=10)
    a.legend(fontsize=8)
    b.plot(x, [r["ttft_ms_p50"] for r in levels], "o-", label="p50")
    b.plot(x, [r["ttft_ms_p95"] for r in levels], "s--", label="p95")
    b.set_xscale("log", base=2)
    b.set_xticks(x, [str(v) for v in x])
    b.set_xlabel("agents asked at once")
    b.set_ylabel("time to first token (ms)")
    s = result["stall"]
    b.set_title(
        f"TTFT; longest pause of a decoding agent while another reads\n"
        f"{s['reader_prompt_tokens']} tokens: {s['decoder_longest_pause_ms']:.0f} ms",
        fontsize=10,
    )
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--stall-prompt", type=int, default=4000, help="tokens of the prompt read during decoding")
    parser.add_argument("--quick", action="store_true", help="1, 2 and 4 agents only, to check the harness")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    result = anyio.run(run, args)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    stem = save(result, args.out, plot)
    print(f"model {result['model']} ({result['dtype']}, OpenBLAS: {result['openblas']}), {result['max_tokens']} tokens per reply")
    print(f"{'agents':>6}{'decode tok/s':>14}{'TTFT p50':>10}{'p95':>8}")
    for r in result["levels"]:
        print(f"{r['agents']:>6}{r['aggregate_decode_tokens_per_s']:>14.1f}{r['ttft_ms_p50']:>10.0f}{r['ttft_ms_p95']:>8.0f}")
    print(f"one after another: engine {result['sequential_engine_decode_tokens_per_s']} tok/s, "
          f"mlx_lm.generate {result['sequential_mlx_lm_decode_tokens_per_s']} tok/s")
    print(f"4 at once vs one after another: {result['speedup_4_vs_sequential']}x; replies equal: {result['batched_replies_equal_sequential']}")
    print(f"with 64-token replies: {result['short_replies']['speedup_4_vs_sequential']}x")
    s = result["stall"]
    print(f"longest pause while another agent reads {s['reader_prompt_tokens']} tokens: {s['decoder_longest_pause_ms']:.0f} ms "
          f"(its TTFT {s['reader_ttft_ms']:.0f} ms)")
    for name, ok in result["targets"].items():
        print(f"  {'met ' if ok else 'MISSED'} {name}")
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
