"""Each int8 op, on random integers with ties and saturation, computes in LiteRT exactly what
qnas_cli/kernels.py says, for XNNPACK and for the reference kernels (BUILTIN_REF).

One integer graph holds every case as a branch off one random input (each branch a leaf, so
all survive conversion); it goes through the real export path (IntegerGraph -> ONNX -> onnx2tf
-> our rewrite), then every op is fed its own int8 inputs on each runtime. Scales that are
powers of two make requantization land exactly on .5 (the ties each runtime rounds its own
way); small output scales and large biases saturate.
"""
from __future__ import annotations

import numpy as np
import pytest

from qnas_cli.export.graph import Add, Conv, GlobalAvgPool, IntegerGraph, Linear, QParams
from qnas_cli.export.reference import real_output, run_reference_tensors
from qnas_cli.export.tflite import export_tflite
from qnas_cli.export.measure import interpreter, xnnpack_coverage
from qnas_cli.export.verify import per_op_parity
from qnas_cli.kernels import TARGETS

pytestmark = pytest.mark.slow

C, H = 8, 12  # even size: onnx2tf puts explicit PADs before the stride-2 convs


def _graph(seed: int = 0, per_channel: bool = False) -> IntegerGraph:
    """``per_channel``: each conv's scale s_w becomes one per output channel, s_w times 1/2, 1 or
    2 by channel on the tie branches (so ratios 0.125..1: ties stay on every branch) and times
    U(0.5, 2) on the others; FC stays per tensor."""
    rng = np.random.default_rng(seed)
    ops, qp = [], {"input": QParams(2.0**-4, 0)}

    def channel_scales(name, out_ch, s_w):
        if not per_channel:
            return s_w
        factors = 2.0 ** (np.arange(out_ch) % 3 - 1) if "tie" in name else rng.uniform(0.5, 2.0, out_ch)
        return (s_w * factors).astype(np.float32)

    def conv(name, src, out_ch, k, stride, groups, relu, s_w, s_out, zp=0, w_max=3, bias_max=2**12):
        in_ch = C if src == "input" else None
        in_ch = in_ch or next(o.weight.shape[0] for o in ops if o.output == src)
        w = rng.integers(-w_max, w_max + 1, size=(out_ch, in_ch // groups, k, k)).astype(np.int8)
        w[0].flat[0] = 127  # the extreme weight, in every conv
        b = rng.integers(-bias_max, bias_max + 1, size=out_ch).astype(np.int32)
        ops.append(Conv(name, src, name, w, b, channel_scales(name, out_ch, s_w), stride, groups, relu))
        qp[name] = QParams(s_out, zp)
        return name

    # s_in * s_w / s_out = 0.5 or 0.25 exactly: ties on every odd (or 2 mod 4) accumulator
    conv("conv_tie", "input", 16, 3, 1, 1, False, 2.0**-6, 2.0**-9)
    conv("conv_tie_relu", "input", 16, 3, 1, 1, True, 2.0**-6, 2.0**-8, zp=-128)
    conv("conv_random", "input", 16, 1, 1, 1, True, 0.0123, 0.0371, zp=-128, w_max=127)
    conv("conv_saturating", "input", 16, 1, 1, 1, False, 0.05, 0.002, w_max=127, bias_max=2**20)
    conv("conv_s2", "input", 16, 3, 2, 1, False, 0.0077, 0.0291, w_max=40)
    conv("dw3_s2_tie", "conv_random", 16, 3, 2, 16, True, 2.0**-2, 2.0**-2 * 0.0371 * 2, zp=-128, w_max=127)
    conv("dw5_tie", "conv_tie", 16, 5, 1, 16, False, 2.0**-3, 2.0**-10, w_max=20)
    conv("dw7", "conv_tie", 16, 7, 1, 16, True, 0.0031, 0.0457, w_max=127)
    qp["add_tie"] = QParams(2.0**-8, 0)  # conv_tie / out = 0.5, conv_tie_relu / out = 1
    ops.append(Add("add_tie", ("conv_tie", "conv_tie_relu"), "add_tie"))
    qp["add_random"] = QParams(0.0519, 0)
    ops.append(Add("add_random", ("conv_random", "dw7"), "add_random"))
    for name, src in (("pool144", "add_random"), ("pool36", "conv_s2"), ("pool36_zp", "dw3_s2_tie")):
        ops.append(GlobalAvgPool(name, src, name))
        qp[name] = qp[src]
    for name, src, s_w, s_out in (("fc_tie", "pool144", 2.0**-2, 0.0519 * 2.0**-2 * 4),
                                  ("fc_random", "pool36", 0.0211, 0.0777)):
        w = rng.integers(-127, 128, size=(10, 16)).astype(np.int8)
        b = rng.integers(-2**10, 2**10, size=10).astype(np.int32)
        ops.append(Linear(name, src, name, w, b, s_w, False))
        qp[name] = QParams(s_out, 0)
    leaves = [o.output for o in ops if all(o.output not in getattr(p, "inputs", (getattr(p, "input", None),)) for p in ops)]
    return IntegerGraph("input", (1, C, H, H), leaves[0], ops, qp, {}, tuple(leaves[1:]))


def _images(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(n, C, H, H)).astype(np.int8)
    x[0], x[1] = -128, 127  # the extremes
    x[2] = np.where(np.indices((C, H, H)).sum(0) % 2, 127, -128)  # a checkerboard of them
    return x


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    graph = _graph()
    result = export_tflite(graph, _images(32, seed=2), tmp_path_factory.mktemp("ops"))
    return graph, result.tflite, _images(120)


def assert_ties_and_saturation(graph: IntegerGraph, images: np.ndarray, runtime: str, tie_ops: tuple[str, ...],
                               min_tie_share: float) -> None:
    """Guard against a test that silently tests nothing: each of ``tie_ops`` puts more than
    ``min_tie_share`` of its values exactly on .5 and the saturating conv clips at both ends."""
    t = run_reference_tensors(graph, images, runtime)
    for name in tie_ops:
        op = next(o for o in graph.ops if o.name == name)
        v = real_output(op, t, graph.qparams) / graph.qparams[name].scale
        assert np.mean(np.abs(v - np.floor(v) - 0.5) < 1e-9) > min_tie_share, name
    sat = t["conv_saturating"]
    assert (sat == -128).mean() > 0.05 and (sat == 127).mean() > 0.05


def test_the_cases_hold_ties_and_saturation(converted):
    """The tie branches put many values exactly on .5 and the saturating one clips at both ends."""
    graph, _, images = converted
    assert_ties_and_saturation(graph, images[:20], "xnnpack", ("conv_tie", "dw5_tie", "add_tie", "fc_tie"), 0.02)


@pytest.mark.parametrize("runtime", TARGETS)
def test_every_op_bit_exact(converted, runtime):
    graph, path, images = converted
    stats = per_op_parity(path, graph, images, runtime)
    assert set(stats) == {op.name for op in graph.ops}
    wrong = {name: s for name, s in stats.items() if s["exact"] < 1.0}
    assert not wrong, wrong


def test_xnnpack_took_every_op(converted):
    _, path, _ = converted
    cov = xnnpack_coverage(interpreter(path, "xnnpack"))
    assert cov["undelegated_ops"] == [] and cov["delegate_nodes"] >= 1, cov


def test_coverage_check_sees_an_op_xnnpack_declines(converted, tmp_path):
    """XNNPACK refuses an ADD whose input/output scale ratio is outside [1/1024, 256)
    (tflite/delegates/xnnpack/xnnpack_delegate.cc ``CheckTensorsInputOutputScale``): that ADD
    then runs on the built-in kernels, and the gate must say so."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    _, path, _ = converted
    model = fbu.read_model_from_bytearray(bytearray(path.read_bytes()))
    tensor = next(t for t in model.subgraphs[0].tensors if t.name.decode() == "add_random")
    tensor.quantization.scale = [float(tensor.quantization.scale[0]) / 1e4]
    declined = tmp_path / "declined.tflite"
    declined.write_bytes(bytes(fbu.convert_object_to_bytearray(model)))
    assert "ADD" in xnnpack_coverage(interpreter(declined, "xnnpack"))["undelegated_ops"]
