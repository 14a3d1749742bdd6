"""The integer graph: the hand-off between the calibrated PyTorch subnet and the TFLite writer.

Every tensor the int8 TFLite model holds is named here with its quantization parameters,
and every op carries its integer constants. Real value of an int8 tensor t:
``real = scale * (q - zero_point)``. Conv/FC weights are int8, symmetric (zero point 0, range
[-127, 127]), per-tensor, or for convs optionally per output channel (``weight_scale`` a 1-D
float32 array of O scales); biases are int32 with scale ``s_in * s_w`` (per channel:
``s_in * s_w[o]``) and zero point 0.

The graph is plain data (numpy arrays + floats), so the export toolchain never imports the
supernet code, and tests can build graphs by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class QParams:
    """Per-tensor int8 quantization of one activation tensor."""

    scale: float
    zero_point: int  # in [-128, 127]; 0 (symmetric) or -128 (full range for non-negative tensors)


@dataclass
class Conv:
    """Conv2d (+ folded BN) with optional fused ReLU. NCHW semantics, 'same' padding k//2."""

    name: str
    input: str
    output: str
    weight: np.ndarray  # int8 (O, I/groups, k, k)
    bias: np.ndarray  # int32 (O,), scale = s_in * weight_scale
    weight_scale: float | np.ndarray  # float, or float32 (O,): one scale per output channel
    stride: int
    groups: int
    relu: bool

    @property
    def per_channel(self) -> bool:
        return is_per_channel(self)


@dataclass
class Add:
    """Elementwise residual add of two int8 tensors (no activation)."""

    name: str
    inputs: tuple[str, str]
    output: str


@dataclass
class GlobalAvgPool:
    """Mean over H, W; output keeps the input's qparams (TFLite requires it), shape (N, C)."""

    name: str
    input: str
    output: str


@dataclass
class Linear:
    """Fully connected layer on (N, C) with optional fused ReLU."""

    name: str
    input: str
    output: str
    weight: np.ndarray  # int8 (O, I)
    bias: np.ndarray  # int32 (O,), scale = s_in * weight_scale
    weight_scale: float  # per-tensor always
    relu: bool

    @property
    def per_channel(self) -> bool:
        return is_per_channel(self)


Op = Conv | Add | GlobalAvgPool | Linear


def is_per_channel(op: Conv | Linear) -> bool:
    """Whether the op's weights have one scale per output channel (a 1-D ``weight_scale``)."""
    return np.ndim(op.weight_scale) == 1


def channel_scale(op: Conv | Linear, ndim: int, axis: int = 0) -> float | np.ndarray:
    """``weight_scale`` shaped to broadcast along ``axis`` (the output channels) of an
    ``ndim``-dimensional array: float64 (O, 1, ...) when per channel, the float itself when per
    tensor (so per-tensor arithmetic stays what it was, bit for bit)."""
    if not is_per_channel(op):
        return op.weight_scale
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(op.weight_scale, np.float64).reshape(shape)


def channel_scales(op: Conv | Linear) -> np.ndarray:
    """The weight scale of every output channel, float64 (O,) (per-tensor: O copies)."""
    return np.broadcast_to(np.asarray(op.weight_scale, np.float64), (op.weight.shape[0],)).copy()


def real_weight(op: Conv | Linear) -> np.ndarray:
    """The real weights ``q_w * s_w`` (per channel along axis 0), float64."""
    return op.weight.astype(np.float64) * channel_scale(op, op.weight.ndim)


@dataclass
class IntegerGraph:
    """A topologically ordered int8 network with one input and one output.

    A subnet has exactly one output. Latency tables convert many blocks in one graph and cut
    them apart afterwards (qnas_cli/export/blocks.py); such a graph lists its other leaves in
    ``extra_outputs`` so that every branch survives conversion.
    """

    input: str
    input_shape: tuple[int, int, int, int]  # (1, C, H, W)
    output: str
    ops: list[Op]
    qparams: dict[str, QParams]  # every tensor name (input, each op output) -> its qparams
    meta: dict = field(default_factory=dict)  # free-form: arch, normalisation, versions
    extra_outputs: tuple[str, ...] = ()

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.output, *self.extra_outputs)
