"""Accuracy predictor: which children of a generation are worth evaluating.

A ridge regression on the one-hot encoding of an architecture (resolution; each stage's width
and depth; each block slot's kernel and expand ratio, all zero for a slot the depth leaves out),
fitted on the subnets evaluated so far. OFA (§3.3) and BatchQuant pre-screen their evolution
with a predictor on this encoding (an MLP there); a linear model is enough to rank children of
one population and fits in milliseconds, deterministically (float64, fixed order), so every
torchrun rank fits the same one. The search uses it only to choose what to evaluate: every
accuracy it reports, ranks or exports was measured.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .space import Arch, SearchSpace

RIDGE = 1e-1  # relative to the number of subnets; keeps rare genes (seen once or twice) near the mean


def encode(space: SearchSpace, arch: Arch) -> list[float]:
    """One-hot features of ``arch`` (length depends on the space only)."""
    f = [float(arch.resolution == r) for r in space.resolutions]
    for spec, stage in zip(space.stages, arch.stages):
        f += [float(stage.width == w) for w in spec.widths]
        f += [float(len(stage.blocks) == d) for d in spec.depths]
        for j in range(max(spec.depths)):
            block = stage.blocks[j] if j < len(stage.blocks) else None
            f += [float(block is not None and block.kernel == k) for k in spec.kernels]
            f += [float(block is not None and block.expand == e) for e in spec.expands]
    return f


class AccuracyPredictor:
    """``fit(archs, accuracies)`` then ``predict(archs)``: ridge regression on ``encode``."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.weights: torch.Tensor | None = None

    def _x(self, archs: Sequence[Arch]) -> torch.Tensor:
        x = torch.tensor([encode(self.space, a) for a in archs], dtype=torch.float64)
        return torch.cat([x, torch.ones(len(archs), 1, dtype=torch.float64)], 1)  # the intercept

    def fit(self, archs: Sequence[Arch], accuracies: Sequence[float]) -> AccuracyPredictor:
        order = sorted(range(len(archs)), key=lambda i: archs[i].key)  # the same fit whatever the order given
        x = self._x([archs[i] for i in order])
        y = torch.tensor([accuracies[i] for i in order], dtype=torch.float64)
        penalty = RIDGE * len(order) * torch.eye(x.shape[1], dtype=torch.float64)
        penalty[-1, -1] = 0.0  # the intercept is not shrunk
        self.mean = float(y.mean())
        self.weights = torch.linalg.solve(x.T @ x + penalty, x.T @ (y - self.mean))
        return self

    def predict(self, archs: Sequence[Arch]) -> list[float]:
        if self.weights is None:
            raise RuntimeError("AccuracyPredictor.predict before fit")
        return (self._x(archs) @ self.weights + self.mean).tolist()
