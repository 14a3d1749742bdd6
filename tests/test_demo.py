"""`python -m qnas_cli.demo`: a user's mistake is exit 2 and one line, as in the qnas CLI, before any work."""
from __future__ import annotations

import subprocess
import sys

import pytest

from qnas_cli.demo import app


def _refused(r) -> str:
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["--population", "0"], "--population"),
    (["--generations", "-1"], "--generations"),
    (["--eval-images", "0"], "--eval-images"),
    (["--finetune-steps", "-1"], "--finetune-steps"),
    ([], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(runner, tmp_path, args, says):
    r = runner.invoke(app, [str(tmp_path / "missing.pt"), "--out", str(tmp_path / "demo"), *args])
    assert says in _refused(r)
    assert not (tmp_path / "demo").exists()


def test_the_module_as_the_readme_runs_it(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qnas_cli.demo", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "missing.pt" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
