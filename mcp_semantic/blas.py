"""Put OpenBLAS under MLX on Linux before MLX loads.

Why: the Linux `mlx[cpu]` wheel links a bundled reference BLAS that multiplies
float32 matrices at about 8 GFLOP/s; with the system's OpenBLAS loaded first
(RTLD_GLOBAL, so its `cblas_*` symbols win) the same matmul runs at about 250.
PyPI has no OpenBLAS build that exports plain `cblas_*` names and runs on every
x86 CPU (`cmeel-openblas` dies with an illegal instruction on some), so we use
the distribution's package and say clearly when it is missing. macOS builds of
MLX use Accelerate and Metal, and need none of this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

INSTALL_HINT = (
    "install OpenBLAS (Debian/Ubuntu: `sudo apt-get install libopenblas0-pthread`, "
    "Fedora: `sudo dnf install openblas-threads`) and restart; without it MLX's CPU "
    "matmuls are about 20x slower"
)

# The first that loads wins; the Debian/Ubuntu pthread build comes first.
_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblasp.so.0",
)

loaded: str | None = None
"""The OpenBLAS library that was loaded, or None."""


def preload_openblas() -> str | None:
    """Load OpenBLAS with global symbols if this is Linux and MLX is not loaded yet.

    `MCP_SEMANTIC_BLAS=bundled` skips it (to compare, or if a system BLAS misbehaves).
    """
    global loaded
    if loaded or sys.platform != "linux" or os.environ.get("MCP_SEMANTIC_BLAS") == "bundled":
        return loaded
    if "mlx.core" in sys.modules:
        return None
    found = ctypes.util.find_library("openblas")
    for name in ((found,) if found else ()) + _CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        break
    return loaded


def blas_warning(on_cpu: bool) -> str | None:
    """A message for the log when MLX computes on a Linux CPU without OpenBLAS."""
    if not on_cpu or sys.platform != "linux" or loaded:
        return None
    if os.environ.get("MCP_SEMANTIC_BLAS") == "bundled":
        return "MCP_SEMANTIC_BLAS=bundled: using MLX's bundled reference BLAS (slow)"
    return f"OpenBLAS was not found: {INSTALL_HINT}"
