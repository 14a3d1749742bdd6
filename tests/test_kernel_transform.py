"""--kernel-transform: smaller depthwise kernels through OFA's learned transforms of the larger
one's centre. At the identity they are the plain crop; trained, saved, loaded and extracted with
the supernet; an --init from a supernet without them starts at the identity."""
from __future__ import annotations

import pytest
import torch

from conftest import ends_and_random
from qnas_cli.cli import app
from qnas_cli.quant import QuantConfig
from qnas_cli.space import PRESETS, sample
from qnas_cli.supernet import Supernet, load_supernet
from qnas_cli.train import TrainConfig, train

FAST = dict(space="tiny", batch_size=32, eval_images=100, calib_images=64, warmup_steps=2, log_every=1, tensorboard=False)
QUIET = dict(log=lambda *a, **k: None)


def test_kernel_transforms_start_as_the_plain_centre_crop_and_are_learned():
    """At the identity a transformed supernet computes what the plain one does (so --init from a
    supernet trained without them starts where it was); smaller kernels only get a gradient."""
    space = PRESETS["tiny"]
    torch.manual_seed(0)
    plain = Supernet(space, 1, 10, QuantConfig(mode="none")).eval()
    torch.manual_seed(0)
    net = Supernet(space, 1, 10, QuantConfig(mode="none"), kernel_transform=True).eval()
    names = [n for n, _ in net.named_parameters() if ".kernel_transforms." in n]
    assert names and all(n.endswith("5to3") for n in names)  # tiny's kernels: 3 or 5
    assert not set(plain.state_dict()) - set(net.state_dict())
    net.load_state_dict(plain.state_dict(), strict=False)
    for arch in ends_and_random(space):
        x = torch.randn(4, 1, arch.resolution, arch.resolution)
        with torch.no_grad():
            torch.testing.assert_close(net(x, arch), plain(x, arch), atol=0, rtol=0)
    net.train()
    arch = sample(space, "largest")  # every kernel 5: the transforms are not on its path
    net(torch.randn(4, 1, arch.resolution, arch.resolution), arch).square().mean().backward()
    assert all(p.grad is None for n, p in net.named_parameters() if ".kernel_transforms." in n)
    arch = sample(space, "smallest")
    net(torch.randn(4, 1, arch.resolution, arch.resolution), arch).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if ".kernel_transforms." in n)


def _transforms(net: Supernet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters() if ".kernel_transforms." in n}


def test_a_run_learns_saves_and_reloads_them(tmp_path):
    """Float then int8 phase with the option: the transforms move, survive the float -> int8 start
    and supernet.pt, and the run's own evaluation is of the transformed subnets."""
    summary = train(TrainConfig(out=str(tmp_path / "kt"), steps=6, float_steps=3, kernel_transform=True, **FAST), **QUIET)
    net, meta = load_supernet(tmp_path / "kt" / "supernet.pt")
    moved = _transforms(net)
    assert net.kernel_transform and moved and meta["config"]["kernel_transform"] is True
    assert any(not torch.equal(m, torch.eye(m.shape[0])) for m in moved.values())
    float_net, _ = load_supernet(tmp_path / "kt" / "float_supernet.pt")
    assert float_net.kernel_transform and _transforms(float_net).keys() == moved.keys()
    assert set(summary["metrics"]) == {"largest", "smallest"}


def test_init_from_a_plain_float_supernet_starts_at_the_identity_and_the_reverse_is_refused(tmp_path, runner):
    train(TrainConfig(out=str(tmp_path / "plain"), steps=5, float_steps=4, **FAST), **QUIET)
    float_pt = tmp_path / "plain" / "float_supernet.pt"
    train(TrainConfig(out=str(tmp_path / "kt"), steps=3, init=str(float_pt), kernel_transform=True, **FAST), **QUIET)
    net, _ = load_supernet(tmp_path / "kt" / "supernet.pt")
    assert net.kernel_transform and _transforms(net)
    train(TrainConfig(out=str(tmp_path / "ktf"), steps=3, float_steps=2, kernel_transform=True, **FAST), **QUIET)
    out = tmp_path / "refused"
    r = runner.invoke(app, ["train", "--space", "tiny", "--init", str(tmp_path / "ktf" / "float_supernet.pt"),
                            "--steps", "2", "--out", str(out)])
    assert r.exit_code == 2 and "learned kernel transforms" in r.output and "--kernel-transform" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_a_supernet_from_before_the_option_loads_without_them(tmp_path):
    """Files written before the option have no ``kernel_transform`` field: a plain supernet."""
    train(TrainConfig(out=str(tmp_path / "plain"), steps=2, float_steps=0, **FAST), **QUIET)
    net, _ = load_supernet(tmp_path / "plain" / "supernet.pt")
    assert not net.kernel_transform and not _transforms(net)


@pytest.mark.slow
def test_a_transformed_subnet_exports_with_the_gate_passing(runner, tmp_path):
    """qnas train --kernel-transform (tiny) -> a subnet with 3x3 kernels -> qnas export: PASS, every
    int8 logit equal to the exact forward's: the file holds the transformed kernels."""
    import json

    from qnas_cli.calibrate import subnet_document
    from qnas_cli.checkpoint import sha256_file, write_json

    r = runner.invoke(app, ["train", "--space", "tiny", "--steps", "60", "--batch-size", "32", "--lr", "0.1", "--kernel-transform",
                            "--warmup-steps", "5", "--eval-images", "200", "--calib-images", "128", "--no-tensorboard",
                            "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    net_path = tmp_path / "run" / "supernet.pt"
    net, _ = load_supernet(net_path)
    assert any(not torch.equal(m, torch.eye(m.shape[0])) for m in _transforms(net).values())
    arch = sample(PRESETS["tiny"], "smallest")  # every depthwise kernel 3x3: each through a transform
    subnet = tmp_path / "subnet.json"
    write_json(subnet, subnet_document(arch, PRESETS["tiny"], str(net_path.resolve()), sha256_file(net_path)))
    r = runner.invoke(app, ["export", str(subnet), "--out", str(tmp_path / "export"), "--eval-images", "300",
                            "--verify-images", "300", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    assert report["passed"] and report["parity"][report["target"]]["exact"] == 1.0
    assert report["accuracy"]["tflite_top1"] == report["accuracy"]["top1"]
