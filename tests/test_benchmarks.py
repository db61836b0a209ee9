"""The benchmark scripts run end to end (on a generated model) and write complete results; no timing is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert data["sharing"]["forks_disk_bytes"] < data["sharing"]["separate_agents_disk_bytes"]
    assert max(data["budget"]["used_bytes"]) <= data["budget"]["budget_bytes"]


def test_blocks_benchmark_quick(tmp_path: Path) -> None:
    data = run_benchmark("bench_blocks.py", tmp_path, "--quick", "--repeats", "3")
    assert [c["case"] for c in data["cases"]] == ["SmolLM2-135M 1x12", "SmolLM2-135M 4x24"]


def test_kv_bits_benchmark_on_a_generated_model(tmp_path: Path) -> None:
    from mcp_semantic.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "m64", hidden_size=128, num_heads=2, num_kv_heads=1)  # head_dim 64
    data = run_benchmark("bench_kv_bits.py", tmp_path / "out", "--model", str(model), "--context", "200", "--continuation", "32")
    modes = {m["kv_bits"]: m for m in data["modes"]}
    assert set(modes) == {"lossless", "16-bit", "8-bit", "4-bit"} and modes["lossless"]["kl_mean"] == 0
    assert modes["4-bit"]["disk_bytes_per_token"] < modes["8-bit"]["disk_bytes_per_token"] < modes["lossless"]["disk_bytes_per_token"]
