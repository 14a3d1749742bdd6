"""Calibrated static subnet -> IntegerGraph: integer weights, int32 biases and every scale.

The integers come from the layers' own ``integer_params`` (the expressions their eval-mode
forward runs), so the graph is the fake-quant network, not an approximation of it.
"""
from __future__ import annotations

import numpy as np
import torch

from qnas_cli.layers import ActQuant, QConvBN, QLinear, scale_value
from qnas_cli.quant import BIAS_QMAX
from qnas_cli.supernet import Subnet

from .graph import Add, Conv, GlobalAvgPool, IntegerGraph, Linear, QParams


def _qp(q: ActQuant) -> QParams:
    return QParams(float(q.scale.item()), int(q.zero_point))


@torch.no_grad()
def to_integer_graph(sub: Subnet, meta: dict | None = None) -> IntegerGraph:
    """Walk the static subnet in execution order (eval mode, calibrated BN)."""
    if not sub.cfg.enabled:
        raise ValueError(f"only fully int8 subnets have an integer graph (this one is {sub.cfg.label})")
    sub.eval()
    ops: list = []
    qparams: dict[str, QParams] = {"input": _qp(sub.input_q)}

    def conv(name: str, layer: QConvBN, src: str, src_q: ActQuant) -> str:
        q_w, q_b, s_w = layer.integer_params(src_q.scale)
        groups = layer.weight.shape[0] if layer.depthwise else 1
        ops.append(Conv(name, src, name, q_w.numpy().astype(np.int8), q_b.numpy().astype(np.int32),
                        scale_value(s_w), layer.stride, groups, layer.relu))
        qparams[name] = _qp(layer.out_q)
        return name

    def linear(name: str, layer: QLinear, src: str, src_scale: torch.Tensor) -> str:
        q_w, q_b, s_w = layer.integer_params(src_scale)
        ops.append(Linear(name, src, name, q_w.numpy().astype(np.int8), q_b.numpy().astype(np.int32),
                          float(s_w.item()), layer.relu))
        qparams[name] = _qp(layer.out_q)
        return name

    x, x_q = conv("stem", sub.stem, "input", sub.input_q), sub.stem.out_q
    for i, blocks in enumerate(sub.stages):
        for j, block in enumerate(blocks):
            p, block_in = f"s{i}b{j}", x
            if block.expand is not None:
                x, x_q = conv(f"{p}_expand", block.expand, x, x_q), block.expand.out_q
            x, x_q = conv(f"{p}_dw", block.depthwise, x, x_q), block.depthwise.out_q
            x, x_q = conv(f"{p}_project", block.project, x, x_q), block.project.out_q
            if block.add_q is not None:
                ops.append(Add(f"{p}_add", (x, block_in), f"{p}_add"))
                qparams[f"{p}_add"] = _qp(block.add_q)
                x, x_q = f"{p}_add", block.add_q
    x, x_q = conv("head", sub.head, x, x_q), sub.head.out_q
    ops.append(GlobalAvgPool("pool", x, "pool"))
    qparams["pool"] = qparams[x]
    x, s = "pool", sub.head.out_q.scale
    if sub.feature is not None:
        x, s = linear("feature", sub.feature, x, s), sub.feature.out_q.scale
    out = linear("logits", sub.classifier, x, s)
    # An int32 bias at the edge of its range was clamped (in integers: never wrapped): the layer
    # still runs, with a bias off by what did not fit. Reachable when a weight scale sits at its floor.
    saturated = [op.name for op in ops if isinstance(op, (Conv, Linear)) and np.abs(op.bias.astype(np.int64)).max(initial=0) >= BIAS_QMAX]
    bad = [op.name for op in ops if isinstance(op, (Conv, Linear)) and not np.all(np.asarray(op.weight_scale) > 0)]
    bad += [name for name, qp in qparams.items() if not qp.scale > 0]
    if bad:
        raise ValueError(f"non-positive scales in {', '.join(bad[:5])}: this subnet has no valid int8 form")
    r = sub.arch.resolution
    return IntegerGraph("input", (1, sub.in_channels, r, r), out, ops, qparams, {**(meta or {}), "saturated_biases": saturated})


@torch.no_grad()
def quantize_input(sub: Subnet, x: torch.Tensor) -> np.ndarray:
    """Normalised float images (N, C, H, W) -> the int8 tensor the model's input holds."""
    from qnas_cli.quant import A_QMAX, A_QMIN, quantize

    q = sub.input_q
    return quantize(x, q.scale, q.zero_point, A_QMIN, A_QMAX).numpy().astype(np.int8)


@torch.no_grad()
def quantize_output(sub: Subnet, logits: torch.Tensor) -> np.ndarray:
    """Fake-quant logits (on the grid) -> their int8 values."""
    from qnas_cli.quant import A_QMAX, A_QMIN, quantize

    q = sub.classifier.out_q
    return quantize(logits, q.scale, q.zero_point, A_QMIN, A_QMAX).numpy().astype(np.int8)
