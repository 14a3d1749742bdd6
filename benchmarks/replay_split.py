"""Which half of the replay lifts ranking: the images or the subnets? (issue 31)

``qnas train``'s int8 phase replays its float phase's first draws (``--draws phase``): each step's
batch and augmentation (the data) and its random subnets are functions of (seed, step within the
phase), so the int8 phase retraces what the float phase started with. That ranks the 40-subnet truth
better than drawing on (``--draws run``: the int8 phase takes the draws of the run's steps after the
float phase). This trains the default int8 phase from a float supernet with one half replayed and
the other drawn as ``--draws run`` would:

- ``--replay data``: the float phase's first batches and augmentations, the subnets of steps
  FLOAT_STEPS.. (the sampler is handed the run's step);
- ``--replay subnets``: the float phase's first subnets, the batches and augmentations of steps
  FLOAT_STEPS.. (the int8 phase is placed after FLOAT_STEPS float steps, drawing by the run's step,
  and the sampler is handed the step within the phase).

Everything else is ``qnas train --init FLOAT --steps 700 --seed N``, the replaying run that the
default recipe is bit for bit; score the result with ``python -m benchmarks.ranking --supernet
OUT/supernet.pt`` and pair it with the replaying and the drawing-on runs in the levers file.

    python -m benchmarks.replay_split --init runs/bench/sn/f2800_s0/supernet.pt --seed 0 --replay data --out OUT

About 6 minutes per run on 2 cores.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from unittest import mock

import qnas_cli.train as train_module
from qnas_cli.train import TrainConfig, train


def split_run(cfg: TrainConfig, replay: str, float_steps: int) -> dict:
    """``train(cfg)`` (an ``init`` run of the int8 phase) with only ``replay``'s half replayed."""
    sandwich = train_module.sandwich
    if replay == "data":  # batches by the step within the phase (draws phase), subnets by the run's step
        shift = lambda space, seed, step, *a, **k: sandwich(space, seed, step + float_steps, *a, **k)  # noqa: E731
        with mock.patch.object(train_module, "sandwich", shift):
            return train(cfg)
    plan = train_module.phase_plan

    def after_float(c: TrainConfig, steps_per_epoch: int) -> list[train_module.Phase]:
        return [replace(ph, start=ph.start + float_steps) for ph in plan(c, steps_per_epoch)]

    back = lambda space, seed, step, *a, **k: sandwich(space, seed, step - float_steps, *a, **k)  # noqa: E731
    with mock.patch.object(train_module, "phase_plan", after_float), mock.patch.object(train_module, "sandwich", back):
        return train(replace(cfg, draws="run"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="the float phase's supernet (qnas train --quant none --steps FLOAT_STEPS)")
    ap.add_argument("--float-steps", type=int, default=2800, help="the float phase's length (where drawing on would start)")
    ap.add_argument("--steps", type=int, default=700, help="the int8 phase's length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", required=True, choices=["data", "subnets"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = TrainConfig(out=args.out, init=args.init, steps=args.steps, seed=args.seed)
    summary = split_run(cfg, args.replay, args.float_steps)
    print({k: v for k, v in summary.items() if k in ("metrics", "seconds")})


if __name__ == "__main__":
    main()
