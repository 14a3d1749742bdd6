"""BN statistics of a conv over int8 inputs that do not depend on threads or CPU (calibration).

BN calibration sets each conv's running mean and variance from its outputs on a fixed set of
images. Computed the usual way (a float32 conv, then a parallel mean over N, H, W) the last bits
depend on the summation order, which oneDNN and PyTorch's reductions pick by thread count and
instruction set. One flipped bit moves a folded weight or a fake-quantized activation across a
rounding boundary, and the int8 grid carries it to every later layer: the same subnet calibrated
with 1 and 2 threads gave different integers. So calibration computes them from exact values:

- the conv's input is on an int8 grid, so ``u = x / s_in`` holds integers (``q - zero_point``);
- its float32 weights are put on a power-of-two grid per output channel, ``STAT_WEIGHT_BITS``
  bits below the channel's largest magnitude (a change of at most 2**-21 of it: far below
  the statistics' sampling noise), so ``W = w / step`` holds integers too;
- ``conv(u, W)`` is then computed from exact parts (``digit_conv``: float32 convolutions of
  small signed digits of ``W``, each partial sum an integer below 2**24, recombined by
  elementwise operations in a fixed order), and ``conv(x, w) = s_in * step * conv(u, W)``;
- the sums over N, H, W run in a fixed order (``fixed_order_sum``: pairwise halving by
  elementwise adds, which IEEE arithmetic rounds the same everywhere).

Every step is either exact or a fixed sequence of elementwise float operations, so the
statistics are the same bits on any thread count, process count or x86 vector width. The
activations passed on are exact too (``layers.QConvBN._calibrated``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

STAT_WEIGHT_BITS = 20  # |W| <= 2**20 per channel: the weights' precision in the statistics
_F32_EXACT = 2**24  # a float32 sum of integers is exact below this
_MAX_INPUT = 255  # |q - zero_point| of an int8 tensor


def weight_grid(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w`` (O, I, kh, kw) -> (integers W, per-channel power-of-two steps) with ``w ~ W * step``."""
    amax = w.detach().abs().flatten(1).amax(1).double()
    _, exponent = torch.frexp(amax)  # amax < 2**exponent (exact, unlike a float log2)
    step = torch.ldexp(torch.ones_like(amax), exponent - STAT_WEIGHT_BITS)
    step = torch.where(amax > 0, step, torch.ones_like(step))  # an all-zero channel: any step
    return torch.round(w.detach().double() / step.view(-1, 1, 1, 1)), step


def digit_conv(u: Tensor, W: Tensor, stride: int, groups: int) -> Tensor:
    """``conv2d(u, W)`` ('same' padding k//2) as float32, every value computed by the same
    operations on any machine, for integer-valued ``u`` (|u| <= 255) and ``W``.

    ``W`` is written in signed base-2**b digits small enough that every partial sum of
    ``conv(u, digit)`` is an integer below 2**24: each digit conv (oneDNN's float32 kernels) is
    exact, whatever order it sums in. The digit convs are then combined by elementwise float32
    operations in a fixed order: a rounding error of about 2**-24, the same bits everywhere.
    (A float64 conv would be exact in one pass, but PyTorch has no fast float64 depthwise kernel.)
    """
    pad = W.shape[-1] // 2
    b = int(math.floor(math.log2(_F32_EXACT / (_MAX_INPUT * W[0].numel())))) + 1  # |digit| <= 2**(b-1)
    if b < 2:
        raise ValueError(f"a conv with {W[0].numel()} inputs per output is too wide for exact float32 digits")
    rest = W.to(torch.int64)
    x = u.to(torch.float32).contiguous(memory_format=torch.channels_last)
    digits = []
    while not digits or bool(rest.any()):
        digit = rest - (((rest + (1 << (b - 1))) >> b) << b)  # in [-2**(b-1), 2**(b-1))
        rest = (rest - digit) >> b
        digits.append(digit.to(torch.float32))
    out = F.conv2d(x, digits[-1], None, stride, pad, 1, groups)  # most significant first
    for digit in reversed(digits[:-1]):
        out.mul_(2.0**b).add_(F.conv2d(x, digit, None, stride, pad, 1, groups))
    return out


def fixed_order_sum(rows: Tensor) -> Tensor:
    """Sum over dim 0 by pairwise halving: the same additions in the same order on every machine."""
    if rows.shape[0] == 0:
        return rows.new_zeros(rows.shape[1:])
    t = rows
    while t.shape[0] > 1:
        half = t.shape[0] // 2
        head = t[:half] + t[half : 2 * half]
        if t.shape[0] % 2:  # the odd row joins the first
            head[0] += t[-1]
        t = head
    return t[0]


def conv_batch_stats(u: Tensor, s_in: Tensor, w: Tensor, stride: int, groups: int) -> tuple[Tensor, Tensor, int]:
    """Per output channel, mean and biased variance of ``conv2d(x, w)`` over (N, H, W), and the
    count of values each is over, for ``x = s_in * u`` on an int8 grid (``u``: its integers
    ``q - zero_point``); float32 results."""
    W, step = weight_grid(w)
    z = digit_conv(u, W, stride, groups)  # (N, O, H, W) channels_last: conv(x, w) / (s_in * step)
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N*H*W, O), a view in channels_last
    n = rows.shape[0]
    mean = fixed_order_sum(rows) / n
    centred = rows.sub_(mean)
    var = fixed_order_sum(centred.mul_(centred)) / n
    unit = step * float(s_in)  # float64: power-of-two step times the float32 input scale, exact
    return (mean.double() * unit).float(), (var.double() * unit * unit).float(), n
