"""Does `qnas train` collapse? Seeds x {int8 from scratch, the default float -> int8 recipe}.

Each run is `qnas train --seed S` (the default recipe) or `qnas train --seed S --float-steps 0`
(int8 from scratch), everything else at its default (batch size, learning rate, schedule), on
Fashion-MNIST `small`. Per run: collapse events (the guard's: the largest subnet's loss back at
chance for 3 logged steps, or a non-finite loss or scale; a run the guard stopped counts as
stopped), final int8 test top-1 of the largest and smallest subnets, wall time. Prints a table
(mean and spread over seeds), writes JSON and a PNG of the largest subnet's loss curves.

    python -m benchmarks.train_stability            # 3 seeds x 2 recipes x the default 3500 steps: about 2.5 h on 2 CPU cores
    python -m benchmarks.train_stability --quick    # 3 seeds x 2 recipes x 200 steps, 1000 test images: about 15 min
    python -m benchmarks.train_stability --jobs 2   # two runs at a time, one thread each (more throughput on 2 cores;
                                                    # the per-run wall times are then those of a shared core)
    python -m benchmarks.train_stability --recipes default --jobs 3   # the default recipe only, 3 seeds at once
    python -m benchmarks.train_stability --resume   # after an interruption: finished runs of the same options kept, the rest continue
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

from qnas_cli.checkpoint import versions, write_json
from qnas_cli.guard import TrainingCollapsed
from qnas_cli.run_folder import ckpt_dir
from qnas_cli.space import load_space
from qnas_cli.train import DEFAULT_STEPS, TrainConfig, phase_plan, plan_record, train

from benchmarks.parallel import run_difference, run_parallel, threads_per_job
from benchmarks.plots import pyplot, save_png

RUN_RESULT = "stability_run.json"  # one finished run's result, reused by --resume
RECIPES = {"scratch": {"float_steps": 0}, "default": {}}  # int8 from scratch; the default float -> int8


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_config(recipe: str, seed: int, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(space=args.space, out=str(args.out / f"{recipe}_seed{seed}"), seed=seed, steps=args.steps,
                       eval_images=args.eval_images, calib_images=args.calib_images, ckpt_every=args.ckpt_every,
                       **RECIPES[recipe])


# What a run's result depends on besides the recipe: how it was evaluated, when the guard stops it.
RESULT_KEYS = (*TrainConfig.RESUME_KEYS, "eval_images", "calib_images", "log_every", "collapse_patience", "collapse_give_up")


def finished_result(cfg: TrainConfig, resume: bool) -> dict | None:
    """The result of a run finished in an earlier invocation as ``cfg``'s run (reused under
    ``--resume``), None where there is none. A finished result of another run (other options,
    space or plan: it records them), or any finished result without ``--resume``, is refused
    with one line before anything runs: training again would destroy it, and that choice is the
    user's (another --out); so is an interrupted run without ``--resume``, which `train` would
    refuse only once the runs before it had trained."""
    out = Path(cfg.out)
    done = out / RUN_RESULT
    if not done.is_file():
        if not resume and (any(ckpt_dir(out).glob("step_*.pt")) or (out / "supernet.pt").exists()):
            raise SystemExit(f"error: {out} holds an interrupted run (checkpoints, no {RUN_RESULT}): pass --resume to "
                             "continue it, or use another --out")
        return None
    result = json.loads(done.read_text())
    why = run_difference(result, cfg, RESULT_KEYS) if "config" in result else "it records no configuration (an older version's)"
    if why:
        raise SystemExit(f"error: {done} is the result of another run: {why}; use another --out")
    if not resume:
        raise SystemExit(f"error: {done} is a finished run: pass --resume to reuse it, or use another --out")
    return result


def run_one(recipe: str, seed: int, args: argparse.Namespace) -> dict:
    cfg = run_config(recipe, seed, args)
    out = Path(cfg.out)
    resume = args.resume and any(ckpt_dir(out).glob("step_*.pt"))
    t = time.perf_counter()
    stopped, top1 = None, {}
    try:
        summary = train(cfg, resume=resume, log=lambda *a, **k: None)
        top1 = {k: v["test_top1"] for k, v in summary["metrics"].items()}
    except TrainingCollapsed as e:
        stopped = str(e)
    rows = metric_rows(out)
    curve = [r for r in rows if "event" not in r]
    result = {"recipe": recipe, "seed": seed, "wall_s": time.perf_counter() - t, "resumed": resume, "stopped": stopped,
              "test_top1": top1, "collapse_events": sum(r.get("event") in ("collapse", "non-finite") for r in rows),
              "events": [{k: r[k] for k in ("step", "event", "loss_largest")} for r in rows if "event" in r],
              "steps": [r["step"] for r in curve], "loss_largest": [r["loss_largest"] for r in curve],
              "phase": [r.get("phase") for r in curve],
              # what was trained, for the reuse check (run_difference reads these keys)
              "config": cfg.to_dict(), "space": load_space(cfg.space).to_dict(),
              "phases": plan_record(phase_plan(cfg, steps_per_epoch=0))}
    write_json(out / RUN_RESULT, result)
    return result


def summarize(runs: list[dict]) -> dict:
    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": None, "spread": None}
        return {"mean": statistics.mean(values), "spread": max(values) - min(values), "min": min(values), "max": max(values)}

    out = {}
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        rs = [r for r in runs if r["recipe"] == recipe]
        done = [r for r in rs if not r["stopped"]]
        out[recipe] = {"runs": len(rs), "collapse_events": sum(r["collapse_events"] for r in rs),
                       "runs_with_collapse": sum(r["collapse_events"] > 0 for r in rs), "stopped": sum(bool(r["stopped"]) for r in rs),
                       "largest": stats([r["test_top1"]["largest"] for r in done]),
                       "smallest": stats([r["test_top1"]["smallest"] for r in done]),
                       "wall_min": stats([r["wall_s"] / 60 for r in rs])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 steps per run and 1000 test images (about 15 min)")
    ap.add_argument("--space", default="small")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {', '.join(RECIPES)}")
    ap.add_argument("--steps", type=int, default=None, help=f"steps per run (default {DEFAULT_STEPS}; 200 with --quick)")
    ap.add_argument("--eval-images", type=int, default=None, help="test images (default all; 1000 with --quick)")
    ap.add_argument("--calib-images", type=int, default=2000)
    ap.add_argument("--ckpt-every", type=int, default=100, help="steps between a run's checkpoints (for --resume)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted invocation in the same --out: finished runs are reused where they "
                         "record these options (another run's result is refused, never overwritten), the others continue "
                         "from their last checkpoint (wall times then cover the last part only)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/train_stability"))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cores/jobs threads (default 1: one run, all cores)")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    args.steps = args.steps or (200 if args.quick else DEFAULT_STEPS)
    args.eval_images = args.eval_images or (1000 if args.quick else None)
    if args.quick:
        args.calib_images = min(args.calib_images, 500)
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    if args.ckpt_every < 1:
        ap.error(f"--ckpt-every must be >= 1, got {args.ckpt_every}")
    if unknown := set(recipes) - set(RECIPES):
        ap.error(f"--recipes: unknown {', '.join(sorted(unknown))} (choose from {', '.join(RECIPES)})")

    planned = [(recipe, seed) for seed in seeds for recipe in recipes]
    reused = {rs: finished_result(run_config(*rs, args), args.resume) for rs in planned}  # all checked before anything runs
    todo = [rs for rs in planned if reused[rs] is None]
    threads = threads_per_job(args.jobs)
    print(f"{len(todo)} runs of {args.steps} steps, {args.jobs} at a time, {threads} thread(s) each "
          f"({len(planned) - len(todo)} finished ones reused)", flush=True)
    results = dict(reused)
    trained = zip(todo, run_parallel(run_one, [(*rs, args) for rs in todo], args.jobs))
    for (recipe, seed), r in itertools.chain(((rs, r) for rs, r in reused.items() if r), trained):  # as they finish
        results[recipe, seed] = r
        print(f"{recipe} seed {seed}: {r['wall_s'] / 60:.1f} min, collapse events {r['collapse_events']}, "
              + (f"stopped: {r['stopped']}" if r["stopped"] else
                 f"top-1 {100 * r['test_top1']['largest']:.2f}% / {100 * r['test_top1']['smallest']:.2f}%"), flush=True)
    runs = [results[rs] for rs in planned]
    table = summarize(runs)
    result = {"config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "threads_per_run": threads},
              "summary": table,
              "runs": runs, "versions": versions()}
    write_json(args.out / "train_stability.json", result)
    _plot(runs, args.out / "train_stability.png")

    def cell(s: dict) -> str:
        return "-" if s["mean"] is None else f"{100 * s['mean']:.2f}% ± {100 * s['spread'] / 2:.2f}"

    print(f"\n{len(seeds)} seeds x {args.steps} steps, {args.space}, test images: {args.eval_images or 'all'}, "
          f"{args.jobs} run(s) at a time, {threads} thread(s) each (± half the range over seeds)")
    print(f"{'recipe':10}{'collapse events':>17}{'runs stopped':>14}{'largest top-1':>18}{'smallest top-1':>18}{'min/run':>9}")
    for recipe, s in table.items():
        print(f"{recipe:10}{s['collapse_events']:>17}{s['stopped']:>14}{cell(s['largest']):>18}{cell(s['smallest']):>18}"
              f"{s['wall_min']['mean']:>9.1f}")
    print(f"wrote {args.out / 'train_stability.json'} and train_stability.png")


def _plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"scratch": "tab:red", "default": "tab:blue"}
    for r in runs:
        label = f"{r['recipe']} (seed {r['seed']})"
        ax.plot(r["steps"], r["loss_largest"], color=colors[r["recipe"]], alpha=0.4 + 0.2 * (r["seed"] % 3), lw=1, label=label)
        for e in r["events"]:
            ax.axvline(e["step"], color=colors[r["recipe"]], ls=":", lw=0.8)
    ax.axhline(2.302585, color="grey", ls="--", lw=0.8, label="chance (ln 10)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss, largest subnet")
    ax.set_title("int8 from scratch vs float -> int8 (default); dotted: collapse events", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path)


if __name__ == "__main__":
    main()
