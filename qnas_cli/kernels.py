"""The int8 arithmetic of each target runtime, bit for bit: the one place that says how each rounds.

A quantized model file does not fix its own numbers: every runtime accumulates the same int32
sums but requantizes them with its own arithmetic, and the one-LSB disagreements compound with
depth. So parity belongs to a runtime, and the calibrated subnet's exact forward, the integer
graph executor and the export gate all take their arithmetic from here.

Targets (LiteRT 2.1.0 = LiteRT tag v2.1.0, XNNPACK 77468446; every rule below was read in that
source, the file is cited where it is used, and tests/test_kernels_tflite.py checks each op
against the interpreter on random integers, ties and saturation included):

=========  =========================================  ========================================
op         ``xnnpack`` (LiteRT's default delegate)     ``reference`` (BUILTIN_REF resolver)
=========  =========================================  ========================================
CONV, DW   ``rne(f32(f32(acc) * S))``,                 ``MultiplyByQuantizedMultiplier``: a
           ``S = f32(f32(s_in*s_w) / s_out)``          31-bit multiplier of the double
                                                      ``s_in*s_w/s_out``; half up, then half
                                                      away from zero (double rounding)
FC         as CONV                                    ``round_half_away(f64(acc) * eff)``, eff
                                                      in double (LiteRT's float requant)
ADD        20-bit multipliers of ``f32(s/s_out)``,     inputs << 20, 31-bit multipliers,
           ``(bias + a*m_a + b*m_b) >> shift``         three double roundings
           (half up)
MEAN       raw-int8 sum times ``f32(1/N)`` in float32, zero-point-removed sum, ``1/N`` folded
           ``std::round`` (half away from zero)        into the multiplier, double rounding
=========  =========================================  ========================================

Per-channel conv and depthwise weight scales (``s_w`` one per output channel): every runtime
applies the rule above channel by channel, ``s_w[c]`` in place of ``s_w`` (XNNPACK's qc8w
operators, TFLite's per-channel multipliers; FC stays per-tensor).

``mediapipe`` is not a target but a client's runtime: MediaPipe Tasks (PyPI mediapipe 1.2.3, what
apps calling its ImageClassifier run) bundles an XNNPACK whose conv, depthwise, FC and ADD round
as ``xnnpack`` above, and whose MEAN rounds the same float32 product half to *even* (measured op by
op through its ImageClassifier: benchmarks/task_api.py). The exact forward knows it, so a
client's results can be checked bit for bit; a file is still exported and gated for a target.

``micro`` (TFLite Micro, tflite-micro 0.dev20261023) shares the reference kernels except
FULLY_CONNECTED, still fixed-point there: ``MultiplyByQuantizedMultiplier`` with the multiplier of
``double(float32(s_in * s_w)) / double(s_out)`` (``GetQuantizedConvolutionMultipler``).
The optimized built-in kernels (no delegate) are a third arithmetic again: ruy rounds both steps
half up, and their vector blocks round differently from their scalar tails (8 or 16 channels);
they are reported, not targeted.

Integers travel as int64 or float tensors holding integers; the runtimes' int32 accumulators are
emulated with explicit wrap-around where a bound says they could overflow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import choice_error

TARGETS = ("xnnpack", "reference", "micro")
CLIENTS = ("mediapipe",)  # runtimes of task APIs our files are run by: emulated, not export targets
ARITHMETICS = (*TARGETS, *CLIENTS)
TARGET_HELP = ("xnnpack: LiteRT's default CPU delegate, what Android/iOS apps run; "
               "reference: TFLite's reference kernels (LiteRT's BUILTIN_REF resolver); "
               "micro: TFLite Micro on microcontrollers (the reference kernels, but its own FULLY_CONNECTED)")


def check_target(runtime: str) -> str:
    if runtime not in TARGETS:
        raise choice_error("--runtime", runtime, TARGETS)
    return runtime


def check_arithmetic(runtime: str) -> str:
    """A runtime the exact forward can emulate: a target or a client (``ARITHMETICS``)."""
    if runtime not in ARITHMETICS:
        raise choice_error("runtime", runtime, ARITHMETICS)
    return runtime


def family(runtime: str) -> str:
    """The target whose conv, FC and ADD arithmetic ``runtime`` shares (MediaPipe's XNNPACK: xnnpack's)."""
    return "xnnpack" if check_arithmetic(runtime) == "mediapipe" else runtime


def f32(x: float) -> np.float32:
    return np.float32(x)


def wrap_int32(x: Tensor) -> Tensor:
    """Two's-complement wrap of int64 values to int32, as an int32 register holds them."""
    return (x + 2**31).remainder(2**32) - 2**31


# ---- TFLite's fixed-point multipliers (reference kernels) -------------------------------------

def quantize_multiplier(real: float) -> tuple[int, int]:
    """``real = m * 2**(shift - 31)`` with a 31-bit ``m`` (TFLite ``QuantizeMultiplier``,
    tensorflow/lite/kernels/internal/quantization_util.cc): frexp, then ``std::round`` (ties away
    from zero) of the mantissa times 2**31; a mantissa that rounds up to 2**31 is halved."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    fixed = int(math.floor(abs(q) * 2**31 + 0.5)) * (1 if q > 0 else -1)  # exact: q * 2**31 is a double
    if abs(fixed) == 2**31:
        fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return fixed, shift


def rounding_doubling_high_mul(a: Tensor, b: int | Tensor) -> Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: ``(a*b + nudge) / 2**31``, truncated toward
    zero, nudge ``2**30`` or ``1 - 2**30`` by sign (gemmlowp/fixedpoint/fixedpoint.h). Saturation
    only for ``a == b == -2**31``, which a positive multiplier never meets."""
    ab = a * b
    nudge = torch.where(ab >= 0, 2**30, 1 - 2**30)
    return torch.div(ab + nudge, 2**31, rounding_mode="trunc")


def quantize_multipliers(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_multiplier`` of each element (int64 arrays), vectorized for per-channel scales:
    the same frexp, ``floor(q * 2**31 + 0.5)`` (exact in double: q * 2**31 < 2**31 keeps 22
    fraction bits) and the same corrections, so each channel equals the scalar call."""
    real = np.asarray(real, np.float64)
    q, shift = np.frexp(real)
    fixed = (np.floor(np.abs(q) * 2**31 + 0.5) * np.sign(q)).astype(np.int64)
    shift = shift.astype(np.int64)
    top = np.abs(fixed) == 2**31
    fixed, shift = np.where(top, fixed // 2, fixed), np.where(top, shift + 1, shift)
    zero = (real == 0.0) | (shift < -31)
    return np.where(zero, 0, fixed), np.where(zero, 0, shift)


def rounding_divide_by_pot(x: Tensor, exponent: int | Tensor) -> Tensor:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2**exponent`` rounded to nearest, ties away from zero.
    ``exponent`` may be an int64 tensor broadcasting with ``x`` (per-channel shifts)."""
    if isinstance(exponent, int) and exponent == 0:
        return x
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (x < 0).to(x.dtype)
    return (x >> exponent) + ((x & mask) > threshold).to(x.dtype)


def multiply_by_quantized_multiplier(x: Tensor, multiplier: int | Tensor, shift: int | Tensor) -> Tensor:
    """TFLite ``MultiplyByQuantizedMultiplier`` (kernels/internal/common.h, double rounding):
    a left shift for multipliers >= 1, the rounding doubling high multiply, a rounding right shift.
    ``multiplier`` and ``shift`` are ints, or int64 tensors broadcasting with ``x`` (per channel:
    TFLite's per-channel conv calls the same function with channel c's pair,
    reference/integer_ops/conv.h, depthwise_conv.h)."""
    if isinstance(shift, Tensor):
        left, right = shift.clamp(min=0), (-shift).clamp(min=0)
        x = wrap_int32(x << left) if bool((left > 0).any()) else x
        return rounding_divide_by_pot(rounding_doubling_high_mul(x, multiplier), right)
    left, right = max(shift, 0), max(-shift, 0)
    x = wrap_int32(x * (1 << left)) if left else x
    return rounding_divide_by_pot(rounding_doubling_high_mul(x, multiplier), right)


# ---- int32 accumulation, exactly --------------------------------------------------------------

def conv_accumulate(x: Tensor, w: Tensor, bias: Tensor, stride: int, groups: int) -> Tensor:
    """The int32 accumulators of an int8 conv ('same' padding k//2), exactly, as a float tensor.

    ``x`` holds ``q - zero_point`` (so padding with 0 is padding with the zero point, as TFLite's
    PAD and SAME convs do) and ``w``, ``bias`` integers, all as float tensors.
    """
    bound = _bound(w.flatten(1), bias)
    dtype = _exact_dtype(x, bound)
    # NHWC: oneDNN's fast (depthwise) kernels; 1.4x faster search scoring than NCHW on CPU
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    acc = torch.nn.functional.conv2d(x, w.to(dtype), bias.to(dtype), stride, w.shape[-1] // 2, 1, groups)
    return _wrapped(acc, bound)


def linear_accumulate(x: Tensor, w: Tensor, bias: Tensor) -> Tensor:
    """``conv_accumulate`` for a fully connected layer: (N, I) x (O, I) -> (N, O)."""
    bound = _bound(w, bias)
    dtype = _exact_dtype(x, bound)
    return _wrapped(torch.nn.functional.linear(x.to(dtype), w.to(dtype), bias.to(dtype)), bound)


def _bound(w_rows: Tensor, bias: Tensor) -> float:
    """Largest |partial sum| any input can produce: |x| <= 255 (q - zero point), per output row."""
    return (w_rows.abs().sum(1) * 255 + bias.abs().to(w_rows.dtype)).max().item()


def _exact_dtype(x: Tensor, bound: float) -> torch.dtype:
    """A float conv of integers is exact while every partial sum stays below 2**24 (float32) or
    2**53 (float64). On CUDA always float64: TF32 may round float32 convolutions."""
    return torch.float32 if bound < 2**24 and not x.is_cuda else torch.float64


def _wrapped(acc: Tensor, bound: float) -> Tensor:
    """The int32 register's value (two's-complement wrap; reachable only with a saturated bias)."""
    return acc if bound < 2**31 else wrap_int32(acc.to(torch.int64)).to(torch.float64)


def round_half_away(x: Tensor) -> Tensor:
    """C's ``round``/``std::round``, exactly: ``floor(|x| + 0.5)`` would itself round just below a tie."""
    whole = torch.trunc(x)
    return whole + torch.sign(x) * ((x - whole).abs() >= 0.5).to(x.dtype)  # x - whole is exact


# ---- requantization of conv / depthwise / FC accumulators ------------------------------------

@dataclass(frozen=True)
class Requant:
    """How one conv, depthwise conv or FC maps its int32 accumulator to int8."""

    runtime: str
    scale: np.float32 | Tensor  # xnnpack: float32(float32(s_in * s_w) / s_out)
    multiplier: int | Tensor  # reference conv: fixed-point form of double(s_in) * double(s_w) / double(s_out)
    shift: int | Tensor
    real: float = 0.0  # reference FC: that double itself, applied in double
    # Per-channel weight scales: scale (float32), multiplier and shift (int64) are 1-D tensors,
    # one entry per output channel, applied along dim 1 of the accumulators.

    @property
    def per_channel(self) -> bool:
        return isinstance(self.scale, Tensor)


def conv_requant(runtime: str, s_in: float, s_w: float | np.ndarray, s_out: float,
                 fully_connected: bool = False) -> Requant:
    """The requantization a runtime derives from the three stored float32 scales.

    XNNPACK: ``input_scale * kernel_scale / output_scale`` in float32, left to right
    (src/operators/convolution-nhwc.c, fully-connected-nc.c). TFLite reference conv and
    depthwise: the same in double, as a 31-bit multiplier (tflite/kernels/kernel_util.cc
    ``PopulateConvolutionQuantizationParams``); reference FC: that double, applied in double
    (tflite/kernels/internal/reference/integer_ops/fully_connected.h, LiteRT 921360770).

    ``s_w`` a 1-D array: per-output-channel scales of a conv or depthwise conv (``_per_channel``).
    """
    runtime = family(runtime)
    if isinstance(s_w, np.ndarray) and s_w.ndim:  # isinstance, not np.ndim: the scalar path is hot
        return _per_channel(runtime, s_in, s_w, s_out, fully_connected)
    s_in, s_w, s_out = f32(s_in), f32(s_w), f32(s_out)
    scale = np.float32(f32(s_in * s_w) / s_out)  # float32 arithmetic, in XNNPACK's order
    real = float(s_in) * float(s_w) / float(s_out)
    if check_target(runtime) == "reference" and fully_connected:
        return Requant(runtime, scale, 0, 0, real)
    if runtime == "micro" and fully_connected:  # TFLite Micro's FC: the float32 product, fixed point
        real = float(f32(s_in * s_w)) / float(s_out)
    multiplier, shift = quantize_multiplier(real) if runtime != "xnnpack" else (0, 0)
    return Requant(runtime, scale, multiplier, shift)


def _per_channel(runtime: str, s_in: float, s_w: np.ndarray, s_out: float, fully_connected: bool) -> Requant:
    """``conv_requant`` of each channel's scale, as 1-D tensors. XNNPACK qc8w:
    ``requantization_scale[c] = input_scale * kernel_scale[c] / output_scale`` in float32, left to
    right (src/operators/convolution-nhwc.c ``init_requantization_scale_qx8_qc8w``, 75db3c09);
    TFLite: ``double(input_scale) * double(filter_scale[c]) / double(output_scale)`` ->
    ``QuantizeMultiplier`` per channel (kernel_util.cc ``PopulateConvolutionQuantizationParams``).
    Per-channel FC is not a layout we export, and its arithmetic is unverified: refused."""
    if fully_connected:
        raise ValueError("per-channel weight scales are emulated for conv and depthwise only, not FC")
    check_target(runtime)
    s_w = np.asarray(s_w, np.float32)
    s_in, s_out = f32(s_in), f32(s_out)
    scale = ((s_in * s_w) / s_out).astype(np.float32)  # float32 elementwise, as the scalar path
    real = float(s_in) * s_w.astype(np.float64) / float(s_out)
    multiplier, shift = quantize_multipliers(real) if runtime != "xnnpack" else (np.zeros(len(s_w), np.int64),) * 2
    return Requant(runtime, torch.from_numpy(scale), torch.from_numpy(multiplier), torch.from_numpy(shift))


def _along_channels(v: Tensor, acc: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast along dim 1 of acc ((N, O, H, W) or (N, O))."""
    return v.to(acc.device).view(-1, *([1] * (acc.ndim - 2)))


def requantize(acc: Tensor, rq: Requant, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """int32 accumulators (bias included, as ``conv_accumulate`` gives them; consumed: the
    xnnpack path works in place) -> int8 values, as a float32 tensor of integers.

    ``qmin``/``qmax`` are the int8 bounds of the fused activation (``qmin = zero_point`` for ReLU).
    The zero point is added after rounding by every runtime, so ``zero_point=0`` with bounds
    shifted by it gives ``q - zero_point`` directly. Per-channel ``rq``: the same rounding, with
    channel c's scale (xnnpack's qc8w microkernels) or multiplier and shift on ``acc[:, c]``.
    """
    if rq.per_channel:
        scale, multiplier, shift = (_along_channels(v, acc) for v in (rq.scale, rq.multiplier, rq.shift))
    else:
        scale, multiplier, shift = float(rq.scale), rq.multiplier, rq.shift
    if rq.runtime == "xnnpack":
        # fp32 requantization: float32(acc) * scale, rounded half to even (XNNPACK's qs8 "fp32"
        # microkernels, e.g. src/qs8-gemm/gen/*-fp32-*.c; cvtps2dq / magic-bias rounding).
        # Converting an exact float64 to float32 rounds to nearest, as cvtdq2ps does with the int32.
        y = acc.to(torch.float32).mul_(scale).round_()  # acc is a fresh tensor: in place is safe
        return y.add_(zero_point).clamp_(qmin, qmax) if zero_point else y.clamp_(qmin, qmax)
    if rq.real:  # reference FC: double, one rounding half away from zero
        y = round_half_away(acc.to(torch.float64) * rq.real)
    else:
        y = multiply_by_quantized_multiplier(acc.to(torch.int64), multiplier, shift)
    return (y + zero_point).clamp_(qmin, qmax).to(torch.float32)


# ---- ADD --------------------------------------------------------------------------------------

def add(a: Tensor, b: Tensor, qa: tuple[float, int], qb: tuple[float, int], qo: tuple[float, int],
        runtime: str) -> Tensor:
    """Elementwise int8 ADD (no activation); ``q*`` are (scale, zero point) of a, b and the output."""
    if family(runtime) == "xnnpack":
        return xnnpack_add(a, b, qa, qb, qo)
    return reference_add(a, b, qa, qb, qo)  # reference and micro


def xnnpack_add(a: Tensor, b: Tensor, qa, qb, qo) -> Tensor:
    """XNNPACK qs8 vadd: 20-bit integer multipliers for ``s_a/s_out`` and ``s_b/s_out`` (float32),
    one rounding bias, an arithmetic right shift (XNNPACK src/microparams-init.c
    ``xnn_init_qs8_add_minmax_scalar_params``; src/qs8-vadd/)."""
    sa, sb = f32(f32(qa[0]) / f32(qo[0])), f32(f32(qb[0]) / f32(qo[0]))
    exponent = math.frexp(float(max(abs(sa), abs(sb))))[1] - 1  # the float's unbiased exponent
    shift = 20 - exponent
    ma = int(np.rint(np.float32(math.ldexp(float(sa), shift))))
    mb = int(np.rint(np.float32(math.ldexp(float(sb), shift))))
    bias = (1 << (shift - 1)) - ma * qa[1] - mb * qb[1]
    acc = bias + a * ma + b * mb
    return ((acc >> shift) + qo[1]).clamp_(-128, 127).to(torch.float32)


def reference_add(a: Tensor, b: Tensor, qa, qb, qo) -> Tensor:
    """TFLite reference int8 ADD (kernels/add.cc Prepare, reference_integer_ops/add.h): both inputs
    shifted left by 20 bits, scaled to ``s/(2 max(s_a, s_b))``, summed, then scaled to the output."""
    left_shift = 20
    twice_max = float(2 * max(f32(qa[0]), f32(qb[0])))
    ma, sa = quantize_multiplier(float(f32(qa[0])) / twice_max)
    mb, sb = quantize_multiplier(float(f32(qb[0])) / twice_max)
    mo, so = quantize_multiplier(twice_max / float(f32((1 << left_shift) * f32(qo[0]))))
    xa = multiply_by_quantized_multiplier((a - qa[1]) * (1 << left_shift), ma, sa)
    xb = multiply_by_quantized_multiplier((b - qb[1]) * (1 << left_shift), mb, sb)
    return (multiply_by_quantized_multiplier(xa + xb, mo, so) + qo[1]).clamp_(-128, 127).to(torch.float32)


# ---- MEAN over H, W (input and output share scale and zero point) ----------------------------

def mean(q: Tensor, zero_point: int, runtime: str) -> Tensor:
    """(N, C, H, W) int8 values -> (N, C): TFLite MEAN over H, W, output sharing the input's
    scale and zero point (TFLite requires it of our pool); int8 values in a float32 tensor."""
    n = q.shape[-1] * q.shape[-2]
    total = q.sum(dim=(-2, -1))
    if check_arithmetic(runtime) in ("xnnpack", "mediapipe"):
        return xnnpack_mean(total, zero_point, n, half_even=runtime == "mediapipe")
    return reference_mean(total, zero_point, n)  # reference and micro


def xnnpack_mean(total: Tensor, zero_point: int, n: int, half_even: bool = False) -> Tensor:
    """XNNPACK's reduce-mean (src/operators/reduce-nd.c ``reshape_reduce_nd``, the int32 -> qint8
    convert of src/reference/unary-elementwise.cc): the raw int8 sum times
    ``f32(f32(s_in/s_out) * f32(1/N))`` plus a float32 zero point, rounded half away from zero
    (``half_even``: to even, as MediaPipe's bundled XNNPACK rounds it)."""
    scale = np.float32(np.float32(1.0) * np.float32(1.0 / np.float32(n)))  # s_in/s_out = 1
    zp = np.float32(np.float32(zero_point) - np.float32(np.float32(n * zero_point) * scale))
    t = total.to(torch.float32).mul_(float(scale)).add_(float(zp))  # float32 throughout
    rounded = t.round() if half_even else round_half_away(t.to(torch.float64))
    return rounded.clamp_(-128, 127).to(torch.float32)


def reference_mean(total: Tensor, zero_point: int, n: int) -> Tensor:
    """TFLite reference MEAN (``reference_ops::QuantizedMeanOrSum``, kernels/internal/reference/reduce.h):
    the scale ratio's multiplier (1.0, i.e. ``2**30``, shift 1) with ``1/n`` folded in by an integer
    division after a left shift of ``min(floor(log2 n), 32)`` bits, applied to the
    zero-point-removed sum by ``MultiplyByQuantizedMultiplier`` (so 22/9 = 2.44 comes out 3)."""
    multiplier, shift = quantize_multiplier(1.0)
    pre = min(n.bit_length() - 1, 32, 31 + shift)
    multiplier, shift = (multiplier << pre) // n, shift - pre
    y = multiply_by_quantized_multiplier(total.to(torch.int64) - zero_point * n, multiplier, shift)
    return (y + zero_point).clamp_(-128, 127).to(torch.float32)
