"""The elastic supernet: extraction equals the supernet bit for bit."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import make_supernet
from qnas_cli.space import sample


def _archs(space, n=4):
    rng = random.Random(5)
    return [sample(space, "largest"), sample(space, "smallest")] + [sample(space, "random", rng) for _ in range(n)]


@pytest.mark.parametrize("mode", ["none", "int8"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_extract_equals_supernet_in_eval_mode(mode, in_channels):
    net = make_supernet(mode, in_channels).eval()
    for arch in _archs(net.space):
        sub = net.extract(arch).eval()
        x = torch.randn(6, in_channels, arch.resolution, arch.resolution)
        with torch.no_grad():
            torch.testing.assert_close(sub(x), net(x, arch), atol=0, rtol=0)


def test_extract_equals_supernet_in_train_mode_float():
    """Float mode also matches with batch statistics (same slices, same ops)."""
    net = make_supernet("none").train()
    for arch in _archs(net.space):
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


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_every_subnet_trains_without_nans(mode):
    net = make_supernet(mode).train()
    for arch in _archs(net.space):
        x = torch.randn(4, 1, arch.resolution, arch.resolution)
        out = net(x, arch)
        assert out.shape == (4, 10) and torch.isfinite(out).all()
        net.zero_grad()
        out.square().mean().backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
