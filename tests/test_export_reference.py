"""Fast checks of the export toolchain's pure-Python parts: reference executor and ONNX."""
from __future__ import annotations

import numpy as np
import pytest

from export.graph import Conv, GlobalAvgPool, Linear, QParams
from export.onnx_export import onnx_name, tensor_shapes, to_onnx
from export.reference import dequantize, global_avg_pool, quantize, run_reference_tensors
from tests.graph_factory import mobilenet_like


@pytest.fixture(scope="module", params=[(1, 20, "full_range"), (3, 17, "symmetric")])
def graph_and_images(request):
    return mobilenet_like(*request.param, n_images=16)


def test_convs_match_torch_float64(graph_and_images):
    """Each conv/linear equals torch's float64 op on the dequantized tensors, requantized
    (the integer accumulation is exact, so only exact ties could differ, and none occur)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    graph, images = graph_and_images
    t = run_reference_tensors(graph, images)
    qp = graph.qparams
    for op in graph.ops:
        if not isinstance(op, (Conv, Linear)):
            continue
        x = torch.from_numpy(dequantize(t[op.input], qp[op.input]))
        w = torch.from_numpy(op.weight.astype(np.float64) * op.weight_scale)
        b = torch.from_numpy(op.bias.astype(np.float64) * qp[op.input].scale * op.weight_scale)
        if isinstance(op, Conv):
            y = F.conv2d(x, w, b, stride=op.stride, padding=op.weight.shape[-1] // 2, groups=op.groups)
        else:
            y = F.linear(x, w, b)
        y = torch.relu(y) if op.relu else y
        np.testing.assert_array_equal(quantize(y.numpy(), qp[op.output]), t[op.output], err_msg=op.name)


def test_global_avg_pool_rounds_ties_away_from_zero_in_raw_int8():
    """Ties follow XNNPACK: the raw int8 mean, half away from zero."""
    q = np.array([[[[-125, -126]], [[2, 3]], [[-2, -3]], [[7, 7]]]], np.int8)  # (1, 4, 1, 2)
    out = global_avg_pool(q, QParams(0.1, -128))
    assert out.tolist() == [[-126, 3, -3, 7]]


def test_pool_output_must_share_input_qparams(graph_and_images):
    graph, images = graph_and_images
    pool = next(op for op in graph.ops if isinstance(op, GlobalAvgPool))
    graph.qparams[pool.output], saved = QParams(1.0, 0), graph.qparams[pool.output]
    try:
        with pytest.raises(ValueError, match="share"):
            run_reference_tensors(graph, images)
    finally:
        graph.qparams[pool.output] = saved


def test_onnx_holds_dequantized_constants_and_our_names(graph_and_images):
    pytest.importorskip("onnx")
    from onnx import numpy_helper

    graph, _ = graph_and_images
    model = to_onnx(graph)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qp = graph.qparams
    for op in graph.ops:
        if isinstance(op, (Conv, Linear)):
            base = onnx_name(op.name)
            np.testing.assert_allclose(inits[f"{base}.weight"], op.weight * op.weight_scale, rtol=1e-6)
            np.testing.assert_allclose(inits[f"{base}.bias"],
                                       op.bias * qp[op.input].scale * op.weight_scale, rtol=1e-6)
    node_outputs = {o for n in model.graph.node for o in n.output}
    assert {onnx_name(op.output) for op in graph.ops} <= node_outputs
    out_dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert tuple(out_dims) == tensor_shapes(graph)[graph.output]


def test_bad_input_is_refused(graph_and_images):
    graph, images = graph_and_images
    with pytest.raises(ValueError, match="int8"):
        run_reference_tensors(graph, images.astype(np.float32))
