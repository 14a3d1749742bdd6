"""Per-layer health of an int8 supernet: what to look at when its loss collapses.

``layer_diagnostics(model, x, arch)`` runs one forward of ``arch`` on ``x`` (training mode, as
the training step runs it; BN running statistics are restored afterwards) and returns, per
quantized layer: the activation scale, the share of its outputs at zero and at the grid's
saturation, and for a Conv-BN the predicted weight scale of this batch, the share of folded
weights that round to zero, and the smallest batch std (a channel whose std collapses to
``sqrt(eps)`` is what inflates the scale predictor's mean, see ``train.py``). Gradient norms
come from ``grad_norms(model)`` after a backward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import BN_EPS, ActQuant, QConvBN, QLinear, rows
from .quant import A_QMAX, W_QMAX
from .space import Arch


@torch.no_grad()
def layer_diagnostics(model: nn.Module, x: Tensor, arch: Arch) -> dict[str, dict[str, float]]:
    """``{layer name: {stat: value}}`` for one training-mode forward of ``arch`` on ``x``."""
    stats: dict[str, dict[str, float]] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def act_hook(m: ActQuant, inputs, out: Tensor) -> None:
        if not m.enabled:
            return
        q = torch.round(out / m.scale) + m.zero_point
        stats.setdefault(names[m], {}).update(
            act_scale=m.scale.item(), act_zero=(q == m.zero_point).float().mean().item(),
            act_saturated=((q >= A_QMAX) | (q <= -A_QMAX - 1)).float().mean().item(),
            act_finite=float(torch.isfinite(out).all().item()))

    def conv_hook(m: QConvBN, inputs, out: Tensor) -> None:
        if not m.cfg.enabled:
            return
        x_in, _, out_channels, kernel = inputs
        if m.depthwise:
            out_channels = x_in.shape[1]
        w = m.sliced_weight(x_in.shape[1], out_channels, kernel)
        var, mean = torch.var_mean(m.conv(x_in, w), dim=(0, 2, 3), unbiased=False)  # this batch's statistics, as the fold uses
        w_fold, _, s_w = m.fold(w, mean, var)
        sigma = torch.sqrt(var + BN_EPS)
        stats.setdefault(names[m], {}).update(
            w_scale=float(s_w.mean()), w_zero=(torch.round(w_fold / rows(s_w)) == 0).float().mean().item(),  # per channel: the mean scale
            w_fold_absmax=w_fold.abs().max().item(), w_clipped=(w_fold.abs() / rows(s_w) > W_QMAX).float().mean().item(),
            sigma_min=sigma.min().item(), dead_channels=(sigma <= 2 * math.sqrt(BN_EPS)).float().mean().item())

    def linear_hook(m: QLinear, inputs, out: Tensor) -> None:
        if m.cfg.enabled:
            stats.setdefault(names[m], {}).update(
                w_scale=m.w_scale.item(), w_zero=(torch.round(m.fc.weight / m.w_scale) == 0).float().mean().item())

    for m in model.modules():
        if isinstance(m, ActQuant):
            hooks.append(m.register_forward_hook(act_hook))
        elif isinstance(m, QConvBN):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, QLinear):
            hooks.append(m.register_forward_hook(linear_hook))
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    was_training = model.training
    try:
        model.train()
        model(x, arch)
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict({**model.state_dict(), **buffers})
        model.train(was_training)
    return stats


def grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each quantized layer's gradients (all its parameters together), after a backward."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QConvBN, QLinear)):
            gs = [p.grad for n, p in m.named_parameters() if p.grad is not None and not n.startswith("out_q")]
            if gs:
                out[name] = math.sqrt(sum(float(g.pow(2).sum()) for g in gs))
    return out
