"""End to end beyond the tiny defaults: every quantization option, a feature FC, expand=1 blocks,
and the mbv3 space at 128 and 224 px, each exported through the real path and bit-exact on the
target runtimes (the per-op and census checks are tests/test_export_tflite.py's).

The supernets here are data-initialised (scales from images, as training starts) and
BN-calibrated on real images: their integers are those of a real export, their accuracy is not
the point.
"""
from __future__ import annotations


import numpy as np
import pytest

from conftest import make_supernet
from qnas_cli.export.fold import to_integer_graph
from qnas_cli.export.pipeline import int8_images, subnet_outputs
from qnas_cli.export.pixels import file_io, on_pixel_grid
from qnas_cli.export.tflite import export_tflite
from qnas_cli.export.tflite_io import adapt_io
from qnas_cli.export.measure import interpreter, xnnpack_coverage
from qnas_cli.export.verify import run_tflite
from qnas_cli.calibrate import calibrated_subnet
from qnas_cli.data import load_dataset
from qnas_cli.kernels import TARGETS
from qnas_cli.layers import keep_scales_positive
from qnas_cli.space import SearchSpace, sample
from qnas_cli.supernet import Supernet
from qnas_cli.quant import QuantConfig
from qnas_cli.train import init_quant_scales
from tests.helpers import space_doc

pytestmark = pytest.mark.slow


def _exact_everywhere(sub, data, folder, n_images=60, pixels=False):
    """Every target runtime runs the file exactly as the subnet's exact forward. ``pixels``: with
    the default ends, uint8 RGB pixels in (the input on the pixel grid), uint8 scores out."""
    finish = None
    if pixels:
        io = file_io(None, "uint8", None, data.describe())
        assert (io.input, io.color_space, io.channel) == ("uint8", "rgb", 1)
        sub = on_pixel_grid(sub, data.describe())
        finish = lambda model: adapt_io(model, io)  # noqa: E731
    graph = to_integer_graph(sub)
    images, _ = int8_images(sub, data, data.test, n_images)
    result = export_tflite(graph, images[:16], folder, finish=finish)
    assert xnnpack_coverage(interpreter(result.tflite, "xnnpack"))["undelegated_ops"] == (["QUANTIZE"] if pixels else [])
    for runtime in TARGETS:
        got, want = run_tflite(result.tflite, images, runtime), subnet_outputs(sub, images, runtime)
        np.testing.assert_array_equal(got, want, err_msg=f"{sub.arch.key} on {runtime}")


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", load_size=20)


@pytest.mark.parametrize("quant", [{"act_scheme": "full-range"}, {"weight_scale": "shared"}, {"bn_fold": "moving"},
                                   {"weight_granularity": "per-channel"},
                                   {"weight_granularity": "per-channel", "weight_scale": "shared", "act_scheme": "full-range"}],
                         ids=["full-range", "shared-scale", "moving-fold", "per-channel", "per-channel-shared"])
def test_quantization_options_export_bit_exact(quant, fashion, tmp_path):
    net = make_supernet("int8", **quant)
    keep_scales_positive(net)
    sub = calibrated_subnet(net, sample(net.space, "largest"), fashion, images=256)
    _exact_everywhere(sub, fashion, tmp_path)


def test_feature_fc_and_expand_1_blocks_export_bit_exact(fashion, tmp_path):
    doc = space_doc(feature_channels=24, stage_expands=[1, 2])
    net = Supernet(SearchSpace.from_dict(doc, name="tiny_feature"), 1, 10, QuantConfig())
    init_quant_scales(net, fashion, net.space, "cpu", images=64)  # data-initialised, as training starts
    arch = sample(net.space, "smallest")
    assert arch.stages[0].blocks[0].expand == 1 and net.feature is not None
    _exact_everywhere(calibrated_subnet(net, arch, fashion, images=256), fashion, tmp_path, pixels=True)


@pytest.fixture(scope="module")
def mbv3_net():
    """An mbv3 supernet (feature FC, expand-1 first stage) with scales initialised from images."""
    from qnas_cli.space import PRESETS

    data = load_dataset("fashion-mnist", load_size=224)
    net = Supernet(PRESETS["mbv3"], 1, 10, QuantConfig())
    init_quant_scales(net, data, net.space, "cpu", images=16)
    return net, data


def test_mbv3_per_channel_exports_bit_exact(tmp_path):
    """Per-channel weights (TFLite's per-axis convention) on mbv3's 42-op subnet, uint8 ends."""
    from qnas_cli.space import PRESETS

    data = load_dataset("fashion-mnist", load_size=128)
    net = Supernet(PRESETS["mbv3"], 1, 10, QuantConfig(weight_granularity="per-channel"))
    init_quant_scales(net, data, net.space, "cpu", images=16)
    smallest = sample(net.space, "smallest")
    arch = type(smallest)(128, smallest.stages)
    _exact_everywhere(calibrated_subnet(net, arch, data, images=64), data, tmp_path, n_images=20, pixels=True)


@pytest.mark.parametrize("resolution", [128, 224])
def test_mbv3_exports_bit_exact(mbv3_net, resolution, tmp_path):
    """The issue's failing case: mbv3's smallest subnet at 128 px (42 ops) failed the old gate
    (92.5% exact on XNNPACK, 4.8% on the built-in kernels); here at both ends of its resolutions."""
    net, data = mbv3_net
    smallest = sample(net.space, "smallest")
    arch = type(smallest)(resolution, smallest.stages)
    _exact_everywhere(calibrated_subnet(net, arch, data, images=64), data, tmp_path, n_images=20, pixels=resolution == 128)


@pytest.mark.parametrize("how,granularity", [("largest", "per-tensor"), ("smallest", "per-tensor"), ("random", "per-tensor"),
                                             ("largest", "per-channel")])
def test_small_space_subnets_export_bit_exact(how, granularity, tmp_path):
    """The project's default space, data-initialised and BN-calibrated on Fashion-MNIST."""
    import random

    from qnas_cli.space import PRESETS

    data = load_dataset("fashion-mnist", load_size=32)
    net = Supernet(PRESETS["small"], 1, 10, QuantConfig(weight_granularity=granularity))
    init_quant_scales(net, data, net.space, "cpu", images=64)
    arch = sample(net.space, how, random.Random(7))
    _exact_everywhere(calibrated_subnet(net, arch, data, images=256), data, tmp_path, n_images=100, pixels=how == "random")
