"""The integer contract and its fake-quantization math, in one place.

Real value of an int8 tensor: ``real = scale * (q - zero_point)``.

- Weights (conv, FC): int8, symmetric, zero point 0, q in [-127, 127]; one scale per tensor, or
  (``--weight-granularity per-channel``) one per conv output channel, TFLite's per-axis
  convention for CONV_2D and DEPTHWISE_CONV_2D. FC weights keep one scale.
- Biases: int32, scale = s_in * s_w (per channel where s_w is), zero point 0.
- Activations: int8 per-tensor, q in [-128, 127]. Zero point 0 ("symmetric", the paper's
  scheme) or -128 for non-negative tensors ("full-range": all 256 levels after a ReLU).
- Rounding: fake quantization rounds half to even (``torch.round``) in float32. How each
  deployment runtime requantizes (float32 or fixed-point, which ties go where) is stated once, in
  ``kernels``; the eval-mode forward uses it to be exact (``layers.Exact``).

Scales are learned with LSQ (Esser et al. 2019): a straight-through estimator for rounding and
the LSQ gradient scale ``1/sqrt(numel * q_max)`` on the step size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import kernels
from .errors import UserError, choice_error

W_QMAX = 127  # weights: [-127, 127] (TFLite's int8 weight spec)
A_QMIN, A_QMAX = -128, 127  # activations
BIAS_QMAX = 2**31 - 1
# Version of the integer contract above and of how calibration derives integers from a supernet
# (fold, scale prediction, rounding, pooling). Bump it whenever any of those changes: calibrated
# subnets record it, and export recalibrates one made under another version.
# 2: BN calibration computes its statistics and activations exactly (batch_stats), independent of
# threads; version-1 calibrations differ from it in the last bits.
# 3: weight scales may be per output channel (QuantConfig.weight_granularity); calibrations record
# the version, so one made before it is recalibrated rather than trusted.
INTEGER_CONTRACT_VERSION = 3


@dataclass(frozen=True)
class QuantConfig:
    """How the supernet is quantized. ``mode='none'`` is the float supernet."""

    # int8: fully quantized (every op integer, what qnas exports) | none: float |
    # convs: only convolutions and FCs quantized (inputs and weights), BN, ReLU, adds and pooling
    # float, as BatchQuant/OQA train and deploy: the paper's partially quantized baseline (Table 1)
    mode: str = "int8"
    act_scheme: str = "symmetric"  # symmetric (zero point 0, the paper's) | full-range (zp -128 after ReLU)
    bn_fold: str = "batch"  # batch: fold batch statistics in training (paper §4.1) | moving: the baseline
    weight_scale: str = "predictor"  # predictor: s = mean(theta / sigma) (paper §4.2) | shared: plain LSQ
    # per-tensor: one conv weight scale (the paper's) | per-channel: one per output channel, where the
    # predictor's s_i = theta_i / sigma_i makes the integer weights round(w_i * gamma_i / theta_i)
    # independent of the BN statistics, so calibration changes only the scales (exact for every subnet);
    # per-channel steps are set from data at the int8 phase's start and held (layers.QConvBN says why)
    weight_granularity: str = "per-tensor"

    def __post_init__(self) -> None:
        for name, legal in (
            ("mode", ("int8", "convs", "none")),
            ("act_scheme", ("symmetric", "full-range")),
            ("bn_fold", ("batch", "moving")),
            ("weight_scale", ("predictor", "shared")),
            ("weight_granularity", ("per-tensor", "per-channel")),
        ):
            if getattr(self, name) not in legal:
                option = "--quant" if name == "mode" else f"--{name.replace('_', '-')}"
                raise choice_error(option, getattr(self, name), legal)

        if self.mode == "convs" and (self.weight_scale, self.bn_fold) != ("shared", "batch"):
            # the predictor and the fold act on BN-folded weights; convs-only keeps BN apart
            raise UserError("--quant convs keeps BN unfolded: it takes --weight-scale shared (plain LSQ) "
                            "and the default --bn-fold")
        if self.mode == "convs" and self.per_channel:
            raise UserError("--quant convs quantizes the unfolded weights with one scale: it takes the default "
                            "--weight-granularity per-tensor")

    @property
    def per_channel(self) -> bool:
        """Conv weights carry one scale per output channel."""
        return self.weight_granularity == "per-channel"

    @property
    def enabled(self) -> bool:
        """Fully int8: the integer graph, exact eval forward and export exist."""
        return self.mode == "int8"

    @property
    def quantized(self) -> bool:
        """Any fake quantization in training (int8 or convs)."""
        return self.mode != "none"

    @property
    def label(self) -> str:
        """What a network of this configuration is, for messages."""
        return {"int8": "fully int8", "none": "float (--quant none)",
                "convs": "convs-only (--quant convs: BN, adds and pooling float)"}[self.mode]


class _FakeQuant(torch.autograd.Function):
    """LSQ fake quantization as one autograd node, with as few passes over the tensor as we can.

    Forward is ``round(clamp(x / s, qmin - zp, qmax - zp)) * s``, which equals
    ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` exactly (integer bounds commute with
    rounding), the expression ``quantize`` uses: the integers an exporter derives are the ones
    the network trained with.
    """

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, zero_point: int, qmin: int, qmax: int, g: float) -> Tensor:
        xs = x / s
        r = xs.clamp(qmin - zero_point, qmax - zero_point)
        inside = torch.eq(r, xs, out=torch.empty_like(xs))  # a float mask: 5-7x faster to apply on CPU than bool
        ctx.save_for_backward(r, inside, s)
        ctx.g = g
        return r.round().mul_(s)

    @staticmethod
    def backward(ctx, grad: Tensor):
        r, inside, s = ctx.saved_tensors
        grad_x = grad * inside
        grad_s = None
        if ctx.needs_input_grad[1]:
            # d out/ds = round(x/s) - x/s inside the range and the clip bound outside, i.e.
            # round(r) - r * inside: two dot products, no temporaries of the tensor's size.
            grad_s = (inner(grad, r.round()) - inner(grad_x, r)).mul(ctx.g).reshape(s.shape)
        return grad_x if ctx.needs_input_grad[0] else None, grad_s, None, None, None, None


def inner(a: Tensor, b: Tensor) -> Tensor:
    """Sum of the elementwise product of two tensors of the same shape (one pass, no temporary)."""
    cl = torch.channels_last
    if a.dim() == 4 and a.is_contiguous(memory_format=cl) and b.is_contiguous(memory_format=cl):
        a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)  # views in storage order
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor | float) -> Tensor:
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.c, None


def scale_grad(x: Tensor, c: Tensor | float) -> Tensor:
    """Identity forward (bit-exact); multiplies the gradient by ``c``."""
    return _ScaleGrad.apply(x, c)


def fake_quant(x: Tensor, scale: Tensor, zero_point: int, qmin: int, qmax: int, g: float = 1.0) -> Tensor:
    """Quantize to the integer grid and back: ``scale * (clamp(round(x/scale) + zp) - zp)``.

    Gradients follow LSQ: straight-through inside the range, zero outside for ``x``; the step
    size gets ``round(x/s) - x/s`` inside and the clip bound outside, times ``g``.
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        # inference (BN calibration, evaluation): _FakeQuant's forward arithmetic, without the mask it keeps for backward
        return (x / scale).clamp_(qmin - zero_point, qmax - zero_point).round_().mul_(scale)
    return _FakeQuant.apply(x, scale, zero_point, qmin, qmax, g)


def quantize(x: Tensor, scale: Tensor | float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """The integer values (as an int64 tensor) that ``fake_quant`` represents.

    Clamped in integers: float32 has no 2**31 - 1, so clamping an int32 bias in float would give
    2**31, which wraps to -2**31 in int32 (``fake_quant`` may hold 2**31 there; exact paths use this).
    """
    q = torch.round(x / scale).clamp_(-(2.0**62), 2.0**62).to(torch.int64)
    return (q + zero_point).clamp_(qmin, qmax)


def lsq_grad_scale(numel: int, qmax: int) -> float:
    return 1.0 / math.sqrt(max(numel, 1) * qmax)


@torch.no_grad()
def mse_optimal_row_scales(x: Tensor, qmax: int, grid: int = 100) -> Tensor:
    """``mse_optimal_scale`` of each row of ``x`` (symmetric, zero point 0): per-channel weights.

    The same grid of clip ranges, searched for every row at once; (O, ...) -> (O,).
    """
    rows = x.detach().float().flatten(1)
    top = rows.abs().amax(1)
    best_s, best_err = top / qmax, torch.full_like(top, math.inf)
    for i in range(grid, grid // 10, -1):
        s = (top * i / grid / qmax).clamp(min=1e-30).unsqueeze(1)
        err = (torch.clamp(torch.round(rows / s), -qmax, qmax) * s - rows).pow_(2).sum(1)
        better = err < best_err
        best_s, best_err = torch.where(better, s.squeeze(1), best_s), torch.where(better, err, best_err)
    return torch.where(top > 0, best_s, torch.full_like(top, 1e-8))


@torch.no_grad()
def mse_optimal_scale(x: Tensor, zero_point: int, qmin: int, qmax: int, grid: int = 100) -> float:
    """The per-tensor step size minimising ``||fake_quant(x) - x||^2`` over a grid of clip ranges.

    Used to initialise weight scales (docs/design.md §4) and activation scales from calibration data.
    """
    x = x.detach().float().flatten()
    if zero_point == qmin:  # full range: non-negative values on [0, (qmax - qmin) * s]
        top, levels = x.clamp(min=0).max().item(), qmax - qmin
    else:
        top, levels = x.abs().max().item(), qmax
    if top <= 0:
        return 1e-8 if top == 0 else top
    if x.numel() > 1_000_000:  # subsample: the optimum is a property of the distribution
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    best_s, best_err = top / levels, math.inf
    for i in range(grid, grid // 10, -1):
        s = top * i / grid / levels
        err = (torch.clamp(torch.round(x / s) + zero_point, qmin, qmax) - zero_point).mul_(s).sub_(x).pow_(2).sum().item()
        if err < best_err:
            best_s, best_err = s, err
    return best_s


def global_avg_pool(x: Tensor, scale: Tensor, zero_point: int, runtime: str = "xnnpack") -> Tensor:
    """Mean over H, W of an int8 tensor, output on the input's grid (TFLite ties their parameters).

    Forward: ``runtime``'s integer MEAN (``kernels.mean``) of the int8 values, exactly on the
    grid; exact ties are common here (1 in H*W), so float rounding would disagree with the
    deployed model. Backward: the plain mean's gradient (straight-through).
    x: (N, C, H, W) on the grid of ``scale``/``zero_point`` -> (N, C).
    """
    with torch.no_grad():
        q = quantize(x, scale, zero_point, A_QMIN, A_QMAX)
        value = (kernels.mean(q, zero_point, runtime) - zero_point) * scale
    if not (torch.is_grad_enabled() and x.requires_grad):
        return value
    mean = x.mean(dim=(2, 3))
    return value + (mean - mean.detach())  # adds exactly 0: the value stays on the grid
