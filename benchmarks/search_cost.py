"""What a paper-sized search costs, and what its fitness settings are worth (issue: search, docs/design.md §8).

1. Agreement (``--agreement N``): N subnets of the space (the smallest, the largest and seeded
   random ones) are scored the way the search scores them, exact int8 on the held-out search
   split, once with the full calibration of `qnas calibrate` (2,000 images) on the whole
   split (the reference), and with smaller calibration and scoring sets. Per setting: Kendall
   tau against the reference, mean and largest |accuracy difference|, and seconds per
   evaluation. The subsets are nested (the seeded class-stratified 1,000 are the first 1,000
   of the 2,000), so a setting's accuracy is read off the same per-image results.
2. The search (``--population 512 --generations 20``, the paper's): one budget, run by the
   `qnas search` command itself (under torchrun when ``--processes`` > 1), timed: wall time
   split into calibration, scoring, latency prediction and the rest; evaluations and cache
   hits, from its pareto.json.

    python -m benchmarks.search_cost --supernet runs/demo/train/supernet.pt
        [--agreement 30] [--population 512 --generations 20] [--processes 2]
        [--calib-images 500 --eval-images 1000] [--budget-ms B] [--out runs/bench/search_cost]

The budget defaults to the middle of the host table's range. Without a table for the space the
host's XNNPACK table is built first (a few minutes, not counted). Writes OUT/search_cost.json.
The full run takes about an hour on 2 cores; ``--population 64 --generations 4 --agreement 8``
is a quick check.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from qnas_cli.calibrate import CALIB_IMAGES, calibrated_subnet, correct
from qnas_cli.checkpoint import versions, write_json
from qnas_cli.fitness import SearchInputs
from qnas_cli.latency import Predictor
from qnas_cli.data import load_dataset, stratified_indices
from qnas_cli.ranking import kendall_tau
from qnas_cli.space import sample
from qnas_cli.supernet import load_supernet

from benchmarks.parallel import BENCH_SUPERNET, trained_supernet

CALIB_SIZES = (CALIB_IMAGES, 500, 250, 125)  # the first is the reference (qnas calibrate's default)
EVAL_SIZES = (None, 2000, 1000, 500)  # None: the whole search split (the reference)


def per_image_correct(net, arch, inputs: SearchInputs) -> tuple[torch.Tensor, float, float]:
    """The search's evaluation (``fitness.evaluate_arch``) image by image: exact int8 (XNNPACK)
    correctness of every scored image, calibration and scoring seconds."""
    t0 = time.perf_counter()
    sub = calibrated_subnet(net, arch, inputs.data, batches=inputs.calibration(arch.resolution))
    t1 = time.perf_counter()
    hits = correct(sub, inputs.search(arch.resolution))
    return hits, t1 - t0, time.perf_counter() - t1


def agreement(net, data, n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    archs = [sample(net.space, "smallest"), sample(net.space, "largest")] + \
            [sample(net.space, "random", rng) for _ in range(max(n - 2, 0))]
    # Nested subsets: the search split in its seeded class-stratified order, first k images.
    results: dict[int, list] = {}
    for c in CALIB_SIZES:
        inputs = SearchInputs(data, c, None)
        rows = []
        for i, a in enumerate(archs):
            rows.append(per_image_correct(net, a, inputs))
            print(f"  calibration {c}: {i + 1}/{len(archs)}", end="\r", flush=True)
        results[c] = rows
    print()
    # positions, in the search split's file order, of its stratified ordering: --eval-images k scores the first k
    order = stratified_indices(data.search, len(data.search))
    ref = [hits.float().mean().item() for hits, _, _ in results[CALIB_SIZES[0]]]
    per_image_s = statistics.median(s / len(h) for h, _, s in (r for rows in results.values() for r in rows))
    settings = []
    for c in CALIB_SIZES:
        calib_s = statistics.mean(t for _, t, _ in results[c])
        for e in EVAL_SIZES:
            take = order if e is None else order[:e]
            accs = [hits[take].float().mean().item() for hits, _, _ in results[c]]
            score_s = statistics.mean(s / len(h) * len(take) for h, _, s in results[c])
            diffs = [abs(a - b) for a, b in zip(accs, ref)]
            settings.append({"calib_images": c, "eval_images": e or len(data.search), "kendall_tau": kendall_tau(ref, accs),
                             "mean_abs_diff_pp": 100 * statistics.mean(diffs), "max_abs_diff_pp": 100 * max(diffs),
                             "seconds_per_evaluation": calib_s + score_s, "calibrate_seconds": calib_s,
                             "score_seconds": score_s})
    return {"subnets": [a.key for a in archs], "reference": {"calib_images": CALIB_SIZES[0], "eval_images": len(data.search)},
            "reference_top1": ref, "score_seconds_per_image": per_image_s, "settings": settings}


def run_search(args, budget: float, table: Path, out: Path) -> dict:
    search_out = out / "search"
    if (search_out / "evaluations.jsonl").exists():
        (search_out / "evaluations.jsonl").unlink()  # a fresh, honest timing
    cli = ["-m", "qnas_cli", "search", "--supernet", str(args.supernet), "--latency-ms", f"{budget:g}",
           "--table", str(table), "--population", str(args.population), "--generations", str(args.generations),
           "--calib-images", str(args.calib_images), "--eval-images", str(args.eval_images), "--out", str(search_out),
           "--json"]
    cmd = [sys.executable, *cli] if args.processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes), *cli]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.processes))}
    print("running:", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    result = json.loads((search_out / "pareto.json").read_text())
    return {"command": " ".join(["python", *cmd[1:]]), "wall_seconds_with_startup": round(wall, 1),
            "budget_ms": budget, "processes": args.processes, "threads_per_process": env["OMP_NUM_THREADS"],
            "evaluations": result["evaluations"], "seconds": result["seconds"], "chosen": result["chosen"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--supernet", type=trained_supernet, default=BENCH_SUPERNET)
    ap.add_argument("--agreement", type=int, default=30, help="subnets in the agreement study (0: skip it)")
    ap.add_argument("--population", type=int, default=512)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--processes", type=int, default=2, help="torchrun processes of the search (1: plain qnas search)")
    ap.add_argument("--calib-images", type=int, default=None, help="default: qnas search's")
    ap.add_argument("--eval-images", type=int, default=None, help="default: qnas search's")
    ap.add_argument("--budget-ms", type=float, default=None)
    ap.add_argument("--table", type=Path, default=None, help="default: this host's XNNPACK table (built if missing)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/search_cost"))
    args = ap.parse_args()
    from qnas_cli.search_job import SearchConfig

    d = SearchConfig(budgets_ms=[1.0])
    args.calib_images = args.calib_images or d.calib_images
    args.eval_images = args.eval_images or d.eval_images
    net, meta = load_supernet(args.supernet)
    doc = {"supernet": {"path": str(args.supernet), "sha256": meta["weights"]["sha256"]}, "machine": _machine(),
           "versions": versions()}
    if args.agreement:
        data = load_dataset(meta.get("config", {}).get("data", "fashion-mnist"), load_size=max(net.space.resolutions))
        print(f"agreement: {args.agreement} subnets x {len(CALIB_SIZES)} calibration sizes, scored on all "
              f"{len(data.search)} search-split images")
        doc["agreement"] = agreement(net, data, args.agreement)
        print(f"{'calib':>6} {'scored':>6} {'tau':>6} {'mean |d| pp':>11} {'max |d| pp':>10} {'s/eval':>7}")
        for s in doc["agreement"]["settings"]:
            print(f"{s['calib_images']:>6} {s['eval_images']:>6} {s['kendall_tau']:>6.3f} {s['mean_abs_diff_pp']:>11.2f} "
                  f"{s['max_abs_diff_pp']:>10.2f} {s['seconds_per_evaluation']:>7.2f}")
        write_json(args.out / "search_cost.json", doc)
    if args.population and args.generations:
        from qnas_cli.export.latency_build import resolve_table  # converts and times: TensorFlow, LiteRT

        loaded, table = resolve_table(args.table, net.space, net.in_channels, net.num_classes, "xnnpack", 1, log=print)
        pred = Predictor(loaded, net.space)
        lo, hi = pred.predict(sample(net.space, "smallest")), pred.predict(sample(net.space, "largest"))
        budget = args.budget_ms or float(f"{(lo + hi) / 2:.2g}")
        doc["search"] = run_search(args, budget, Path(table), args.out)
        s, e = doc["search"]["seconds"], doc["search"]["evaluations"]
        print(f"search {args.population} x {args.generations}, budget {budget:g} ms, {args.processes} process(es): "
              f"wall {s['wall'] / 60:.1f} min; calibration {s['calibrate'] / 60:.1f} and scoring {s['score'] / 60:.1f} "
              f"process-min; latency prediction {s['latency_prediction']:.1f} s; other {s['other'] / 60:.1f} min; "
              f"{e['new']} evaluations, {e['cache_hits']} cache hits")
        write_json(args.out / "search_cost.json", doc)
    print(f"wrote {args.out / 'search_cost.json'}")


def _machine() -> dict:
    from qnas_cli.latency import host_device

    return {**host_device(), "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    main()
