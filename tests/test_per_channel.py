"""Per-output-channel conv weight scales (issue 30), on the export and kernel side.

Fast: per-channel requantization (qnas_cli/kernels.py) is the scalar rule applied channel by
channel, bit for bit, and equals the scalar path when every channel has the same scale.
Slow (one onnx2tf conversion each, shared per module): a per-channel mobilenet-like graph and a
per-channel copy of tests/test_kernels_tflite.py's tie/saturation graph go through the real
export path; every op and every output is bit-exact on xnnpack, reference and micro, and the file
stores exactly the intended per-axis weight and bias parameters (quantized dimension 0 for
CONV_2D, 3 for DEPTHWISE_CONV_2D), which the gate checks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qnas_cli import kernels
from qnas_cli.export.graph import Conv, Linear, channel_scales, is_per_channel
from qnas_cli.kernels import TARGETS

RUNTIMES = (*TARGETS, "mediapipe")


def _acc(n_channels: int, seed: int = 0, ndim: int = 4) -> torch.Tensor:
    """int32 accumulators as requantize gets them (float tensor of integers), wide enough to
    saturate, with small values (ties) too."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, n_channels, 5, 5) if ndim == 4 else (7, n_channels)
    wide = torch.randint(-2**20, 2**20, shape, generator=g)
    small = torch.randint(-64, 65, shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < 0.5, wide, small).to(torch.float32)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_per_channel_with_one_scale_equals_the_scalar_path(runtime):
    s_in, s_w, s_out = 0.0123, 0.00071, 0.0371
    acc = _acc(16)
    scalar = kernels.requantize(acc.clone(), kernels.conv_requant(runtime, s_in, s_w, s_out), -3, -128, 127)
    vector = kernels.conv_requant(runtime, s_in, np.full(16, s_w, np.float32), s_out)
    assert vector.per_channel
    assert torch.equal(kernels.requantize(acc.clone(), vector, -3, -128, 127), scalar)


@pytest.mark.parametrize("ndim", [4, 2])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_per_channel_equals_a_scalar_call_per_channel(runtime, ndim):
    """Random scales (and exact ties: power-of-two ratios), ReLU bounds and a zero point:
    channel c of the vector call is the scalar call with s_w[c], along dim 1 of (N, O[, H, W])."""
    rng = np.random.default_rng(1)
    s_in, s_out, n = 2.0**-4, 2.0**-9, 24
    s_w = np.concatenate([2.0 ** rng.integers(-8, -3, 8), rng.uniform(1e-4, 1e-1, 16)]).astype(np.float32)
    acc = _acc(n, seed=2, ndim=ndim)
    got = kernels.requantize(acc.clone(), kernels.conv_requant(runtime, s_in, s_w, s_out), -128, -128, 127)
    for c in range(n):
        rq = kernels.conv_requant(runtime, s_in, float(s_w[c]), s_out)
        want = kernels.requantize(acc[:, c].clone(), rq, -128, -128, 127)
        assert torch.equal(got[:, c], want), (runtime, c)


def test_vector_multipliers_equal_the_scalar_ones():
    rng = np.random.default_rng(3)
    real = np.concatenate([[0.0, 1.0, 0.5, 2.0**-40, 1 - 2.0**-40, 3.0],
                           np.exp(rng.uniform(-25, 3, 500))])
    m, s = kernels.quantize_multipliers(real)
    assert [(int(a), int(b)) for a, b in zip(m, s)] == [kernels.quantize_multiplier(float(r)) for r in real]


def test_per_channel_fully_connected_is_refused():
    with pytest.raises(ValueError, match="conv and depthwise only"):
        kernels.conv_requant("reference", 0.1, np.ones(4, np.float32), 0.1, fully_connected=True)


def test_graph_factory_makes_per_channel_convs():
    from tests.graph_factory import mobilenet_like

    graph, _ = mobilenet_like(per_channel=True)
    convs = [op for op in graph.ops if isinstance(op, Conv)]
    assert convs and all(op.per_channel and op.weight_scale.dtype == np.float32
                         and op.weight_scale.shape == (op.weight.shape[0],) for op in convs)
    assert not any(is_per_channel(op) for op in graph.ops if isinstance(op, Linear))
    for op in convs:  # each row's scale from its own range: some weight of every row near +-127
        assert (np.abs(op.weight.reshape(len(op.weight), -1)).max(1) >= 120).all(), op.name
        assert len(np.unique(op.weight_scale)) > 1, op.name


def test_onnx_holds_per_channel_real_weights_and_biases():
    """The float ONNX onnx2tf converts: w[o] = q_w[o] * s_w[o], b[o] = q_b[o] * s_in * s_w[o]."""
    from onnx import numpy_helper

    from qnas_cli.export.onnx_export import onnx_name, to_onnx
    from tests.graph_factory import mobilenet_like

    graph, _ = mobilenet_like(per_channel=True)
    inits = {i.name: numpy_helper.to_array(i) for i in to_onnx(graph).graph.initializer}
    for op in graph.ops:
        if isinstance(op, Conv):
            s_w = op.weight_scale.astype(np.float64)
            base = onnx_name(op.name)
            np.testing.assert_allclose(inits[f"{base}.weight"], op.weight * s_w[:, None, None, None], rtol=1e-6)
            np.testing.assert_allclose(inits[f"{base}.bias"], op.bias * graph.qparams[op.input].scale * s_w,
                                       rtol=1e-6, atol=1e-30)


def test_fold_keeps_a_vector_weight_scale_a_float32_vector():
    """fold.to_integer_graph's conversion of QConvBN.integer_params' s_w: 0-d -> float, (O,) ->
    float32 array; the non-positive-scale check works on both."""
    from qnas_cli.layers import scale_value

    assert scale_value(torch.tensor(0.5)) == 0.5 and isinstance(scale_value(torch.tensor(0.5)), float)
    v = scale_value(torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert v.dtype == np.float32 and v.tolist() == [0.5, 0.25]
    conv = Conv("c", "input", "c", np.ones((2, 1, 1, 1), np.int8), np.zeros(2, np.int32), v, 1, 1, False)
    assert conv.per_channel and channel_scales(conv).tolist() == [0.5, 0.25]


# ---- through onnx2tf and LiteRT (slow) ---------------------------------------------------------

N_IMAGES = 100


def test_the_per_channel_tie_graph_still_holds_ties_and_saturation():
    """Guard for the slow per-op test: per-channel scales keep many values exactly on .5."""
    from tests.test_kernels_tflite import _graph, _images, assert_ties_and_saturation

    assert_ties_and_saturation(_graph(per_channel=True), _images(20), "reference",
                               ("conv_tie", "conv_tie_relu", "dw5_tie", "dw3_s2_tie"), 0.05)


# 3 channels, even size (PADs before stride-2 convs); 1 channel, where the stem conv reads a single
# channel (onnx2tf 1.29.24 keeps it a CONV_2D, OHWI with I = 1; the gate takes the quantized
# dimension from the op that reads the weight, so a depthwise form would be checked for 3).
CASES = [(3, 24), (1, 28)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"c{c[0]}-{c[1]}px")
def mobilenet(request, tmp_path_factory):
    from qnas_cli.export.tflite import export_tflite
    from qnas_cli.export.verify import reference_runs, verify_tflite
    from tests.graph_factory import mobilenet_like, sample_images

    channels, size = request.param
    graph, calib = mobilenet_like(channels, size, "full_range", per_channel=True)
    result = export_tflite(graph, calib, tmp_path_factory.mktemp("per_channel"))
    held_out, _ = sample_images(N_IMAGES, channels, size, "full_range", seed=321)
    report = verify_tflite(result.tflite, graph, reference_runs(graph, held_out), latency=False)
    return graph, result.tflite, held_out, report


@pytest.fixture(scope="module")
def ties(tmp_path_factory):
    from qnas_cli.export.tflite import export_tflite
    from tests.test_kernels_tflite import _graph, _images

    graph = _graph(per_channel=True)
    result = export_tflite(graph, _images(32, seed=2), tmp_path_factory.mktemp("per_channel_ties"))
    return graph, result.tflite, _images(120)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", TARGETS)
def test_mobilenet_per_channel_passes_the_gate(mobilenet, runtime):
    """End to end on every image and every op on its own inputs, bit-exact on ``runtime``; census,
    XNNPACK coverage (the delegate takes per-channel convs) and stored parameters exact."""
    graph, _, _, report = mobilenet
    assert report["parity"][runtime]["exact"] == 1.0 and report["parity"][runtime]["n_images"] == N_IMAGES
    assert set(report["per_op"][runtime]) == {op.name for op in graph.ops}
    assert all(o["exact"] == 1.0 for o in report["per_op"][runtime].values()), report["per_op"][runtime]
    assert report["census"]["ops"]["DEPTHWISE_CONV_2D"] >= 2
    from qnas_cli.export.verify import failures
    assert failures(report, runtime) == []


@pytest.mark.slow
@pytest.mark.parametrize("runtime", TARGETS)
def test_every_per_channel_op_bit_exact_with_ties_and_saturation(ties, runtime):
    from qnas_cli.export.verify import per_op_parity

    graph, path, images = ties
    assert all(op.per_channel for op in graph.ops if isinstance(op, Conv))
    stats = per_op_parity(path, graph, images, runtime)
    assert set(stats) == {op.name for op in graph.ops}
    wrong = {name: s for name, s in stats.items() if s["exact"] < 1.0}
    assert not wrong, wrong


def _stored(path):
    """name -> (kind of the op reading it, its QuantizationParametersT) for every weight and bias."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    from qnas_cli.export.tflite_rewrite import OP_NAMES

    model = fbu.read_model_from_bytearray(bytearray(path.read_bytes()))
    sg = model.subgraphs[0]
    out = {}
    for op in sg.operators:
        kind = OP_NAMES[fbu.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])]
        for t in op.inputs[1:3]:
            if t >= 0:
                out[sg.tensors[t].name.decode()] = (kind, sg.tensors[t].quantization)
    return out


@pytest.mark.slow
def test_per_axis_parameters_are_the_intended_ones(mobilenet):
    """Read back from the file: per-axis weight scales (float32 of ours) with zero points 0 along
    dimension 0 (CONV_2D, OHWI) or 3 (DEPTHWISE_CONV_2D, 1HWO); bias scales float32(s_in) *
    float32(s_w[c]) along 0; the FC per tensor."""
    graph, path, _, _ = mobilenet
    stored = _stored(path)
    kinds = set()
    for op in graph.ops:
        if not isinstance(op, (Conv, Linear)):
            continue
        kind, w = stored[f"{op.name}/weight"]
        _, b = stored[f"{op.name}/bias"]
        kinds.add(kind)
        s_w = np.asarray(op.weight_scale, np.float32).ravel()
        s_in = np.float32(graph.qparams[op.input].scale)
        assert np.array_equal(np.asarray(w.scale, np.float32), s_w), op.name
        assert np.array_equal(np.asarray(b.scale, np.float32),
                              (np.float64(s_in) * s_w.astype(np.float64)).astype(np.float32)), op.name
        assert list(w.zeroPoint) == list(b.zeroPoint) == [0] * len(s_w), op.name
        if isinstance(op, Conv):
            assert len(s_w) == op.weight.shape[0] > 1
            assert (w.quantizedDimension, b.quantizedDimension) == ({"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3}[kind], 0)
        else:
            assert len(s_w) == 1
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"} <= kinds


def _broken(path, tmp_path, name: str, change) -> object:
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(path.read_bytes()))
    tensor = next(t for t in model.subgraphs[0].tensors if t.name.decode() == name)
    change(tensor.quantization)
    out = tmp_path / f"broken_{len(list(tmp_path.iterdir()))}.tflite"
    out.write_bytes(bytes(fbu.convert_object_to_bytearray(model)))
    return out


@pytest.mark.slow
def test_a_wrong_per_axis_parameter_fails_the_gate(mobilenet, tmp_path):
    """One channel's weight scale 5% off, a depthwise weight's quantized dimension 0 instead of
    3, or a bias made per-tensor: the stored-parameter check flags each, and the first also shows
    up in that op's per-op parity."""
    from qnas_cli.export.verify import per_op_parity, stored_scales

    graph, path, images, report = mobilenet
    assert report["scales"]["max_rel_err"] < 1e-6
    dw = next(op for op in graph.ops if isinstance(op, Conv) and op.groups > 1)

    def one_channel_off(q):
        q.scale = [float(v) * (1.05 if i == 3 else 1.0) for i, v in enumerate(q.scale)]

    def axis_zero(q):
        q.quantizedDimension = 0

    def per_tensor(q):
        q.scale, q.zeroPoint = [float(q.scale[0])], [0]

    cases = [(f"{dw.name}/weight", one_channel_off), (f"{dw.name}/weight", axis_zero), ("stem/bias", per_tensor)]
    for name, change in cases:
        broken = _broken(path, tmp_path, name, change)
        assert stored_scales(broken, graph)["max_rel_err"] > 1e-6, name
        if change is one_channel_off:
            assert per_op_parity(broken, graph, images[:10], "xnnpack")[dw.name]["exact"] < 1.0
    expected = channel_scales(dw)
    assert expected.shape == (dw.weight.shape[0],)
