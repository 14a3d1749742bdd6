"""Training throughput of the `small` preset on this machine (issues 2 and 3).

Prints and writes (JSON):
- images/s of the largest subnet alone (forward + backward + SGD step), float and int8;
- seconds per full sandwich step (largest + smallest + N random, in-place distillation), float and int8;
- the int8 / float ratio of the sandwich step (target <= 1.5x).
Float and int8 are measured interleaved, round by round, in one process: medians and the median
of per-round ratios are robust to the noise of a shared machine.

    python -m benchmarks.train_throughput [--rounds 5] [--batch-size 128] [--out runs/bench/train_throughput.json]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from qnas_cli.checkpoint import versions, write_json
from qnas_cli.data import calibration_indices, load_dataset
from qnas_cli.quant import QuantConfig
from qnas_cli.space import load_space, sample
from qnas_cli.supernet import Supernet
from qnas_cli.train import Dist, TrainConfig, init_quant_scales, train_step, param_groups


def build(mode: str, space, data, cfg: TrainConfig):
    torch.manual_seed(0)
    net = Supernet(space, data.in_channels, data.num_classes, QuantConfig(mode=mode)).train()
    if mode == "int8":
        init_quant_scales(net, data, space, "cpu")
    opt = torch.optim.SGD(param_groups(net, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    return net, opt


def largest_step(net, opt, x, y, arch) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x, arch), y).backward()
    opt.step()
    return time.perf_counter() - t


def sandwich_step(net, opt, data, space, idx, step, cfg) -> float:
    t = time.perf_counter()
    train_step(net, opt, data, space, idx, step, 10_000, cfg, Dist(), "cpu")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-random", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/train_throughput.json"))
    args = ap.parse_args()

    space, data = load_space(args.space), load_dataset("fashion-mnist")
    cfg = TrainConfig(space=args.space, batch_size=args.batch_size, num_random=args.num_random, warmup_steps=0)
    big = sample(space, "largest")
    idx = calibration_indices(data.train, args.batch_size, seed=3)
    from qnas_cli.data import to_input

    x_u8, y = data.train.get(idx)
    x = to_input(x_u8, data, big.resolution)
    nets = {m: build(m, space, data, cfg) for m in ("none", "int8")}
    for m, (net, opt) in nets.items():  # warm-up: allocator, oneDNN kernels
        largest_step(net, opt, x, y, big)
        sandwich_step(net, opt, data, space, idx, 0, cfg)

    times: dict[str, list[float]] = {f"{k}_{m}": [] for k in ("largest", "sandwich") for m in nets}
    for r in range(args.rounds):
        for m, (net, opt) in nets.items():
            times[f"largest_{m}"].append(largest_step(net, opt, x, y, big))
            times[f"sandwich_{m}"].append(sandwich_step(net, opt, data, space, idx, r + 1, cfg))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [q / f for q, f in zip(times["sandwich_int8"], times["sandwich_none"])]
    result = {
        "space": args.space, "arch": big.key, "batch_size": args.batch_size, "num_random": args.num_random,
        "rounds": args.rounds, "threads": torch.get_num_threads(),
        "largest_img_per_s": {m: args.batch_size / med[f"largest_{m}"] for m in nets},
        "sandwich_step_s": {m: med[f"sandwich_{m}"] for m in nets},
        "sandwich_img_per_s": {m: args.batch_size / med[f"sandwich_{m}"] for m in nets},
        "int8_over_float_sandwich": statistics.median(ratios),
        "int8_over_float_largest": med["largest_int8"] / med["largest_none"],
        "raw_seconds": times, "versions": versions(),
    }
    write_json(args.out, result)
    print(f"space {args.space}, largest subnet {big.key}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'':28}{'float':>10}{'int8':>10}")
    print(f"{'largest subnet, img/s':28}{result['largest_img_per_s']['none']:>10.1f}{result['largest_img_per_s']['int8']:>10.1f}")
    print(f"{'sandwich step, s':28}{med['sandwich_none']:>10.3f}{med['sandwich_int8']:>10.3f}")
    print(f"{'sandwich, img/s':28}{result['sandwich_img_per_s']['none']:>10.1f}{result['sandwich_img_per_s']['int8']:>10.1f}")
    print(f"int8 / float: sandwich step {result['int8_over_float_sandwich']:.2f}x (target <= 1.5x), "
          f"largest subnet {result['int8_over_float_largest']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
