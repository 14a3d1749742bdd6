"""Elastic, quantized building blocks.

Each layer owns one max-size weight and slices it for the active subnet (once-for-all style:
channel prefixes, centre-cropped kernels, optionally through OFA's kernel transforms). The active
size is passed to ``forward`` explicitly.
``extract`` copies the slices into a layer whose max size *is* the active size, so the static
layer runs the very same code on the very same tensors (bit-exact equality with the supernet).

In int8 mode every Conv-BN simulates the folded int8 conv TFLite runs (QuantNAS §4.1):
the BN is folded into the conv weights and bias, the folded weights are fake-quantized with a
per-tensor scale (or one per output channel: ``QuantConfig.weight_granularity``), and the bias
is quantized to int32 at ``s_in * s_w``. In training the fold
uses this batch's statistics, computed so that it costs one conv backward (``_batch_folded``).

In eval mode the int8 layers compute *exactly* what a target runtime computes (``Exact``): the
same integers, accumulated exactly and requantized with that runtime's arithmetic
(``kernels``), so an accuracy measured in PyTorch is the accuracy of the exported file there.
Training keeps the fast, differentiable fake-quant. Fed the same int8 inputs, one op of it
differs from the exact forward by at most one LSB, at near-ties only; run end to end, each
difference is the next layer's input difference, so they compound with depth
(tests/test_kernels.py allows 2 LSB on a tiny subnet against XNNPACK; docs/design.md §4).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .batch_stats import conv_batch_stats, digit_conv
from .quant import (A_QMAX, A_QMIN, BIAS_QMAX, W_QMAX, QuantConfig, fake_quant, inner, lsq_grad_scale, mse_optimal_row_scales,
                    mse_optimal_scale, quantize, scale_grad)

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


SCALE_FLOOR = 1e-8


class QuantInit:
    """Mixin: modules whose quantization scales are initialised from data (see ``init_scales``)."""

    observe: bool = False  # set only inside ``init_scales``

    def scale_params(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in ("scale", "theta", "w_scale") if hasattr(self, n)]


class Exact:
    """Mixin: modules whose eval-mode int8 forward is bit-exact for a target runtime.

    ``runtime`` is one of ``kernels.TARGETS``, or None for the fake-quant simulation (float
    arithmetic, round half to even): faster to reason about; at most one LSB off per op, at
    near-ties, and more end to end, where the differences compound with depth.
    """

    runtime: str | None = "xnnpack"
    _fixed: dict | None = None  # inside ``fixed_integers``: the integers computed so far

    def exact(self) -> bool:
        return not self.training and self.runtime is not None

    def integers_once(self, make):
        """``make()``, computed once per ``fixed_integers`` block (every call outside one)."""
        if self._fixed is None:
            return make()
        if "value" not in self._fixed:
            self._fixed["value"] = make()
        return self._fixed["value"]


@contextlib.contextmanager
def fixed_integers(model: nn.Module) -> Iterator[None]:
    """Within this block each layer's integer weights, bias and requantization are computed once
    and reused: scoring a static subnet on many batches. The model must not change inside."""
    mods = [m for m in model.modules() if isinstance(m, Exact)]
    for m in mods:
        m._fixed = {}
    try:
        yield
    finally:
        for m in mods:
            m._fixed = None


def set_runtime(model: nn.Module, runtime: str | None) -> None:
    """Make ``model``'s eval-mode forward exact for ``runtime`` (``kernels.ARITHMETICS``; None: fake-quant)."""
    if runtime is not None:
        kernels.check_arithmetic(runtime)
    for m in model.modules():
        if isinstance(m, Exact):
            m.runtime = runtime


@torch.no_grad()
def keep_scales_positive(model: nn.Module) -> None:
    """Project every learned step size (and theta) back to positive values after an optimizer step.

    SGD can push a small step size through zero (theta_i ~ s*sigma_i is tiny while its gradient
    scales with 1/sigma_i); a negative scale has no integer meaning and TFLite mis-handles it.
    """
    for m in model.modules():
        if isinstance(m, QuantInit):
            for p in m.scale_params():
                p.clamp_(min=SCALE_FLOOR)


@contextlib.contextmanager
def init_scales(model: nn.Module, kind: type = QuantInit) -> Iterator[None]:
    """Within this block, the next forward initialises every scale from the data it sees (of the
    ``kind`` modules only: ``ActQuant`` refits the activation steps alone).

    Run it once, on a fixed calibration batch, with the largest subnet (so every channel of the
    scale predictor sees its sigma). Layers initialise in order, each seeing the already
    quantized output of the previous one.
    """
    mods = [m for m in model.modules() if isinstance(m, QuantInit) and isinstance(m, kind)]
    for m in mods:
        m.observe = True
    try:
        with torch.no_grad():
            yield
    finally:
        for m in mods:
            m.observe = False


@contextlib.contextmanager
def exact_statistics(model: nn.Module) -> Iterator[None]:
    """Within this block (BN calibration) every int8 Conv-BN in train mode takes its batch
    statistics from exact arithmetic and passes on exactly computed integers
    (``QConvBN._calibrated``): the calibrated model is the same on any thread count or machine."""
    mods = [m for m in model.modules() if isinstance(m, QConvBN)]
    for m in mods:
        m.calibrating = True
    try:
        yield
    finally:
        for m in mods:
            m.calibrating = False


class ActQuant(nn.Module, QuantInit):
    """Per-tensor int8 activation quantizer with an LSQ-learned scale, shared by all subnets.

    With ``relu`` it also applies the ReLU before it, fused: clipping at the grid's zero is the
    ReLU, with the same values and gradients, at one pass over the tensor instead of three.
    """

    def __init__(self, cfg: QuantConfig, relu: bool) -> None:
        super().__init__()
        self.enabled, self.relu = cfg.enabled, relu
        self.zero_point = A_QMIN if (relu and cfg.act_scheme == "full-range") else 0
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return F.relu(x) if self.relu else x
        if self.observe:
            self.scale.fill_(mse_optimal_scale(F.relu(x) if self.relu else x, self.zero_point, A_QMIN, A_QMAX))
        return fake_quant(x, self.scale, self.zero_point, self.qmin, A_QMAX, lsq_grad_scale(x[0].numel(), A_QMAX))

    @property
    def qmin(self) -> int:
        """The lowest int8 value: the real value 0 after a ReLU."""
        return max(A_QMIN, self.zero_point) if self.relu else A_QMIN

    def from_grid(self, x: Tensor) -> Tensor:
        """Real values on this quantizer's grid -> their int8 values (int64)."""
        return quantize(x, self.scale, self.zero_point, A_QMIN, A_QMAX)

    def to_grid(self, q: Tensor) -> Tensor:
        """int8 values -> the real values they stand for (float32)."""
        return (q - self.zero_point) * self.scale.detach()

    def requantize(self, acc: Tensor, rq: kernels.Requant) -> Tensor:
        """Exact int32 accumulators -> this quantizer's grid, with the fused ReLU, as the runtime rounds."""
        zp = self.zero_point
        return kernels.requantize(acc, rq, 0, self.qmin - zp, A_QMAX - zp).mul_(self.scale.detach())

    def extract(self) -> ActQuant:
        return _copy_module(self)


def _copy_module(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)


def rows(s_w: Tensor) -> Tensor:
    """A weight scale shaped to broadcast over a conv weight (O, I, k, k): per-channel scales
    (O,) become (O, 1, 1, 1); a per-tensor one stays as it is."""
    return s_w.view(-1, 1, 1, 1) if s_w.dim() else s_w


def scale_value(s_w: Tensor) -> float | np.ndarray:
    """A weight scale as the kernels and the integer graph take it: a float, or float32 per channel."""
    return s_w.item() if s_w.dim() == 0 else s_w.detach().cpu().numpy().astype(np.float32)


def _bias_quant(b: Tensor, s_in: Tensor, s_w: Tensor) -> Tensor:
    """int32 bias at scale s_in * s_w (TFLite's bias spec); straight-through for ``b`` only."""
    return fake_quant(b, (s_in * s_w).detach(), 0, -BIAS_QMAX, BIAS_QMAX, 0.0)


class _WeightQuantError(torch.autograd.Function):
    """``conv(x, Q(w) - w)``: what quantizing the weights ``w`` (step ``s``) adds to ``conv(x, w)``.

    Backward gives the step size its exact LSQ gradient, by adjointness
    ``<dL/dQ(w), dQ/ds> = <dL/dy, conv(x, dQ/ds)>``, and gives ``x`` and ``w`` none: the caller
    routes those through the unquantized conv (see ``QConvBN._batch_folded``). ``bias`` is
    added to the output and gets no gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, s: Tensor, layer: QConvBN, g: float, bias: Tensor | None = None) -> Tensor:
        w_q = fake_quant(w, s, 0, -W_QMAX, W_QMAX)
        c = layer.conv(x, w_q - w, bias)
        ctx.save_for_backward(x, c, w / s, s, bias)
        ctx.layer, ctx.g = layer, g
        return c

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, c, v, s, bias = ctx.saved_tensors
        if not ctx.needs_input_grad[2]:  # per-channel steps are calibrated, not learned
            return None, None, None, None, None, None
        # dQ/ds = round(v) - v = (Q(w) - w)/s inside the range; the clip bound = that + v outside.
        grad_s = inner(grad, c)
        if bias is not None:  # c holds the bias too (one pass fewer than adding it apart)
            grad_s = grad_s - grad.sum((0, 2, 3)) @ bias
        grad_s = grad_s / s
        clipped = v.abs() > W_QMAX
        if x.is_cuda:  # no host sync: convolve every output channel
            grad_s = grad_s + inner(grad, ctx.layer.conv(x, torch.where(clipped, v, 0.0)))
        else:  # few output channels have a clipped weight, usually: convolve only those
            rows = clipped.flatten(1).any(1).nonzero().flatten()
            if rows.numel():
                x_rows = x[:, rows] if ctx.layer.depthwise else x
                grad_s = grad_s + inner(grad[:, rows], ctx.layer.conv(x_rows, torch.where(clipped, v, 0.0)[rows]))
        return None, None, (grad_s * ctx.g).reshape(s.shape), None, None, None


class QConvBN(nn.Module, QuantInit, Exact):
    """Elastic Conv2d + BatchNorm (+ ReLU), simulated as the folded int8 conv in int8 mode.

    ``forward(x, s_in, out_channels, kernel)``: x is (N, C_in, H, W) with C_in <= max input;
    ``s_in`` is the scale x was quantized with (None in float mode). Depthwise layers take
    ``out_channels = C_in``.
    """

    calibrating: bool = False  # set only inside ``exact_statistics``

    def __init__(self, in_max: int, out_max: int, kernel_max: int, stride: int, cfg: QuantConfig,
                 depthwise: bool = False, relu: bool = True, kernel_transforms: tuple[int, ...] = (),
                 separate_kernels: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.cfg, self.stride, self.depthwise, self.relu = cfg, stride, depthwise, relu
        self.weight = nn.Parameter(torch.empty(out_max, 1 if depthwise else in_max, kernel_max, kernel_max))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        # OFA's elastic kernel (Cai et al. 2020, §3.2): a smaller kernel is the centre of the next
        # larger one times a learned (k*k x k*k) matrix shared by the layer's channels, starting at
        # the identity (plain centre crop). Without it the centre of a 7x7 kernel must serve as the
        # 5x5 and the 3x3 kernel too, and the supernet's scores follow the kernel size more than
        # training alone does (BENCHMARKS.md §1). ``kernel_transforms``: the kernel choices (else none).
        self.kernel_sizes = tuple(sorted(kernel_transforms, reverse=True))  # e.g. (7, 5, 3)
        self.kernel_transforms = nn.ParameterDict({
            f"{big}to{small}": nn.Parameter(torch.eye(small * small))
            for big, small in zip(self.kernel_sizes, self.kernel_sizes[1:])})
        # Or each smaller kernel choice its own weights, shared across widths but not with the larger
        # kernels (issue 31's test of the kernel bias: is it the shared taps? Measured: no; a kernel of
        # its own is trained only by the subnets that choose it, and the supernet ranks worse).
        # Initialised as a layer of that kernel size would be. ``separate_kernels``: the kernel choices.
        self.own_kernels = nn.ParameterDict({
            str(k): nn.Parameter(nn.init.kaiming_normal_(torch.empty(out_max, self.weight.shape[1], k, k), mode="fan_out",
                                                          nonlinearity="relu"))
            for k in sorted(separate_kernels) if k < kernel_max})
        self.bn_weight = nn.Parameter(torch.ones(out_max))
        self.bn_bias = nn.Parameter(torch.zeros(out_max))
        self.register_buffer("running_mean", torch.zeros(out_max))
        self.register_buffer("running_var", torch.ones(out_max))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.bn_momentum: float | None = BN_MOMENTUM  # None: cumulative average (BN calibration)
        if cfg.quantized:
            # theta: the scale predictor (paper Eq. 7), one entry per output channel; or one LSQ scale.
            # per-channel: theta_i predicts channel i's own scale; a shared scale becomes one per channel.
            # Per-channel steps are set from data when the int8 phase starts and then held, not learned:
            # LSQ on them destabilised the sandwich (BENCHMARKS.md section 3b: a 200-step int8 phase
            # ended at 77.1% vs 87.6% per-tensor; held, 87.5%): each channel's step followed its own
            # noisy gradient, from whichever subnet the batch trained.
            if cfg.weight_scale == "predictor":
                self.theta = nn.Parameter(torch.ones(out_max), requires_grad=not cfg.per_channel)
            else:
                self.w_scale = (nn.Parameter(torch.ones(out_max), requires_grad=False) if cfg.per_channel
                                else nn.Parameter(torch.tensor(1.0)))
        if cfg.mode == "convs":  # the conv quantizes its own input; its output stays float (out_q: the ReLU)
            self.in_q = ActQuant(QuantConfig(act_scheme=cfg.act_scheme), relu=False)
        self.out_q = ActQuant(cfg, relu=relu)

    @property
    def out_max(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_max(self) -> int:
        return self.weight.shape[-1]

    def sliced_weight(self, in_channels: int, out_channels: int, kernel: int) -> Tensor:
        source = self.own_kernels[str(kernel)] if str(kernel) in self.own_kernels else self.weight
        w = source[:out_channels, : 1 if self.depthwise else in_channels]
        # one centre crop (none for a kernel of its own); with transforms, one crop and transform per
        # kernel choice on the way down
        sizes = [k for k in self.kernel_sizes if k >= kernel] if self.kernel_sizes else [source.shape[-1], kernel]
        for big, small in zip(sizes, sizes[1:]):
            crop = (big - small) // 2
            w = w[:, :, crop : crop + small, crop : crop + small]
            if self.kernel_sizes:
                w = (w.reshape(-1, small * small) @ self.kernel_transforms[f"{big}to{small}"].t()).reshape(w.shape)
        return w

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        groups = x.shape[1] if self.depthwise else 1
        # NHWC: oneDNN's fast depthwise kernels (backward 2.5x faster on CPU than NCHW). A no-op
        # after the first conv; a 1-channel input is NHWC and NCHW at once, so its output is not.
        x = x.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, w, b, self.stride, w.shape[-1] // 2, 1, groups)

    def _bn_factor(self) -> float:
        self.num_batches_tracked += 1
        return self.bn_momentum if self.bn_momentum is not None else 1.0 / float(self.num_batches_tracked)

    @property
    def per_channel(self) -> bool:
        return self.cfg.per_channel

    def predicted_scale(self, sigma: Tensor) -> Tensor:
        """Weight scale of the active subnet: s = mean_i(theta_i / sigma_i) (paper Eq. 7), or per
        channel s_i = theta_i / sigma_i; with ``--weight-scale shared`` the shared scale(s).

        theta's gradient is preconditioned by m / mean(1/sigma^2) so that one SGD step moves s
        exactly as plain LSQ would move a shared scale: theta_i ~ s*sigma_i is tiny for small
        sigma_i while its raw gradient grows as 1/sigma_i, which otherwise makes s jump.
        """
        n = sigma.shape[0]
        if self.cfg.weight_scale == "shared":
            return self.w_scale[:n] if self.per_channel else self.w_scale
        theta = self.theta[:n]
        if self.per_channel:
            return theta / sigma
        if theta.requires_grad and torch.is_grad_enabled():
            theta = scale_grad(theta, (n / sigma.pow(-2).mean()).detach())  # no host sync on GPU
        return (theta / sigma).mean()

    def integer_params(self, s_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eval mode, static layer: int8 weights, int32 bias and the weight scale it runs with.

        The very expressions of ``forward`` (same tensors, same order), so the fake-quant
        network and the integer graph hold the same integers.
        """
        w = self.sliced_weight(self.weight.shape[1], self.out_max, self.kernel_max)
        return self._integers(w, self.running_mean, self.running_var, s_in)

    def _integers(self, w: Tensor, mean: Tensor, var: Tensor, s_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w_fold, bias, s_w = self.fold(w, mean, var)
        if self.per_channel and self.cfg.weight_scale == "predictor":
            # (w*gamma/sigma) / (theta/sigma) is w*gamma/theta: computed so, sigma cancels exactly and
            # BN calibration, which changes only sigma, leaves these integers as they are
            n = s_w.shape[0]
            q_w = quantize(w * (self.bn_weight[:n] / self.theta[:n]).view(-1, 1, 1, 1), 1.0, 0, -W_QMAX, W_QMAX)
        else:
            q_w = quantize(w_fold, rows(s_w), 0, -W_QMAX, W_QMAX)
        return q_w, quantize(bias, (s_in * s_w).detach(), 0, -BIAS_QMAX, BIAS_QMAX), s_w

    def _exact(self, x: Tensor, s_in: Tensor, w: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """Eval mode: the int8 conv as the target runtime computes it, on ``out_q``'s grid."""
        def make():
            q_w, q_b, s_w = self._integers(w, mean, var, s_in)
            return q_w, q_b, kernels.conv_requant(self.runtime, s_in.item(), scale_value(s_w), self.out_q.scale.item())

        q_w, q_b, rq = self.integers_once(make)
        groups = x.shape[1] if self.depthwise else 1
        acc = kernels.conv_accumulate(torch.div(x, s_in).round_(), q_w, q_b, self.stride, groups)  # x/s_in: q - zero point
        return self.out_q.requantize(acc, rq)

    def fold(self, w: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Folded weight and bias, and the predicted weight scale, for these statistics."""
        sigma = torch.sqrt(var + BN_EPS)
        w_fold, bias = self._fold_sigma(w, mean, sigma)
        return w_fold, bias, self.predicted_scale(sigma.detach())

    def _fold_sigma(self, w: Tensor, mean: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """``w * gamma/sigma`` and ``beta - mean * gamma/sigma`` of the active channels; in
        ``init_scales``, also the weight scale's initial value from this fold."""
        n = sigma.shape[0]
        factor = self.bn_weight[:n] / sigma
        w_fold = w * factor.view(-1, 1, 1, 1)
        if self.observe:
            self._init_weight_scale(w_fold, sigma)
        return w_fold, self.bn_bias[:n] - mean * factor

    def _init_weight_scale(self, w_fold: Tensor, sigma: Tensor) -> None:
        """MSE-optimal s_init (per tensor, or per output channel); theta_i = s_init * sigma_i, so
        the first prediction is s_init."""
        n = sigma.shape[0]
        s_init = mse_optimal_row_scales(w_fold, W_QMAX) if self.per_channel else mse_optimal_scale(w_fold, 0, -W_QMAX, W_QMAX)
        if self.cfg.weight_scale == "predictor":
            self.theta[:n] = s_init * sigma
        elif self.per_channel:
            self.w_scale[:n] = s_init
        else:
            self.w_scale.fill_(s_init)

    def forward(self, x: Tensor, s_in: Tensor | None, out_channels: int, kernel: int) -> Tensor:
        if self.depthwise:
            out_channels = x.shape[1]
        w = self.sliced_weight(x.shape[1], out_channels, kernel)
        rm, rv = self.running_mean[:out_channels], self.running_var[:out_channels]
        gamma, beta = self.bn_weight[:out_channels], self.bn_bias[:out_channels]
        if not self.cfg.enabled:
            factor = self._bn_factor() if self.training else 0.0
            if self.cfg.mode == "convs":
                x, w = self.in_q(x), self.quantized_unfolded(w)
            return self.out_q(F.batch_norm(self.conv(x, w), rm, rv, gamma, beta, self.training, factor, BN_EPS))
        if self.training and self.calibrating:
            return self._calibrated(x, s_in, w, rm, rv)
        if self.training and self.cfg.bn_fold == "batch":
            y = self._batch_folded(x, s_in, w, rm, rv, gamma, beta)
        else:
            if self.training:  # moving-statistics folding: the batch only updates the running averages
                with torch.no_grad():
                    F.batch_norm(self.conv(x, w), rm, rv, None, None, True, self._bn_factor(), BN_EPS)
            elif self.exact():
                return self._exact(x, s_in, w, rm, rv)
            w_fold, bias, s_w = self.fold(w, rm.clone(), rv.clone())
            w_q = fake_quant(w_fold, rows(s_w), 0, -W_QMAX, W_QMAX, lsq_grad_scale(w_fold.numel(), W_QMAX))
            y = self.conv(x, w_q, _bias_quant(bias, s_in, s_w))
        return self.out_q(y)

    def quantized_unfolded(self, w: Tensor) -> Tensor:
        """--quant convs: the conv's own weights, fake-quantized with one LSQ scale (BN stays apart)."""
        if self.observe:
            self.w_scale.fill_(mse_optimal_scale(w, 0, -W_QMAX, W_QMAX))
        return fake_quant(w, self.w_scale, 0, -W_QMAX, W_QMAX, lsq_grad_scale(w.numel(), W_QMAX))

    def _batch_folded(self, x: Tensor, s_in: Tensor, w: Tensor, rm: Tensor, rv: Tensor, gamma: Tensor,
                      beta: Tensor) -> Tensor:
        """The folded int8 conv with this batch's statistics (paper §4.1), at the cost of one conv backward.

        Value: ``conv(x, Q(w * g)) + Q(b)``, with ``g = gamma / sigma_B`` and ``b = beta - g * mu_B``
        the fold by the statistics of the float conv ``z = conv(x, w)`` on this batch. Computed as
        ``BN_B(z) + conv(x, Q(w*g) - w*g) + (Q(b) - b)``: linearity makes the first two terms
        ``conv(x, Q(w*g)) + b``. The gradient reaches w, gamma, beta, x and the batch statistics
        through ``BN_B(z)`` (one fused BatchNorm, one conv backward) and the weight scale through
        the quantization error term (exact LSQ). What this does not reproduce of the two-conv
        form: x's gradient sees ``w*g`` rather than ``Q(w*g)`` (a difference of at most s/2 per
        weight), and weights clipped by the quantizer keep their gradient.
        """
        y, mean, invstd = torch.native_batch_norm(self.conv(x, w), gamma, beta, rm, rv, True,
                                                  self._bn_factor(), BN_EPS)  # also updates rm, rv
        with torch.no_grad():
            sigma = invstd.reciprocal()
            w_fold, bias = self._fold_sigma(w, mean, sigma)
        s_w = self.predicted_scale(sigma)
        bias_error = _bias_quant(bias, s_in, s_w) - bias  # the int32 bias's rounding; no gradient
        error = _WeightQuantError.apply(x, w_fold, rows(s_w), self, lsq_grad_scale(w_fold.numel(), W_QMAX), bias_error)
        return y.add_(error)  # BN's backward needs its input, not its output

    @torch.no_grad()
    def _calibrated(self, x: Tensor, s_in: Tensor, w: Tensor, rm: Tensor, rv: Tensor) -> Tensor:
        """BN calibration: the training forward's value, computed so that no bit depends on
        summation order. This batch's statistics of ``conv(x, w)`` come from exact arithmetic
        (``batch_stats``) and update the running averages as ``F.batch_norm`` does (unbiased
        variance); the output ``conv(x, Q(w*g)) + Q(b)``, folded by the batch's statistics (or the
        running ones with ``--bn-fold moving``), is the integer accumulation (``digit_conv``) plus
        the int32 bias, times ``s_in * s_w``: elementwise roundings in a fixed order, so the next
        layer quantizes the same numbers everywhere.
        """
        groups = x.shape[1] if self.depthwise else 1
        u = torch.div(x, s_in).round_()  # q - zero point, as the exact forward reads x
        mean, var, n = conv_batch_stats(u, s_in, w, self.stride, groups)
        f = self._bn_factor()
        rm.mul_(1.0 - f).add_(mean * f)
        rv.mul_(1.0 - f).add_(var * (n / max(n - 1, 1)) * f)
        fold_mean, fold_var = (mean, var) if self.cfg.bn_fold == "batch" else (rm.clone(), rv.clone())
        q_w, q_b, s_w = self._integers(w, fold_mean, fold_var, s_in)
        acc = digit_conv(u, q_w, self.stride, groups)  # the int8 conv's accumulators, bias aside
        return self.out_q(acc.add_(q_b.to(torch.float32).view(-1, 1, 1)).mul_((s_in * s_w).reshape(-1, 1, 1)))

    def extract(self, in_channels: int, out_channels: int, kernel: int) -> QConvBN:
        """A static copy holding exactly the active slice."""
        if self.depthwise:
            out_channels = in_channels
        m = QConvBN(in_channels, out_channels, kernel, self.stride, self.cfg, self.depthwise, self.relu)
        with torch.no_grad():
            m.weight.copy_(self.sliced_weight(in_channels, out_channels, kernel))
            for name in ("bn_weight", "bn_bias", "running_mean", "running_var", "theta"):
                if hasattr(self, name):
                    getattr(m, name).copy_(getattr(self, name)[:out_channels])
            m.num_batches_tracked.copy_(self.num_batches_tracked)
            if hasattr(self, "w_scale"):
                m.w_scale.copy_(self.w_scale[:out_channels] if self.per_channel else self.w_scale)
            m.out_q.scale.copy_(self.out_q.scale)
            if hasattr(self, "in_q"):
                m.in_q.scale.copy_(self.in_q.scale)
        m.bn_momentum, m.runtime = self.bn_momentum, self.runtime
        return m


class QLinear(nn.Module, QuantInit, Exact):
    """Fully connected layer (+ ReLU) with an LSQ weight scale and int32 bias. Not elastic."""

    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, relu: bool) -> None:
        super().__init__()
        self.cfg, self.relu = cfg, relu
        self.fc = nn.Linear(in_features, out_features)
        if cfg.quantized:
            self.w_scale = nn.Parameter(torch.tensor(1.0))
        if cfg.mode == "convs":  # as QConvBN: input and weights quantized, output float
            self.in_q = ActQuant(QuantConfig(act_scheme=cfg.act_scheme), relu=False)
        self.out_q = ActQuant(cfg, relu=relu)

    def forward(self, x: Tensor, s_in: Tensor | None) -> Tensor:
        if self.observe and self.cfg.quantized:
            self.w_scale.fill_(mse_optimal_scale(self.fc.weight, 0, -W_QMAX, W_QMAX))
        if self.cfg.mode == "convs":
            w_q = fake_quant(self.fc.weight, self.w_scale, 0, -W_QMAX, W_QMAX, lsq_grad_scale(self.fc.weight.numel(), W_QMAX))
            return self.out_q(F.linear(self.in_q(x), w_q, self.fc.bias))
        if not self.cfg.enabled:
            return self.out_q(self.fc(x))
        if self.exact():
            def make():
                q_w, q_b, s_w = self.integer_params(s_in)
                return q_w, q_b, kernels.conv_requant(self.runtime, s_in.item(), s_w.item(), self.out_q.scale.item(),
                                                      fully_connected=True)

            q_w, q_b, rq = self.integers_once(make)
            acc = kernels.linear_accumulate(torch.div(x, s_in).round_(), q_w, q_b)
            return self.out_q.requantize(acc, rq)
        w_q = fake_quant(self.fc.weight, self.w_scale, 0, -W_QMAX, W_QMAX, lsq_grad_scale(self.fc.weight.numel(), W_QMAX))
        y = F.linear(x, w_q, _bias_quant(self.fc.bias, s_in, self.w_scale))
        return self.out_q(y)

    def integer_params(self, s_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """int8 weights, int32 bias and the weight scale, exactly as ``forward`` uses them."""
        s_w = self.w_scale
        return (quantize(self.fc.weight, s_w, 0, -W_QMAX, W_QMAX),
                quantize(self.fc.bias, (s_in * s_w).detach(), 0, -BIAS_QMAX, BIAS_QMAX), s_w)

    def extract(self) -> QLinear:
        return _copy_module(self)


def exact_add(a: Tensor, qa: ActQuant, b: Tensor, qb: ActQuant, out: ActQuant, runtime: str) -> Tensor:
    """Eval mode: the int8 residual ADD of two tensors on their grids, as ``runtime`` computes it."""
    q = kernels.add(qa.from_grid(a), qb.from_grid(b), (qa.scale.item(), qa.zero_point), (qb.scale.item(), qb.zero_point),
                    (out.scale.item(), out.zero_point), runtime)
    return out.to_grid(q)
