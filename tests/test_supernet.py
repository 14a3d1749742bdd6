"""The elastic supernet: extraction equals the supernet bit for bit."""
from __future__ import annotations

import pytest
import torch

from conftest import ends_and_random, make_supernet
from qnas_cli.space import sample


@pytest.mark.parametrize("mode", ["none", "int8", "convs"])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("kernels", ["crop", "transform", "separate"])
def test_extract_equals_supernet_in_eval_mode(mode, in_channels, kernels):
    """With kernel transforms (or separate kernels) the extracted subnet holds the transformed
    (or its own) kernels: still bit for bit."""
    net = make_supernet(mode, in_channels, kernel_transform=kernels == "transform",
                        separate_kernels=kernels == "separate").eval()
    for arch in ends_and_random(net.space):
        sub = net.extract(arch).eval()
        x = torch.randn(6, in_channels, arch.resolution, arch.resolution)
        with torch.no_grad():
            torch.testing.assert_close(sub(x), net(x, arch), atol=0, rtol=0)


def test_extract_equals_supernet_in_train_mode_float():
    """Float mode also matches with batch statistics (same slices, same ops)."""
    net = make_supernet("none").train()
    for arch in ends_and_random(net.space):
        sub = net.extract(arch).train()
        x = torch.randn(6, 1, arch.resolution, arch.resolution)
        with torch.no_grad():
            torch.testing.assert_close(sub(x), net(x, arch), atol=0, rtol=0)


def test_extract_copies_and_leaves_supernet_untouched():
    net = make_supernet("int8")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    arch = sample(net.space, "smallest")
    sub = net.extract(arch)
    with torch.no_grad():
        for p in sub.parameters():
            p.add_(1.0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("mode", ["none", "int8", "convs"])
def test_every_subnet_trains_without_nans(mode):
    net = make_supernet(mode).train()
    for arch in ends_and_random(net.space):
        x = torch.randn(4, 1, arch.resolution, arch.resolution)
        out = net(x, arch)
        assert out.shape == (4, 10) and torch.isfinite(out).all()
        net.zero_grad()
        out.square().mean().backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_convs_mode_quantizes_conv_and_fc_inputs_and_weights_only():
    """--quant convs (the partially quantized baseline): each conv and FC quantizes its input and
    its own (unfolded) weights; every other quantizer is off, so BN, ReLU, adds, pooling and the
    logits stay float."""
    from qnas_cli.layers import ActQuant, QConvBN, QLinear
    from qnas_cli.quant import W_QMAX

    net = make_supernet("convs").train()
    convs = [m for m in net.modules() if isinstance(m, (QConvBN, QLinear))]
    on = [m for m in net.modules() if isinstance(m, ActQuant) and m.enabled]
    assert {id(m) for m in on} == {id(m.in_q) for m in convs}
    seen = []

    def on_grid(m, inputs, out):
        q = out / m.scale  # integers, up to the division's rounding
        assert (q - q.round()).abs().max() < 1e-3 and q.abs().max() <= 128.001
        seen.append(m)

    hooks = [m.register_forward_hook(on_grid) for m in on]
    arch = sample(net.space, "largest")
    logits = net(torch.randn(4, 1, arch.resolution, arch.resolution), arch)
    for h in hooks:
        h.remove()
    assert len(seen) == len(convs)  # every conv and FC of the largest subnet ran
    cls = net.classifier
    off = logits / cls.out_q.scale
    assert (off - off.round()).abs().max() > 0.1  # float logits: on no grid
    stem = net.stem
    w = stem.quantized_unfolded(stem.weight) / stem.w_scale
    assert (w - w.round()).abs().max() < 1e-3 and w.abs().max() <= W_QMAX + 1e-3 and not hasattr(stem, "theta")

