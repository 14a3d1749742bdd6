"""A calibrated int8 model does not depend on the CPU thread count (issue 27 item 19).

Before: the same subnet calibrated with 1 and 2 threads differed in 62 of 267 tensors (float
summation order in oneDNN and PyTorch's reductions, amplified by the int8 grid), so the search's
fitness, the .qnas.pt and the shipped .tflite depended on where they were made.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qnas_cli.batch_stats import STAT_WEIGHT_BITS, conv_batch_stats, digit_conv, fixed_order_sum, weight_grid
from qnas_cli.calibrate import calibrated_subnet, calibration_batches, subnet_document
from qnas_cli.checkpoint import write_json
from qnas_cli.data import load_dataset
from qnas_cli.layers import init_scales
from qnas_cli.quant import QuantConfig
from qnas_cli.space import PRESETS, sample
from qnas_cli.supernet import Supernet


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("groups,channels,kernel,fan_in", [(1, 1, 3, 9), (1, 64, 1, 64), (1, 576, 1, 576),
                                                           (48, 48, 7, 49), (32, 32, 3, 9)])
def test_digit_conv_is_the_exact_integer_conv(groups, channels, kernel, fan_in):
    """Every value within float32's rounding of the exact (float64) conv, and exact where it fits float32."""
    g = torch.Generator().manual_seed(0)
    u = torch.randint(-128, 128, (4, channels, 9, 9), generator=g).float()
    W, _ = weight_grid(torch.randn(16 if groups == 1 else channels, channels // groups, kernel, kernel, generator=g))
    exact = F.conv2d(u.double(), W.double(), None, 1, kernel // 2, 1, groups)  # integers below 2**53: exact
    got = digit_conv(u, W, 1, groups).double()
    assert W.abs().max() == 2**STAT_WEIGHT_BITS or W.abs().max() > 2 ** (STAT_WEIGHT_BITS - 1)
    small = exact.abs() < 2**24
    assert torch.equal(got[small], exact[small].round())
    assert ((got - exact).abs() <= exact.abs() * 2.0**-22).all()


def test_fixed_order_sum_matches_the_exact_sum_for_every_length():
    g = torch.Generator().manual_seed(1)
    for n in (0, 1, 2, 3, 7, 1000, 1023):
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        want = [math.fsum(x[:, j].tolist()) for j in range(5)]
        got = fixed_order_sum(x)
        assert got.shape == (5,)
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("depthwise", [False, True])
def test_batch_statistics_are_those_of_the_float_conv(depthwise):
    """What BatchNorm computes from the float conv, to float32 precision."""
    g = torch.Generator().manual_seed(2)
    c = 24
    s_in = torch.tensor(0.037)
    u = torch.randint(0, 200, (16, c, 10, 10), generator=g).float()
    w = torch.randn(c, 1 if depthwise else c, 3, 3, generator=g) * 0.2
    z = F.conv2d((u * s_in).double(), w.double(), None, 1, 1, 1, c if depthwise else 1)
    mean, var, n = conv_batch_stats(u, s_in, w, 1, c if depthwise else 1)
    assert n == 16 * 10 * 10
    scale = z.abs().mean()  # a mean near 0 is a sum that cancels: its error is relative to the terms
    assert torch.allclose(mean.double(), z.mean((0, 2, 3)), rtol=1e-5, atol=1e-5 * scale)
    assert torch.allclose(var.double(), z.var((0, 2, 3), unbiased=False), rtol=1e-5)


def _small_supernet() -> tuple[Supernet, object]:
    torch.manual_seed(0)
    space = PRESETS["small"]
    net = Supernet(space, 1, 10, QuantConfig())
    data = load_dataset("fashion-mnist", load_size=max(space.resolutions))
    x = next(iter(calibration_batches(data, max(space.resolutions), 250)))
    net.train()
    with init_scales(net):
        net(x[:64], sample(space, "largest"))
    return net, data


def test_calibration_gives_the_same_integers_on_1_and_2_threads(fmnist, threads):
    """Failed before: 50 of 217 tensors of this subnet differed between 1 and 2 threads."""
    net, data = _small_supernet()
    arch = sample(net.space, "random", random.Random(3))
    states = []
    for n in (1, 2):
        threads(n)
        sub = calibrated_subnet(net, arch, data, 500)
        states.append(sub.state_dict())
    differ = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert differ == []


@pytest.mark.slow
def test_the_calibrated_file_and_the_tflite_are_byte_identical_on_1_and_2_threads(tmp_path):
    """`qnas export` of one subnet.json, once with OMP_NUM_THREADS=1 and once with 2: the same bytes."""
    from qnas_cli.train import TrainConfig, train

    cfg = TrainConfig(space="tiny", out=str(tmp_path / "run"), steps=40, batch_size=32, lr=0.1, warmup_steps=5,
                      eval_images=100, calib_images=64, ckpt_every=1000)
    train(cfg, log=lambda *a, **k: None)
    meta = json.loads((tmp_path / "run" / "supernet.json").read_text())
    arch = sample(PRESETS["tiny"], "random", random.Random(5))
    digests = []
    for n in (1, 2):
        folder = tmp_path / f"threads{n}"
        write_json(folder / "subnet.json", subnet_document(arch, PRESETS["tiny"], tmp_path / "run" / "supernet.pt",
                                                           meta["weights"]["sha256"]))
        env = {**os.environ, "OMP_NUM_THREADS": str(n)}
        r = subprocess.run([sys.executable, "-m", "qnas_cli", "export", str(folder / "subnet.json"), "--out",
                            str(folder / "export"), "--calib-images", "500", "--eval-images", "200", "--json"],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in [folder / "subnet.qnas.pt", *sorted((folder / "export").glob("*.tflite"))]})
    assert len(digests[0]) >= 2 and digests[0] == digests[1]
