"""What every benchmark writes: a JSON result named by date and machine, and its PNG plot."""

from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

RESULTS = Path(__file__).parent / "results"


def header(benchmark: str) -> dict[str, Any]:
    machine = f"{platform.system().lower()}-{platform.machine()}-{mx.default_device().type.name}"
    return {"benchmark": benchmark, "date": date.today().isoformat(), "machine": machine}


def save(result: dict[str, Any], out: Path, plot: Callable[[dict[str, Any], Path], None]) -> Path:
    """Write <out>/<date>-<machine>-<benchmark>.json and .png; return the common stem."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{result['date']}-{result['machine']}-{result['benchmark']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    return stem


def pyplot():
    """matplotlib's pyplot on the file-only backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
