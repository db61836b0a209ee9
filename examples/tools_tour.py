"""A tour of the four tools over stdio: ask, fork, list, evict, and two refusals.

    python examples/tools_tour.py [--model M]

Prints each call and the text the host gets (structured content is there too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import anyio
from mcp import Client, StdioServerParameters

CALLS = [
    ("ask_agent", {"agent": "guide", "message": "What is the capital of France?", "system": "You are a concise travel guide.", "max_tokens": 40}),
    ("ask_agent", {"agent": "guide", "message": "Name one famous museum there.", "max_tokens": 40}),
    ("fork_agent", {"source": "guide", "agent": "guide.food"}),
    ("ask_agent", {"agent": "guide.food", "message": "What food should I try there?", "max_tokens": 40}),
    ("list_agents", {}),
    ("evict_cache", {"agent": "guide", "level": "memory"}),
    ("ask_agent", {"agent": "guide", "message": "Thanks!", "max_tokens": 20}),
    ("evict_cache", {"agent": "guide.food", "level": "disk"}),
    ("ask_agent", {"agent": "../etc/passwd", "message": "hi"}),  # refused: the name rule
    ("fork_agent", {"source": "guide", "agent": "guide.food"}),  # refused: exists
    ("evict_cache", {"level": "agent"}),
]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    server_args = ["-m", "mcp_semantic", "serve", "--cache-dir", tempfile.mkdtemp(prefix="mcp-semantic-tour-")]
    server_args += ["--log-level", "WARNING"] + (["--model", args.model] if args.model else [])
    server = StdioServerParameters(command=sys.executable, args=server_args, env=dict(os.environ))
    async with Client(server) as client:
        print("tools:", [t.name for t in (await client.list_tools()).tools])
        for tool, arguments in CALLS:
            result = await client.call_tool(tool, arguments)
            print(f"\n>>> {tool} {json.dumps(arguments)}")
            print(("ERROR: " if result.is_error else "") + result.content[0].text)


if __name__ == "__main__":
    anyio.run(main)
