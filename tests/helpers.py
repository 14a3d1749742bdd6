"""Helpers shared by tests and benchmarks: compare weights, write space files, run the README's CI job."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from qnas_cli.checkpoint import load_weights
from qnas_cli.space import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def supernet_weights(run: Path, name: str = "supernet.pt") -> dict[str, torch.Tensor]:
    """The trained tensors of ``RUN/supernet.pt`` (or another weights file of the run)."""
    return load_weights(Path(run) / name)[0]["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit for bit, tensor by tensor (the failing tensor is named)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def space_doc(**change: Any) -> dict[str, Any]:
    """The tiny preset as a space document; ``stage_X=v`` edits stage 0's field X, other keys the top level."""
    doc = json.loads(json.dumps(PRESETS["tiny"].to_dict()))
    for key, value in change.items():
        if key.startswith("stage_"):
            doc["stages"][0][key[6:]] = value
        else:
            doc[key] = value
    return doc


def readme_ci_job() -> str:
    """The bash job of the README section "In a CI pipeline", exactly as written there."""
    section = (ROOT / "README.md").read_text().split("## In a CI pipeline", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


def run_ci_job(cwd: Path, subnet: Path, out: Path, qnas: str | None = None) -> subprocess.CompletedProcess:
    """Run the README's CI job in ``cwd`` with ``qnas`` and ``python`` on PATH.

    ``qnas`` is this checkout's CLI unless a shell-script body stands in for it.
    """
    bin_dir = Path(cwd) / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    body = qnas or f'PYTHONPATH="{ROOT}" exec "{sys.executable}" -m qnas_cli "$@"'
    for name, text in (("qnas", body), ("python", f'exec "{sys.executable}" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SUBNET": str(subnet), "OUT": str(out)}
    return subprocess.run(["bash", "-c", readme_ci_job()], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
