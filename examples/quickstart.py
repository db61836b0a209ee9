"""Quickstart: an MCP client that starts mcp-semantic over stdio, talks to an agent,
restarts the server, and talks to the same agent again, which resumes from disk.

    python examples/quickstart.py                       # the default model
    python examples/quickstart.py --model ./some-mlx-dir --cache-dir /tmp/qs

Prints the cache tier and the time to first token of each call.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import anyio
from mcp import Client, StdioServerParameters


async def ask(client: Client, agent: str, message: str, **extra: object) -> None:
    result = await client.call_tool("ask_agent", {"agent": agent, "message": message, "max_tokens": 64, **extra})
    if result.is_error:
        sys.exit(f"error: {result.content[0].text}")
    out = result.structured_content
    t = out["tokens"]
    print(f"> {message}")
    print(
        f"  tier={out['tier']:<4} ttft={out['timings_ms']['ttft']:7.0f} ms  "
        f"cached={t['cached']}/{t['context']} tokens  prefilled={t['prefilled']}"
    )
    print(f"  {out['reply'].strip()}\n")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model for the server (default: its default)")
    parser.add_argument("--cache-dir", default=None, help="cache dir (default: a fresh temporary one)")
    args = parser.parse_args()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="mcp-semantic-quickstart-")
    server_args = ["-m", "mcp_semantic", "serve", "--cache-dir", cache_dir, "--log-level", "WARNING"]
    if args.model:
        server_args += ["--model", args.model]
    server = StdioServerParameters(command=sys.executable, args=server_args, env=dict(os.environ))

    print(f"starting the server (cache dir {cache_dir})\n")
    async with Client(server) as client:
        await ask(client, "guide", "What is the capital of France?", system="You are a concise travel guide.")
        await ask(client, "guide", "Name one famous museum there.")
    print("restarting the server: the agent's KV cache comes back from disk\n")
    async with Client(server) as client:
        await ask(client, "guide", "What is a good time of year to visit?")
        listed = await client.call_tool("list_agents", {})
        print(listed.content[0].text)


if __name__ == "__main__":
    anyio.run(main)
