"""Build mcp-semantic as an MCP Bundle (`.mcpb`), the one-file install of Claude Desktop.

    python examples/build_mcpb.py [--out dist]

It stages the bundle in `<out>/mcpb/`: `manifest.json` (server type `uv`: Claude Desktop runs
`uv run` in the bundle, which installs the dependencies of its `pyproject.toml`), the package and
its `pyproject.toml`. Then, where Node is installed, it validates the manifest and packs
`<out>/mcp-semantic-<version>.mcpb` with the official CLI (`npx @anthropic-ai/mcpb`). The
user's settings (model, cache dir, memory budget) are the bundle's user configuration, passed to
the server as its `MCP_SEMANTIC_*` variables. On Linux, OpenBLAS stays a system step (README).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mcp_semantic import __version__  # noqa: E402
from mcp_semantic.settings import DEFAULT_MODEL  # noqa: E402

MCPB = ["npx", "-y", "@anthropic-ai/mcpb@2"]


def manifest() -> dict:
    """The bundle's manifest (MCPB manifest 0.4)."""
    return {
        "manifest_version": "0.4",
        "name": "mcp-semantic",
        "display_name": "mcp-semantic: local agents that remember",
        "version": __version__,
        "description": "Local LLM agents whose KV caches persist, so a resumed agent reads only its new message.",
        "author": {"name": "mcp-semantic developers"},
        "license": "Apache-2.0",  # pyproject.toml's
        "keywords": ["local-llm", "agents", "kv-cache", "mlx"],
        "server": {
            "type": "uv",
            "entry_point": "mcp_semantic/__main__.py",
            "mcp_config": {
                "command": "uv",
                "args": ["run", "--directory", "${__dirname}", "mcp-semantic", "serve"],
                "env": {
                    "MCP_SEMANTIC_MODEL": "${user_config.model}",
                    "MCP_SEMANTIC_CACHE_DIR": "${user_config.cache_dir}",
                    "MCP_SEMANTIC_MEMORY_BUDGET": "${user_config.memory_budget}",
                },
            },
        },
        "tools": [
            {"name": "ask_agent", "description": "Send a message to a named local agent and get its reply"},
            {"name": "fork_agent", "description": "Branch an agent's conversation, all of it or up to a turn"},
            {"name": "list_agents", "description": "List the agents and where their caches are"},
            {"name": "evict_cache", "description": "Free an agent's cache from memory or disk, or forget it"},
        ],
        "user_config": {
            "model": {
                "type": "string", "title": "Model", "required": False, "default": DEFAULT_MODEL,
                "description": "The default model, a .gguf file, ollama:<name>, lmstudio:<name>, an mlx-lm "
                               "directory or a Hugging Face repo id",
            },
            "cache_dir": {
                "type": "directory", "title": "Cache directory", "required": False,
                "default": "${HOME}/.cache/mcp-semantic",
                "description": "Where models, transcripts and KV caches are kept",
            },
            "memory_budget": {
                "type": "string", "title": "Memory budget", "required": False, "default": "2GiB",
                "description": "Memory for KV caches kept hot, e.g. 2GiB",
            },
        },
        "compatibility": {"platforms": ["darwin", "linux"], "runtimes": {"python": ">=3.11"}},
    }


def stage(out: Path) -> Path:
    """The bundle's files in `out/mcpb`: manifest, package, pyproject.toml, README."""
    bundle = out / "mcpb"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    shutil.copytree(ROOT / "mcp_semantic", bundle / "mcp_semantic", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(manifest(), indent=2) + "\n")
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    args = parser.parse_args()
    bundle = stage(args.out)
    print(f"staged {bundle}")
    if shutil.which("npx") is None:
        print("Node's npx is not installed: validate and pack it with `npx @anthropic-ai/mcpb pack` where it is")
        return
    subprocess.run([*MCPB, "validate", str(bundle / "manifest.json")], check=True)
    target = args.out / f"mcp-semantic-{__version__}.mcpb"
    subprocess.run([*MCPB, "pack", str(bundle), str(target)], check=True)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
