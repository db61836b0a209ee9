"""Delegate: what a coding assistant does with mcp-semantic. It hands parts of one task to
three local sub-agents that share a long brief, asks them in parallel, branches one of them,
and shows where every answer's KV cache came from.

    .venv/bin/python examples/delegate.py                        # the default model, a fresh temporary cache dir
    .venv/bin/python examples/delegate.py --model ./some-mlx-dir --cache-dir /tmp/delegate

What it shows:
  1. `planner` reads the shared system prompt (a few hundred words on a small codebase) first:
     tier `new`, everything prefilled.
  2. `planner`, `tester` and `reviewer` are then asked at once (an anyio task group; the server
     batches calls to different agents). `tester` and `reviewer` are new agents, yet their first
     call reuses the planner's KV blocks of the shared prompt: `cached` > 0 on their very first
     call. The planner goes on from its own cache.
  3. `reviewer` is forked into `reviewer.strict` (no KV is copied) and the fork is asked for an
     alternative: it starts from the reviewer's whole conversation.
  4. `list_agents`' memory figures: hit rate, cached-token rate, blocks in memory and on disk.

For every answer it prints the agent, the cache tier, cached/context tokens, the time to first
token and the reply (trimmed). Replies are kept short (max_tokens 48); the default model is a
135M one, so expect fluent rather than wise answers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap

import anyio
from mcp import Client, StdioServerParameters

MAX_TOKENS = 48

BRIEF = """\
You are one of several assistants working on the same small Python codebase. Read this brief \
carefully; every question you get is about it. Answer in a few short sentences.

The project is "shortlink", a URL shortener used inside one company. It has four modules.
- shortlink/models.py defines Link, a dataclass with fields code (a string of 7 letters and \
digits), target (the full URL), owner (an email address), created_at (a UTC datetime) and \
clicks (an int). Codes are made by encoding a random 40-bit number in base 62.
- shortlink/store.py keeps links in SQLite, in one table named links with code as its primary \
key. It has create(link), get(code), delete(code), increment_clicks(code) and \
list_by_owner(owner). Every function opens its own connection; there is no connection pool.
- shortlink/app.py is a small Flask app. POST /links takes JSON with a target URL and returns \
the new code. GET /<code> redirects to the target with status 302 and increments the click \
count. DELETE /links/<code> deletes a link if the caller owns it. GET /links lists the \
caller's links. The caller is known from the X-User header that the company proxy sets.
- shortlink/validate.py checks target URLs: only http and https, at most 2048 characters, and \
no hosts on the internal blocklist.

The tests live in tests/, use pytest, and run against a temporary SQLite file. There are tests \
for create and get, for the redirect, and for the URL checks, but none for delete, for \
list_by_owner, or for concurrent clicks.

The task for this week: links must be able to expire. A caller may pass expires_in_days (an \
integer from 1 to 365) when creating a link; links created without it never expire. GET on an \
expired code must return 410 Gone instead of redirecting, and must not count a click. Expired \
links are kept for 30 days, so that their owners can still see them in GET /links, marked as \
expired, and are then deleted by a nightly job. Existing links in the database have no expiry \
and must keep working without a manual migration step.

The team cares about three things: no broken redirects for existing links, a schema change \
that can be rolled back, and tests for every new branch. Keep answers concrete: name files, \
functions, columns and status codes."""

FIRST = ("planner", "In one short list, which files change for the expiry task, and in what order?")
PARALLEL = [
    ("planner", "Which part is riskiest to change, and why?"),
    ("tester", "Name three pytest tests for the expiry task, one line each."),
    ("reviewer", "What would you check first when reviewing the change to the redirect in app.py?"),
]
FORK = ("reviewer", "reviewer.strict")
ALTERNATIVE = "Now review it strictly instead: give one reason to reject the change, and what would fix it."


def trimmed(text: str, width: int = 200) -> str:
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ...") or "(empty reply)"


async def ask(client: Client, agent: str, message: str) -> None:
    """Ask one agent (with the shared brief as its system prompt) and print the answer."""
    arguments = {"agent": agent, "message": message, "system": BRIEF, "max_tokens": MAX_TOKENS}
    result = await client.call_tool("ask_agent", arguments)
    if result.is_error:
        sys.exit(f"error from {agent}: {result.content[0].text}")
    out = result.structured_content
    t = out["tokens"]
    print(
        f"[{out['agent']}] tier={out['tier']:<4} cached={t['cached']}/{t['context']} tokens  "
        f"ttft={out['timings_ms']['ttft']:.0f} ms\n"
        f"  Q: {message}\n"
        f"  A: {trimmed(out['reply'])}\n"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model for the server (default: its default)")
    parser.add_argument("--cache-dir", default=None, help="cache dir (default: a fresh temporary one)")
    args = parser.parse_args()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="mcp-semantic-delegate-")
    server_args = ["-m", "mcp_semantic", "serve", "--cache-dir", cache_dir, "--log-level", "WARNING"]
    if args.model:
        server_args += ["--model", args.model]
    server = StdioServerParameters(command=sys.executable, args=server_args, env=dict(os.environ))

    print(f"starting the server (cache dir {cache_dir})\n")
    async with Client(server) as client:
        print("== 1. the planner reads the shared brief first\n")
        await ask(client, *FIRST)

        print("== 2. three sub-agents at once: tester and reviewer reuse the planner's blocks of the brief\n")
        async with anyio.create_task_group() as tg:
            for agent, message in PARALLEL:
                tg.start_soon(ask, client, agent, message)

        source, fork = FORK
        print(f"== 3. fork {source} -> {fork}, and ask the fork for an alternative\n")
        forked = await client.call_tool("fork_agent", {"source": source, "agent": fork})
        if forked.is_error:
            sys.exit(f"error: {forked.content[0].text}")
        await ask(client, fork, ALTERNATIVE)

        await anyio.sleep(1.0)  # the server saves blocks to disk once idle for half a second
        listed = await client.call_tool("list_agents", {})
        agents = listed.structured_content["agents"]
        memory = listed.structured_content["memory"]
        print("== 4. list_agents")
        for a in agents:
            parent = f" (fork of {a['parent']})" if a["parent"] else ""
            print(f"  {a['name']:<16} tier={a['tier']:<4} tokens={a['tokens']:<5} blocks={a['blocks']}{parent}")
        print(
            f"  memory: hit_rate={memory['hit_rate']}  cached_token_rate={memory['cached_token_rate']}  "
            f"blocks_in_memory={memory['blocks_in_memory']}  blocks_on_disk={memory['blocks_on_disk']}  "
            f"({memory['block_tokens']} tokens a block)"
        )


if __name__ == "__main__":
    anyio.run(main)
