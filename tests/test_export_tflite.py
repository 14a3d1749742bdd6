"""End to end: IntegerGraph -> ONNX -> onnx2tf -> our parameters -> LiteRT, against reference.py.

Each conversion takes ~15 s, so every model is converted once per module and shared.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qnas_cli.export.graph import Conv
from qnas_cli.export.tflite import export_tflite
from qnas_cli.export.tflite_rewrite import MappingError, rewrite
from qnas_cli.export.verify import failures, op_census, per_op_parity, reference_runs, verify_tflite
from qnas_cli.kernels import TARGETS
from tests.graph_factory import mobilenet_like, sample_images

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# (input channels, size, zero-point scheme): even sizes make onnx2tf insert PAD ops before the
# stride-2 convs, odd ones don't; 3 channels take onnx2tf's sample-data path.
CASES = [(1, 28, "full_range"), (3, 17, "symmetric"), (3, 24, "full_range")]
N_IMAGES = 200


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"c{c[0]}-{c[1]}px-{c[2]}")
def exported(request, tmp_path_factory):
    channels, size, scheme = request.param
    graph, calib = mobilenet_like(channels, size, scheme)
    result = export_tflite(graph, calib, tmp_path_factory.mktemp("export"))
    held_out, _ = sample_images(N_IMAGES, channels, size, scheme, seed=123)
    report = verify_tflite(result.tflite, graph, reference_runs(graph, held_out), latency=False)
    return graph, result, held_out, report


def test_files_and_timings(exported):
    _, result, _, _ = exported
    assert result.tflite.is_file() and result.onnx.is_file() and result.log.is_file()
    assert result.seconds["onnx2tf"] > 0 and result.versions["onnx2tf"] == "1.29.24"
    assert not list(result.tflite.parent.glob(".*.tmp")), "atomic writes left temp files behind"


def test_census_fully_int8(exported):
    graph, _, _, report = exported
    census = report["census"]
    assert census["float_tensors"] == 0
    assert (census["input_dtype"], census["output_dtype"]) == ("int8", "int8")
    assert census["quantize_ops"] == 0 and census["dequantize_ops"] == 0
    _, c, h, w = graph.input_shape
    assert census["input_shape"] == [1, h, w, c]  # NHWC
    assert set(census["ops"]) <= {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "AVERAGE_POOL_2D",
                                  "FULLY_CONNECTED", "PAD", "RESHAPE"}
    assert census["ops"]["DEPTHWISE_CONV_2D"] == 2 and census["ops"]["ADD"] == 1


def test_our_parameters_are_stored(exported):
    graph, _, _, report = exported
    scales = report["scales"]
    assert scales["missing"] == [] and scales["constants_mismatched"] == []
    assert scales["max_rel_err"] < 1e-6  # float32 storage of our float64 scales
    stored = {row["tensor"] for row in scales["tensors"]}
    assert set(graph.qparams) <= stored


@pytest.mark.parametrize("runtime", TARGETS)
def test_every_op_bit_exact_on_its_target(exported, runtime):
    """Each kernel, fed its own int8 inputs, computes exactly what qnas_cli/kernels.py says: every
    op of the graph is checked (an empty per-op report would otherwise pass)."""
    graph, _, _, report = exported
    assert set(report["per_op"][runtime]) == {op.name for op in graph.ops} and len(graph.ops) >= 8
    for name, stats in report["per_op"][runtime].items():
        assert stats["exact"] == 1.0, (runtime, name, stats)


@pytest.mark.parametrize("runtime", TARGETS)
def test_end_to_end_bit_exact(exported, runtime):
    """At any depth: the whole network equals the integer executor for that runtime on every image."""
    _, _, _, report = exported
    p = report["parity"][runtime]
    assert p["n_images"] == N_IMAGES
    assert p["exact"] == 1.0, p


def test_xnnpack_took_every_op(exported):
    cov = exported[3]["xnnpack_coverage"]
    assert cov["delegate_nodes"] == 1 and cov["undelegated_ops"] == [], cov


def test_builtin_kernels_are_another_arithmetic(exported):
    """The optimized built-in kernels (not a target) round differently from the reference ones
    they are compared with: within 1 LSB per op, drifting end to end (seen: max 9 LSB)."""
    _, _, _, report = exported
    assert max(o["max_abs_lsb"] for o in report["per_op"]["builtin"].values()) <= 1
    p = report["parity"]["builtin"]
    assert p["max_abs_lsb"] <= 12 and p["top1_agreement"] >= 0.9, p


@pytest.mark.parametrize("runtime", TARGETS)
def test_report_passes_the_gate_for_each_target(exported, runtime):
    assert failures(exported[3], runtime) == []


def test_rewrite_is_idempotent_and_rejects_other_weights(exported):
    """Matching is by structure plus weight content, so a graph whose conv weights differ
    from the model's cannot be written into it."""
    graph, result, held_out, _ = exported
    again, match = rewrite(result.tflite.read_bytes(), graph)
    assert again == result.tflite.read_bytes()
    assert sorted(op.name for op in match.ops.values()) == sorted(op.name for op in graph.ops)
    conv = next(op for op in graph.ops if isinstance(op, Conv) and op.groups > 1)
    original = conv.weight
    conv.weight = np.flip(original, axis=-1).copy()  # same shape, other kernel
    try:
        with pytest.raises(MappingError, match=conv.name):
            rewrite(result.tflite.read_bytes(), graph)
    finally:
        conv.weight = original


_BLOCK_NETWORK = """
import os, socket

def _refuse(*args, **kwargs):
    with open(os.environ["QNAS_NET_LOG"], "a") as log:
        log.write(f"network use: {args[1:]!r}\\n")
    raise OSError("network access disabled by the qnas offline test")

socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = socket.getaddrinfo = _refuse
"""

_EXPORT = """
import sys
from pathlib import Path
import qnas_cli.export.tflite
from qnas_cli.export.verify import op_census
from tests.graph_factory import mobilenet_like
if sys.argv[2] == "without-sample-data":  # negative control: let onnx2tf look for its file
    qnas_cli.export.tflite.SAMPLE_DATA_FILE = "not_the_sample_data_file.npy"
graph, calib = mobilenet_like(3, 16, "full_range")
result = qnas_cli.export.tflite.export_tflite(graph, calib, Path(sys.argv[1]))
print("census", op_census(result.tflite))
"""


def _export_offline(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(_BLOCK_NETWORK))
    log = tmp_path / "network.log"
    # PYTHONPATH reaches every child: onnx2tf's interpreter and the onnxsim executable too.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), QNAS_NET_LOG=str(log))
    proc = subprocess.run([sys.executable, "-c", _EXPORT, str(tmp_path / "out"), mode], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    return proc, log.read_text() if log.exists() else ""


def test_export_works_offline(tmp_path):
    """A 3-channel, batch-1 input is exactly the case where onnx2tf 1.29 downloads sample
    data; with every socket refused, export must still succeed and never try the network."""
    proc, network = _export_offline(tmp_path, "with-sample-data")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert network == ""
    assert "'float_tensors': 0" in proc.stdout
    assert op_census(tmp_path / "out" / "subnet_int8.tflite")["input_dtype"] == "int8"


def test_offline_guard_catches_the_download(tmp_path):
    """Negative control for the test above: without our sample-data file onnx2tf reaches for
    the network, the guard refuses, and export fails with onnx2tf's log in the message."""
    proc, network = _export_offline(tmp_path, "without-sample-data")
    assert proc.returncode != 0
    assert "network use" in network
    assert "onnx2tf failed" in proc.stderr


def test_per_op_parity_flags_a_wrong_scale(exported, tmp_path):
    """A model whose stored output scale differs from the graph's is caught op by op."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    graph, result, held_out, _ = exported
    model = fbu.read_model_from_bytearray(bytearray(result.tflite.read_bytes()))
    target = next(op for op in graph.ops if isinstance(op, Conv) and op.relu)
    tensor = next(t for t in model.subgraphs[0].tensors if t.name.decode() == target.output)
    tensor.quantization.scale = [float(tensor.quantization.scale[0]) * 1.05]
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(bytes(fbu.convert_object_to_bytearray(model)))
    stats = per_op_parity(broken, graph, held_out[:10], "xnnpack")
    assert stats[target.name]["max_abs_lsb"] > 1
