"""OpenBLAS goes under MLX on Linux, and its absence is explained, not silent."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mcp_semantic import blas


@pytest.mark.skipif(sys.platform != "linux", reason="MLX uses Accelerate on macOS")
def test_openblas_is_loaded_before_mlx() -> None:
    assert blas.loaded, "install.sh installs OpenBLAS; without it MLX's CPU matmuls are ~20x slower"
    maps = open("/proc/self/maps").read()
    assert "libopenblas" in maps


def test_a_missing_openblas_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blas, "loaded", None)
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.delenv("MCP_SEMANTIC_BLAS", raising=False)
    message = blas.blas_warning(on_cpu=True)
    assert "apt-get install libopenblas0-pthread" in message and "20x slower" in message
    assert blas.blas_warning(on_cpu=False) is None  # a GPU does its own matmuls


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_the_server_process_loads_it_too() -> None:
    code = "import mcp_semantic, mlx.core; from mcp_semantic import blas; print(blas.loaded)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "openblas" in out.stdout
