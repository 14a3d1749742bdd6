"""The collapse guard: a supernet that silently failed must not be shipped.

A collapse is the largest subnet's training loss back at chance, ``ln(classes)`` (constant
logits), for ``patience`` logged steps in a row after it had learned something, or a
non-finite loss, gradient or scale. The training loop asks ``check`` at every logged step;
the verdict is ``collapse`` (first time: log it, write the diagnostics), ``recovered``,
``stop`` (still at chance after ``give_up`` logged steps) or ``non-finite`` (stop now: NaN
does not recover).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .layers import QuantInit

ARMED_BELOW = 0.8  # the guard arms once the largest subnet's loss is below 0.8 ln(C): it has learned
AT_CHANCE = 0.97  # ... and a loss >= 0.97 ln(C) after that is "at chance" (a collapse gives exactly ln C)


class TrainingCollapsed(Exception):
    """Training stopped because the supernet collapsed and did not recover."""

    def __init__(self, step: int, why: str, out: str) -> None:
        super().__init__(f"training collapsed at step {step}: {why}. Per-layer diagnostics are in {out}/metrics.jsonl "
                         f"(rows with \"event\"); no supernet.pt was written. Start from a float supernet "
                         f"(the default; --float-steps > 0) or lower --lr")
        self.step, self.why = step, why


class CollapseGuard:
    def __init__(self, num_classes: int, patience: int = 3, give_up: int = 10) -> None:
        self.chance = math.log(num_classes)
        self.patience, self.give_up = patience, give_up
        self.armed, self.streak, self.events = False, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"armed": self.armed, "streak": self.streak, "events": self.events}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.armed, self.streak, self.events = bool(state["armed"]), int(state["streak"]), int(state["events"])

    def check(self, metrics: dict[str, float], scales_finite: bool = True) -> str | None:
        """The verdict for one logged step's metrics (see the module docstring), or None."""
        if not (scales_finite and all(math.isfinite(metrics[k]) for k in ("loss", "loss_largest", "grad_norm"))):
            return "non-finite"
        loss = metrics["loss_largest"]
        if loss < ARMED_BELOW * self.chance:
            self.armed = True
        if not (self.armed and loss >= AT_CHANCE * self.chance):
            recovered, self.streak = self.streak >= self.patience, 0
            return "recovered" if recovered else None
        self.streak += 1
        if self.streak == self.patience:
            self.events += 1
            return "collapse"
        return "stop" if self.streak >= self.give_up else None

    def describe(self, verdict: str, metrics: dict[str, float]) -> str:
        if verdict == "non-finite":
            return f"non-finite loss, gradient or scale (loss {metrics['loss']}, grad norm {metrics['grad_norm']})"
        return (f"the largest subnet's loss is at chance (ln {round(math.exp(self.chance))} = {self.chance:.3f}) "
                f"for {self.streak} logged steps (now {metrics['loss_largest']:.3f})")


@torch.no_grad()
def scales_finite(model: nn.Module) -> bool:
    """Every quantization scale (step sizes, scale predictor) is finite and positive."""
    vals = [p.detach().reshape(-1) for m in model.modules() if isinstance(m, QuantInit) for p in m.scale_params()]
    if not vals:
        return True
    v = torch.cat(vals)
    return bool((torch.isfinite(v) & (v > 0)).all())
