"""KV block precision: bytes in memory and on disk, and how far a resumed agent's predictions move.

For each --kv-bits (lossless, 16, 8, 4) on the default model: a ~1,000-token conversation
is prefilled, cut into blocks of 256 tokens at that precision, committed to a store, read
back from the block files, rebuilt into a cache, and then reads the same continuation of a
few hundred tokens (teacher forcing). Its next-token distributions are compared with those
of the lossless round trip: mean and max KL divergence, and top-1 agreement.

    python benchmarks/bench_kv_bits.py [--model M] [--context 1000] [--continuation 256]

Writes benchmarks/results/<date>-<machine>-kv-bits.json and .png, and prints a table.
--kv-bits shrinks the blocks both on disk and in memory: the pool holds them as stored
(quantized at 8 and 4 bits), and only the working cache of the running call is built in the
model's dtype. Both sizes are reported per token, and the working cache's for comparison.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import mcp_semantic  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from report import RESULTS, header, pyplot, save

from mcp_semantic.block_pool import BLOCK_TOKENS, Storage, array_names, cut_blocks
from mcp_semantic.cache_build import reconstruct
from mcp_semantic.cache_kinds import probe
from mcp_semantic.models import load_model
from mcp_semantic.settings import DEFAULT_MODEL
from mcp_semantic.block_files import host_block
from mcp_semantic.store import KVRecord
from mcp_semantic.sqlite_store import SQLiteStore

MODES = [None, 16, 8, 4]
CONTEXT = (
    "The river town of Millbrook grew around a mill built in 1821. Its water wheel ground wheat for farms "
    "along the valley, and barges carried flour downstream to the port. In 1888 a flood broke the dam, and "
    "the town rebuilt it in stone. The railway arrived in 1902 and the barges slowly disappeared. "
)
CONTINUATION = (
    "Walkers who follow the towpath today pass the old lock keeper's cottage, a row of willows planted "
    "after the flood, and the iron bridge that carried the first trains across the water. In summer the "
    "lake behind the dam fills with small boats, and the museum opens the mill's upper floor, where the "
    "grinding stones still stand. Children are shown how the wheel turned the shafts and gears, and how "
    "the miller judged the flour by rubbing it between finger and thumb. "
)


def mode_name(bits: int | None) -> str:
    return "lossless" if bits is None else f"{bits}-bit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--context", type=int, default=1000, help="approximate context tokens")
    parser.add_argument("--continuation", type=int, default=256, help="tokens read after the resume")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mcp-semantic-kvbits-"))
    lm = load_model(args.model, work)
    tok = lm.tokenizer
    n_doc = max(1, round(args.context / len(tok.encode(CONTEXT))))
    messages = [{"role": "system", "content": "Answer from this document.\n\n" + CONTEXT * n_doc}]
    messages.append({"role": "user", "content": "Describe a walk through the town today."})
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True))
    follow = tok.encode(CONTINUATION * 4)[: args.continuation]

    cache = make_prompt_cache(lm.model)
    for i in range(0, len(prompt), 512):
        lm.model(mx.array(prompt[i : i + 512])[None], cache=cache)
        mx.eval([c.state for c in cache])

    layout = probe(lm.model)
    logprobs = {}
    rows = []
    for bits in MODES:
        name = mode_name(bits)
        storage = Storage(lm.fingerprint, lm.dtype, bits)
        blocks = cut_blocks(layout, cache, prompt, storage, BLOCK_TOKENS)
        memory = sum(b.nbytes for b in blocks)  # as the pool holds them
        store = SQLiteStore(work / name)  # a store of its own: the sizes on disk are this precision's only
        written = store.commit_kv("agent", KVRecord([b.id for b in blocks], prompt), [host_block(b) for b in blocks], storage)
        size = sum(store.blocks.path(b.id).stat().st_size for b in blocks)
        assert written == size, (written, size)
        del blocks
        start = time.perf_counter()
        loaded = []
        for bid in store.kv_record("agent").blocks:
            block, problem = store.blocks.read_block(bid, storage, array_names(layout, storage))
            assert block is not None, problem
            loaded.append(block)
        kv = reconstruct(layout, storage, loaded, len(prompt), len(prompt) + len(follow), BLOCK_TOKENS)  # evaluated: the read is done
        load_ms = (time.perf_counter() - start) * 1000
        store.close()
        per_slot = sum(c.keys.nbytes + c.values.nbytes for c in kv) / kv[0].keys.shape[2]  # the model's dtype
        logits = lm.model(mx.array(follow)[None], cache=kv)[0].astype(mx.float32)
        logprobs[name] = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(logprobs[name])
        ref = logprobs["lossless"]
        kl = mx.sum(mx.exp(ref) * (ref - logprobs[name]), axis=-1)
        top1 = mx.mean(mx.argmax(ref, axis=-1) == mx.argmax(logprobs[name], axis=-1))
        rows.append(
            {
                "kv_bits": name,
                "blocks": len(loaded),
                "file_bytes": size,
                "block_bytes": memory,
                "disk_bytes_per_token": round(size / len(prompt)),
                "memory_bytes_per_token": round(memory / len(prompt)),
                "working_cache_bytes_per_token": round(per_slot),
                "load_ms": round(load_ms, 1),
                "kl_mean": float(mx.mean(kl).item()),
                "kl_max": float(mx.max(kl).item()),
                "top1_agreement": float(top1.item()),
            }
        )
    shutil.rmtree(work, ignore_errors=True)  # the imported model and a store per precision

    result = {
        **header("kv-bits"),
        "model": lm.name,
        "dtype": lm.dtype,
        "context_tokens": len(prompt),
        "continuation_tokens": len(follow),
        "block_tokens": BLOCK_TOKENS,
        "modes": rows,
    }
    stem = save(result, args.out, plot)
    print(f"{lm.name} ({lm.dtype}), {len(prompt)} tokens of context, {len(follow)} tokens read after the resume")
    print(f"{'kv-bits':10}{'memory B/token':>16}{'disk B/token':>14}{'load ms':>9}{'KL mean':>11}{'KL max':>10}{'top-1':>8}")
    for r in rows:
        print(
            f"{r['kv_bits']:10}{r['memory_bytes_per_token']:>16,}{r['disk_bytes_per_token']:>14,}{r['load_ms']:>9.0f}"
            f"{r['kl_mean']:>11.2e}{r['kl_max']:>10.2e}{r['top1_agreement']:>8.1%}"
        )
    print(f"wrote {stem}.json and .png")


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    rows = result["modes"]
    names = [r["kv_bits"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = range(len(rows))
    a.bar([i - 0.2 for i in x], [r["memory_bytes_per_token"] / 1024 for r in rows], 0.4, color="#48c", label="blocks in memory")
    a.bar([i + 0.2 for i in x], [r["disk_bytes_per_token"] / 1024 for r in rows], 0.4, color="#8ac", label="block files")
    a.axhline(rows[0]["working_cache_bytes_per_token"] / 1024, color="#999", linestyle="--", label="working cache")
    a.set_xticks(list(x), names)
    a.set_ylabel("KiB per token")
    a.set_title("KV block size")
    a.legend(fontsize=8)
    b.bar(names, [max(r["kl_mean"], 1e-12) for r in rows], color="#c84")
    b.set_yscale("log")
    b.set_ylabel("mean KL vs lossless (nats)")
    b.set_title(f"divergence over {result['continuation_tokens']} tokens")
    for i, r in enumerate(rows):
        label = f"top-1 {r['top1_agreement']:.1%}" if r["kl_mean"] > 0 else "exact (KL 0)"
        b.text(i, max(r["kl_mean"], 1e-12), label, ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{result['model']}: {result['context_tokens']}-token context", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
