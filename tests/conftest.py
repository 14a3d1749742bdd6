"""Shared fixtures: the real Fashion-MNIST files, tiny supernets, a CLI runner."""
from __future__ import annotations

import random

import pytest
import torch
from typer.testing import CliRunner

from qnas_cli.data import FASHION_MNIST_DIR, load_dataset
from qnas_cli.layers import init_scales
from qnas_cli.quant import QuantConfig
from qnas_cli.space import PRESETS, sample
from qnas_cli.supernet import Supernet


@pytest.fixture(scope="session")
def fmnist():
    if not FASHION_MNIST_DIR.is_dir():
        pytest.fail(f"Fashion-MNIST is required for the tests: {FASHION_MNIST_DIR} (make setup installs it)")
    return load_dataset("fashion-mnist")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def ends_and_random(space, n: int = 4) -> list:
    """The largest and the smallest subnet, then ``n`` seeded random ones."""
    rng = random.Random(5)
    return [sample(space, "largest"), sample(space, "smallest")] + [sample(space, "random", rng) for _ in range(n)]


def make_supernet(mode: str = "int8", in_channels: int = 1, seed: int = 0, kernel_transform: bool = False,
                  separate_kernels: bool = False, **quant) -> Supernet:
    """A tiny supernet with data-initialised scales and non-trivial BN statistics (and kernel
    transforms away from the identity, with ``kernel_transform``)."""
    torch.manual_seed(seed)
    space = PRESETS["tiny"]
    if mode == "convs":  # convs-only quantization has no scale predictor
        quant = {"weight_scale": "shared", **quant}
    net = Supernet(space, in_channels, 10, QuantConfig(mode=mode, **quant), kernel_transform=kernel_transform,
                   separate_kernels=separate_kernels)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".kernel_transforms." in name:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(16, in_channels, 20, 20)
    net.train()
    if mode != "none":
        with init_scales(net):
            net(x, sample(space, "largest"))
    rng = random.Random(seed)
    with torch.no_grad():  # move running statistics away from their reset values
        for _ in range(3):
            a = sample(space, "random", rng)
            net(torch.randn(8, in_channels, a.resolution, a.resolution), a)
        for name, p in net.named_parameters():  # and BN affine parameters away from 1 / 0
            if p.dim() == 1 and p.shape[0] > 1:
                noise = 0.05 * torch.randn_like(p)
                # per-channel weight scales are of the order of 1e-2: moved relatively, they stay positive
                p.mul_(1 + noise) if name.endswith(("theta", "w_scale")) and net.cfg.per_channel else p.add_(noise)
    return net
