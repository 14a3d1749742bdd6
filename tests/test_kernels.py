"""The runtimes' int8 arithmetic (qnas_cli/kernels.py), fast: the rounding of ties as measured on
LiteRT 2.1.0's interpreter, the fixed-point helpers against a literal transcription of their C
source, and the exact forward of a subnet against the integer graph executor.

The interpreter itself is checked op by op on random integers in tests/test_kernels_tflite.py (slow).
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from conftest import make_supernet
from qnas_cli.export.fold import quantize_input, quantize_output, to_integer_graph
from qnas_cli.export.reference import run_reference_tensors
from qnas_cli import kernels
from qnas_cli.layers import QConvBN, keep_scales_positive, set_runtime
from qnas_cli.space import sample
from qnas_cli.supernet import MBBlock

# Probes run on the LiteRT 2.1.0 interpreter with hand-built one-op models (XNNPACK, BUILTIN_REF)
# and on TFLite Micro. FULLY_CONNECTED with input 1, weights x, s_in = s_w = 1, s_out = 4 (acc/4):
FC_X = [1, 2, 3, 5, 6, 10, -1, -2, -3, -5, -6, -10, 14, -14, 7, -7]
FC_XNNPACK = [0, 0, 1, 1, 2, 2, 0, 0, -1, -1, -2, -2, 4, -4, 2, -2]  # fp32, ties to even
FC_REFERENCE = [0, 1, 1, 1, 2, 3, 0, -1, -1, -1, -2, -3, 4, -4, 2, -2]  # double, ties away from zero
FIXED_POINT = [1, 1, 1, 2, 2, 3, 0, -1, -1, -1, -2, -3, 4, -4, 2, -2]  # TFLite Micro's FC: MultiplyByQuantizedMultiplier
# MEAN over 4 values, input and output sharing scale and zero point 0; per-channel sums:
MEAN_SUMS = [-2, -6, 2, 6, -10, 10, -1, -3, 1, 3, -4, 4, -14, 14, -18, 18]
MEAN_XNNPACK = [-1, -2, 1, 2, -3, 3, 0, -1, 0, 1, -1, 1, -4, 4, -5, 5]
MEAN_REFERENCE = [-1, -2, 1, 2, -3, 3, 0, -1, 1, 1, -1, 1, -4, 4, -5, 5]  # 0.25 -> 1: double rounding (TFLite Micro too)


@pytest.mark.parametrize("runtime, want", [("xnnpack", FC_XNNPACK), ("reference", FC_REFERENCE), ("micro", FIXED_POINT)])
def test_fully_connected_ties_as_measured(runtime, want):
    acc = torch.tensor(FC_X, dtype=torch.float32)
    rq = kernels.conv_requant(runtime, 1.0, 1.0, 4.0, fully_connected=True)
    assert kernels.requantize(acc, rq, 0, -128, 127).tolist() == want


def test_reference_conv_rounds_like_tflite_fixed_point():
    """The reference conv's MultiplyByQuantizedMultiplier: half up, then half away from zero."""
    rq = kernels.conv_requant("reference", 1.0, 1.0, 4.0)
    assert kernels.requantize(torch.tensor(FC_X, dtype=torch.float32), rq, 0, -128, 127).tolist() == FIXED_POINT


@pytest.mark.parametrize("runtime, want", [("xnnpack", MEAN_XNNPACK), ("reference", MEAN_REFERENCE), ("micro", MEAN_REFERENCE)])
def test_mean_ties_as_measured(runtime, want):
    q = torch.zeros(1, len(MEAN_SUMS), 2, 2, dtype=torch.int64)
    q[0, :, 0, 0] = torch.tensor(MEAN_SUMS)
    assert kernels.mean(q, 0, runtime)[0].tolist() == want


def test_xnnpack_mean_rounds_in_float32_not_exact_rationals():
    """sum * float32(1/N) is not sum/N for N = 9, 49: emulated as XNNPACK computes it."""
    for n in (9, 25, 49):
        h = int(math.isqrt(n))
        totals = torch.arange(-127 * n, 127 * n + 1, dtype=torch.int64)
        scale = np.float32(1.0 / np.float32(n))
        want = [int(math.copysign(math.floor(abs(float(np.float32(np.float32(t) * scale))) + 0.5), t)) for t in totals.tolist()]
        q = torch.zeros(len(totals), 1, h, h, dtype=torch.int64)
        q[:, 0, 0, 0] = totals  # the kernel only sees the sum
        got = kernels.xnnpack_mean(q.sum(dim=(-2, -1)), 0, n)
        assert got[:, 0].tolist() == [max(-128, min(127, w)) for w in want]


def _srdhm(a: int, b: int) -> int:  # gemmlowp SaturatingRoundingDoublingHighMul, in C's integer semantics
    if a == b == -(2**31):
        return 2**31 - 1
    ab = a * b
    nudge = 2**30 if ab >= 0 else 1 - 2**30
    return int((ab + nudge) / 2**31) if abs(ab + nudge) < 2**52 else -((-(ab + nudge)) // 2**31) if ab + nudge < 0 else (ab + nudge) // 2**31


def _rdbpot(x: int, e: int) -> int:  # gemmlowp RoundingDivideByPOT
    mask = (1 << e) - 1
    remainder, threshold = x & mask, (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if remainder > threshold else 0)


def test_multiply_by_quantized_multiplier_equals_its_c_source():
    rng = random.Random(0)
    xs = [rng.randint(-(2**24), 2**24) for _ in range(3000)] + list(range(-300, 301))
    for real in (0.25, 0.0123, 0.7, 1.0 / 9, 3.5, 1e-6):
        m, shift = kernels.quantize_multiplier(real)
        left, right = max(shift, 0), max(-shift, 0)
        want = [_rdbpot(_srdhm(x * (1 << left), m), right) for x in xs]
        got = kernels.multiply_by_quantized_multiplier(torch.tensor(xs), m, shift)
        assert got.tolist() == want, real


def test_quantize_multiplier():
    assert kernels.quantize_multiplier(1.0) == (2**30, 1)
    assert kernels.quantize_multiplier(0.5) == (2**30, 0)
    assert kernels.quantize_multiplier(0.0) == (0, 0)
    assert kernels.quantize_multiplier(2.0**-40) == (0, 0)  # shift < -31 flushes to zero
    assert kernels.quantize_multiplier(1 - 2.0**-40) == (2**30, 1)  # the mantissa rounds up to 2**31: halved
    for real in np.geomspace(1e-5, 100, 50):
        m, shift = kernels.quantize_multiplier(float(real))
        assert 2**30 <= m < 2**31 and abs(m * 2.0 ** (shift - 31) / real - 1) < 2**-30


def test_round_half_away_is_exact_next_to_ties():
    x = torch.tensor([0.5, -0.5, 2.5, -2.5, 0.49999999999999994, -0.49999999999999994, 1.4999999999999998, 3.0],
                     dtype=torch.float64)
    assert kernels.round_half_away(x).tolist() == [1, -1, 3, -3, 0, 0, 1, 3]


def test_xnnpack_requantization_is_float32():
    """float32(acc) * float32 scale: near a tie this can differ from the exact rational rounding
    (which is why the fake-quant simulation is not bit-exact), never by more than one LSB."""
    acc = torch.arange(-2**20, 2**20, 7, dtype=torch.float64)
    rq = kernels.conv_requant("xnnpack", 0.0123, 0.00456, 0.0789)
    got = kernels.requantize(acc.clone(), rq, 0, -(2**30), 2**30)
    want = torch.round(acc.float() * torch.tensor(rq.scale)).double()
    assert torch.equal(got.double(), want)
    assert (got.double() - acc * (0.0123 * 0.00456 / 0.0789)).abs().max() <= 0.5 + 1e-3


def test_accumulators_wrap_like_int32():
    w = torch.full((1, 1, 1, 1), 127.0)
    bias = torch.tensor([2.0**31 - 1], dtype=torch.float64)
    acc = kernels.conv_accumulate(torch.full((1, 1, 1, 1), 1.0), w, bias, 1, 1)
    assert acc.item() == 2**31 - 1 + 127 - 2**32  # wraps around, as the int32 register does


def test_check_target_refuses_unknown_runtime():
    from qnas_cli.errors import UserError

    with pytest.raises(UserError, match="--runtime"):
        kernels.check_target("gpu")


# ---- the calibrated subnet's exact forward == the integer graph executor, every tensor -------

def _grid_tensors(sub, x):
    """Every int8 tensor the subnet computes (name -> int8 values NCHW / NC), via hooks."""
    got = {}

    def hook(name, q):
        return lambda m, i, out: got.__setitem__(name, q().from_grid(out).numpy())

    handles = [sub.stem.register_forward_hook(hook("stem", lambda: sub.stem.out_q))]
    for i, blocks in enumerate(sub.stages):
        for j, block in enumerate(blocks):
            p = f"s{i}b{j}"
            if block.expand is not None:
                handles.append(block.expand.register_forward_hook(hook(f"{p}_expand", lambda b=block: b.expand.out_q)))
            handles.append(block.depthwise.register_forward_hook(hook(f"{p}_dw", lambda b=block: b.depthwise.out_q)))
            handles.append(block.project.register_forward_hook(hook(f"{p}_project", lambda b=block: b.project.out_q)))
            if block.add_q is not None:
                handles.append(block.register_forward_hook(hook(f"{p}_add", lambda b=block: b.add_q)))
    handles.append(sub.head.register_forward_hook(hook("head", lambda: sub.head.out_q)))
    try:
        with torch.no_grad():
            out = sub(x)
    finally:
        for h in handles:
            h.remove()
    return got, out


@pytest.mark.parametrize("quant", [{}, {"act_scheme": "full-range"}, {"weight_scale": "shared"}, {"bn_fold": "moving"},
                                   {"weight_granularity": "per-channel"}],
                         ids=["default", "full-range", "shared-scale", "moving-fold", "per-channel"])
@pytest.mark.parametrize("runtime", kernels.TARGETS)
def test_subnet_exact_forward_equals_integer_graph(runtime, quant):
    net = make_supernet("int8", **quant).eval()
    keep_scales_positive(net)  # make_supernet's perturbation can push a theta below zero
    rng = random.Random(1)
    for arch in [sample(net.space, "largest"), sample(net.space, "smallest"), sample(net.space, "random", rng)]:
        sub = net.extract(arch).eval()
        set_runtime(sub, runtime)
        x = torch.randn(12, 1, arch.resolution, arch.resolution) * 2
        got, logits = _grid_tensors(sub, x)
        graph = to_integer_graph(sub)
        want = run_reference_tensors(graph, quantize_input(sub, x), runtime)
        for name, values in got.items():
            np.testing.assert_array_equal(values, want[name], err_msg=f"{arch.key} {name}")
        np.testing.assert_array_equal(quantize_output(sub, logits), want[graph.output])


def test_fake_quant_stays_within_two_lsb_of_exact_end_to_end():
    """Training's simulation (float arithmetic) vs the exact XNNPACK forward, on every tensor of a
    whole network: per op they differ by at most 1 LSB, at near-ties; each network then feeds its
    own outputs forward, so a difference can grow with depth (docs/design.md §4)."""
    net = make_supernet("int8").eval()
    arch = sample(net.space, "largest")
    sub = net.extract(arch).eval()
    x = torch.randn(32, 1, arch.resolution, arch.resolution) * 2
    set_runtime(sub, None)
    fake, _ = _grid_tensors(sub, x)
    set_runtime(sub, "xnnpack")
    exact, _ = _grid_tensors(sub, x)
    diffs = [np.abs(fake[k].astype(int) - exact[k]) for k in exact]
    assert max(d.max() for d in diffs) <= 2
    assert np.mean(np.concatenate([d.ravel() for d in diffs])) < 0.05


def test_exact_forward_is_eval_only_and_set_runtime_reaches_every_layer():
    net = make_supernet("int8")
    set_runtime(net, "reference")
    assert all(m.runtime == "reference" for m in net.modules() if isinstance(m, (QConvBN, MBBlock)))
    arch = sample(net.space, "largest")
    sub = net.extract(arch)
    assert sub.runtime == "reference" and sub.stem.runtime == "reference"
    x = torch.randn(4, 1, arch.resolution, arch.resolution, requires_grad=True)
    net.train()(x, arch).sum().backward()  # training still differentiates the fake-quant network
    assert x.grad is not None and torch.isfinite(x.grad).all()
