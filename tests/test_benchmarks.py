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
    assert set(data["targets"]) == {
        "prefill_512_at_least_120_tokens_per_s",
        "disk_resume_at_least_25x_cold",
        "disk_within_1.5x_hot",
    }
    assert result.with_suffix(".png").stat().st_size > 0
