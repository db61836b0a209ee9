"""`ollama:<name>` and `lmstudio:<name>`: the GGUF files those apps keep, found in fake trees
laid out as theirs are (no app is run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcp_semantic.local_models import NotFound, lmstudio_gguf, ollama_gguf, ollama_root


def ollama_tree(root: Path, name: str, blob: bytes | Path = b"GGUF...", host: str = "registry.ollama.ai",
                layers: list[str] | None = None) -> Path:
    """An Ollama models directory holding `name` (`namespace/model:tag`); returns its blob."""
    (namespace, model), tag = name.split(":")[0].split("/"), name.split(":")[1]
    digest = f"sha256:{abs(hash(name)):064x}"[:71]
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    path = blobs / digest.replace(":", "-")
    if isinstance(blob, Path):
        path.symlink_to(blob)
    else:
        path.write_bytes(blob)
    kinds = layers or ["application/vnd.ollama.image.model", "application/vnd.ollama.image.template"]
    manifest = root / "manifests" / host / namespace / model / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:" + "0" * 64},
                                    "layers": [{"mediaType": k, "digest": digest, "size": 7} for k in kinds]}))
    return path


def test_ollama_names_resolve_to_their_gguf_blobs(tmp_path: Path, monkeypatch) -> None:
    qwen = ollama_tree(tmp_path, "library/qwen3:4b")
    mine = ollama_tree(tmp_path, "me/tiny:q4")
    assert ollama_gguf("qwen3:4b", tmp_path) == qwen
    assert ollama_gguf("registry.ollama.ai/library/qwen3:4b", tmp_path) == qwen  # the full name
    assert ollama_gguf("me/tiny:q4", tmp_path) == mine
    latest = ollama_tree(tmp_path, "library/qwen3:latest")
    assert ollama_gguf("qwen3", tmp_path) == latest  # no tag: latest, as `ollama run` reads it
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    assert ollama_root() == tmp_path and ollama_gguf("qwen3:4b") == qwen


def test_ollama_names_that_are_not_there_list_what_is(tmp_path: Path) -> None:
    ollama_tree(tmp_path, "library/qwen3:4b")
    ollama_tree(tmp_path, "me/tiny:q4")
    with pytest.raises(NotFound, match=r"no model 'llama3:8b' in .*it has: me/tiny:q4, qwen3:4b"):
        ollama_gguf("llama3:8b", tmp_path)
    with pytest.raises(NotFound, match="it has none"):
        ollama_gguf("qwen3:4b", tmp_path / "empty")
    with pytest.raises(NotFound, match="invalid Ollama model name"):
        ollama_gguf("../../etc:passwd", tmp_path)
    ollama_tree(tmp_path, "library/adapter:1", layers=["application/vnd.ollama.image.adapter"])
    with pytest.raises(NotFound, match="names no GGUF model layer"):
        ollama_gguf("adapter:1", tmp_path)
    ollama_gguf("qwen3:4b", tmp_path).unlink()
    with pytest.raises(NotFound, match="lacks its blob .* `ollama pull qwen3:4b`"):
        ollama_gguf("qwen3:4b", tmp_path)


def test_lmstudio_names_resolve_to_their_files_and_an_ambiguous_one_lists_them(tmp_path: Path) -> None:
    old, new = tmp_path / "cache", tmp_path / "lmstudio"
    for root, file in ((new, "pub/Repo-GGUF/repo.Q4_K_M.gguf"), (new, "pub/Repo-GGUF/repo.Q8_0.gguf"),
                       (old, "other/Solo/solo.gguf")):
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_bytes(b"GGUF...")
    roots = [new, old]
    assert lmstudio_gguf("Solo", roots) == old / "other/Solo/solo.gguf"
    assert lmstudio_gguf("other/solo", roots) == old / "other/Solo/solo.gguf"  # case-insensitive
    assert lmstudio_gguf("repo.Q8_0", roots) == new / "pub/Repo-GGUF/repo.Q8_0.gguf"
    assert lmstudio_gguf("pub/Repo-GGUF/repo.Q4_K_M.gguf", roots) == new / "pub/Repo-GGUF/repo.Q4_K_M.gguf"
    with pytest.raises(NotFound, match=r"is 2 files; give one: pub/Repo-GGUF/repo.Q4_K_M.gguf, pub/Repo-GGUF/repo.Q8_0.gguf"):
        lmstudio_gguf("pub/repo-gguf", roots)
    with pytest.raises(NotFound, match="no model 'nothing' in .*it has: other/Solo/solo.gguf, pub/"):
        lmstudio_gguf("nothing", roots)


@pytest.mark.anyio
async def test_a_server_runs_an_ollama_model_by_name(tmp_path: Path) -> None:
    """`--model ollama:<name>` end to end: the blob imported once, then served over stdio; a name
    Ollama lacks stops the server at start with the names it has."""
    import os
    import subprocess
    import sys

    from mcp import Client, StdioServerParameters

    from conftest import serve_args
    from mcp_semantic.models import default_gguf_path
    from mcp_semantic.settings import Settings

    root = tmp_path / "ollama"
    ollama_tree(root, "library/smollm2:135m", blob=default_gguf_path(tmp_path / "cache"))
    settings = Settings(model="ollama:smollm2:135m", cache_dir=tmp_path / "cache")
    env = {**os.environ, "OLLAMA_MODELS": str(root)}
    params = StdioServerParameters(command=sys.executable, args=serve_args(settings), env=env)
    async with Client(params) as client:
        result = await client.call_tool("ask_agent", {"agent": "o", "message": "Hi.", "max_tokens": 4})
        assert not result.is_error, result.content
    assert any(p.name.startswith("ollama-smollm2_135m-") for p in (tmp_path / "cache" / "models").iterdir())
    missing = settings.model_copy(update={"model": "ollama:llama3:8b"})
    out = subprocess.run([sys.executable, *serve_args(missing)], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Ollama has no model 'llama3:8b'" in out.stderr and "smollm2:135m" in out.stderr


def test_an_lmstudio_model_resolves_and_imports(tmp_path: Path, monkeypatch) -> None:
    from mcp_semantic import local_models
    from mcp_semantic.models import ModelError, default_gguf_path, resolve_model_dir

    root = tmp_path / "lmstudio"
    file = root / "bartowski" / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct-Q4_1.gguf"
    file.parent.mkdir(parents=True)
    file.symlink_to(default_gguf_path(tmp_path / "cache"))
    monkeypatch.setattr(local_models, "lmstudio_roots", lambda: [root])
    model_dir = resolve_model_dir("lmstudio:SmolLM2-135M-Instruct-GGUF", tmp_path / "cache")
    assert (model_dir / "config.json").is_file() and model_dir.name.startswith("lmstudio-SmolLM2-135M-Instruct-GGUF-")
    with pytest.raises(ModelError, match="LM Studio has no model 'qwen3' .*it has: bartowski/SmolLM2"):
        resolve_model_dir("lmstudio:qwen3", tmp_path / "cache")
