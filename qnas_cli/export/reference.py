"""Executor of an IntegerGraph for a target runtime: what that runtime computes, bit for bit.

Every op takes its arithmetic from ``qnas_cli.kernels`` (the one statement of how XNNPACK and
TFLite's reference kernels round), the same functions the calibrated subnet's exact forward
uses, so three things must agree exactly: the subnet in PyTorch, this executor on the graph
handed to the converter, and the TFLite file on that runtime. Accumulation is exact (integers
in float32 where provably below 2**24, float64 otherwise).
"""
from __future__ import annotations

import numpy as np
import torch

from qnas_cli.export.graph import Add, Conv, GlobalAvgPool, IntegerGraph, Linear, Op, QParams, channel_scale
from qnas_cli import kernels


def quantize(real: np.ndarray, qp: QParams) -> np.ndarray:
    """real -> int8 with round-half-to-even (np.rint) and saturation (test data, inputs)."""
    q = np.rint(np.asarray(real, np.float64) / qp.scale) + qp.zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    return qp.scale * (q.astype(np.float64) - qp.zero_point)


def _int(t: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(t).astype(np.int64))


def _accumulators(op: Conv | Linear, tensors: dict[str, np.ndarray], qparams: dict[str, QParams]) -> torch.Tensor:
    """The exact int32 accumulators (bias included) of a conv or FC on its int8 inputs."""
    x = (_int(tensors[op.input]) - qparams[op.input].zero_point).to(torch.float32)
    w, b = _int(op.weight).to(torch.float32), _int(op.bias).to(torch.float64)
    if isinstance(op, Conv):
        return kernels.conv_accumulate(x, w, b, op.stride, op.groups)
    return kernels.linear_accumulate(x, w, b)


def real_output(op: Op, tensors: dict[str, np.ndarray], qparams: dict[str, QParams]) -> np.ndarray:
    """The ideal real value an op computes from its int8 inputs, before any rounding (float64):
    what every runtime approximates; tests use it to choose scales and to bound the rounding."""
    if isinstance(op, (Conv, Linear)):
        acc = _accumulators(op, tensors, qparams).numpy().astype(np.float64)
        y = acc * (qparams[op.input].scale * channel_scale(op, acc.ndim, axis=1))
        return np.maximum(y, 0.0) if op.relu else y
    if isinstance(op, Add):
        a, b = op.inputs
        return dequantize(tensors[a], qparams[a]) + dequantize(tensors[b], qparams[b])
    if isinstance(op, GlobalAvgPool):
        return dequantize(tensors[op.input], qparams[op.input]).mean(axis=(2, 3))
    raise TypeError(f"unknown op {type(op).__name__} ({getattr(op, 'name', '?')})")


def run_op(op: Op, tensors: dict[str, np.ndarray], qparams: dict[str, QParams], runtime: str = "xnnpack") -> np.ndarray:
    """One op: its int8 output from the int8 tensors it reads, as ``runtime`` computes it."""
    kernels.check_arithmetic(runtime)
    if isinstance(op, (Conv, Linear)):
        qi, qo = qparams[op.input], qparams[op.output]
        acc = _accumulators(op, tensors, qparams)
        rq = kernels.conv_requant(runtime, qi.scale, op.weight_scale, qo.scale, fully_connected=isinstance(op, Linear))
        out = kernels.requantize(acc, rq, qo.zero_point, qo.zero_point if op.relu else -128, 127)
    elif isinstance(op, Add):
        (a, b), qo = op.inputs, qparams[op.output]
        out = kernels.add(_int(tensors[a]), _int(tensors[b]), (qparams[a].scale, qparams[a].zero_point),
                          (qparams[b].scale, qparams[b].zero_point), (qo.scale, qo.zero_point), runtime)
    elif isinstance(op, GlobalAvgPool):
        if qparams[op.output] != qparams[op.input]:
            raise ValueError(f"{op.name}: GlobalAvgPool output must share its input's qparams")
        out = kernels.mean(_int(tensors[op.input]), qparams[op.input].zero_point, runtime)
    else:
        raise TypeError(f"unknown op {type(op).__name__} ({getattr(op, 'name', '?')})")
    return out.numpy().astype(np.int8)


def run_reference_tensors(graph: IntegerGraph, x: np.ndarray, runtime: str = "xnnpack") -> dict[str, np.ndarray]:
    """Run `graph` on int8 NCHW input `x` (N, C, H, W); every tensor by name, int8."""
    if x.dtype != np.int8 or x.ndim != 4 or tuple(x.shape[1:]) != tuple(graph.input_shape[1:]):
        raise ValueError(
            f"expected int8 input of shape (N, {', '.join(map(str, graph.input_shape[1:]))}), "
            f"got {x.dtype} {x.shape}"
        )
    tensors: dict[str, np.ndarray] = {graph.input: x}
    for op in graph.ops:
        tensors[op.output] = run_op(op, tensors, graph.qparams, runtime)
    return tensors


def run_reference(graph: IntegerGraph, x: np.ndarray, runtime: str = "xnnpack") -> np.ndarray:
    """Run `graph` on int8 NCHW input `x` (N, C, H, W); the int8 output (N, classes)."""
    return run_reference_tensors(graph, x, runtime)[graph.output]
