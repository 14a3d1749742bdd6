"""What a subnet costs besides latency: multiply-accumulates and parameters, from its shapes alone.

The same walk as ``latency.part_keys`` and ``qnas_cli/export/fold.py``: stem, inverted residual blocks
(1x1 expand, kxk depthwise, 1x1 project), 1x1 head, pooling, optional feature FC, classifier.
Parameters count what the int8 model stores: weights (int8) and biases (int32), after BN folding.
"""
from __future__ import annotations

from dataclasses import dataclass

from .latency import conv_out
from .space import Arch, SearchSpace
from .supernet import mid_channels


# Bytes of the int8 .tflite beyond its weights and biases, per op (its tensors, quantization
# parameters, names, options) and per file: fitted by least squares in relative error on real
# exports of `tiny`, `small` and `mbv3` subnets by benchmarks/tflite_size.py, which refits them
# and reports each file's error under these values (`python -m benchmarks.tflite_size`).
TFLITE_BYTES_PER_OP = 368
TFLITE_BYTES_FIXED = 1707
# The default file's uint8 ends (two QUANTIZE ops, a STRIDED_SLICE for a grey model's RGB input) and
# its metadata with the labels: +1,898 and +1,914 B on the demo's two winners, int8-ended vs default.
TFLITE_BYTES_ENDS = 1906
# Per-channel conv weights (--weight-granularity per-channel) store a float32 scale and an int64 zero
# point per output channel, for the weights and for the bias: 24 B per conv output channel (measured:
# 152,120 B more for the largest `small` subnet's 6,368 conv output channels, 11.94 B per entry).
TFLITE_BYTES_PER_CHANNEL = 24


@dataclass(frozen=True)
class Cost:
    macs: int  # multiply-accumulates of one image
    params: int  # stored weights + biases
    weight_bytes: int  # int8 weights + int32 biases: the bulk of the .tflite file
    ops: int  # int8 ops of the exported model (convs, adds, the pool, fully connected layers)

    @property
    def mflops(self) -> float:
        """Millions of multiply-adds (the 'FLOPs' MobileNet papers quote)."""
        return self.macs / 1e6

    @property
    def tflite_kb(self) -> float:
        """Predicted size of the int8 .tflite `qnas export` writes, in KiB."""
        return (self.weight_bytes + TFLITE_BYTES_PER_OP * self.ops + TFLITE_BYTES_FIXED + TFLITE_BYTES_ENDS) / 1024


def arch_cost(space: SearchSpace, arch: Arch, in_channels: int, num_classes: int, per_channel: bool = False) -> Cost:
    """``per_channel``: the supernet's conv weights carry one scale per output channel (their
    quantization parameters count into ``weight_bytes``; FC layers keep one)."""
    macs = params = wbytes = 0
    ops = 1  # the global average pool

    def layer(c_in: int, c_out: int, k: int, out_hw: int, groups: int = 1, conv: bool = True) -> None:
        nonlocal macs, params, wbytes, ops
        w = c_out * (c_in // groups) * k * k
        macs += w * out_hw * out_hw
        params += w + c_out
        wbytes += w + 4 * c_out + (TFLITE_BYTES_PER_CHANNEL * c_out if per_channel and conv else 0)
        ops += 1

    size = conv_out(arch.resolution, space.stem_stride)
    layer(in_channels, space.stem_channels, 3, size)
    c = space.stem_channels
    for spec, stage in zip(space.stages, arch.stages):
        for j, b in enumerate(stage.blocks):
            stride = spec.stride if j == 0 else 1
            mid = mid_channels(c, b.expand)
            if b.expand > 1:
                layer(c, mid, 1, size)
            size = conv_out(size, stride)
            layer(mid, mid, b.kernel, size, groups=mid)
            layer(mid, stage.width, 1, size)
            ops += j > 0  # the residual add (qnas_cli/supernet.py: every block after a stage's first)
            c = stage.width
    layer(c, space.head_channels, 1, size)
    c = space.head_channels
    if space.feature_channels:
        layer(c, space.feature_channels, 1, 1, conv=False)
        c = space.feature_channels
    layer(c, num_classes, 1, 1, conv=False)
    return Cost(macs, params, wbytes, ops)
