"""Fast checks of the export toolchain's pure-Python parts: reference executor and ONNX."""
from __future__ import annotations

import numpy as np
import pytest

from qnas_cli.export.graph import Conv, GlobalAvgPool, Linear, QParams
from qnas_cli.export.onnx_export import onnx_name, tensor_shapes, to_onnx
from qnas_cli.export.reference import real_output, run_reference_tensors
from qnas_cli.kernels import TARGETS
from tests.graph_factory import mobilenet_like


@pytest.fixture(scope="module", params=[(1, 20, "full_range"), (3, 17, "symmetric")])
def graph_and_images(request):
    return mobilenet_like(*request.param, n_images=16)


@pytest.mark.parametrize("runtime", TARGETS)
def test_each_op_rounds_the_ideal_value(graph_and_images, runtime):
    """Every op of every target lands on a rounding of the ideal real value (within 1 LSB, as
    any rounding must), and on the nearest one almost everywhere. The reference kernels' double
    rounding widens a tie into a window 2**-(right shift + 1) LSB wide: up to ~6% of values in a
    layer whose multiplier needs only a 3-bit right shift."""
    graph, images = graph_and_images
    t = run_reference_tensors(graph, images, runtime)
    for op in graph.ops:
        ideal = real_output(op, t, graph.qparams)
        qp = graph.qparams[op.output]
        q = t[op.output].astype(np.float64)
        unclipped = (q > -128) & (q < 127)
        dist = np.abs(ideal / qp.scale + qp.zero_point - q)[unclipped]
        assert dist.max() <= 1.0 + 1e-9, (op.name, dist.max())
        assert np.mean(dist <= 0.5 + 1e-9) > 0.9, op.name


def test_targets_differ_only_by_rounding(graph_and_images):
    graph, images = graph_and_images
    a = run_reference_tensors(graph, images, "xnnpack")
    b = run_reference_tensors(graph, images, "reference")
    first = graph.ops[0].output  # same inputs: any difference is requantization
    diff = np.abs(a[first].astype(int) - b[first])
    assert diff.max() <= 1


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
