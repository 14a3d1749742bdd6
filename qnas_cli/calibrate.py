"""BN calibration and evaluation of subnets (DESIGN §4).

A subnet's BN statistics are re-estimated after extraction: reset, then the cumulative average
over a fixed, seeded set of training images (no augmentation). In int8 mode the scale predictor
then reads the calibrated sigma, so every subnet gets its own weight scales.
"""
from __future__ import annotations

import torch
from torch import nn

from .data import Dataset, ImageSource, calibration_indices, ordered_batches, to_input
from .space import Arch
from .supernet import Subnet, Supernet, reset_bn_stats, set_bn_momentum

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
        set_bn_momentum(model, 0.1)
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
