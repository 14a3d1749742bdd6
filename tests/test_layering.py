"""The package's layers: the model core imports no converter, runtime or export module.

core (qnas_cli/*.py: space, quant, layers, supernet, calibrate, search, search_job, latency, ...)
  <- qnas_cli/export/ (ONNX, onnx2tf, TensorFlow, LiteRT, TFLite Micro)
  <- the app layer: qnas_cli/cli/ and qnas_cli/demo.py (parse, then call both)
So training, calibration and search run without TensorFlow loaded, and the core can be read
(and tested) without the converter stack.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qnas_cli"
APP_LAYER = {"demo", "__main__"}  # with cli/: may import the export layer
HEAVY = ("tensorflow", "tf_keras", "onnx", "onnx2tf", "onnxruntime", "onnxsim", "ai_edge_litert", "tflite_micro")
CORE = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in APP_LAYER | {"__init__"})


def _imported_names(path: Path) -> list[str]:
    """Every module an import statement in ``path`` names, at any depth (lazy imports included),
    resolved to absolute names."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "qnas_cli." * (node.level > 0) + (node.module or "")
            names += [base] + [f"{base}.{a.name}".replace("..", ".") for a in node.names]
    return names


@pytest.mark.parametrize("module", CORE)
def test_no_core_module_imports_the_export_layer_or_a_converter(module):
    bad = [n for n in _imported_names(PACKAGE / f"{module}.py")
           if n.startswith(("qnas_cli.export", "qnas_cli.cli", "qnas_cli.demo")) or n.split(".")[0] in HEAVY]
    assert bad == [], f"qnas_cli/{module}.py imports {bad}: the model core stays free of the export and app layers"


def test_no_export_module_imports_the_app_layer():
    for path in sorted((PACKAGE / "export").glob("*.py")):
        bad = [n for n in _imported_names(path) if n.startswith(("qnas_cli.cli", "qnas_cli.demo"))]
        assert bad == [], f"{path.name} imports {bad}"


def test_importing_the_core_loads_no_converter_or_runtime():
    """What the AST check cannot see: a dependency that itself pulls in TensorFlow."""
    code = ("import sys\n" + "".join(f"import qnas_cli.{m}\n" for m in CORE)
            + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith('qnas_cli.export')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
