"""IntegerGraph -> float ONNX (NCHW) whose int8 quantization with our qparams is the contract.

Weights and biases are stored dequantized (w = s_w * q_w, b = s_in * s_w * q_b; s_w per output
channel where the graph has it), so the float
network computes exactly the real values the integer contract describes, before each output
is rounded. onnx2tf only needs it for structure; the TFLite writer later replaces every
constant and every scale with the integer originals.

Names: each ONNX tensor is named after its IntegerGraph tensor and each node after its op
(`onnx_name` makes them safe for onnx2tf/TensorFlow, which reject ':' and leading '/').
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from qnas_cli.checkpoint import write_bytes
from qnas_cli.export.graph import Add, Conv, GlobalAvgPool, IntegerGraph, Linear, channel_scale, real_weight

OPSET = 13


def onnx_name(name: str) -> str:
    """A TensorFlow-safe version of an IntegerGraph name (letters, digits, '_', '.', '-')."""
    safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    return safe if safe[:1].isalpha() else f"t_{safe}"


def _check_names(graph: IntegerGraph) -> None:
    names = [graph.input] + [op.output for op in graph.ops]
    safe = [onnx_name(n) for n in names]
    if len(set(safe)) != len(safe):
        raise ValueError(f"tensor names collide once made ONNX-safe: {sorted(names)}")
    missing = [n for n in names if n not in graph.qparams]
    if missing:
        raise ValueError(f"tensors without qparams: {missing}")


def to_onnx(graph: IntegerGraph):
    """Build the float ONNX ModelProto of `graph` (batch 1, NCHW, opset 13)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    _check_names(graph)
    qp = graph.qparams
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    for op in graph.ops:
        base, dst = onnx_name(op.name), onnx_name(op.output)
        src = "" if isinstance(op, Add) else onnx_name(op.input)
        if isinstance(op, (Conv, Linear)):
            s_in = qp[op.input].scale
            w = const(f"{base}.weight", real_weight(op))
            b = const(f"{base}.bias", op.bias.astype(np.float64) * (s_in * channel_scale(op, 1)))
            pre = f"{base}.preact" if op.relu else dst
            if isinstance(op, Conv):
                k = op.weight.shape[-1]
                nodes.append(helper.make_node(
                    "Conv", [src, w, b], [pre], name=base, kernel_shape=[k, k],
                    strides=[op.stride] * 2, pads=[k // 2] * 4, group=op.groups))
            else:
                nodes.append(helper.make_node("Gemm", [src, w, b], [pre], name=base, transB=1))
            if op.relu:
                nodes.append(helper.make_node("Relu", [pre], [dst], name=f"{base}.relu"))
        elif isinstance(op, Add):
            a, b_ = (onnx_name(n) for n in op.inputs)
            nodes.append(helper.make_node("Add", [a, b_], [dst], name=base))
        elif isinstance(op, GlobalAvgPool):
            # (N, C, H, W) -> (N, C, 1, 1) -> (N, C): Flatten is a reshape, which shares qparams.
            pooled = f"{base}.pooled"
            nodes.append(helper.make_node("GlobalAveragePool", [src], [pooled], name=base))
            nodes.append(helper.make_node("Flatten", [pooled], [dst], name=f"{base}.flatten", axis=1))
        else:
            raise TypeError(f"unknown op {type(op).__name__}")

    shapes = tensor_shapes(graph)
    model = helper.make_model(
        helper.make_graph(
            nodes, "qnas_subnet",
            [helper.make_tensor_value_info(onnx_name(graph.input), TensorProto.FLOAT,
                                           list(graph.input_shape))],
            [helper.make_tensor_value_info(onnx_name(name), TensorProto.FLOAT, list(shapes[name]))
             for name in graph.outputs],
            initializer=inits,
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="qnas",
    )
    model.ir_version = 8  # onnx 1.19 would write IR 12; onnxruntime 1.23 (inside onnx2tf) reads <= 11
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor_shapes(graph: IntegerGraph) -> dict[str, tuple[int, ...]]:
    """NCHW shape (batch 1) of every tensor: (1, C, H, W) for maps, (1, C) after pooling."""
    shapes: dict[str, tuple[int, ...]] = {graph.input: tuple(graph.input_shape)}
    for op in graph.ops:
        if isinstance(op, Conv):
            _, _, h, w = shapes[op.input]
            k, s = op.weight.shape[-1], op.stride
            shapes[op.output] = (1, op.weight.shape[0], (h + 2 * (k // 2) - k) // s + 1,
                                 (w + 2 * (k // 2) - k) // s + 1)
        elif isinstance(op, Add):
            shapes[op.output] = shapes[op.inputs[0]]
        elif isinstance(op, GlobalAvgPool):
            shapes[op.output] = shapes[op.input][:2]
        else:
            shapes[op.output] = (1, op.weight.shape[0])
    return shapes


def export_onnx(graph: IntegerGraph, path: Path) -> Path:
    """Write the float ONNX of `graph` to `path` and return it."""
    return write_bytes(Path(path), to_onnx(graph).SerializeToString())
