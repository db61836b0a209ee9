"""Models other apps already downloaded: `ollama:<name>` and `lmstudio:<name>` for `--model`.

Ollama keeps a model as content-addressed blobs under its models directory (`OLLAMA_MODELS`,
by default `~/.ollama/models`): a manifest per name and tag,
`manifests/<host>/<namespace>/<model>/<tag>`, lists the model's layers, and the layer of media
type `application/vnd.ollama.image.model` is the GGUF file, at `blobs/sha256-<hex>`. A bare
name is `registry.ollama.ai/library/<name>:latest`, as `ollama run` reads it.

LM Studio keeps GGUF files as `<publisher>/<model>/<file>.gguf` under its models folder
(`~/.lmstudio/models`, or `~/.cache/lm-studio/models` before version 0.3).

Both resolve to a GGUF file, which models.py then imports like any other. Why not their own
tools (`ollama show --modelfile`, `lms ls`): they need the apps' servers running, and the files
are all we read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

OLLAMA_HOSTS = ("registry.ollama.ai", "ollama.com")
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


class NotFound(ValueError):
    """A model name that is not there; the message lists what is."""


def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def lmstudio_roots() -> list[Path]:
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def _ollama_parts(name: str) -> tuple[tuple[str, ...], list[str], str]:
    """`name` as the hosts to look under, its path below them (namespace, model) and its tag."""
    path, _, tag = name.strip().partition(":")
    parts = [p for p in path.split("/") if p]
    if not 1 <= len(parts) <= 3 or any(p in (".", "..") for p in parts) or "/" in tag or tag in (".", ".."):
        raise NotFound(f"invalid Ollama model name {name!r}: give it as `ollama list` shows it, e.g. qwen3:4b")
    hosts = (parts.pop(0),) if len(parts) == 3 else OLLAMA_HOSTS
    return hosts, (["library", *parts] if len(parts) == 1 else parts), tag or "latest"


def ollama_models(root: Path) -> list[str]:
    """The names Ollama has, as `ollama list` shows them."""
    names = []
    for manifests in (root / "manifests", root / "manifests-v2"):
        for host in OLLAMA_HOSTS:
            base = manifests / host
            for tag in sorted(base.glob("*/*/*")) if base.is_dir() else []:
                namespace, model = tag.parent.parent.name, tag.parent.name
                names.append(f"{model if namespace == 'library' else namespace + '/' + model}:{tag.name}")
    return sorted(set(names))


def ollama_gguf(name: str, root: Path | None = None) -> Path:
    """The GGUF blob of the Ollama model `name` (e.g. `qwen3:4b`, `user/model:tag`)."""
    root = root or ollama_root()
    hosts, path, tag = _ollama_parts(name)
    for manifests in (root / "manifests", root / "manifests-v2"):
        for host in hosts:
            manifest = manifests.joinpath(host, *path, tag)
            if manifest.is_file():
                return _model_blob(root, manifest, name)
    have = ollama_models(root)
    raise NotFound(f"Ollama has no model {name!r} in {root} (OLLAMA_MODELS); "
                   + (f"it has: {', '.join(have)}" if have else "it has none (pull one with `ollama pull`)"))


def _model_blob(root: Path, manifest: Path, name: str) -> Path:
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer["mediaType"] == OLLAMA_MODEL_LAYER)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise NotFound(f"Ollama's manifest of {name!r} ({manifest}) names no GGUF model layer") from None
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise NotFound(f"Ollama's model {name!r} lacks its blob {blob}: pull it again with `ollama pull {name}`")
    return blob


def lmstudio_models(roots: list[Path]) -> list[str]:
    """The GGUF files LM Studio has, as `publisher/model/file.gguf`."""
    return sorted({str(p.relative_to(root)) for root in roots if root.is_dir() for p in root.glob("*/*/*.gguf")})


def lmstudio_gguf(name: str, roots: list[Path] | None = None) -> Path:
    """The GGUF file of LM Studio's model `name`: `publisher/model/file.gguf`, `publisher/model`
    or `model` (case-insensitive), or a file's name; a name that fits several files is an error
    listing them (give the file then)."""
    roots = roots or lmstudio_roots()
    have = lmstudio_models(roots)
    wanted = name.strip().strip("/").lower().removesuffix(".gguf")
    fits = [f for f in have if wanted in (f.lower().removesuffix(".gguf"), f.lower().rsplit("/", 1)[0],
                                          f.lower().split("/")[1], Path(f).stem.lower())]
    if len(fits) == 1:
        return next(root / fits[0] for root in roots if (root / fits[0]).is_file())
    where = " or ".join(str(r) for r in roots)
    if fits:
        raise NotFound(f"LM Studio's {name!r} is {len(fits)} files; give one: {', '.join(fits)}")
    raise NotFound(f"LM Studio has no model {name!r} in {where}; "
                   + (f"it has: {', '.join(have)}" if have else "it has none"))
