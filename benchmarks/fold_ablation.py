"""Paper Fig. 8 at small scale: BN folding with batch statistics vs moving statistics.

Two int8 supernets are trained from the same seed with the same data and subnets, differing only
in ``--bn-fold``: ``batch`` (QuantNAS §4.1: fold the statistics of the current batch) and
``moving`` (the stand-alone QAT recipe: fold the supernet's moving statistics, which are shared
by all subnets and match none of them). Writes the loss curves (JSON + PNG) and prints a verdict.

Both start, as in the paper, from one float supernet (trained first for ``--float-steps``, or
given with ``--init``); ``--from-scratch`` starts both int8 runs from random weights instead.

    python -m benchmarks.fold_ablation [--steps 150] [--float-steps 150] [--from-scratch] [--space small] [--out runs/bench/fold_ablation]
    python -m benchmarks.fold_ablation --steps 1400 --float-steps 1400 --eval-images 10000  # the default recipe's length (~22 min)
    python -m benchmarks.fold_ablation --init RUN/float_supernet.pt --steps 1400 --eval-images 10000  # from a default run's float phase (~16 min)
    python -m benchmarks.fold_ablation --quick     # tiny space, 30 + 30 steps: about a minute
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from qnas_cli.checkpoint import versions, write_json
from qnas_cli.quant import QuantConfig
from qnas_cli.train import TrainConfig, train


def curve(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "event" not in r]  # the guard's event rows are not points of the curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="small")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--float-steps", type=int, default=150, help="steps of the float supernet both int8 runs start from")
    ap.add_argument("--init", type=Path, default=None, help="start both runs from this float supernet.pt instead of training one")
    ap.add_argument("--from-scratch", action="store_true", help="start both int8 runs from random weights (not the paper's setting)")
    ap.add_argument("--quick", action="store_true", help="tiny space, 30 float + 30 int8 steps, 500 test images")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/fold_ablation"))
    args = ap.parse_args()
    if args.quick:
        args.space, args.steps, args.float_steps, args.eval_images = "tiny", 30, 30, 500

    common = dict(space=args.space, batch_size=args.batch_size, lr=args.lr, num_random=1, calib_images=1000,
                  ckpt_every=10**9, log_every=5)
    init = None
    if args.from_scratch and args.init:
        ap.error("--from-scratch and --init exclude each other")
    if args.init:
        init = str(args.init)
    elif not args.from_scratch:
        print(f"training the float supernet both start from ({args.float_steps} steps)", flush=True)
        train(TrainConfig(out=str(args.out / "float"), quant=QuantConfig(mode="none"), steps=args.float_steps,
                          warmup_steps=args.float_steps // 10, eval_images=1000, **common), log=lambda *a, **k: None, overwrite=True)
        init = str(args.out / "float" / "supernet.pt")
    runs = {}
    for fold in ("batch", "moving"):
        out = args.out / fold
        cfg = TrainConfig(out=str(out), quant=QuantConfig(bn_fold=fold), steps=args.steps, warmup_steps=args.steps // 10,
                          eval_images=args.eval_images, init=init, float_steps=None if init else 0, **common)
        print(f"training with --bn-fold {fold} ({args.steps} steps)", flush=True)
        summary = train(cfg, log=lambda *a, **k: None, overwrite=True)
        rows = curve(out)
        tail = [r["loss_largest"] for r in rows[-max(1, len(rows) // 5):]]
        runs[fold] = {"steps": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
                      "loss_largest": [r["loss_largest"] for r in rows], "final_loss_largest": statistics.median(tail),
                      "test_top1": {k: v["test_top1"] for k, v in summary["metrics"].items()}}

    b, m = runs["batch"], runs["moving"]
    verdict = ("batch-statistics folding converges better" if b["final_loss_largest"] < m["final_loss_largest"]
               else "no advantage for batch-statistics folding at this scale")
    start = "random weights" if args.from_scratch else f"the float supernet {init}"
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "start": start, "runs": runs,
              "verdict": verdict, "versions": versions()}
    write_json(args.out / "fold_ablation.json", result)
    _plot(runs, args.out / "fold_ablation.png")
    print(f"both int8 runs start from {start}")
    print(f"{'fold':8}{'final loss (largest)':>22}{'test top-1 largest':>20}{'smallest':>10}")
    for fold, r in runs.items():
        print(f"{fold:8}{r['final_loss_largest']:>22.4f}{100 * r['test_top1']['largest']:>19.2f}%{100 * r['test_top1']['smallest']:>9.2f}%")
    print(f"verdict: {verdict}")
    print(f"wrote {args.out / 'fold_ablation.json'} and fold_ablation.png")


def _plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for fold, r in runs.items():
        ax.plot(r["steps"], r["loss_largest"], label=f"fold {fold} statistics")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (largest subnet)")
    ax.set_title("Conv-BN folding, fully int8 supernet (cf. QuantNAS Fig. 8)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


if __name__ == "__main__":
    main()
