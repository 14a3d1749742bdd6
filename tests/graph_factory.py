"""Hand-built, realistic IntegerGraphs for export tests.

Built the way calibration builds a real subnet: every conv gets a random BatchNorm folded in
(per-channel mean/std from the sample images), weights are quantized per tensor with a scale
that clips the extreme tail (some weights sit at +-127), and every output scale comes from the
range of the real values the reference computes on sample images, layer by layer, so
activations are neither saturated nor all zero. The logits come from a nearest-class-mean
classifier, so they track the features as a trained head's do (random logits amplify
single-LSB differences many times over, which no trained network does).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np

from qnas_cli.export.graph import Add, Conv, GlobalAvgPool, IntegerGraph, Linear, Op, QParams, channel_scale
from qnas_cli.export.reference import dequantize, quantize, real_output, run_op

Scheme = Literal["symmetric", "full_range"]


def sample_images(n: int, channels: int, size: int, scheme: Scheme, seed: int,
                  classes: int = 10) -> tuple[np.ndarray, QParams]:
    """Smooth random int8 images (N, C, H, W) and their qparams.

    Each image is a noisy copy of one of `classes` random low-frequency prototypes, with its
    own contrast and colour shift, so pooled features (and logits) differ between images as
    they do on real data. full_range: pixels in [0, 1] (scale 1/255, zero point -128);
    symmetric: normalised pixels in about [-2.5, 2.5] (zero point 0).
    """
    rng = np.random.default_rng(seed)
    grid = size // 4 + 2
    prototypes = rng.normal(size=(classes, channels, grid, grid))
    coarse = prototypes[np.arange(n) % classes] + 0.3 * rng.normal(size=(n, channels, grid, grid))
    img = coarse.repeat(4, axis=2).repeat(4, axis=3)[:, :, :size, :size]
    img = img + 0.1 * rng.normal(size=img.shape)
    img = img * rng.uniform(0.3, 1.7, size=(n, channels, 1, 1)) + rng.normal(0.0, 1.0, size=(n, channels, 1, 1))
    if scheme == "full_range":
        qp = QParams(1.0 / 255.0, -128)
        real = np.clip(0.5 + 0.2 * img, 0.0, 1.0)
    else:
        qp = QParams(2.5 / 127.0, 0)
        real = np.clip(img, -2.5, 2.5)
    return quantize(real, qp), qp


class GraphBuilder:
    """Appends ops one at a time, running each on the sample images to pick its output scale."""

    clip_pct = 99.9  # output scale = this percentile of |y| / 127: clips the tail, as LSQ does

    def __init__(self, images: np.ndarray, input_qp: QParams, scheme: Scheme, seed: int,
                 input_name: str = "input", per_channel: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.scheme = scheme
        self.per_channel = per_channel  # convs get one weight scale per output channel
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
            qp = QParams(float(np.percentile(y, self.clip_pct)) / 255.0, -128)
        else:
            qp = QParams(float(np.percentile(np.abs(y), self.clip_pct)) / 127.0, 0)
        assert qp.scale > 0, f"{op.name}: all-zero output, pick another seed"
        self.qparams[op.output] = qp
        self.tensors[op.output] = run_op(op, self.tensors, self.qparams)
        self.ops.append(op)
        return op.output

    def _fold_bn(self, op: Conv | Linear, w_real: np.ndarray, axes: tuple[int, ...],
                 centre: bool = False) -> None:
        """Set op's int8 weight and int32 bias from float weights with a random BatchNorm
        folded in, as calibration does: each output channel's pre-activation on the sample
        images gets std gamma ~ U(0.5, 1.5) and mean beta ~ N(0, 0.5) (0 with centre=True,
        so logits rank classes per image). Then per-tensor quantization, the weight scale
        clipping the largest 10% of the range, as an MSE-optimal scale does; with
        ``per_channel`` (convs only, FC stays per tensor) the same from each row's max abs,
        a float32 scale per output channel."""
        shape = (-1,) + (1,) * (w_real.ndim - 1)
        op.weight_scale = float(np.abs(w_real).max()) / 127.0
        op.weight = np.rint(w_real / op.weight_scale).astype(np.int8)
        op.bias = np.zeros(w_real.shape[0], np.int32)
        y0 = real_output(replace(op, relu=False), self.tensors, self.qparams)
        mu, sigma = y0.mean(axis=axes), y0.std(axis=axes) + 1e-9
        gamma = self.rng.uniform(0.5, 1.5, size=mu.shape)
        beta = np.zeros_like(mu) if centre else self.rng.normal(0.0, 0.5, size=mu.shape)
        w_fold = w_real * (gamma / sigma).reshape(shape)
        b_fold = beta - gamma * mu / sigma
        if self.per_channel and isinstance(op, Conv):
            op.weight_scale = (0.9 * np.abs(w_fold).reshape(len(w_fold), -1).max(1) / 127.0).astype(np.float32)
        else:
            op.weight_scale = 0.9 * float(np.abs(w_fold).max()) / 127.0
        s_w = channel_scale(op, w_fold.ndim)
        op.weight = np.clip(np.rint(w_fold / s_w), -127, 127).astype(np.int8)
        op.bias = np.rint(b_fold / (self.qparams[op.input].scale * channel_scale(op, 1))).astype(np.int32)

    def conv(self, name: str, src: str, out_ch: int, k: int, stride: int = 1,
             depthwise: bool = False, relu: bool = True) -> str:
        in_ch = self.tensors[src].shape[1]
        groups = in_ch if depthwise else 1
        if depthwise:
            out_ch = in_ch
        fan_in = (in_ch // groups) * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(out_ch, in_ch // groups, k, k))
        op = Conv(name, src, f"{name}.out", w, w, 1.0, stride, groups, relu)  # weights set below
        self._fold_bn(op, w, (0, 2, 3))
        return self._emit(op, nonneg=relu)

    def add(self, name: str, a: str, b: str) -> str:
        return self._emit(Add(name, (a, b), f"{name}.out"), nonneg=False)

    def pool(self, name: str, src: str) -> str:
        return self._emit(GlobalAvgPool(name, src, f"{name}.out"), nonneg=False, same_as=src)

    def classifier(self, name: str, src: str, labels: np.ndarray, classes: int) -> str:
        """Logits of a nearest-class-mean classifier on the pooled features (zero-mean per
        class over the sample images). Like a trained head, its weights follow the directions
        in which features actually vary; random weights would mostly cancel that variation
        and blow single-LSB feature changes up into many logit LSBs."""
        feats = dequantize(self.tensors[src], self.qparams[src])  # (N, C)
        w = np.stack([feats[labels == c].mean(0) for c in range(classes)]) - feats.mean(0)
        op = Linear(name, src, f"{name}.out", w, w, 1.0, relu=False)  # weights set below
        self._fold_bn(op, w, (0,), centre=True)
        return self._emit(op, nonneg=False)

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
                   n_images: int = 64, num_classes: int = 10,
                   per_channel: bool = False) -> tuple[IntegerGraph, np.ndarray]:
    """A small MobileNetV3-style graph (ReLU, no SE) and the int8 images its scales came from
    (``per_channel``: every conv's weights with one scale per output channel).

    stem 3x3/2 -> IR(expand 3, dw 3x3, residual add) -> IR(expand 2, dw 5x5/2)
    -> head 1x1 -> global average pool -> linear logits. Even input sizes make onnx2tf
    insert explicit PADs before both stride-2 convs; odd ones let TFLite's SAME padding do.
    """
    images, in_qp = sample_images(n_images, channels, size, scheme, seed, num_classes)
    b = GraphBuilder(images, in_qp, scheme, seed + 1, per_channel=per_channel)
    x = b.conv("stem", "input", 8, 3, stride=2)
    x = b.inverted_residual("b1", x, expand=3, k=3, out_ch=8)
    x = b.inverted_residual("b2", x, expand=2, k=5, out_ch=16, stride=2)
    x = b.conv("head", x, 64, 1)
    x = b.pool("pool", x)
    x = b.classifier("classifier", x, np.arange(n_images) % num_classes, num_classes)
    return b.build(x), images
