"""Paper Fig. 9 at small scale: the same search on the scale-predictor and the shared-scale supernet.

The two int8 supernets of claim 1 (`benchmarks.scale_ranking`: `qnas train`'s default recipe,
``--weight-scale predictor`` vs ``shared``, one seed; trained here if missing, reused if there)
are searched with identical settings: one latency table, the same budgets (three across the
predicted range, as the demo picks them), population, generations, seed, calibration and
search-split images. The search-split scores are each supernet's own inherited accuracy, so
the two fronts compare what each supernet delivers without retraining, as Fig. 9 does. Each
arm's winner per budget is then exported for real (`qnas export`'s pipeline, parity gate
included) and its int8 TFLite scored on the test split: the figure a user ships.

    python -m benchmarks.scale_pareto --jobs 2     # claim 1's supernets; population 64 x 8, 3 budgets: about 1 h
                                                   # on 2 CPU cores (plus 2 x 14 min if the supernets are missing)
    python -m benchmarks.scale_pareto --quick      # tiny space, two 40-step supernets, 2 budgets: a few minutes
                                                   # (and the tiny host table, built once: a few more)

Writes OUT/scale_pareto.json and OUT/scale_pareto.png (both fronts, the winners' test top-1).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from qnas_cli.checkpoint import versions, write_json
from qnas_cli.demo import budgets_for
from qnas_cli.export.latency_build import resolve_table
from qnas_cli.latency import Predictor
from qnas_cli.search_job import SearchConfig, run_search
from qnas_cli.space import load_arch, load_space

from benchmarks.parallel import run_parallel
from benchmarks.plots import pyplot, save_png
from benchmarks.scale_ranking import QUICK_SUPERNET_STEPS, load_arm, supernet_runs, train_run
from benchmarks.search_quality import export_top1, print_winners

ARMS = ("predictor", "shared")  # Fig. 9's two supernets (scale_ranking's arms of those names)
FRONT_POINTS = 50  # latencies at which the two fronts are compared


def front_at(rows: list[dict], latency_ms: float) -> float | None:
    """The best search-split top-1 among ``rows`` predicted within ``latency_ms`` (None: nothing fits)."""
    fits = [r["search_top1"] for r in rows if r["latency_ms"] <= latency_ms]
    return max(fits) if fits else None


def front_gap(a: list[dict], b: list[dict], points: int = FRONT_POINTS) -> float:
    """Mean of front ``a`` minus front ``b`` over evenly spaced latencies where both have a subnet."""
    lo = max(min(r["latency_ms"] for r in a), min(r["latency_ms"] for r in b))
    hi = max(r["latency_ms"] for r in a + b)
    gaps = [front_at(a, t) - front_at(b, t) for t in (lo + i * (hi - lo) / max(points - 1, 1) for i in range(points))]
    return statistics.mean(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="small")
    ap.add_argument("--seed", type=int, default=0, help="of the supernets (if trained here) and of both searches")
    ap.add_argument("--predictor", type=Path, help="an int8 supernet.pt trained with --weight-scale predictor")
    ap.add_argument("--shared", type=Path, help="the same with --weight-scale shared")
    ap.add_argument("--supernets", type=Path, default=None,
                    help="where claim 1 keeps (or this trains) the two supernets (default runs/bench/scale_ranking)")
    ap.add_argument("--supernet-steps", type=int, default=None, help="if trained here (default: qnas train's)")
    ap.add_argument("--jobs", type=int, default=1, help="supernets trained at a time, if any")
    ap.add_argument("--table", type=Path, help="latency table (default: the host's XNNPACK table, built once and cached)")
    ap.add_argument("--population", type=int, default=64)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--eval-images", type=int, default=2000, help="search-split images per candidate (qnas search's)")
    ap.add_argument("--calib-images", type=int, default=250, help="BN re-estimation per candidate (qnas search's)")
    ap.add_argument("--test-images", type=int, default=None, help="test images each exported winner is scored on (all)")
    ap.add_argument("--quick", action="store_true", help=f"tiny space, {QUICK_SUPERNET_STEPS}-step supernets (scale_ranking --quick's), "
                                                         "population 8 x 2, 2 budgets")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/scale_pareto"))
    args = ap.parse_args()
    if args.quick:
        args.space, args.supernet_steps = "tiny", args.supernet_steps or QUICK_SUPERNET_STEPS
        args.population, args.generations = min(args.population, 8), min(args.generations, 2)
        args.eval_images, args.calib_images, args.test_images = 200, 64, args.test_images or 200
        args.supernets = args.supernets or args.out / "supernets"
    if args.jobs < 1 or args.population < 2 or args.generations < 1:
        ap.error("--jobs must be >= 1, --population >= 2 and --generations >= 1")
    root = args.supernets or Path("runs/bench/scale_ranking")

    supernets, runs = supernet_runs(root, {arm: getattr(args, arm) for arm in ARMS}, space=args.space,
                                    seed=args.seed, steps=args.supernet_steps, ckpt_every=10**9,
                                    **({"eval_images": 100, "calib_images": 64} if args.quick else {}))
    if runs:
        print(f"training {', '.join(n for n, _ in runs)} supernet(s) into {root}, {args.jobs} at a time", flush=True)
    for (name, _), summary in zip(runs, run_parallel(train_run, [(cfg,) for _, cfg in runs], args.jobs)):
        print(f"  {name}: " + ", ".join(f"{k} {100 * v['test_top1']:.2f}%" for k, v in summary["metrics"].items()), flush=True)

    space = load_space(args.space)
    nets = {arm: load_arm(arm, supernets[arm], space) for arm in ARMS}
    net = nets["predictor"][0]
    table, table_path = resolve_table(args.table, net.space, net.in_channels, net.num_classes, "xnnpack", 1, log=print)
    budgets = sorted(budgets_for(Predictor(table, net.space), net.space))
    if args.quick:
        budgets = budgets[::2]

    searches = {}
    for arm in ARMS:
        print(f"{arm}: searching {supernets[arm]} under {', '.join(f'{b:g}' for b in budgets)} ms, "
              f"population {args.population} x {args.generations} generations", flush=True)
        cfg = SearchConfig(supernet=str(supernets[arm]), budgets_ms=budgets, table=str(table_path), population=args.population,
                           generations=args.generations, calib_images=args.calib_images, eval_images=args.eval_images,
                           seed=args.seed, out=str(args.out / arm / "search"),
                           resume=(args.out / arm / "search" / "evaluations.jsonl").is_file())  # cached by supernet hash
        searches[arm] = run_search(cfg, log=lambda m: None, on_generation=lambda b, g, arm=arm: print(
            f"  {arm}, {b:g} ms: generation {g.index}, best {100 * g.best[1]:.2f}%", flush=True), table=(table, table_path))

    rows = []
    for budget in budgets:
        row = {"budget_ms": budget}
        for arm in ARMS:
            c = next(c for c in searches[arm]["chosen"] if c["budget_ms"] == budget)
            arch = load_arch(Path(searches[arm]["out"]) / c["file"], net.space)
            print(f"exporting the {arm} winner for {budget:g} ms: {arch.key}", flush=True)
            exp = export_top1(arch, net.space, supernets[arm], nets[arm][1]["weights"]["sha256"],
                              args.out / arm / f"winner_{budget:g}ms", args.test_images)
            row[arm] = {"arch": arch.key, "search_top1": c["search_top1"], "predicted_ms": c["latency_ms"], **exp}
        p, s = row["predictor"]["test_top1"], row["shared"]["test_top1"]
        row["verdict"] = "predictor better" if p > s else "tie" if p == s else "shared better"
        rows.append(row)
    fronts = {arm: [r for r in searches[arm]["subnets"] if r.get("pareto")] for arm in ARMS}
    gap = front_gap(searches["predictor"]["subnets"], searches["shared"]["subnets"])
    result = {"supernets": {arm: {"path": str(supernets[arm]), "sha256": nets[arm][1]["weights"]["sha256"],
                                  "metrics": nets[arm][1].get("metrics")} for arm in ARMS},
              "table": str(table_path), "runtime": table.header["runtime"], "budgets_ms": budgets,
              "settings": {k: getattr(args, k) for k in ("population", "generations", "eval_images", "calib_images",
                                                         "test_images", "seed")},
              "evaluations": {arm: searches[arm]["evaluations"]["count"] for arm in ARMS},
              "front_gap_search_top1": gap, "rows": rows,
              "fronts": {arm: [{k: r[k] for k in ("arch", "latency_ms", "search_top1")} for r in fronts[arm]] for arm in ARMS},
              "subnets": {arm: [{k: r[k] for k in ("latency_ms", "search_top1")} for r in searches[arm]["subnets"]]
                          for arm in ARMS},
              "versions": versions()}
    write_json(args.out / "scale_pareto.json", result)
    _plot(result, args.out / "scale_pareto.png")

    print(f"\n{args.space}: the same search on both supernets ({result['evaluations']['predictor']} / "
          f"{result['evaluations']['shared']} subnets evaluated); winners exported, int8 TFLite test top-1 on "
          f"{args.test_images or 'all'} images")
    print_winners(rows, ARMS)
    print(f"fronts (search split): predictor minus shared {100 * gap:+.2f} pp on average over {FRONT_POINTS} latencies "
          f"(paper Fig. 9: the predictor's front lies above)")
    print(f"wrote {args.out / 'scale_pareto.json'} and scale_pareto.png")


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for arm, color, marker in zip(ARMS, ("tab:blue", "tab:orange"), ("*", "P")):
        pts = result["subnets"][arm]
        ax.scatter([r["latency_ms"] for r in pts], [100 * r["search_top1"] for r in pts], s=6, color=color, alpha=0.25)
        front = result["fronts"][arm]
        ax.step([r["latency_ms"] for r in front], [100 * r["search_top1"] for r in front], where="post", color=color,
                label=f"{arm}: Pareto front (search split)")
        won = [row[arm] for row in result["rows"]]
        ax.plot([w["predicted_ms"] for w in won], [100 * w["test_top1"] for w in won], marker, ms=11, ls="none",
                color=color, markeredgecolor="black", label=f"{arm}: exported winners (test, TFLite)")
    for b in result["budgets_ms"]:
        ax.axvline(b, color="0.5", ls=":", lw=0.8)
    ax.set(xlabel=f"predicted int8 TFLite latency (ms, {result['runtime']} table)", ylabel="int8 top-1 (%)",
           title="scale predictor vs shared scale: the same search on both supernets")
    ax.legend(loc="lower right", fontsize=8)
    save_png(fig, path)


if __name__ == "__main__":
    main()
