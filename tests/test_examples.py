"""The example scripts run end to end against a generated model; their output is checked, not their timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"

ANSWER = re.compile(r"^\[(\S+)\] tier=(\w+)\s+cached=(\d+)/(\d+) tokens", re.M)


def test_delegate_asks_three_agents_and_a_fork(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache")]
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "delegate.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    answers = [(agent, tier, int(cached), int(context)) for agent, tier, cached, context in ANSWER.findall(out.stdout)]
    assert sorted(a[0] for a in answers) == ["planner", "planner", "reviewer", "reviewer.strict", "tester"], out.stdout
    assert answers[0][:3] == ("planner", "new", 0), out.stdout  # the first call reads the shared brief
    for agent, tier, cached, context in answers[1:]:  # the others reuse blocks: their own, the brief's, the fork's source's
        assert tier == "hot" and 0 < cached < context, out.stdout
    listing = out.stdout.split("== 4. list_agents")[1]
    for agent in ("planner", "tester", "reviewer", "reviewer.strict"):
        assert re.search(rf"^  {re.escape(agent)} +tier=(hot|disk)", listing, re.M), listing
    assert re.search(r"hit_rate=\S+\s+cached_token_rate=\S+\s+blocks_in_memory=\d+\s+blocks_on_disk=\d+", listing), listing
