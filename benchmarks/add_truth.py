"""Grow the stand-alone truth (issue 31, part 2): more `small` subnets trained alone, two seeds
each, chosen where the latency budgets bite, and appended to the committed truth file as each
subnet's last seed finishes (a session that ends mid-way keeps what it finished).

Twenty subnets spread over MFLOPs give Kendall tau a standard error of about 0.16, so levers
closer than that cannot be told apart; and regret is decided among the subnets just under each
budget, where the spread has few. So the new subnets are drawn where a search chooses:

- the budgets are the demo's (``qnas_cli.demo.budgets_for``: 15%, 40% and 80% of the way from
  the fastest to the slowest subnet on this host's latency table), as ``benchmarks.ranking``
  scores regret;
- a subnet *competes* for a budget when its predicted latency lies in [BAND x budget, budget]
  (a budget above the slowest subnet of the pool stands at that subnet: the top budget often
  fits nearly every subnet, and then the slowest compete for it);
- from ``--pool`` seeded random subnets not in the truth yet, each budget's competitors are
  taken at evenly spaced MFLOPs ranks: similar cost, different kernels, expands and depths;
- they are trained round-robin over the budgets, so a partial run covers all three.

Each run is `qnas train --subnet` with the file's recipe, space, data and seeds (the recipe read
back and checked before anything is trained).
The plan (which subnets) is written to OUT/plan.json and reused by a rerun into the same OUT, so
an interrupted invocation resumes its runs (`train --resume`) rather than choosing again. The
file gains one ``additions`` record per plan (command, commit, date, host, how the subnets were
chosen, the integer contract they were scored under), and every added subnet names it.

    python -m benchmarks.add_truth --subnets 21 --jobs 2     # about 4.5 min of 2 cores per run
    python -m benchmarks.add_truth --subnets 3 --jobs 2 --truth T.json --out runs/x   # a copy to try
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qnas_cli.checkpoint import write_json
from qnas_cli.cost import arch_cost
from qnas_cli.data import load_dataset
from qnas_cli.demo import budgets_for
from qnas_cli.latency import Predictor, host_device
from qnas_cli.quant import INTEGER_CONTRACT_VERSION
from qnas_cli.space import Arch, SearchSpace, load_space, sample
from qnas_cli.train import TrainConfig, with_added_defaults

from benchmarks.parallel import run_parallel, threads_per_job
from benchmarks.scale_ranking import standalone_index, standalone_runs, train_run
from benchmarks.truth import (DEFAULT_TRUTH, RECIPE_KEYS, check_truth_matches, load_truth, seed_top1,
                              standalone_recipe)

BAND = 0.75  # a subnet competes for a budget when its latency is within 25% under it
POOL = 4000  # random subnets to choose from (about 3,900 distinct in `small`)
PLAN_FORMAT = "qnas.truth_plan/1"


def budget_subnets(space: SearchSpace, latency: Callable[[Arch], float], mflops: Callable[[Arch], float],
                   budgets: list[float], n: int, exclude: set[str], seed: int = 0, pool: int = POOL) -> list[Arch]:
    """``n`` distinct subnets competing for ``budgets`` (latency in [BAND x b, b], b capped at the
    pool's slowest subnet), as evenly over the
    budgets as their bands allow, at evenly spaced MFLOPs quantiles (midpoints) of each band; none in
    ``exclude`` (arch keys). Ordered round-robin over the budgets, lowest first."""
    rng = random.Random(seed)
    unique = {a.key: a for a in (sample(space, "random", rng) for _ in range(pool)) if a.key not in exclude}
    slowest = max(map(latency, unique.values()), default=0.0)
    bands, taken = [], set()
    for b in (min(b, slowest) for b in budgets):  # a budget above every subnet: the slowest ones compete for it
        # bands may overlap: a subnet counts for the lowest budget it competes for
        bands.append(sorted((a for a in unique.values() if BAND * b <= latency(a) <= b and a.key not in taken),
                            key=lambda a: (mflops(a), a.key)))
        taken |= {a.key for a in bands[-1]}
    wanted = [0] * len(bands)
    for _ in range(n):  # one at a time to the budget with the fewest so far, among those with subnets left
        room = [k for k, band in enumerate(bands) if wanted[k] < len(band)]
        if not room:
            break
        wanted[min(room, key=lambda k: (wanted[k], k))] += 1
    picks = [[band[int((i + 0.5) * len(band) / want)] for i in range(want)] for band, want in zip(bands, wanted)]
    return [p[i] for i in range(max(wanted, default=0)) for p in picks if i < len(p)]


def load_plan(path: Path, identity: dict[str, Any], space: SearchSpace) -> list[Arch] | None:
    """The archs of OUT/plan.json when it was made for this truth (``identity``: ``truth_identity``); else None."""
    if not path.is_file():
        return None
    plan = json.loads(path.read_text())
    if plan.get("format") != PLAN_FORMAT or plan.get("truth") != identity:
        raise SystemExit(f"error: {path} is the plan of another truth or recipe; use another --out")
    return [Arch.from_dict(a, space) for a in plan["archs"]]


def recipe_options(truth: dict[str, Any]) -> dict[str, Any]:
    """The `qnas train` options of the file's recipe (its lengths as resolved), with its space and data."""
    recipe = with_added_defaults({"config": truth["recipe"]})["config"]
    return {"space": truth["space"]["name"], "data": truth["data"]["spec"], **{k: recipe[k] for k in RECIPE_KEYS}}


def truth_identity(truth: dict[str, Any]) -> dict[str, Any]:
    return {"space": truth["space"], "recipe": truth["recipe"], "seeds": truth["seeds"]}


def merge(truth: dict[str, Any], arch: Arch, space: SearchSpace, mflops: float, top1: dict[int, float],
          addition: dict[str, Any]) -> None:
    """Append ``arch``'s results to ``truth`` (in place) under ``addition`` (added to ``additions`` the first time)."""
    additions = truth.setdefault("additions", [])
    if addition not in additions:
        additions.append(addition)
    truth["subnets"].append({"index": len(truth["subnets"]), "arch": arch.to_dict(space), "arch_key": arch.key,
                             "mflops": mflops, "steps": truth["recipe"]["steps"],
                             "top1": {str(s): top1[s] for s in truth["seeds"]}, "addition": additions.index(addition)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subnets", type=int, default=21, help="subnets to add (each trained once per seed of the file)")
    ap.add_argument("--truth", type=Path, default=DEFAULT_TRUTH, help="the truth file to grow (rewritten as subnets finish)")
    ap.add_argument("--table", type=Path, default=None, help="latency table (default: this host's, built on first use)")
    ap.add_argument("--seed", type=int, default=0, help="of the random pool the subnets are chosen from")
    ap.add_argument("--pool", type=int, default=POOL, help="random subnets drawn to choose from")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (cores/jobs threads each)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/add_truth"))
    args = ap.parse_args()
    if args.subnets < 1 or args.jobs < 1 or args.pool < 1:
        ap.error("--subnets, --jobs and --pool must be >= 1")
    from qnas_cli.export.latency_build import resolve_table  # converts and times on first use: not in the model core

    truth = load_truth(args.truth)
    space = load_space(truth["space"]["name"])
    data = load_dataset(truth["data"]["spec"], load_size=max(space.resolutions))
    common = recipe_options(truth)
    check_truth_matches(truth, space, data.describe(), standalone_recipe(TrainConfig(subnet="subnet.json", **common)))

    plan_path = args.out / "plan.json"
    archs = load_plan(plan_path, truth_identity(truth), space)
    if archs is None:
        table, table_path = resolve_table(args.table, space, data.in_channels, data.num_classes)
        pred = Predictor(table, space)
        budgets = budgets_for(pred, space)
        cost = lambda a: arch_cost(space, a, data.in_channels, data.num_classes).mflops  # noqa: E731
        archs = budget_subnets(space, pred.predict, cost, budgets, args.subnets,
                               {e["arch_key"] for e in truth["subnets"]}, args.seed, args.pool)
        selection = {"how": f"competing for the demo's budgets: predicted latency in [{BAND} x budget, budget] (budget capped "
                            "at the pool's slowest subnet), "
                            "evenly spaced MFLOPs ranks in each band, round-robin over the budgets",
                     "budgets_ms": budgets, "band": BAND, "seed": args.seed, "pool": args.pool, "table": str(table_path),
                     "table_device": table.header.get("device"), "latency_ms": [round(pred.predict(a), 3) for a in archs]}
        write_json(plan_path, {"format": PLAN_FORMAT, "truth": truth_identity(truth), "selection": selection,
                               "archs": [a.to_dict(space) for a in archs]})
    plan = json.loads(plan_path.read_text())
    addition = {"command": "python -m benchmarks.add_truth " + " ".join(sys.argv[1:]),
                "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
                "date": datetime.date.today().isoformat(), "host": host_device(),
                "integer_contract_version": INTEGER_CONTRACT_VERSION, "selection": plan["selection"],
                "plan": [a.key for a in archs]}
    addition = next((a for a in truth.get("additions", []) if a["plan"] == addition["plan"]), addition)  # a rerun's own

    seeds = [int(s) for s in truth["seeds"]]
    done, todo = standalone_runs(args.out, archs, seeds, data.describe(), seed_top1(truth), **common)
    mflops = {a.key: arch_cost(space, a, data.in_channels, data.num_classes).mflops for a in archs}
    print(f"{len(archs)} subnets x {len(seeds)} seeds planned in {plan_path}: {len(todo)} runs to train, "
          f"{args.jobs} at a time, {threads_per_job(args.jobs)} thread(s) each", flush=True)

    def add_finished() -> None:
        in_file = {e["arch_key"] for e in truth["subnets"]}
        for i, arch in enumerate(archs):
            if arch.key not in in_file and all((i, s) in done for s in seeds):
                merge(truth, arch, space, mflops[arch.key], {s: done[i, s] for s in seeds}, addition)
                write_json(args.truth, truth)
                load_truth(args.truth)  # what was written must load
                print(f"  subnet {arch.key} ({mflops[arch.key]:.2f} MFLOPs): "
                      + " / ".join(f"{100 * done[i, s]:.2f}%" for s in seeds)
                      + f" -> {args.truth} ({len(truth['subnets'])} subnets)", flush=True)

    add_finished()  # results of an earlier invocation into the same OUT not yet in the file
    for (name, cfg), summary in zip(todo, run_parallel(train_run, [(cfg,) for _, cfg in todo], args.jobs)):
        done[standalone_index(name), cfg.seed] = summary["metrics"]["subnet"]["test_top1"]
        add_finished()
    print(f"{args.truth}: {len(truth['subnets'])} subnets")


if __name__ == "__main__":
    main()
