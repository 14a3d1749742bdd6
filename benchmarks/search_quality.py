"""Evolution vs random sampling at the same number of evaluations (issue: search, docs/design.md §8).

Same supernet, same latency table, same budgets, same fitness (calibrated exact int8 top-1 on
the held-out search split, `qnas search`'s settings):
- evolution: `qnas search` (run_search) over all budgets; it spends E evaluations;
- random: E random subnets that meet some budget by prediction (E / budgets drawn per budget),
  evaluated the same way; per budget the best one that fits, as the search picks its winners.
Each winner is then exported for real (`qnas export`'s pipeline, parity gate included) and its
int8 TFLite is scored on the test split. Prints both, and a verdict per budget.

    python -m benchmarks.search_quality --supernet runs/demo/train/supernet.pt
        [--population 64 --generations 8] [--test-images 5000] [--out runs/bench/search_quality]

Takes about 20 minutes on 2 cores with the defaults. Writes OUT/search_quality.json.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from qnas_cli.export.latency_build import resolve_table
from qnas_cli.export.pipeline import export_subnet
from qnas_cli.calibrate import subnet_document
from qnas_cli.checkpoint import versions, write_json
from qnas_cli.data import load_dataset
from qnas_cli.demo import budgets_for
from qnas_cli.fitness import SearchInputs, evaluate_arch, fitness_arithmetic
from qnas_cli.latency import Predictor
from qnas_cli.search_job import SearchConfig, budget_seeds, random_candidates, run_search
from qnas_cli.space import load_arch, sample
from qnas_cli.supernet import load_supernet

from benchmarks.parallel import BENCH_SUPERNET, trained_supernet


def random_search(net, data, pred: Predictor, budgets: list[float], evaluations: int, cfg: SearchConfig,
                  seed: int) -> dict[str, dict]:
    """``evaluations`` random subnets, an equal share under each budget; every one scored as the
    search scores. A budget's share starts with the seeds the search's first population starts
    with (``budget_seeds``: only under a budget random sampling rarely meets), so both arms start alike."""
    rng = random.Random(seed)
    inputs = SearchInputs(data, cfg.calib_images, cfg.eval_images)
    runtime = fitness_arithmetic(cfg.runtime)
    candidates = random_candidates(net.space)
    scored: dict[str, tuple] = {}
    per_budget = -(-evaluations // len(budgets))
    for b in budgets:
        drawn = 0
        seeds = iter(budget_seeds(candidates, lambda a, b=b: pred.predict(a) <= b))
        while drawn < per_budget and len(scored) < evaluations:
            a = next(seeds, None) or sample(net.space, "random", rng)
            if pred.predict(a) <= b and a.key not in scored:
                scored[a.key] = (a, evaluate_arch(net, a, inputs, runtime=runtime)["accuracy"])
                drawn += 1
                print(f"  random: {len(scored)}/{evaluations}", end="\r", flush=True)
    print()
    return scored


def export_top1(arch, space, supernet: Path, sha: str, folder: Path, test_images: int | None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "subnet.json"
    write_json(path, subnet_document(arch, space, supernet.resolve(), sha))
    r = export_subnet(path, folder / "export", eval_images=test_images, log=lambda *a, **k: None)
    return {"test_top1": r["accuracy"]["top1"], "passed": r["passed"],  # the file's: bit-equal to it where it ran
            "measured_ms": r["latency_ms"]["xnnpack"]}


def print_winners(rows: list[dict], arms: tuple[str, str]) -> None:
    """Per budget, two arms' winners side by side: search-split and test top-1, predicted ms, the verdict."""
    a, b = arms
    print(f"{'budget':>8} | {a + ': search':>17} {'test':>7} {'ms':>7} | {b + ': search':>14} {'test':>7} {'ms':>7} | verdict")
    for row in rows:
        print(f"{row['budget_ms']:>6g}ms | " + " | ".join(
            f"{100 * w['search_top1']:>{w_search}.2f}% {100 * w['test_top1']:>6.2f}% {w['predicted_ms']:>7.3f}"
            for w, w_search in ((row[a], 16), (row[b], 13))) + f" | {row['verdict']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--supernet", type=trained_supernet, default=BENCH_SUPERNET)
    ap.add_argument("--population", type=int, default=64)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--test-images", type=int, default=5000, help="test images each exported winner is scored on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/search_quality"))
    args = ap.parse_args()
    net, meta = load_supernet(args.supernet)
    sha = meta["weights"]["sha256"]
    table, table_path = resolve_table(None, net.space, net.in_channels, net.num_classes, "xnnpack", 1, log=print)
    pred = Predictor(table, net.space)
    budgets = budgets_for(pred, net.space)[:2]
    out = args.out
    evo_dir = out / "evolution"
    if (evo_dir / "evaluations.jsonl").exists():
        (evo_dir / "evaluations.jsonl").unlink()
    cfg = SearchConfig(supernet=str(args.supernet), budgets_ms=budgets, table=str(table_path), population=args.population,
                       generations=args.generations, seed=args.seed, out=str(evo_dir))
    print(f"evolution: budgets {budgets} ms, population {args.population} x {args.generations} generations")
    t0 = time.perf_counter()
    evo = run_search(cfg, log=print, table=(table, table_path))
    evo_s = time.perf_counter() - t0
    n_eval = evo["evaluations"]["count"]
    data = load_dataset(meta.get("config", {}).get("data", "fashion-mnist"), load_size=max(net.space.resolutions))
    print(f"random: {n_eval} evaluations (as many as evolution made)")
    t0 = time.perf_counter()
    rand = random_search(net, data, pred, budgets, n_eval, cfg, args.seed + 1)
    rand_s = time.perf_counter() - t0
    rows = []
    for c in evo["chosen"]:
        b = c["budget_ms"]
        fits = [(a, acc) for a, acc in rand.values() if pred.predict(a) <= b]
        ra, racc = max(fits, key=lambda t: (t[1], -pred.predict(t[0])))
        e_arch = load_arch(evo_dir / c["file"], net.space)
        row = {"budget_ms": b}
        for name, arch, acc in (("evolution", e_arch, c["search_top1"]), ("random", ra, racc)):
            print(f"exporting the {name} winner for {b:g} ms: {arch.key}")
            exp = export_top1(arch, net.space, args.supernet, sha, out / f"{name}_{b:g}ms", args.test_images)
            row[name] = {"arch": arch.key, "search_top1": acc, "predicted_ms": pred.predict(arch), **exp}
        e, r = row["evolution"], row["random"]
        row["verdict"] = ("evolution better" if e["search_top1"] > r["search_top1"] else
                          "tie" if e["search_top1"] == r["search_top1"] else "random better") + " on the search split; " + \
                         ("evolution better" if e["test_top1"] > r["test_top1"] else
                          "tie" if e["test_top1"] == r["test_top1"] else "random better") + " on test"
        rows.append(row)
    doc = {"supernet": {"path": str(args.supernet), "sha256": sha}, "table": str(table_path), "budgets_ms": budgets,
           "evaluations_each": n_eval, "evolution_seconds": round(evo_s, 1), "random_seconds": round(rand_s, 1),
           "settings": {"population": args.population, "generations": args.generations, "screen": cfg.screen,
                        "calib_images": cfg.calib_images, "eval_images": cfg.eval_images,
                        "test_images": args.test_images}, "rows": rows, "versions": versions()}
    write_json(out / "search_quality.json", doc)
    print(f"\n{n_eval} evaluations each; test top-1 of the exported int8 model on {args.test_images} images "
          f"(the exact forward, which each file equals bit for bit on the images it ran)")
    print_winners(rows, ("evolution", "random"))
    print(f"wrote {out / 'search_quality.json'}")


if __name__ == "__main__":
    main()
