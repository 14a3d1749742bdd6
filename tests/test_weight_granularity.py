"""Per-channel weight scales in the model core: the fold, the predictor's exactness under BN
calibration, held per-channel steps, and the supernet/subnet identity (issue 30). The fold without
quantizers is tests/test_quant.py's, parametrized over granularity."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import make_supernet
from qnas_cli.errors import UserError
from qnas_cli.layers import BN_EPS, QConvBN, init_scales
from qnas_cli.quant import W_QMAX, QuantConfig, mse_optimal_row_scales, mse_optimal_scale
from qnas_cli.space import sample
from tests.test_quant import _convbn as convbn, _two_conv_reference as two_conv_reference

SCALE_MODES = ["predictor", "shared"]


def _convbn(depthwise=False, **quant):
    """test_quant's Conv-BN (uniform BN parameters and statistics), per channel."""
    return convbn("int8", depthwise, weight_granularity="per-channel", **quant)


def test_per_channel_is_a_checked_option():
    assert QuantConfig(weight_granularity="per-channel").per_channel
    assert not QuantConfig().per_channel  # the paper's per-tensor scale stays the default until measured
    with pytest.raises(UserError, match="--weight-granularity"):
        QuantConfig(weight_granularity="per-row")
    with pytest.raises(UserError, match="convs"):
        QuantConfig(mode="convs", weight_scale="shared", weight_granularity="per-channel")


@pytest.mark.parametrize("depthwise", [False, True])
def test_per_channel_predictor_integers_do_not_change_under_bn_calibration(depthwise):
    """s_i = theta_i / sigma_i: the integer weights are round(w_i gamma_i / theta_i), whatever sigma."""
    m = _convbn(depthwise).eval()
    s_in = torch.tensor(0.02)
    q_w, q_b, s_w = m.integer_params(s_in)
    assert s_w.shape == (m.out_max,)
    with torch.no_grad():
        m.running_var.mul_(torch.linspace(0.3, 3.0, m.out_max))  # another subnet's statistics
        m.running_mean.add_(0.1)
    q_w2, q_b2, s_w2 = m.integer_params(s_in)
    assert torch.equal(q_w, q_w2)  # bit for bit
    assert not torch.equal(s_w, s_w2) and not torch.equal(q_b, q_b2)  # only scales and biases move
    torch.testing.assert_close(s_w2, m.theta / torch.sqrt(m.running_var + BN_EPS))
    # the per-tensor predictor's integers do change: the point of the option
    pt = QConvBN(8, m.out_max, 5, 1, QuantConfig(), depthwise=depthwise, relu=False).eval()
    pt.load_state_dict(m.state_dict())
    before = pt.integer_params(s_in)[0]
    with torch.no_grad():
        pt.running_var.mul_(torch.linspace(3.0, 0.3, m.out_max))
    assert not torch.equal(before, pt.integer_params(s_in)[0])


def test_row_scales_are_each_rows_mse_optimal_scale():
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 3.0, 6).view(-1, 1, 1, 1)
    got = mse_optimal_row_scales(w, W_QMAX)
    want = torch.tensor([mse_optimal_scale(r, 0, -W_QMAX, W_QMAX) for r in w])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale_mode", SCALE_MODES)
def test_first_prediction_is_each_channels_mse_optimal_scale(scale_mode):
    m = _convbn(weight_scale=scale_mode).train()
    x = torch.randn(16, 8, 9, 9)
    with init_scales(m):
        m(x, torch.tensor(0.02), 12, 5)
    conv = F.conv2d(x, m.sliced_weight(8, 12, 5), None, 1, 2)
    var, _ = torch.var_mean(conv, dim=(0, 2, 3), unbiased=False)
    sigma = torch.sqrt(var + BN_EPS)
    w_fold = m.sliced_weight(8, 12, 5) * (m.bn_weight[:12] / sigma).view(-1, 1, 1, 1)
    torch.testing.assert_close(m.predicted_scale(sigma), mse_optimal_row_scales(w_fold, W_QMAX), rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale_mode", SCALE_MODES)
@pytest.mark.parametrize("depthwise", [False, True])
def test_per_channel_steps_are_held_and_the_batch_fold_is_the_two_conv_form(scale_mode, depthwise):
    """Per-channel steps are set from data, then held (learning them destabilised training): no
    gradient, no optimizer step moves them; the weights and gamma still learn, and the one-conv
    batch fold computes the two-conv form's values."""
    m = _convbn(depthwise, weight_scale=scale_mode).double().train()
    m.out_q.enabled = False
    out_c, k, s_in = (8 if depthwise else 12), 5, torch.tensor(0.02, dtype=torch.float64)
    x = torch.randn(8, 8, 9, 9, dtype=torch.float64)
    with init_scales(m):
        m(x, s_in, out_c, k)
    step = m.theta if scale_mode == "predictor" else m.w_scale
    held = step.detach().clone()
    with torch.no_grad():
        y_ref = two_conv_reference(m, x, s_in, out_c, k)[0]
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    y = m(x, s_in, out_c, k)
    torch.testing.assert_close(y.detach(), y_ref, rtol=0, atol=1e-9)
    (y * torch.randn_like(y)).sum().backward()
    assert not step.requires_grad and step.grad is None
    assert m.weight.grad.abs().sum() > 0 and m.bn_weight.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(step, held)


def _archs(space, n=3):
    rng = random.Random(5)
    return [sample(space, "largest"), sample(space, "smallest")] + [sample(space, "random", rng) for _ in range(n)]


@pytest.mark.parametrize("scale_mode", SCALE_MODES)
def test_per_channel_subnets_equal_the_supernet_and_train(scale_mode):
    net = make_supernet("int8", 1, weight_scale=scale_mode, weight_granularity="per-channel")
    for arch in _archs(net.space):
        x = torch.randn(4, 1, arch.resolution, arch.resolution)
        net.eval()
        sub = net.extract(arch).eval()
        with torch.no_grad():
            torch.testing.assert_close(sub(x), net(x, arch), atol=0, rtol=0)
        net.train()
        out = net(x, arch)
        net.zero_grad()
        out.square().mean().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_a_bad_granularity_is_refused_before_anything_is_written(runner, tmp_path):
    from qnas_cli.cli import app

    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--space", "tiny", "--weight-granularity", "per-row", "--out", str(out)])
    assert r.exit_code == 2 and "--weight-granularity" in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()


def test_a_checkpoint_from_before_the_option_resumes_as_per_tensor():
    from dataclasses import asdict

    from qnas_cli.train import with_added_defaults

    old = {"config": {"quant": {"mode": "int8", "act_scheme": "symmetric", "bn_fold": "batch", "weight_scale": "predictor"}}}
    assert with_added_defaults(old)["config"]["quant"] == asdict(QuantConfig())
    newer = {"config": {"quant": {**old["config"]["quant"], "weight_granularity": "per-channel"}}}
    assert with_added_defaults(newer)["config"]["quant"]["weight_granularity"] == "per-channel"
    unknown = {"config": {"quant": {"mode": "int8", "from_the_future": 1}}}
    assert with_added_defaults(unknown)["config"]["quant"] == unknown["config"]["quant"]  # compared as it is, and refused by check_resumable


def test_the_size_model_counts_per_channel_quantization_parameters():
    """A per-channel file stores a scale and a zero point per conv output channel, for weights and
    biases (cost.TFLITE_BYTES_PER_CHANNEL each); FC layers keep one."""
    from qnas_cli.cost import TFLITE_BYTES_PER_CHANNEL, arch_cost
    from qnas_cli.export.fold import to_integer_graph
    from qnas_cli.export.graph import Conv

    net = make_supernet("int8", 1, weight_granularity="per-channel").eval()
    for arch in _archs(net.space, n=1):
        graph = to_integer_graph(net.extract(arch).eval())
        channels = sum(op.weight.shape[0] for op in graph.ops if isinstance(op, Conv) and op.per_channel)
        assert channels == sum(op.weight.shape[0] for op in graph.ops if isinstance(op, Conv))
        tensor, channel = (arch_cost(net.space, arch, 1, 10, per_channel=pc).weight_bytes for pc in (False, True))
        assert channel - tensor == TFLITE_BYTES_PER_CHANNEL * channels
