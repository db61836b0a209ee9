"""`mcp-semantic serve`: every Settings field is a flag, and an MCP_SEMANTIC_* variable."""

from __future__ import annotations

import argparse
import logging
import sys
import typing

from pydantic import ValidationError

from mcp_semantic import __version__
from mcp_semantic.settings import Settings

EPILOG = """\
examples:
  mcp-semantic serve                                  # stdio, default model (SmolLM2-135M-Instruct)
  mcp-semantic serve --transport streamable-http      # http://127.0.0.1:8765/mcp
  mcp-semantic serve --model ./my-mlx-model --cache-dir /tmp/agents

Every flag can also be set by its environment variable, e.g. MCP_SEMANTIC_CACHE_DIR.
Flags win over variables. Logs go to stderr; stdout belongs to the stdio transport."""


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "MCP_SEMANTIC_" + name.upper()
        default = field.default_factory() if field.default_factory else field.default
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            choices=choices,
            metavar=None if choices else name.upper(),
            help=f"{field.description} (env {env}; default {default})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-semantic",
        description="An MCP server of local LLM agents that remember: each agent's KV cache persists "
        "in safetensors, so a resumed conversation skips the prefill of its history.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mcp-semantic {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="start the MCP server", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_setting_flags(serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        sys.exit(2)
    flags = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    try:
        settings = Settings(**flags)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        parser.error(f"invalid settings: {problems}")
    logging.basicConfig(
        level=settings.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from mcp_semantic.server import serve  # imports MLX: after the flags are known good

    try:
        serve(settings)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, after the lifespan has saved every cache
        logging.getLogger("mcp_semantic").info("stopped")
