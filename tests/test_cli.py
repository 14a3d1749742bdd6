"""A CLI that never misleads (issue 13): every command it shows runs, exit codes tell a failed
model from a crash, and Rich never eats a path's brackets or cuts an architecture key."""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from qnas_cli.cli import app
from qnas_cli.cli.common import EXIT_GATE_FAILED
from qnas_cli.space import PRESETS, sample
from tests.helpers import run_ci_job

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MBV3_KEY = sample(PRESETS["mbv3"], "largest").key  # 135 characters: wider than Rich's 80 columns off a terminal


# ---- every command shown in --help and in the README exists as written ---------------------------

def _help_texts(cmd, path: str = "qnas") -> list[tuple[str, str]]:
    """(where, text) for the help, epilog and option help of every command."""
    texts = [(path, cmd.help or ""), (path, cmd.epilog or "")]
    texts += [(f"{path} {'/'.join(p.opts)}", getattr(p, "help", None) or "") for p in cmd.params]
    for name, sub in getattr(cmd, "commands", {}).items():
        texts += _help_texts(sub, f"{path} {name}")
    return texts


def _readme_snippets() -> list[tuple[str, str]]:
    """(where, text): README code blocks line by line, and inline code spans."""
    text = README.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    lines = [("README code block", line) for b in blocks for line in b.splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + [("README", span) for span in re.findall(r"`([^`\n]+)`", prose)]


def shown_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every qnas / torchrun / python -m command line a user is shown."""
    snippets = _readme_snippets()
    for where, text in _help_texts(typer.main.get_command(app)):
        snippets += [(where, span) for span in re.findall(r"`([^`\n]+)`", text)]
        snippets += [(where, m) for m in re.findall(r"torchrun\s+-[^`\n]*", text)]
    found = []
    for where, text in snippets:
        line = re.sub(r"(^|\s)#.*", "", text).strip()  # shell comments
        m = re.search(r"(?:^|[\s/])(qnas|torchrun|python[\d.]*)\s+(.*)", line)
        if m and not (m.group(1).startswith("python") and "-m" not in m.group(2).split()):
            found.append((where, [m.group(1), *shlex.split(m.group(2))]))
    return found


def _module_and_args(argv: list[str]) -> tuple[str, list[str]]:
    if argv[0] == "qnas":
        return "qnas_cli", argv[1:]
    i = argv.index("-m")  # torchrun ... -m MODULE ARGS / python -m MODULE ARGS
    return argv[i + 1], argv[i + 2:]


def _runnable(module: str) -> bool:
    """What ``python -m module`` needs: the module, and ``__main__`` if it is a package."""
    spec = importlib.util.find_spec(module)
    return spec is not None and (spec.submodule_search_locations is None or _runnable(f"{module}.__main__"))


def _resolve(args: list[str]):
    """The qnas command ``args`` names (subcommands walked down), or an assertion naming what is wrong."""
    cmd = typer.main.get_command(app)
    names = []
    for tok in args:
        if tok in getattr(cmd, "commands", {}):
            cmd = cmd.commands[tok]
            names.append(tok)
        elif not tok.startswith("-"):
            break
    if hasattr(cmd, "commands"):
        rest = args[len(names):] if names else [t for t in args if not t.startswith("-")]
        assert rest and rest[0].isupper(), f"'{' '.join(names)}' is a group and {rest[:1]} is not one of its commands"
        return None  # `qnas COMMAND --help`: a placeholder for any command
    return cmd, names


def test_the_shown_commands_were_found():
    where = {w for w, _ in shown_commands()}
    assert {"README code block", "README", "qnas train"} <= where, where  # README blocks, spans, train's torchrun line
    assert any(a[0] == "torchrun" for _, a in shown_commands())


def test_every_shown_command_names_a_runnable_module_a_real_command_and_real_options(runner):
    modules = set()
    for where, argv in shown_commands():
        module, args = _module_and_args(argv)
        assert _runnable(module), f"{where}: {' '.join(argv)}: `python -m {module}` cannot run"
        if module != "qnas_cli":
            continue
        modules.add(module)
        resolved = _resolve(args)
        if resolved is None:
            continue
        cmd, names = resolved
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h", "--debug"}
        unknown = [t.split("=")[0] for t in args if t.startswith("-") and t != "-" and t.split("=")[0] not in known]
        assert not unknown, f"{where}: {' '.join(argv)}: no such option {unknown} for qnas {' '.join(names)}"
        r = runner.invoke(app, [*names, "--help"])
        assert r.exit_code == 0, f"{where}: {' '.join(argv)}: {r.output}"
    for module in modules:  # and it really starts
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0 and "Usage" in r.stdout, f"python -m {module} --help: {r.stderr[-500:]}"


def test_a_wrong_module_or_command_would_be_caught(runner):
    """The check above is not vacuous."""
    assert not _runnable("qnas_cli.cli") and _runnable("qnas_cli")  # `-m qnas_cli.cli` failed: a package without __main__
    with pytest.raises(AssertionError, match="is a group"):
        _resolve(["space", "list"])
    assert _resolve(["calibrate", "x.json"])[1] == ["calibrate"]


# ---- exit codes -----------------------------------------------------------------------------------

def test_a_failed_export_gate_exits_3_and_still_prints_the_report(runner, tmp_path, monkeypatch):
    report = {"schema": "qnas.export_report/4", "passed": False, "problems": ["xnnpack: max |Δ| 4 LSB > 1 [end to end]"]}
    monkeypatch.setattr("qnas_cli.export.pipeline.export_subnet", lambda *a, **k: report)
    r = runner.invoke(app, ["export", str(tmp_path / "subnet.json"), "--json"])
    assert EXIT_GATE_FAILED == 3 and r.exit_code == 3, r.output
    assert json.loads(r.stdout) == report
    assert "export failed verification: xnnpack: max |Δ| 4 LSB > 1 [end to end]" in r.stderr


def test_exit_codes_are_documented_in_help_and_readme(runner):
    for args in ([], ["export"]):
        r = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "300"})
        assert re.search(r"\b3\b[^.;]*fail(s|ed)? (parity|verification)", r.output), r.output
    readme = README.read_text()
    assert "3 the exported model failed verification" in readme and "## In a CI pipeline" in readme
    assert "qnas.export_report/4" in readme


def _fake_export(code: int, passed: bool) -> str:
    """A stand-in `qnas` for the CI job: prints a report (only on a finished export) and exits with ``code``."""
    report = {"schema": "qnas.export_report/4", "passed": passed, "arch_key": "r16-w8:k3e2", "size_bytes": 1234, "target": "xnnpack",
              "accuracy": {"top1": 0.8, "fake_quant_top1": 0.8, "n_images": 10},
              "parity": {"xnnpack": {"max_abs_lsb": 1, "exact": 0.99}}, "latency_ms": {"xnnpack": 0.5}}
    return (f"echo '{json.dumps(report)}'; " if code in (0, 3) else "echo 'error: boom' >&2; ") + f"exit {code}"


@pytest.mark.parametrize("code, words", [(0, "r16-w8:k3e2: top-1 0.8000"), (3, "failed verification; not shipped"),
                                         (1, "did not finish (exit 1)"), (2, "did not finish (exit 2)")])
def test_the_readme_ci_job_ships_only_a_verified_model(tmp_path, code, words):
    r = run_ci_job(tmp_path, tmp_path / "subnet.json", tmp_path / "dist", qnas=_fake_export(code, passed=code == 0))
    assert r.returncode == code, r.stdout + r.stderr
    assert words in r.stdout + r.stderr


# ---- Rich: brackets survive, keys are never cut ---------------------------------------------------

def test_paths_with_brackets_are_printed_as_they_are(runner, tmp_path):
    folder = tmp_path / "[abc]"
    r = runner.invoke(app, ["space", "sample", "--space", "tiny", "--out", str(folder / "subnet.json")])
    assert r.exit_code == 0 and f"wrote {folder / 'subnet.json'}" in r.output, r.output
    r = runner.invoke(app, ["calibrate", str(folder / "missing.json")])
    assert r.exit_code == 2 and f"{folder / 'missing.json'} does not exist" in r.output, r.output


def test_an_architecture_key_is_printed_whole_off_a_terminal(runner, tmp_path, monkeypatch):
    meta = {"arch_key": MBV3_KEY, "accuracy": {"kind": "fake-quant", "test_top1": 0.5, "search_top1": 0.5}}
    monkeypatch.setattr("qnas_cli.cli.calibrate.calibrate_file", lambda *a, **k: (None, meta, None))
    r = runner.invoke(app, ["calibrate", str(tmp_path / "subnet.json")])
    assert r.exit_code == 0 and MBV3_KEY in r.output.splitlines()[0], r.output  # on one line: copy it whole


def test_the_training_table_folds_long_keys_instead_of_cutting_them(runner, tmp_path, monkeypatch):
    summary = {"metrics": {"largest": {"arch": MBV3_KEY, "test_top1": 0.5}}}
    monkeypatch.setattr("qnas_cli.cli.train.run_train", lambda *a, **k: summary)
    r = runner.invoke(app, ["train", "--space", "tiny", "--out", str(tmp_path / "[run]")])
    assert r.exit_code == 0, r.output
    assert "…" not in r.output and "[run]" in r.output
    rows = [line.split("│") for line in r.output.splitlines() if line.startswith("│")]
    assert "".join(cells[2].strip() for cells in rows) == MBV3_KEY, r.output  # the architecture column, folded


# ---- --debug -----------------------------------------------------------------------------------

def test_debug_prints_the_traceback():
    cmd = [sys.executable, "-m", "qnas_cli", "--debug", "space", "show", "--space", "huge"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr, r.stderr
    assert "qnas_cli.errors.UserError" in r.stderr and "neither a preset" in r.stderr
    r = subprocess.run([c for c in cmd if c != "--debug"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
