"""Paper Fig. 10 and §5.3.3 at small scale: the scale predictor's weight scales vs scales fine-tuned by LSQ.

For ``--subnets`` random subnets of an int8 supernet trained with the scale predictor: extract the
subnet and calibrate its BN statistics (as search and export do), read every Conv-BN's predicted
weight scale ``s = mean(theta / sigma)``; then freeze everything but the weight scales and
fine-tune them with LSQ: the fake-quant forward with the calibrated statistics, cross-entropy on
training images, SGD (momentum 0.9, cosine decay, training's bounded step for scales) with the
LSQ gradient of each layer's scale.
(Training's theta preconditioning makes an SGD step on theta move ``s`` exactly as LSQ moves a
scale of its own, so theta is what is fine-tuned. Adam was tried first and is not LSQ: it moves a
scale the loss is flat in as fast as one it is steep in, so the "optimum" it reports wanders.)
Reported:

- the relative error ``|s_pred - s_ft| / s_ft`` over every Conv-BN layer of every subnet (paper:
  6.97% mean), and the subnet's test top-1 with predicted and with fine-tuned scales (if the
  predictor is near the optimum, fine-tuning buys little);
- how far the fine-tuned (optimal) scale of one layer moves across subnets: max/min over the
  subnets that contain it (supplement Fig. 12: up to 3-4x), and the relative error of the best
  one scale per layer for all subnets (the geometric mean of its fine-tuned scales): what a
  shared scale cannot fit;
- a PNG of two layers' predicted and fine-tuned scales across the subnets, as Fig. 10.

    python -m benchmarks.scale_finetune --supernet runs/demo/train/supernet.pt       # 10 subnets x 200 steps: ~10 min on 2 cores
    python -m benchmarks.scale_finetune --supernet S --subnets 3 --steps 20 --quick  # a smoke run
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qnas_cli.calibrate import calibrated_subnet, evaluate
from qnas_cli.checkpoint import versions, write_json
from qnas_cli.data import augment, epoch_batches, load_dataset, to_input
from qnas_cli.layers import BN_EPS, QConvBN, set_runtime
from qnas_cli.supernet import load_supernet
from qnas_cli.train import optimizer_step
from benchmarks.plots import pyplot, save_png


def weight_scales(sub: nn.Module) -> dict[str, float]:
    """Every Conv-BN's weight scale with the subnet's calibrated statistics."""
    with torch.no_grad():
        return {name: float(m.predicted_scale(torch.sqrt(m.running_var + BN_EPS)))
                for name, m in sub.named_modules() if isinstance(m, QConvBN)}


def max_over_min(points: list[dict], key: str) -> float:
    return max(p[key] for p in points) / min(p[key] for p in points)


def finetune_scales(sub: nn.Module, data, resolution: int, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """LSQ on the weight scales alone: everything else frozen, BN statistics the calibrated ones (eval mode)."""
    for p in sub.parameters():
        p.requires_grad_(False)
    thetas = [m.theta for m in sub.modules() if isinstance(m, QConvBN)]
    for theta in thetas:
        theta.requires_grad_(True)
    opt = torch.optim.SGD(thetas, lr=lr, momentum=0.9)
    sub.eval()  # the calibrated statistics, no BN updates; after set_runtime(None) eval mode is fake-quant, differentiable
    gen = torch.Generator().manual_seed(seed)
    batches = epoch_batches(len(data.train), batch_size, seed, 0)
    for step in range(steps):
        x, y = data.train.get(batches[step % len(batches)])
        x = to_input(augment(x, data.pad, data.flip, gen), data, resolution)
        loss = F.cross_entropy(sub(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer_step(sub, opt)  # training's step: each scale moves by at most 2x per step, stays positive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--supernet", type=Path, required=True, help="an int8 supernet.pt trained with --weight-scale predictor")
    ap.add_argument("--subnets", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps per subnet")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01, help="peak learning rate of the scales (training's is 0.05)")
    ap.add_argument("--eval-images", type=int, default=2000, help="test images (class-stratified) for top-1 before and after")
    ap.add_argument("--calib-images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 500 test and 250 calibration images")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/scale_finetune"))
    args = ap.parse_args()
    if args.quick:
        args.eval_images, args.calib_images = min(args.eval_images, 500), min(args.calib_images, 250)

    net, meta = load_supernet(args.supernet)
    if not net.cfg.enabled or net.cfg.weight_scale != "predictor":
        raise SystemExit(f"{args.supernet}: needs an int8 supernet trained with --weight-scale predictor")
    data = load_dataset(meta.get("config", {}).get("data", "fashion-mnist"), load_size=max(net.space.resolutions))
    rng = random.Random(args.seed)
    archs = [net.sample("random", rng) for _ in range(args.subnets)]

    rows, layers = [], {}
    for i, arch in enumerate(archs):
        t = time.perf_counter()
        sub = calibrated_subnet(net, arch, data, args.calib_images)
        before = weight_scales(sub)
        top1_pred = evaluate(sub, data.test, data, arch.resolution, limit=args.eval_images)  # the exact int8 forward
        set_runtime(sub, None)  # fake-quant: the forward LSQ differentiates
        finetune_scales(sub, data, arch.resolution, args.steps, args.batch_size, args.lr, args.seed + i)
        after = weight_scales(sub)
        top1_ft = evaluate(sub, data.test, data, arch.resolution, limit=args.eval_images)
        errors = {k: abs(before[k] - after[k]) / after[k] for k in before}
        for k in before:
            layers.setdefault(k, []).append({"subnet": i, "predicted": before[k], "finetuned": after[k]})
        rows.append({"subnet": i, "arch": arch.key, "layers": len(before), "mean_rel_error": statistics.mean(errors.values()),
                     "max_rel_error": max(errors.values()), "top1_predicted": top1_pred, "top1_finetuned": top1_ft,
                     "seconds": time.perf_counter() - t})
        r = rows[-1]
        print(f"subnet {i}: {r['layers']} Conv-BN layers, relative error mean {100 * r['mean_rel_error']:.2f}% "
              f"max {100 * r['max_rel_error']:.2f}%; top-1 {100 * top1_pred:.2f}% predicted, {100 * top1_ft:.2f}% fine-tuned "
              f"({r['seconds']:.0f} s)", flush=True)

    all_errors = [abs(p["predicted"] - p["finetuned"]) / p["finetuned"] for ps in layers.values() for p in ps]
    spread = {k: max_over_min(ps, "finetuned") for k, ps in layers.items() if len(ps) > 1}
    spread_pred = {k: max_over_min(ps, "predicted") for k, ps in layers.items() if len(ps) > 1}
    shared = {k: math.exp(statistics.mean(math.log(p["finetuned"]) for p in ps)) for k, ps in layers.items()}
    shared_errors = [abs(shared[k] - p["finetuned"]) / p["finetuned"] for k, ps in layers.items() if len(ps) > 1 for p in ps]
    summary = {"mean_rel_error": statistics.mean(all_errors), "median_rel_error": statistics.median(all_errors),
               "layers_compared": len(all_errors),
               "shared_scale_mean_rel_error": statistics.mean(shared_errors) if shared_errors else None,
               "top1_predicted_mean": statistics.mean(r["top1_predicted"] for r in rows),
               "top1_finetuned_mean": statistics.mean(r["top1_finetuned"] for r in rows),
               "optimal_scale_spread_max": max(spread.values(), default=None),
               "optimal_scale_spread_median": statistics.median(spread.values()) if spread else None,
               "predicted_scale_spread_max": max(spread_pred.values(), default=None),
               "paper": {"mean_rel_error": 0.0697, "optimal_scale_spread": "up to 3-4x (supplement Fig. 12)"}}
    write_json(args.out / "scale_finetune.json", {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                                  "summary": summary, "subnets": rows, "layers": layers, "versions": versions()})
    shown = _plot(layers, args.out / "scale_finetune.png")
    print(f"\n{len(rows)} subnets, {len(all_errors)} Conv-BN layers: predicted vs LSQ-fine-tuned weight scale, "
          f"relative error mean {100 * summary['mean_rel_error']:.2f}% (paper 6.97%), median {100 * summary['median_rel_error']:.2f}%")
    print(f"test top-1 (mean over subnets, {args.eval_images} images): {100 * summary['top1_predicted_mean']:.2f}% with predicted scales, "
          f"{100 * summary['top1_finetuned_mean']:.2f}% fine-tuned")
    if spread:
        print(f"fine-tuned scale of one layer across subnets: max/min up to {summary['optimal_scale_spread_max']:.2f}x "
              f"(median layer {summary['optimal_scale_spread_median']:.2f}x; paper: up to 3-4x), predicted up to "
              f"{summary['predicted_scale_spread_max']:.2f}x; one shared scale per layer "
              f"(the best for all subnets) is {100 * summary['shared_scale_mean_rel_error']:.2f}% off on average")
    print(f"wrote {args.out / 'scale_finetune.json'} and scale_finetune.png ({', '.join(shown)})")


def _plot(layers: dict[str, list[dict]], path: Path) -> list[str]:
    """Fig. 10: two layers (the two seen in most subnets with the widest optimal-scale spread), per subnet."""
    plt = pyplot()
    ranked = sorted(layers, key=lambda k: (len(layers[k]), max_over_min(layers[k], "finetuned")))
    shown = ranked[-2:]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.5), squeeze=False)
    for ax, name in zip(axes[0], shown):
        ps = layers[name]
        ax.plot([p["subnet"] for p in ps], [p["finetuned"] for p in ps], "o", label="fine-tuned (LSQ)")
        ax.plot([p["subnet"] for p in ps], [p["predicted"] for p in ps], "x", ms=9, label="predicted")
        ax.set_xticks([p["subnet"] for p in ps])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("subnet")
        ax.set_ylabel("weight scale")
        ax.legend(fontsize=8)
    save_png(fig, path)
    return shown


if __name__ == "__main__":
    main()
