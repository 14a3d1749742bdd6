"""Paper Table 1 at small scale: does the scale predictor rank subnets better than one shared
scale, and fully int8 better than partially quantized?

1. Three supernets, `qnas train`'s default recipe, one seed, differing only in quantization
   (``--arms``): ``predictor``, fully int8 with the scale predictor (QuantNAS §4.2); ``shared``,
   fully int8 with one LSQ scale per layer for every subnet; ``convs``, only convs and FCs
   quantized, BN, adds and pooling float, shared scale (``--quant convs``: the partially
   quantized baseline of BatchQuant/OQA, Table 1's first row and claim 5's ranking arm).
   Each is given (``--predictor`` / ``--shared`` / ``--convs``), reused from OUT when a finished
   one of the same recipe is there, or trained here.
2. ``--subnets`` random subnets (seeded), spread over the cost range: 2,000 random subnets sorted
   by multiply-accumulates (the order of their latency on one runtime, near enough for spreading),
   taken at evenly spaced ranks.
3. Ground truth, shared by every arm: each subnet trained alone from scratch (`qnas train
   --subnet`), int8, the same recipe and ``--standalone-steps`` for all, ``--standalone-seeds``
   times (seeds ``--seed``, ``--seed``+1, ...); its int8 test top-1, averaged over the seeds
   (fully int8 is what ships, so it is the truth for the convs-only arm too). With two or more
   seeds the replicas' tau with each other is reported: how reproducible the ranking being
   predicted is at this budget, the yardstick for every arm's tau. Results committed as data
   (``--truth``, by default benchmarks/data/standalone_small_fashion-mnist.json: BENCHMARKS.md
   §1's 20 subnets, 2 seeds, 2,800 steps) are read instead of trained where they are this
   invocation's runs (the same space, data and recipe, then the same architecture and seed);
   ``--no-truth`` trains them all.
4. Per arm: every subnet's supernet-inherited accuracy (extracted, BN calibrated; exact int8 on
   the test split, fake-quant for convs-only) and Kendall tau against the ground truth (and
   against each seed's). Paper: 0.84-0.91 with the predictor, 0.69-0.75 with a shared scale,
   0.69-0.78 partially quantized.

The training runs (the supernets, the stand-alone subnets) run ``--jobs`` at a time. A finished
run in OUT is reused only where it records what this invocation would train (its subnet's
architecture, options, space, phase plan, evaluation images and data), never because of its
path; a finished run of anything else there is refused in one line before any training (use
another --out): training over it would destroy a result.

    python -m benchmarks.scale_ranking --jobs 2          # 3 supernets, the 2 x 20 stand-alone subnets read from the committed truth
    python -m benchmarks.scale_ranking --jobs 2 --no-truth   # the stand-alone subnets trained too: about 2.5 h on 2 CPU cores
    python -m benchmarks.scale_ranking --jobs 2 --standalone-steps 1400   # half-length ground truth (seeds agree less): about 1.5 h
    python -m benchmarks.scale_ranking --quick           # tiny space, 6 subnets, short runs: a few minutes
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
from pathlib import Path

from qnas_cli.calibrate import calibrated_subnet, evaluate
from qnas_cli.checkpoint import versions, write_json
from qnas_cli.cost import arch_cost
from qnas_cli.data import load_dataset
from qnas_cli.quant import QuantConfig
from qnas_cli.ranking import kendall_tau
from qnas_cli.run_folder import ckpt_dir
from qnas_cli.space import Arch, SearchSpace, load_space, sample
from qnas_cli.supernet import Supernet, load_supernet
from qnas_cli.train import TrainConfig, train

from benchmarks.parallel import run_difference, run_parallel, threads_per_job
from benchmarks.plots import pyplot, save_png
from benchmarks.truth import DEFAULT_TRUTH, load_truth, seed_top1, standalone_recipe, truth_difference

# Table 1's rows: fully int8 with the scale predictor, fully int8 with one shared scale, and
# the partially quantized baseline (convs only, BN/adds/pooling float, shared scale; claim 5).
ARM_QUANT = {"predictor": QuantConfig(weight_scale="predictor"), "shared": QuantConfig(weight_scale="shared"),
             "convs": QuantConfig(mode="convs", weight_scale="shared")}
ARMS = tuple(ARM_QUANT)
PAPER_TAU = {"predictor": "0.84-0.91", "shared": "0.69-0.75", "convs": "0.69-0.78"}
QUICK_SUPERNET_STEPS = 40  # --quick's supernets (scale_pareto --quick trains the same, so one run serves both)
ARM_TEXT = {"predictor": "int8, scale predictor", "shared": "int8, shared scale", "convs": "convs-only int8"}


def spread_subnets(space, n: int, seed: int, in_channels: int, num_classes: int, pool: int = 2000) -> list[Arch]:
    """``n`` distinct random subnets at evenly spaced ranks of cost among ``pool`` random ones."""
    rng = random.Random(seed)
    unique = {a.key: a for a in (sample(space, "random", rng) for _ in range(pool))}
    ranked = sorted(unique.values(), key=lambda a: (arch_cost(space, a, in_channels, num_classes).macs, a.key))
    n = min(n, len(ranked))
    return [ranked[round(i * (len(ranked) - 1) / max(n - 1, 1))] for i in range(n)]


def supernet_runs(root: Path, given: dict[str, Path | None], **config) -> tuple[dict[str, Path], list[tuple[str, TrainConfig]]]:
    """Each arm's (``given``'s keys) supernet.pt: the one given, else ``root/supernet_<arm>``; the
    training runs still to do for the latter (none where a finished supernet.pt of the same recipe
    is already there: `train` writes it last)."""
    paths, runs = {}, []
    for arm in given:
        out = root / f"supernet_{arm}"
        paths[arm] = given[arm] or out / "supernet.pt"
        cfg = TrainConfig(out=str(out), quant=ARM_QUANT[arm], **config)
        if not given.get(arm) and not _trained_as(paths[arm], cfg):
            runs.append((arm, cfg))
    return paths, runs


def _trained_as(supernet: Path, cfg: TrainConfig) -> bool:
    """A finished supernet.pt whose run had ``cfg``'s recipe (options, space, resolved phase plan)."""
    meta = supernet.with_suffix(".json")
    return supernet.is_file() and meta.is_file() and run_difference(json.loads(meta.read_text()), cfg) is None


# A stand-alone run's result (its test top-1) also depends on how it was evaluated.
STANDALONE_KEYS = (*TrainConfig.RESUME_KEYS, "eval_images", "calib_images")


def standalone_runs(root: Path, archs: list[Arch], seeds: list[int], data_description: dict,
                    known: dict[tuple[str, int], float] | None = None,
                    **config) -> tuple[dict[tuple[int, int], float], list[tuple[str, TrainConfig]]]:
    """Each subnet's stand-alone runs, one per seed, in ``root/standalone/<index>/``: the int8 test
    top-1 of those ``known`` by (architecture key, seed) (a committed truth of this recipe), or
    finished in an earlier invocation as the same run (the same architecture, not the same
    subnet.json path; the same options, space, plan and data: ``data_description``, a
    ``Dataset.describe()``), and the runs still to do. A folder holding a finished run of
    anything else is refused before anything is written or trained: retraining would destroy a
    finished result (another subnet's truth, or the same subnet under another recipe), so that
    choice is left to the user (another --out)."""
    done: dict[tuple[int, int], float] = {}
    runs: list[tuple[str, TrainConfig]] = []
    for i, arch in enumerate(archs):
        out = root / "standalone" / f"{i:02d}"
        for s in seeds:
            if known and (arch.key, s) in known:  # nothing to train, so nothing in the folder to check
                done[i, s] = known[arch.key, s]
                continue
            run = out / standalone_run_name(s, seeds[0])
            cfg = TrainConfig(out=str(run), subnet=str(out / "subnet.json"), **{**config, "seed": s})
            if not (run / "supernet.pt").is_file():
                runs.append((f"standalone {i} seed {s}", cfg))
                continue
            meta = json.loads((run / "supernet.json").read_text()) if (run / "supernet.json").is_file() else {}
            trained = meta.get("metrics", {}).get("subnet", {})
            why = ("its supernet.json is missing" if not meta else
                   f"subnet {trained.get('arch')} there, {arch.key} now (another --space, --subnets or --seed?)"
                   if trained.get("arch") != arch.key else run_difference(meta, cfg, STANDALONE_KEYS, data_description))
            if why:
                raise SystemExit(f"error: {run} holds a finished stand-alone run that is not subnet {i} of this invocation: "
                                 f"{why}; use another --out (or remove that run to train it again)")
            done[i, s] = trained["test_top1"]
    space = load_space(config["space"])
    for i, arch in enumerate(archs):  # only now: nothing is rewritten when a folder is refused
        (root / "standalone" / f"{i:02d}").mkdir(parents=True, exist_ok=True)
        (root / "standalone" / f"{i:02d}" / "subnet.json").write_text(json.dumps(arch.to_dict(space), indent=1))
    return done, runs


def committed_truth(args: argparse.Namespace, space: SearchSpace, data: dict,
                    cfg: TrainConfig) -> tuple[dict[tuple[str, int], float], Path | None]:
    """The committed stand-alone results by (architecture key, seed) where the truth file is of
    ``cfg``'s runs (space, ``data``, recipe), and its path. ``--truth`` given: another truth is
    refused in one line; the default file: used where it matches, else said and trained."""
    path = args.truth or DEFAULT_TRUTH
    if args.no_truth or (args.truth is None and (args.quick or not path.is_file())):
        return {}, None
    truth = load_truth(path)
    why = truth_difference(truth, space, data, standalone_recipe(cfg))
    if why and args.truth:
        raise SystemExit(f"error: --truth {path} is not of this invocation's stand-alone runs: {why}; "
                         "pass --no-truth to train them")
    if why:
        print(f"committed stand-alone truth {path} not used ({why}): its runs are trained", flush=True)
        return {}, None
    return seed_top1(truth), path


def load_arm(arm: str, path: Path, space: SearchSpace) -> tuple[Supernet, dict]:
    """``path``'s supernet and sidecar, refused unless it is ``arm``'s quantization of ``space``."""
    net, meta = load_supernet(path)
    if net.cfg != ARM_QUANT[arm] or net.space.fingerprint != space.fingerprint:
        raise SystemExit(f"--{arm} {path}: not a {ARM_TEXT[arm]} supernet of {space.name} ({ARM_QUANT[arm]})")
    return net, meta


def standalone_run_name(seed: int, first: int) -> str:
    """The run folder of one stand-alone seed: ``run`` for the first (as before seeds were
    repeated, so those runs are reused), ``run_seed<s>`` for the replicas."""
    return "run" if seed == first else f"run_seed{seed}"


def train_run(cfg: TrainConfig) -> dict:
    """One benchmark training run, continuing an interrupted one in its folder (train refuses a
    resume under other options)."""
    ckpts = ckpt_dir(Path(cfg.out))
    return train(cfg, resume=ckpts.is_dir() and any(ckpts.iterdir()), log=lambda *a, **k: None)


def standalone_index(run_name: str) -> int | None:
    """The subnet index of a ``standalone_runs`` run ("standalone <index> seed <seed>"); None for any other run."""
    kind, *rest = run_name.split()
    return int(rest[0]) if kind == "standalone" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="small")
    ap.add_argument("--subnets", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="of the supernets, the stand-alone runs and the subnet sample")
    ap.add_argument("--supernet-steps", type=int, default=None, help="default: qnas train's")
    ap.add_argument("--standalone-steps", type=int, default=None, help="each stand-alone subnet's budget (default: qnas train's)")
    ap.add_argument("--standalone-seeds", type=int, default=2,
                    help="stand-alone runs per subnet (default 2), seeds --seed, --seed+1, ...: the truth is their mean, their tau "
                         "with each other the truth's reproducibility")
    ap.add_argument("--predictor", type=Path, help="an int8 supernet.pt trained with --weight-scale predictor (else trained here)")
    ap.add_argument("--shared", type=Path, help="the same with --weight-scale shared (else trained here)")
    ap.add_argument("--convs", type=Path, help="one trained with --quant convs --weight-scale shared (else trained here)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--eval-images", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--calib-images", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=1, help="training runs at a time (cores/jobs threads each)")
    ap.add_argument("--truth", type=Path, help="stand-alone results to read instead of training, where they are this "
                    "invocation's runs (default: benchmarks/data/standalone_small_fashion-mnist.json where it matches)")
    ap.add_argument("--no-truth", action="store_true", help="train every stand-alone run (no committed truth)")
    ap.add_argument("--quick", action="store_true", help="tiny space, 6 subnets, 40-step supernets, 30-step stand-alone runs")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/scale_ranking"))
    args = ap.parse_args()
    if args.quick:
        args.space, args.subnets = "tiny", min(args.subnets, 6)
        args.supernet_steps, args.standalone_steps = args.supernet_steps or QUICK_SUPERNET_STEPS, args.standalone_steps or 30
        args.eval_images, args.calib_images = args.eval_images or 500, min(args.calib_images, 250)
    if args.truth and args.no_truth:
        ap.error("--truth and --no-truth: give one of them")
    if args.jobs < 1 or args.subnets < 3 or args.standalone_seeds < 1:
        ap.error("--jobs and --standalone-seeds must be >= 1 and --subnets >= 3")
    arms = [a for a in args.arms.split(",") if a]
    if not arms or set(arms) - set(ARMS):
        ap.error(f"--arms: choose among {', '.join(ARMS)}")

    space = load_space(args.space)
    data = load_dataset("fashion-mnist", load_size=max(space.resolutions))
    archs = spread_subnets(space, args.subnets, args.seed, data.in_channels, data.num_classes)
    common = dict(space=args.space, seed=args.seed, eval_images=args.eval_images, calib_images=args.calib_images, ckpt_every=10**9)
    supernets, runs = supernet_runs(args.out, {arm: getattr(args, arm) for arm in arms},
                                    steps=args.supernet_steps, **common)
    for arm, cfg in runs:  # _trained_as said no: a finished supernet there is another one, and train would refuse it mid-way
        if (meta := Path(cfg.out, "supernet.json")).is_file():
            raise SystemExit(f"error: {cfg.out} holds a finished supernet that is not this invocation's {arm} arm: "
                             f"{run_difference(json.loads(meta.read_text()), cfg)}; use another --out, or pass it as --{arm}")
    seeds = [args.seed + k for k in range(args.standalone_seeds)]
    known, truth_path = committed_truth(args, space, data.describe(),
                                        TrainConfig(subnet="subnet.json", steps=args.standalone_steps, **common))
    standalone, todo = standalone_runs(args.out, archs, seeds, data.describe(), known, steps=args.standalone_steps, **common)
    runs += todo
    from_truth = sum((a.key, s) in known for a in archs for s in seeds)
    if truth_path:
        print(f"{from_truth} stand-alone results read from {truth_path} (--no-truth trains them)", flush=True)
    print(f"{len(runs)} training runs, {args.jobs} at a time, {threads_per_job(args.jobs)} thread(s) each "
          f"({len(arms) + len(archs) * len(seeds) - len(runs) - from_truth} finished ones reused)", flush=True)
    for (name, cfg), summary in zip(runs, run_parallel(train_run, [(cfg,) for _, cfg in runs], args.jobs)):
        top1 = {k: v["test_top1"] for k, v in summary["metrics"].items()}
        print(f"  {name}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in top1.items()), flush=True)
        if (i := standalone_index(name)) is not None:
            standalone[i, cfg.seed] = top1["subnet"]

    replicas = {s: [standalone[i, s] for i in range(len(archs))] for s in seeds}
    truth = [statistics.mean(replicas[s][i] for s in seeds) for i in range(len(archs))]
    replica_tau = ([kendall_tau(replicas[a], replicas[b]) for a, b in itertools.combinations(seeds, 2)]
                   if len(seeds) > 1 else [])
    inherited, taus, taus_per_seed = {}, {}, {}
    for arm in arms:
        net, _ = load_arm(arm, supernets[arm], space)
        inherited[arm] = [evaluate(calibrated_subnet(net, a, data, args.calib_images), data.test, data, a.resolution,
                                   limit=args.eval_images) for a in archs]
        taus[arm] = kendall_tau(inherited[arm], truth)
        taus_per_seed[arm] = {str(s): kendall_tau(inherited[arm], replicas[s]) for s in seeds}

    rows = [{"subnet": i, "arch": a.key, "mflops": arch_cost(space, a, data.in_channels, data.num_classes).mflops,
             "standalone": truth[i], "standalone_per_seed": {str(s): replicas[s][i] for s in seeds},
             **{arm: inherited[arm][i] for arm in arms}} for i, a in enumerate(archs)]
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "supernets": {arm: str(p) for arm, p in supernets.items()},
              "standalone_truth": {"path": str(truth_path) if truth_path else None, "results_read": from_truth},
              "kendall_tau": taus,
              "kendall_tau_per_seed": taus_per_seed, "standalone_replica_tau": replica_tau, "paper_tau": PAPER_TAU,
              "subnets": rows, "versions": versions()}
    write_json(args.out / "scale_ranking.json", result)
    _plot(rows, taus, len(seeds), args.out / "scale_ranking.png")
    print(f"\n{len(archs)} subnets of {args.space}, int8 test top-1 ({args.eval_images or 'all'} images); "
          f"stand-alone: mean of {len(seeds)} seed(s)" + (f", then seed {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""))
    per_seed = [f"{'seed ' + str(s):>8}" for s in seeds] if len(seeds) > 1 else []
    print(f"{'#':>3} {'MFLOPs':>8} {'stand-alone':>12} {' '.join(per_seed)} " + " ".join(f"{arm:>10}" for arm in arms) + "  arch")
    for r in rows:
        seeds_text = " ".join(f"{100 * v:>7.2f}%" for v in r["standalone_per_seed"].values()) if len(seeds) > 1 else ""
        print(f"{r['subnet']:>3} {r['mflops']:>8.2f} {100 * r['standalone']:>11.2f}% {seeds_text} "
              + " ".join(f"{100 * r[arm]:>9.2f}%" for arm in arms) + f"  {r['arch']}")
    if replica_tau:
        print("Kendall tau between stand-alone seeds (the truth's own reproducibility): "
              + ", ".join(f"{t:+.3f}" for t in replica_tau))
    for arm in arms:
        per = ", ".join(f"seed {s} {t:+.3f}" for s, t in taus_per_seed[arm].items()) if len(seeds) > 1 else ""
        print(f"Kendall tau, {ARM_TEXT[arm]:21} supernet vs stand-alone: {taus[arm]:+.3f} (paper {PAPER_TAU[arm]})"
              + (f" [{per}]" if per else "") + f"; mean inherited top-1 {100 * statistics.mean(inherited[arm]):.2f}%")
    print(f"wrote {args.out / 'scale_ranking.json'} and scale_ranking.png")


def _plot(rows: list[dict], taus: dict[str, float], n_seeds: int, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for arm, marker in zip(taus, "ox^"):
        ax.plot([100 * r["standalone"] for r in rows], [100 * r[arm] for r in rows], marker, ls="none",
                label=f"{ARM_TEXT[arm]} (tau {taus[arm]:+.2f})")
    ax.set_xlabel("stand-alone int8 test top-1 (%" + (f", mean of {n_seeds} seeds)" if n_seeds > 1 else ")"))
    ax.set_ylabel("supernet-inherited int8 test top-1 (%)")
    ax.set_title("ranking: scale predictor vs shared scale vs convs-only", fontsize=10)
    ax.legend(fontsize=8)
    save_png(fig, path)


if __name__ == "__main__":
    main()
