"""`mcp-semantic` flags, environment variables and their errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mcp_semantic import __version__
from mcp_semantic.cli import build_parser, main
from mcp_semantic.settings import Settings


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "mcp_semantic", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"mcp-semantic {__version__}"


def test_help_names_every_flag_and_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["serve", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text and "MCP_SEMANTIC_" + name.upper() in text


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SEMANTIC_PORT", "9001")
    monkeypatch.setenv("MCP_SEMANTIC_MEMORY_BUDGET", "2GiB")
    assert Settings().port == 9001 and Settings().memory_budget == 2 * 1024**3
    assert Settings(port=9002).port == 9002  # a flag wins over the variable


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--port", "http"], "port"),
        (["serve", "--port", "0"], "port"),
        (["serve", "--memory-budget", "lots"], "memory_budget"),
        (["serve", "--transport", "carrier-pigeon"], "transport"),
        (["serve", "--block-tokens", "3"], "block_tokens"),
        (["serve", "--kv-bits", "2"], "--kv-bits"),
    ],
)
def test_bad_flags_say_which(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main([])
    assert exit.value.code == 2 and "serve" in capsys.readouterr().err


def test_a_bad_model_stops_the_server_before_it_serves(tmp_path) -> None:
    args = [sys.executable, "-m", "mcp_semantic", "serve", "--model", str(tmp_path / "nope.gguf"), "--cache-dir", str(tmp_path)]
    out = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert out.returncode == 1 and "does not exist" in out.stderr and out.stdout == ""


def test_a_model_whose_cache_kind_is_not_kept_stops_the_server_naming_both(tmp_path, monkeypatch) -> None:
    """No such model ships with mlx-lm today; one that makes a cache we cannot keep must never reach
    its first ask_agent: the server exits at start, naming the model type and the cache kind."""
    from mlx_lm.models import gemma3_text
    from mlx_lm.models.cache import RotatingKVCache

    from mcp_semantic.server import serve
    from mcp_semantic.settings import Settings
    from mcp_semantic.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "gemma", model_type="gemma3_text")
    monkeypatch.setattr(gemma3_text.Model, "make_cache", lambda self: [RotatingKVCache(24, keep=4) for _ in self.layers])
    with pytest.raises(SystemExit) as exit:
        serve(Settings(model=str(model), cache_dir=tmp_path / "cache"))
    assert "model type 'gemma3_text' makes a RotatingKVCache(keep=4) cache" in str(exit.value.code)
