"""The quantization math: grids, clipping, LSQ gradients, Conv-BN folding, the scale predictor."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qnas_cli.layers import BN_EPS, QConvBN, init_scales, set_runtime
from qnas_cli.quant import A_QMAX, A_QMIN, W_QMAX, QuantConfig, fake_quant, mse_optimal_scale, quantize


def test_fake_quant_values_lie_on_the_int8_grid_and_clip():
    x = torch.linspace(-3, 3, 1001)
    s = torch.tensor(0.01)
    for zp, qmin, qmax in ((0, -W_QMAX, W_QMAX), (0, A_QMIN, A_QMAX), (A_QMIN, A_QMIN, A_QMAX)):
        y = fake_quant(x, s, zp, qmin, qmax)
        q = quantize(x, s, zp, qmin, qmax)
        assert torch.equal(y, (q - zp).float() * s)  # exactly the grid value of the integer
        assert q.min().item() == qmin and q.max().item() == qmax  # clipped at the bounds
        assert ((y / s + zp).round() - (y / s + zp)).abs().max() < 1e-4
    # full range: non-negative values use all 256 levels, 0 is exact
    y = fake_quant(torch.tensor([0.0, 2.55, 9.0]), s, A_QMIN, A_QMIN, A_QMAX)
    assert y.tolist() == pytest.approx([0.0, 2.55, 2.55])


def test_lsq_gradients_match_a_hand_computation():
    x = torch.tensor([0.26, -0.74, 1.9, -2.0, 0.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    g = 0.3
    y = fake_quant(x, s, 0, -3, 3, g)  # grid: -1.5 .. 1.5 step 0.5
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (y * upstream).sum().backward()
    # x / s = 0.52, -1.48, 3.8, -4, 0: rounded to 1, -1, clipped to 3, -3, and 0
    assert torch.equal(y.detach(), torch.tensor([0.5, -0.5, 1.5, -1.5, 0.0]))
    inside = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    assert torch.equal(x.grad, upstream * inside)
    ds = torch.tensor([round(0.52) - 0.52, round(-1.48) + 1.48, 3.0, -3.0, 0.0])
    assert s.grad.item() == pytest.approx((upstream * ds).sum().item() * g, rel=1e-6)


def test_mse_optimal_scale_beats_max_scaling():
    torch.manual_seed(0)
    w = torch.randn(10000) * 0.1
    w[0] = 2.0  # an outlier: max scaling wastes levels on it
    s = mse_optimal_scale(w, 0, -W_QMAX, W_QMAX)
    err = lambda sc: (fake_quant(w, torch.tensor(sc), 0, -W_QMAX, W_QMAX) - w).pow(2).sum().item()  # noqa: E731
    assert s < 2.0 / W_QMAX and err(s) < err(2.0 / W_QMAX)
    for f in (0.9, 1.1):
        assert err(s) <= err(s * f)


def _convbn(mode, depthwise=False, **kw):
    torch.manual_seed(1)
    m = QConvBN(8, 8 if depthwise else 12, 5, 1, QuantConfig(mode=mode, **kw), depthwise=depthwise, relu=False)
    with torch.no_grad():
        m.bn_weight.uniform_(0.5, 1.5)
        m.bn_bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("quant", [{}, {"weight_granularity": "per-channel"},
                                   {"weight_granularity": "per-channel", "weight_scale": "shared"}],
                         ids=["per-tensor", "per-channel", "per-channel-shared"])
@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_folded_convbn_equals_conv_then_bn_without_quantization(quant, depthwise, training, monkeypatch):
    """The int8 layer with its quantizers switched off is exactly Conv followed by BN."""
    from qnas_cli import layers

    monkeypatch.setattr(layers, "fake_quant", lambda x, *args: x)
    m = _convbn("int8", depthwise, **quant)
    layers.set_runtime(m, None)  # the fake-quant forward (the exact one has no quantizers to switch off)
    ref = _convbn("none", depthwise)
    m.train(training), ref.train(training)
    x = torch.randn(4, 8, 9, 9)
    out_c = 8 if depthwise else 10
    y = m(x, torch.tensor(1e-3), out_c, 3)
    conv = F.conv2d(x, ref.sliced_weight(8, out_c, 3), None, 1, 1, 1, 8 if depthwise else 1)
    bn = F.batch_norm(conv, ref.running_mean[:out_c].clone(), ref.running_var[:out_c].clone(),
                      ref.bn_weight[:out_c], ref.bn_bias[:out_c], training, 0.1, BN_EPS)
    torch.testing.assert_close(y, bn, atol=1e-5, rtol=1e-5)
    # running statistics update as BatchNorm's do
    ref(x, None, out_c, 3)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)


def test_folding_uses_batch_statistics_in_training_and_running_in_eval():
    m = _convbn("int8")
    with init_scales(m):
        m.train()(torch.randn(8, 8, 9, 9), torch.tensor(0.02), 12, 5)
    x = torch.randn(8, 8, 9, 9) * 3 + 1  # statistics far from the running ones
    m.train()
    y_train = m(x, torch.tensor(0.02), 12, 5)
    conv = F.conv2d(x, m.sliced_weight(8, 12, 5), None, 1, 2)
    var, mean = torch.var_mean(conv, dim=(0, 2, 3), unbiased=False)
    # per channel, the folded output is the batch-normalised conv (up to quantization error)
    z = (conv - mean[None, :, None, None]) / torch.sqrt(var + BN_EPS)[None, :, None, None]
    expect = z * m.bn_weight[None, :12, None, None] + m.bn_bias[None, :12, None, None]
    assert (y_train - expect).abs().mean() < 0.05
    m.eval()
    y_eval = m(x, torch.tensor(0.02), 12, 5)
    assert (y_eval - expect).abs().mean() > 0.2  # eval folds the running statistics instead


def test_scale_predictor_first_prediction_is_the_mse_optimal_scale():
    m = _convbn("int8")
    x = torch.randn(16, 8, 9, 9)
    m.train()
    with init_scales(m):
        m(x, torch.tensor(0.02), 12, 5)
    # sigma of the same batch, folded weights of the same batch
    conv = F.conv2d(x, m.sliced_weight(8, 12, 5), None, 1, 2)
    var, _ = torch.var_mean(conv, dim=(0, 2, 3), unbiased=False)
    sigma = torch.sqrt(var + BN_EPS)
    w_fold = m.sliced_weight(8, 12, 5) * (m.bn_weight[:12] / sigma).view(-1, 1, 1, 1)
    s_init = mse_optimal_scale(w_fold, 0, -W_QMAX, W_QMAX)
    assert m.predicted_scale(sigma).item() == pytest.approx(s_init, rel=1e-5)
    # each active channel contributes equally: theta_i / sigma_i == s_init
    torch.testing.assert_close(m.theta[:12] / sigma, torch.full((12,), s_init), rtol=1e-5, atol=0)


def test_scale_predictor_follows_sigma_of_the_active_channels():
    m = _convbn("int8")
    with torch.no_grad():
        m.theta.copy_(torch.arange(1, 13, dtype=torch.float))
    sigma = torch.full((6,), 2.0)
    assert m.predicted_scale(sigma).item() == pytest.approx(sum(range(1, 7)) / 6 / 2.0)
    assert m.predicted_scale(sigma * 2).item() == pytest.approx(sum(range(1, 7)) / 6 / 4.0)


def test_theta_and_activation_scales_receive_gradients():
    m = _convbn("int8")
    m.train()
    with init_scales(m):
        m(torch.randn(8, 8, 9, 9), torch.tensor(0.02), 12, 5)
    m(torch.randn(8, 8, 9, 9), torch.tensor(0.02), 12, 5).square().sum().backward()
    assert m.theta.grad[:12].abs().sum() > 0 and m.theta.grad[12:].abs().sum() == 0
    assert m.out_q.scale.grad.abs() > 0 and m.weight.grad.abs().sum() > 0


def test_shared_weight_scale_is_one_lsq_parameter():
    m = _convbn("int8", weight_scale="shared")
    assert not hasattr(m, "theta") and m.w_scale.shape == ()
    m.train()
    with init_scales(m):
        m(torch.randn(8, 8, 9, 9), torch.tensor(0.02), 12, 5)
    assert m.w_scale.item() > 0 and math.isfinite(m.w_scale.item())


def test_moving_fold_uses_running_statistics_in_training():
    m = _convbn("int8", bn_fold="moving")
    m.train()
    with init_scales(m):
        m(torch.randn(8, 8, 9, 9), torch.tensor(0.02), 12, 5)
    x = torch.randn(8, 8, 9, 9) * 3 + 1
    y = m(x, torch.tensor(0.02), 12, 5)
    m.eval()
    set_runtime(m, None)  # eval's fake-quant form: the same fold (the exact form also rounds x to its grid)
    torch.testing.assert_close(y, m(x, torch.tensor(0.02), 12, 5))  # the same fold as eval


def test_scales_are_projected_back_to_positive_values():
    from qnas_cli.layers import SCALE_FLOOR, keep_scales_positive

    m = _convbn("int8")
    with torch.no_grad():
        m.theta[:3] = -0.5
        m.out_q.scale.fill_(-1.0)
    keep_scales_positive(m)
    floor = torch.tensor(SCALE_FLOOR).item()  # float32
    assert m.theta.min().item() == floor and m.out_q.scale.item() == floor
    assert m.theta[3:].eq(1.0).all()  # positive entries untouched


def test_predictor_step_moves_the_scale_like_lsq():
    """One SGD step on theta changes s = mean(theta/sigma) by exactly -lr * dL/ds, whatever sigma."""
    m = _convbn("int8")
    sigma = torch.linspace(0.01, 2.0, 7)
    (3.0 * m.predicted_scale(sigma)).backward()
    with torch.no_grad():
        before = m.predicted_scale(sigma).item()
        m.theta -= 1e-3 * m.theta.grad
        after = m.predicted_scale(sigma).item()
    assert after - before == pytest.approx(-3e-3, rel=2e-3)  # float32 cancellation; unpreconditioned: ~100x off
    assert m.theta.grad[7:].abs().sum() == 0


def _two_conv_reference(m: QConvBN, x, s_in, out_c, k):
    """The batch-statistics fold written the plain way (paper Fig. 6): float conv for the
    statistics, fold, quantize (per channel where the layer is), then the folded int8 conv. Two
    convs forward and backward."""
    from qnas_cli.layers import _bias_quant, rows
    from qnas_cli.quant import lsq_grad_scale

    w = m.sliced_weight(x.shape[1], out_c, k)
    var, mean = torch.var_mean(m.conv(x, w), dim=(0, 2, 3), unbiased=False)
    sigma = torch.sqrt(var + BN_EPS)
    factor = m.bn_weight[:out_c] / sigma
    w_fold, bias = w * factor.view(-1, 1, 1, 1), m.bn_bias[:out_c] - mean * factor
    s_w = m.predicted_scale(sigma.detach())
    w_q = fake_quant(w_fold, rows(s_w), 0, -W_QMAX, W_QMAX, lsq_grad_scale(w_fold.numel(), W_QMAX))
    return m.conv(x, w_q, _bias_quant(bias, s_in, s_w)), w_fold, s_w


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("clipping", [False, True])
def test_batch_fold_has_the_two_conv_forms_values_and_gradients(depthwise, clipping):
    """Training computes the fold as BN_B(conv(x, w)) + conv(x, Q(w_fold) - w_fold) (one conv
    backward). Same values as the two-conv form; the same gradients for the weight scale always,
    and for w, gamma, beta when no weight clips; x's within the weight quantization error."""
    m = _convbn("int8", depthwise).double().train()
    m.out_q.enabled = False  # compare the conv output itself
    out_c, k, s_in = (8 if depthwise else 12), 5, torch.tensor(0.02, dtype=torch.float64)
    x = torch.randn(8, 8, 9, 9, dtype=torch.float64)
    with init_scales(m):
        m(x, s_in, out_c, k)
    with torch.no_grad():  # scale to 1.01x (no clipping) or 0.6x (heavy clipping) the largest folded weight
        _, w_fold, s_w = _two_conv_reference(m, x, s_in, out_c, k)
        m.theta.mul_((0.6 if clipping else 1.01) * w_fold.abs().max().item() / W_QMAX / s_w.item())
        assert ((w_fold / _two_conv_reference(m, x, s_in, out_c, k)[2]).abs() > W_QMAX).any() == clipping
    upstream = torch.randn(8, out_c, 9, 9, dtype=torch.float64)

    def grads(forward):
        m.zero_grad()
        xg = x.clone().requires_grad_()
        y = forward(xg)
        (y * upstream).sum().backward()
        return y.detach(), xg.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    state = {k_: v.clone() for k_, v in m.state_dict().items()}
    y, gx, g = grads(lambda xg: m(xg, s_in, out_c, k))
    m.load_state_dict(state)
    y_ref, gx_ref, g_ref = grads(lambda xg: _two_conv_reference(m, xg, s_in, out_c, k)[0])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(g["theta"], g_ref["theta"], rtol=1e-7, atol=1e-12)  # exact LSQ, by adjointness
    assert g["theta"].abs().sum() > 0
    if not clipping:
        for name in ("weight", "bn_weight", "bn_bias"):
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-7, atol=1e-9)
        # x's gradient sees w_fold instead of Q(w_fold): off by the weight quantization error only
        assert 0 < (gx - gx_ref).norm() < 0.02 * gx_ref.norm()


@pytest.mark.parametrize("scheme", ["symmetric", "full-range"])
def test_fused_relu_quantizer_equals_relu_then_quantizer(scheme):
    """Clipping at the grid's zero is the ReLU: same values, same gradients for x and the scale."""
    from qnas_cli.layers import ActQuant
    from qnas_cli.quant import lsq_grad_scale

    q = ActQuant(QuantConfig(act_scheme=scheme), relu=True)
    with torch.no_grad():
        q.scale.fill_(0.02)
    x = torch.randn(4, 3, 5, 5) * 4
    upstream = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = q(x1)
    (y1 * upstream).sum().backward()
    g1 = q.scale.grad.clone()
    q.scale.grad = None
    y2 = fake_quant(F.relu(x2), q.scale, q.zero_point, A_QMIN, A_QMAX, lsq_grad_scale(x2[0].numel(), A_QMAX))
    (y2 * upstream).sum().backward()
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    assert g1.item() == pytest.approx(q.scale.grad.item(), rel=1e-5)
    assert (y1 == 0).any() and (y1 == q.scale * (A_QMAX - q.zero_point)).any()  # both ends exercised


def test_inner_product_is_layout_independent():
    from qnas_cli.quant import inner

    a, b = torch.randn(3, 5, 4, 6, dtype=torch.float64), torch.randn(3, 5, 4, 6, dtype=torch.float64)
    expect = (a * b).sum()
    cl = torch.channels_last
    for x, y in ((a, b), (a.contiguous(memory_format=cl), b.contiguous(memory_format=cl)), (a.contiguous(memory_format=cl), b)):
        torch.testing.assert_close(inner(x, y), expect)
