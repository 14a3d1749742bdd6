"""Hand-built, realistic IntegerGraphs for export tests.

Scales are chosen the way calibration chooses them: every output scale comes from the range
of the real values the reference computes on sample images, layer by layer, so activations
are neither saturated nor all zero. Weight scales clip the extreme tail (as an MSE-optimal
scale does), so some weights sit at +-127.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np

from export.graph import Add, Conv, GlobalAvgPool, IntegerGraph, Linear, Op, QParams
from export.reference import quantize, real_output

Scheme = Literal["symmetric", "full_range"]


def sample_images(n: int, channels: int, size: int, scheme: Scheme, seed: int) -> tuple[np.ndarray, QParams]:
    """Smooth random int8 images (N, C, H, W) and their qparams.

    full_range: pixels in [0, 1] (scale 1/255, zero point -128); symmetric: normalised pixels
    in about [-2.5, 2.5] (zero point 0). Low-frequency noise, so convs see structure.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n, channels, size // 4 + 2, size // 4 + 2))
    img = coarse.repeat(4, axis=2).repeat(4, axis=3)[:, :, :size, :size]
    img = img + 0.3 * rng.normal(size=img.shape)
    if scheme == "full_range":
        qp = QParams(1.0 / 255.0, -128)
        real = np.clip(0.5 + 0.2 * img, 0.0, 1.0)
    else:
        qp = QParams(2.5 / 127.0, 0)
        real = np.clip(img, -2.5, 2.5)
    return quantize(real, qp), qp


class GraphBuilder:
    """Appends ops one at a time, running each on the sample images to pick its output scale."""

    def __init__(self, images: np.ndarray, input_qp: QParams, scheme: Scheme, seed: int,
                 input_name: str = "input") -> None:
        self.rng = np.random.default_rng(seed)
        self.scheme = scheme
        self.input_name = input_name
        self.input_shape = (1, *images.shape[1:])
        self.tensors: dict[str, np.ndarray] = {input_name: images}
        self.qparams: dict[str, QParams] = {input_name: input_qp}
        self.ops: list[Op] = []

    def _emit(self, op: Op, nonneg: bool, same_as: str | None = None) -> str:
        y = real_output(op, self.tensors, self.qparams)
        if same_as is not None:
            qp = self.qparams[same_as]
        elif nonneg and self.scheme == "full_range":
            qp = QParams(float(np.percentile(y, 99.99)) / 255.0, -128)
        else:
            qp = QParams(float(np.percentile(np.abs(y), 99.99)) / 127.0, 0)
        assert qp.scale > 0, f"{op.name}: all-zero output, pick another seed"
        self.qparams[op.output] = qp
        self.tensors[op.output] = quantize(y, qp)
        self.ops.append(op)
        return op.output

    def _weights(self, shape: tuple[int, ...], fan_in: int) -> tuple[np.ndarray, float]:
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
        s_w = 0.9 * float(np.abs(w).max()) / 127.0  # clips the tail, like an MSE-optimal scale
        return np.clip(np.rint(w / s_w), -127, 127).astype(np.int8), s_w

    def _bias(self, op: Conv | Linear, axes: tuple[int, ...], centre: bool = False) -> np.ndarray:
        """A bias of about a third of the pre-bias spread per channel (as BN folding gives);
        centre=True also removes each channel's mean, so logits rank classes per image."""
        y0 = real_output(replace(op, relu=False), self.tensors, self.qparams)
        spread = y0.std(axis=axes) + 1e-9
        b_real = self.rng.normal(0.0, 0.3, size=spread.shape) * spread
        if centre:
            b_real -= y0.mean(axis=axes)
        s_b = self.qparams[op.input].scale * op.weight_scale
        return np.rint(b_real / s_b).astype(np.int32)

    def conv(self, name: str, src: str, out_ch: int, k: int, stride: int = 1,
             depthwise: bool = False, relu: bool = True) -> str:
        in_ch = self.tensors[src].shape[1]
        groups = in_ch if depthwise else 1
        if depthwise:
            out_ch = in_ch
        w, s_w = self._weights((out_ch, in_ch // groups, k, k), (in_ch // groups) * k * k)
        op = Conv(name, src, f"{name}.out", w, np.zeros(out_ch, np.int32), s_w, stride, groups, relu)
        op.bias = self._bias(op, (0, 2, 3))
        return self._emit(op, nonneg=relu)

    def add(self, name: str, a: str, b: str) -> str:
        return self._emit(Add(name, (a, b), f"{name}.out"), nonneg=False)

    def pool(self, name: str, src: str) -> str:
        return self._emit(GlobalAvgPool(name, src, f"{name}.out"), nonneg=False, same_as=src)

    def linear(self, name: str, src: str, out_features: int, relu: bool = False) -> str:
        in_features = self.tensors[src].shape[1]
        w, s_w = self._weights((out_features, in_features), in_features)
        op = Linear(name, src, f"{name}.out", w, np.zeros(out_features, np.int32), s_w, relu)
        op.bias = self._bias(op, (0,), centre=True)
        return self._emit(op, nonneg=relu)

    def inverted_residual(self, name: str, src: str, expand: int, k: int, out_ch: int,
                          stride: int = 1) -> str:
        in_ch = self.tensors[src].shape[1]
        h = self.conv(f"{name}.expand", src, in_ch * expand, 1)
        h = self.conv(f"{name}.dw", h, 0, k, stride, depthwise=True)
        h = self.conv(f"{name}.project", h, out_ch, 1, relu=False)
        if stride == 1 and in_ch == out_ch:
            h = self.add(f"{name}.add", src, h)
        return h

    def build(self, output: str) -> IntegerGraph:
        return IntegerGraph(self.input_name, self.input_shape, output, list(self.ops),
                            {k: self.qparams[k] for k in self.tensors})


def mobilenet_like(channels: int = 3, size: int = 24, scheme: Scheme = "full_range", seed: int = 0,
                   n_images: int = 64, num_classes: int = 10) -> tuple[IntegerGraph, np.ndarray]:
    """A small MobileNetV3-style graph (ReLU, no SE) and the int8 images its scales came from.

    stem 3x3/2 -> IR(e3, dw3x3, residual) -> IR(e2, dw5x5, residual) -> IR(e3, dw3x3/2)
    -> head 1x1 -> global average pool -> linear logits.
    """
    images, in_qp = sample_images(n_images, channels, size, scheme, seed)
    b = GraphBuilder(images, in_qp, scheme, seed + 1)
    x = b.conv("stem", "input", 8, 3, stride=2)
    x = b.inverted_residual("b1", x, expand=3, k=3, out_ch=8)
    x = b.inverted_residual("b2", x, expand=2, k=5, out_ch=8)
    x = b.inverted_residual("b3", x, expand=3, k=3, out_ch=16, stride=2)
    x = b.conv("head", x, 32, 1)
    x = b.pool("pool", x)
    x = b.linear("classifier", x, num_classes)
    return b.build(x), images
