"""BN calibration and evaluation of subnets (DESIGN §4).

A subnet's BN statistics are re-estimated after extraction: reset, then the cumulative average
over a fixed, seeded set of training images (no augmentation). In int8 mode the scale predictor
then reads the calibrated sigma, so every subnet gets its own weight scales.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_weights, save_weights
from .data import Dataset, ImageSource, calibration_indices, load_dataset, ordered_batches, to_input
from .errors import UserError
from .layers import BN_MOMENTUM
from .quant import QuantConfig
from .space import Arch, SearchSpace
from .supernet import Subnet, Supernet, load_supernet, reset_bn_stats, set_bn_momentum

CALIB_IMAGES = 2000
EVAL_BATCH = 500


@torch.no_grad()
def calibrate_bn(model: nn.Module, data: Dataset, resolution: int, images: int = CALIB_IMAGES,
                 batch_size: int = 250, device: str = "cpu", seed: int = 0) -> None:
    """Reset every BN and set its running statistics to the average over ``images`` training images."""
    idx = calibration_indices(data.train, images, seed)
    was_training = model.training
    reset_bn_stats(model)
    set_bn_momentum(model, None)
    model.train()
    try:
        for i in range(0, len(idx), batch_size):
            x, _ = data.train.get(idx[i : i + batch_size])
            model(to_input(x, data, resolution).to(device))
    finally:
        set_bn_momentum(model, BN_MOMENTUM)
        model.train(was_training)


def calibrated_subnet(supernet: Supernet, arch: Arch, data: Dataset, images: int = CALIB_IMAGES,
                      device: str = "cpu") -> Subnet:
    """Extract ``arch`` and calibrate its BN statistics; returned in eval mode."""
    sub = supernet.extract(arch).to(device)
    calibrate_bn(sub, data, arch.resolution, images, device=device)
    return sub.eval()


@torch.no_grad()
def evaluate(model: nn.Module, source: ImageSource, data: Dataset, resolution: int, device: str = "cpu",
             limit: int | None = None, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 accuracy (fraction) of ``model(x)`` on ``source`` in eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in ordered_batches(source, batch_size, limit):
        logits = model(to_input(x, data, resolution).to(device))
        correct += (logits.argmax(1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


# ---- the calibrated subnet artifact (subnet.qnas.pt + subnet.qnas.json) --------------------------

def resolve_supernet(raw: dict, subnet_path: Path, supernet: Path | None) -> tuple[Path, str | None]:
    """The supernet a subnet file names (path relative to the file), or ``--supernet``; and its sha256."""
    ref = raw.get("supernet") if isinstance(raw.get("supernet"), dict) else {}
    recorded = ref.get("sha256")
    if supernet is not None:
        return Path(supernet), recorded
    if not ref.get("path"):
        raise UserError(f"{subnet_path} names no supernet: pass --supernet PATH (e.g. runs/default/supernet.pt)")
    path = Path(ref["path"])
    if not path.is_absolute() and not path.exists():
        path = subnet_path.parent / path
    return path, recorded


def calibrate_file(subnet_path: Path, supernet: Path | None = None, data_spec: str | None = None,
                   calib_images: int = CALIB_IMAGES, out: Path | None = None, device: str = "cpu",
                   eval_images: int | None = None) -> tuple[Subnet, dict[str, Any], Dataset]:
    """``qnas calibrate``: subnet.json -> calibrated static int8 subnet, saved with its accuracy."""
    from .space import read_structured

    if calib_images <= 0:
        raise UserError(f"--calib-images must be a positive integer, got {calib_images}")
    raw = read_structured(Path(subnet_path), "subnet file")
    net_path, recorded_sha = resolve_supernet(raw, Path(subnet_path), supernet)
    net, net_meta = load_supernet(net_path, recorded_sha)
    arch = Arch.from_dict(raw, net.space)
    data = load_dataset(data_spec or net_meta.get("config", {}).get("data", "fashion-mnist"),
                        load_size=max(net.space.resolutions))
    if (data.in_channels, data.num_classes) != (net.in_channels, net.num_classes):
        raise UserError(f"--data {data.spec}: {data.in_channels} channels / {data.num_classes} classes, but the supernet "
                        f"was trained for {net.in_channels} / {net.num_classes}")
    sub = calibrated_subnet(net, arch, data, calib_images, device)
    acc = {"test_top1": evaluate(sub, data.test, data, arch.resolution, device, eval_images),
           "search_top1": evaluate(sub, data.search, data, arch.resolution, device, eval_images)}
    out = Path(out) if out else Path(subnet_path).with_suffix(".qnas.pt")
    meta = save_weights(out, {
        "subnet": sub.state_dict(), "arch": arch.to_dict(net.space), "space": net.space.to_dict(),
        "in_channels": net.in_channels, "num_classes": net.num_classes, "quant": asdict(net.cfg),
    }, {
        "kind": "qnas.calibrated_subnet", "arch": arch.to_dict(net.space), "arch_key": arch.key,
        "supernet": {"path": str(net_path), "sha256": net_meta["weights"]["sha256"]},
        "data": data.describe(), "calib_images": calib_images, "quant": asdict(net.cfg),
        "accuracy": {**acc, "kind": "fake-quant" if net.cfg.enabled else "float", "eval_images": eval_images},
    })
    return sub, meta, data


def load_calibrated(path: Path) -> tuple[Subnet, dict[str, Any]]:
    """Rebuild a calibrated subnet from ``subnet.qnas.pt`` (verified; no code unpickled)."""
    payload, meta = load_weights(path)
    try:
        space = SearchSpace.from_dict(payload["space"])
        arch = Arch.from_dict(payload["arch"], space)
        shell = Supernet(space, int(payload["in_channels"]), int(payload["num_classes"]), QuantConfig(**payload["quant"]))
        sub = shell.extract(arch)
        sub.load_state_dict(payload["subnet"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path} is not a calibrated qnas subnet: {str(e).splitlines()[0][:200]}") from None
    return sub.eval(), meta
