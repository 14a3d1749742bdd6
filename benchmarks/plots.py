"""Figures of the benchmark scripts: matplotlib without a display, written atomically."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed: CI, SSH sessions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """``fig`` (laid out tight) to ``path`` via a temporary file: never a half-written PNG."""
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
