"""Numpy executor of an IntegerGraph: the ground truth the TFLite model is checked against.

It implements the integer contract literally: dequantize, compute the real-valued op,
requantize with round-half-to-even and clamp to int8. Convolutions and matmuls accumulate
the integer products exactly in int64 (the same sum TFLite's int32 accumulator holds), so
the only floating-point step is the final rescale, done in float64.

One deliberate exception: GlobalAvgPool. Its output shares the input's qparams, so it is
q_out = round(mean over H, W of q_in), zero point included, and that mean lands exactly on .5
for about 1 in H*W values when H*W is even. XNNPACK (the default, production delegate) rounds
those ties half away from zero *in the raw int8 domain*: with zero point -128 a tie at
raw -125.5 goes to -126. We do the same, in integers, so no float error can move a tie.
(The built-in MEAN kernel rounds ties towards +inf instead, and its fixed-point 1/(H*W) is
coarse enough to misround near-ties too: it is off by one there, see export/verify.py.)
"""
from __future__ import annotations

import numpy as np

from export.graph import Add, Conv, GlobalAvgPool, IntegerGraph, Linear, Op, QParams


def quantize(real: np.ndarray, qp: QParams) -> np.ndarray:
    """real -> int8 with round-half-to-even (np.rint) and saturation."""
    q = np.rint(np.asarray(real, np.float64) / qp.scale) + qp.zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def global_avg_pool(q: np.ndarray, qp: QParams) -> np.ndarray:
    """Integer global average pool (N, C, H, W) -> (N, C) with output qparams = input qparams:
    the raw int8 mean, exact ties rounded away from zero (as XNNPACK; module docstring)."""
    n = q.shape[2] * q.shape[3]
    total = q.astype(np.int64).sum(axis=(2, 3))
    mean = np.sign(total) * ((2 * np.abs(total) + n) // (2 * n))
    return np.clip(mean, -128, 127).astype(np.int8)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    return qp.scale * (q.astype(np.float64) - qp.zero_point)


def _conv_acc(x: np.ndarray, w: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """Integer conv, 'same' padding k//2. x: (N, C, H, W) int64 (zero point removed);
    w: (O, C/groups, k, k) int64. Returns (N, O, Ho, Wo) int64."""
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ho = (h + 2 * p - k) // stride + 1
    wo = (wd + 2 * p - k) // stride + 1
    # Patches (N, C, Ho, Wo, k, k) as a strided view: no copy until the einsum.
    sn, sc, sh, sw = xp.strides
    patches = np.lib.stride_tricks.as_strided(
        xp, (n, c, ho, wo, k, k), (sn, sc, sh * stride, sw * stride, sh, sw), writeable=False
    )
    og = o // groups
    patches = patches.reshape(n, groups, cg, ho, wo, k, k)
    wg = w.reshape(groups, og, cg, k, k)
    out = np.einsum("ngchwij,gocij->ngohw", patches, wg, optimize=True)
    return out.reshape(n, o, ho, wo)


def real_output(op: Op, tensors: dict[str, np.ndarray], qparams: dict[str, QParams]) -> np.ndarray:
    """The real value y an op computes from its int8 inputs, before requantization (float64)."""
    if isinstance(op, (Conv, Linear)):
        qp_in = qparams[op.input]
        x = tensors[op.input].astype(np.int64) - qp_in.zero_point
        w = op.weight.astype(np.int64)
        if isinstance(op, Conv):
            acc = _conv_acc(x, w, op.stride, op.groups) + op.bias.astype(np.int64)[None, :, None, None]
        else:
            acc = x @ w.T + op.bias.astype(np.int64)[None, :]
        y = acc.astype(np.float64) * (qp_in.scale * op.weight_scale)
        return np.maximum(y, 0.0) if op.relu else y
    if isinstance(op, Add):
        a, b = op.inputs
        return dequantize(tensors[a], qparams[a]) + dequantize(tensors[b], qparams[b])
    if isinstance(op, GlobalAvgPool):
        return dequantize(tensors[op.input], qparams[op.input]).mean(axis=(2, 3))
    raise TypeError(f"unknown op {type(op).__name__} ({getattr(op, 'name', '?')})")


def run_op(op: Op, tensors: dict[str, np.ndarray], qparams: dict[str, QParams]) -> np.ndarray:
    """One op of the contract: its int8 output from the int8 tensors it reads."""
    if isinstance(op, GlobalAvgPool):
        if qparams[op.output] != qparams[op.input]:
            raise ValueError(f"{op.name}: GlobalAvgPool output must share its input's qparams")
        return global_avg_pool(tensors[op.input], qparams[op.input])
    return quantize(real_output(op, tensors, qparams), qparams[op.output])


def run_reference_tensors(graph: IntegerGraph, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run `graph` on int8 NCHW input `x` (N, C, H, W); every tensor by name, int8."""
    if x.dtype != np.int8 or x.ndim != 4 or tuple(x.shape[1:]) != tuple(graph.input_shape[1:]):
        raise ValueError(
            f"expected int8 input of shape (N, {', '.join(map(str, graph.input_shape[1:]))}), "
            f"got {x.dtype} {x.shape}"
        )
    tensors: dict[str, np.ndarray] = {graph.input: x}
    for op in graph.ops:
        tensors[op.output] = run_op(op, tensors, graph.qparams)
    return tensors


def run_reference(graph: IntegerGraph, x: np.ndarray) -> np.ndarray:
    """Run `graph` on int8 NCHW input `x` (N, C, H, W); the int8 output (N, classes)."""
    return run_reference_tensors(graph, x)[graph.output]
