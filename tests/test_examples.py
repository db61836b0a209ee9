"""The example scripts run end to end against a generated model; their output is checked, not their timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_mcp_bundle_s_manifest_is_valid_and_its_settings_are_the_server_s(tmp_path: Path) -> None:
    """examples/build_mcpb.py: each user setting reaches a `serve` setting by its variable, its
    default is one `serve` takes, and the official CLI validates the manifest where Node is."""
    import importlib.util
    import json
    import shutil

    from mcp_semantic.settings import Settings

    spec = importlib.util.spec_from_file_location("build_mcpb", Path(__file__).parent.parent / "examples" / "build_mcpb.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    bundle = build.stage(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (bundle / "mcp_semantic" / "__main__.py").is_file() and (bundle / "pyproject.toml").is_file()
    env = manifest["server"]["mcp_config"]["env"]
    settings = {}
    for var, value in env.items():
        (key,) = re.fullmatch(r"\$\{user_config\.(\w+)\}", value).groups()
        default = manifest["user_config"][key]["default"].replace("${HOME}", str(tmp_path))
        settings[var.removeprefix("MCP_SEMANTIC_").lower()] = default
    Settings(**settings)  # every variable names a setting, every default is one it takes
    if shutil.which("npx") is None:
        pytest.skip("Node's npx is not installed: the official validator cannot run")
    out = subprocess.run([*build.MCPB, "validate", str(bundle / "manifest.json")], capture_output=True, text=True,
                         timeout=300)
    if out.returncode and re.search(r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|network", out.stderr):
        pytest.skip(f"npm cannot fetch the validator here: {out.stderr[-300:]}")
    assert out.returncode == 0 and "validation passes" in out.stdout, out.stdout + out.stderr
