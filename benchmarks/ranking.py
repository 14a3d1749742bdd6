"""How well a supernet ranks subnets, against the committed stand-alone truth (issue 31, part 1).

One command, one supernet, no stand-alone training: every subnet of the truth file
(benchmarks/data/standalone_small_fashion-mnist.json, subnets trained alone, two seeds) is
extracted from the supernet, BN calibrated as `qnas export` calibrates (2,000 images) and scored
with the exact int8 forward on the whole test split (its *inherited* accuracy). Then:
- Kendall tau of inherited vs truth, with a bootstrap 90% interval (subnets resampled), Spearman rho;
- the floor to beat: tau of MFLOPs alone against the same truth, with its interval;
- the truth's own yardstick: its two seeds' tau with each other;
- the mean inherited-minus-truth gap;
- **regret** at three latency budgets (the demo's, from this host's latency table): truth of the
  best truth subnet under the budget minus truth of the supernet's pick under it (highest
  inherited accuracy), and the same for the naive pick, "largest MFLOPs that fits".
- **re-scoring by fine-tune** (``--finetuned``): each budget's winner taken as the best of the
  supernet's top ``--finetune-top`` candidates after `qnas finetune` (scores from a
  ``benchmarks.finetune`` run on the same supernet, checked by sha256): its regret, and what it
  ships against the best subnet under the budget trained alone. Without it, the shortlists and
  the command that fine-tunes them are printed. A file that fine-tuned every truth subnet is also
  scored as a ranker of its own (tau, paired with the inherited scores'): is a fine-tune of that
  length worth ranking by? (150 steps: no, issue 31's fourth session.)
Inherited scores are cached in OUT keyed by what made them (supernet sha256, calibration images,
integer contract, data), so rerunning on the same supernet costs nothing and another supernet
is scored afresh.

    python -m benchmarks.ranking [--supernet runs/bench/supernet_accuracy/default/supernet.pt]
        [--truth benchmarks/data/standalone_small_fashion-mnist.json] [--table T.json] [--out runs/bench/ranking]
        [--calib-images N] [--act-ranges learned|subnet] [--finetuned FINETUNE.json [--finetune-top K]]
    python -m benchmarks.ranking --collect NAME=OUT/ranking.json ... [--control ARM]  # lever rows into LEVERS, one PNG
    python -m benchmarks.ranking --quick      # tiny: trains its own supernet and 6-subnet truth first (minutes)

``--collect`` keeps each lever's figures and per-subnet scores in a small committed file
(benchmarks/data/ranking_levers_small_fashion-mnist.json: the command, commit and the supernet's
training options with them), since runs/ does not outlive a session, and draws inherited vs
truth per lever (docs/bench/ranking_levers.png). Rows named ARM/SEED are one arm's training seeds:
``--collect`` prints how they agree with each other and, with ``--control ARM``, each arm's τ minus
the control's paired by seed. Any supernet file scores, the float one a run leaves beside its
int8 one (``float_supernet.pt``) or a ``--quant none`` run included: issue 31 found the ranking
error already there after the float phase, so a float-phase lever is screened on a float-only run
paired with the default run's own float phase: ``qnas train --quant none --steps 2800`` is the
default's float phase bit for bit (checked on `small`, seed 0: all 256 tensors equal; the
2026-12-07 screens used ``--steps 1400``, the earlier default's, paired with its ``float_supernet.pt``).

About 10-15 minutes on 2 cores for 20 `small` subnets (the calibration and 10,000 exact images
each), so twice that for the grown truth's 41.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from qnas_cli.calibrate import CALIB_IMAGES, calibrate_bn, calibrated_subnet, calibration_batches, calibration_images, evaluate
from qnas_cli.checkpoint import sha256_file, write_json
from qnas_cli.cost import arch_cost
from qnas_cli.data import load_dataset, to_input
from qnas_cli.demo import budgets_for
from qnas_cli.latency import Predictor
from qnas_cli.layers import ActQuant, init_scales
from qnas_cli.quant import INTEGER_CONTRACT_VERSION
from qnas_cli.ranking import kendall_tau
from qnas_cli.space import load_space
from qnas_cli.supernet import load_supernet
from qnas_cli.train import TrainConfig

from benchmarks.plots import pyplot, save_png
from benchmarks.truth import (DEFAULT_TRUTH, check_truth_matches, load_truth, seed_taus, truth_archs, truth_document,
                              truth_mean)

DEFAULT_SUPERNET = Path("runs/bench/supernet_accuracy/default/supernet.pt")
DEFAULT_LEVERS = Path("benchmarks/data/ranking_levers_small_fashion-mnist.json")
LEVERS_FORMAT = "qnas.ranking_levers/1"
# The training options a lever row records of its supernet (its supernet.json's config).
TRAIN_KEYS = ("steps", "float_steps", "init", "num_random", "sampling", "sampling_k", "kd_ratio", "seed", "quant")
BOOTSTRAP = 2000


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties: mean ranks)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    return statistics.correlation(ranks(x), ranks(y))


def bootstrap_tau(x: list[float], y: list[float], seed: int = 0, n: int = BOOTSTRAP) -> tuple[float, float]:
    """A 90% interval of Kendall tau by resampling the subnets with replacement (seeded)."""
    rng = random.Random(seed)
    taus = []
    for _ in range(n):
        idx = [rng.randrange(len(x)) for _ in x]
        a, b = [x[i] for i in idx], [y[i] for i in idx]
        if len(set(a)) > 1 and len(set(b)) > 1:
            taus.append(kendall_tau(a, b))
    taus.sort()
    return taus[int(0.05 * len(taus))], taus[int(0.95 * len(taus)) - 1]


def regret(truth: list[float], score: list[float], latency: list[float], budget: float) -> dict:
    """Truth of the best subnet under ``budget`` minus truth of the one ``score`` picks under it."""
    fits = [i for i, ms in enumerate(latency) if ms <= budget]
    if not fits:
        return {"fits": 0}
    best = max(fits, key=truth.__getitem__)
    pick = max(fits, key=lambda i: (score[i], -latency[i]))
    return {"fits": len(fits), "best": best, "pick": pick, "regret_pp": 100 * (truth[best] - truth[pick])}


def top_candidates(score: list[float], latency: list[float], budget: float, k: int) -> list[int]:
    """The ``k`` subnets that ``score`` ranks highest among those under ``budget`` (a search's shortlist)."""
    fits = [i for i, ms in enumerate(latency) if ms <= budget]
    return sorted(fits, key=lambda i: (-score[i], latency[i]))[:k]


def rescored_regret(truth: list[float], score: list[float], finetuned: dict[int, float], latency: list[float],
                    budget: float, k: int, choose_by: dict[int, float] | None = None) -> dict:
    """Regret when the winner under ``budget`` is the best *fine-tuned* one of ``score``'s top ``k``
    (issue 31's re-scoring by `qnas finetune`), and what it ships: the winner's fine-tuned test
    top-1 minus the stand-alone truth of the best subnet under the budget (>= 0: the user ships at
    least what training the best fitting subnet alone would give). ``choose_by``: the fine-tuned
    scores the winner is chosen by, the held-out search split's, as a user would choose; without
    them (files from before `qnas finetune` scored that split) the test scores choose, which
    favours the pick by their noise."""
    shortlist = top_candidates(score, latency, budget, k)
    if not shortlist:
        return {"fits": 0}
    best = max((i for i, ms in enumerate(latency) if ms <= budget), key=truth.__getitem__)
    by = choose_by or finetuned
    pick = max(shortlist, key=lambda i: (by[i], -latency[i]))
    return {"shortlist": shortlist, "best": best, "pick": pick, "chosen_by": "search" if choose_by else "test",
            "regret_pp": 100 * (truth[best] - truth[pick]),
            "shipped_vs_best_standalone_pp": 100 * (finetuned[pick] - truth[best])}


def finetuned_scores(path: Path, supernet_sha256: str) -> tuple[dict[int, float], dict[int, float] | None]:
    """Fine-tuned test top-1, and search-split top-1 (None where the file lacks it), by truth index,
    from a benchmarks.finetune result on this very supernet."""
    doc = json.loads(path.read_text())
    if doc.get("config", {}).get("supernet_sha256") != supernet_sha256:
        raise SystemExit(f"error: --finetuned {path}: fine-tuned from another supernet "
                         f"(sha256 {str(doc.get('config', {}).get('supernet_sha256'))[:12]}, not {supernet_sha256[:12]})")
    rows = doc.get("truth_subnets", [])
    search = {r["index"]: r["finetuned_search"] for r in rows if "finetuned_search" in r}
    return {r["index"]: r["finetuned"] for r in rows}, (search if len(search) == len(rows) else None)


ACT_RANGE_IMAGES = 500  # --act-ranges subnet: calibration images the activation steps are fitted on, one batch


def finetuned_ranking(truth: list[float], inherited: list[float], finetuned: dict[int, float],
                      choose_by: dict[int, float] | None) -> dict[str, dict]:
    """How the fine-tuned scores of every truth subnet rank the truth, on the test split and (where
    the file has it) the held-out search split a user would rank by: Kendall tau with its interval,
    and its difference from the inherited scores' tau, paired on the same resampled subnets."""
    out, inherited_tau = {}, kendall_tau(inherited, truth)
    for name, scores in (("test", finetuned), ("search", choose_by)):
        if scores is None:
            continue
        tuned = [scores[i] for i in range(len(truth))]
        tau = kendall_tau(tuned, truth)
        out[name] = {"kendall_tau": tau, "kendall_tau_90": bootstrap_tau(tuned, truth), "delta_vs_inherited": tau - inherited_tau,
                     "delta_90": paired_tau_diff_90([(tuned, inherited, truth)])}
    return out


@torch.no_grad()
def refit_act_ranges(sub, data, resolution: int, calib_images: int) -> None:
    """BatchQuant's point as a calibration lever (issue 31, part 3): the supernet's learned
    activation steps are shared by every subnet, so refit each of this subnet's (a copy: the
    supernet is untouched) to the MSE-optimal step of its own activations on ``ACT_RANGE_IMAGES``
    seeded calibration images in one batch (layer by layer, each seeing the quantized output
    of the one before, as at initialisation), then calibrate BN again on the new grid. Only
    the steps change, so the subnet stays inside the integer contract (export folds them as
    any). A benchmark lever: the fit sums floats, so it is not yet thread-count exact."""
    x = torch.cat(list(calibration_images(data, min(ACT_RANGE_IMAGES, calib_images))))
    sub.eval()
    with init_scales(sub, ActQuant):
        sub(to_input(x, data, resolution))
    calibrate_bn(sub, calibration_batches(data, resolution, calib_images))  # leaves it in eval mode, as it found it


def inherited_scores(supernet: Path, archs, data, calib_images: int, cache: Path, log=print,
                     act_ranges: str = "learned") -> list[float]:
    """Each subnet's inherited exact int8 top-1 on the whole test split, cached by what made it."""
    identity = {"supernet_sha256": sha256_file(supernet), "calib_images": calib_images, "data": data.describe(),
                "integer_contract": INTEGER_CONTRACT_VERSION, "eval": "test split, all images, exact xnnpack"}
    if act_ranges != "learned":
        identity["act_ranges"] = {"how": act_ranges, "images": ACT_RANGE_IMAGES}
    done = {}
    if cache.is_file():
        doc = json.loads(cache.read_text())
        if doc.get("identity") == identity:
            done = doc["scores"]
        else:
            log(f"{cache}: made from other inputs; scoring afresh")
    net, _ = load_supernet(supernet)
    for i, arch in enumerate(archs):
        if arch.key not in done:
            sub = calibrated_subnet(net, arch, data, calib_images)
            if act_ranges == "subnet":
                refit_act_ranges(sub, data, arch.resolution, calib_images)
            done[arch.key] = evaluate(sub, data.test, data, arch.resolution)
            write_json(cache, {"identity": identity, "scores": done})
            log(f"  subnet {i:2d}: inherited {100 * done[arch.key]:.2f}%")
    return [done[a.key] for a in archs]


FINETUNE_TOP = 3  # re-scoring by fine-tune: candidates per budget
QUICK = {"space": "tiny", "subnets": 6, "supernet_steps": 40, "standalone_steps": 30, "calib_images": 128}


def quick_inputs(out: Path, jobs: int) -> tuple[Path, Path]:
    """--quick: a `tiny` supernet and a truth of QUICK["subnets"] subnets (MFLOPs spread, two seeds,
    short runs) trained here into ``out``, reused by a rerun where they are the same runs: the
    harness end to end in minutes, without the committed `small` truth."""
    from benchmarks.parallel import run_parallel
    from benchmarks.scale_ranking import _trained_as, spread_subnets, standalone_index, standalone_runs, train_run

    space = load_space(QUICK["space"])
    data = load_dataset("fashion-mnist", load_size=max(space.resolutions))
    common = dict(space=space.name, eval_images=None, calib_images=QUICK["calib_images"], ckpt_every=10**9)
    supernet_cfg = TrainConfig(out=str(out / "supernet"), steps=QUICK["supernet_steps"], **common)
    archs = spread_subnets(space, QUICK["subnets"], 0, data.in_channels, data.num_classes)
    seeds = [0, 1]
    done, runs = standalone_runs(out, archs, seeds, data.describe(), steps=QUICK["standalone_steps"], **common)
    if not _trained_as(out / "supernet" / "supernet.pt", supernet_cfg):
        runs.append(("supernet", supernet_cfg))
    print(f"--quick: {len(runs)} training runs in {out} ({jobs} at a time)", flush=True)
    for (name, cfg), summary in zip(runs, run_parallel(train_run, [(cfg,) for _, cfg in runs], jobs)):
        if (i := standalone_index(name)) is not None:
            done[i, cfg.seed] = summary["metrics"]["subnet"]["test_top1"]
    subnets = [{"index": i, "arch": a.to_dict(space), "arch_key": a.key,
                "mflops": arch_cost(space, a, data.in_channels, data.num_classes).mflops, "steps": QUICK["standalone_steps"],
                "top1": {str(s): done[i, s] for s in seeds}} for i, a in enumerate(archs)]
    truth = truth_document(space, data.describe(), TrainConfig(subnet="subnet.json", steps=QUICK["standalone_steps"], **common),
                           seeds, subnets, description="--quick: a tiny truth trained by benchmarks.ranking --quick",
                           command="python -m benchmarks.ranking --quick", commit=_commit(),
                           integer_contract_version=INTEGER_CONTRACT_VERSION)
    write_json(out / "truth.json", truth)
    return out / "supernet" / "supernet.pt", out / "truth.json"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--supernet", type=Path, default=DEFAULT_SUPERNET)
    ap.add_argument("--truth", type=Path, default=DEFAULT_TRUTH)
    ap.add_argument("--table", type=Path, default=None, help="latency table (default: this host's, built on first use)")
    ap.add_argument("--calib-images", type=int, default=CALIB_IMAGES)
    ap.add_argument("--act-ranges", choices=("learned", "subnet"), default="learned",
                    help="subnet: refit each subnet's activation steps to its own calibration activations (BatchQuant's point)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/ranking"))
    ap.add_argument("--collect", nargs="+", metavar="NAME=RANKING_JSON", default=None,
                    help="only add these runs' ranking.json as lever rows to --levers and redraw --png")
    ap.add_argument("--control", default=None, metavar="ARM",
                    help="--collect: print each arm's Kendall tau minus this arm's, paired by training seed (rows ARM/sK)")
    ap.add_argument("--levers", type=Path, default=DEFAULT_LEVERS)
    ap.add_argument("--png", type=Path, default=Path("docs/bench/ranking_levers.png"))
    ap.add_argument("--finetune-top", type=int, default=FINETUNE_TOP,
                    help="re-scoring by fine-tune: each budget's winner is the best fine-tuned of the supernet's top K")
    ap.add_argument("--finetuned", type=Path, default=None,
                    help="a benchmarks.finetune finetune.json on this supernet holding those K per budget (else: the "
                         "command that makes it is printed)")
    ap.add_argument("--quick", action="store_true",
                    help=f"train a {QUICK['space']} supernet and a {QUICK['subnets']}-subnet truth in --out first and score "
                         "those (minutes: the harness end to end; default --out runs/bench-quick/ranking)")
    ap.add_argument("--jobs", type=int, default=2, help="--quick: training runs at a time")
    args = ap.parse_args()
    if args.collect:
        collect(args.collect, args.levers, args.png, args.control)
        return
    if args.finetune_top < 1:
        ap.error(f"--finetune-top must be >= 1, got {args.finetune_top}")
    if args.finetuned and not args.finetuned.is_file():
        ap.error(f"--finetuned {args.finetuned}: no such file (the command that makes it is printed without --finetuned)")
    if args.quick:
        if args.out == ap.get_default("out"):
            args.out = Path("runs/bench-quick/ranking")
        args.calib_images = min(args.calib_images, QUICK["calib_images"])
        args.supernet, args.truth = quick_inputs(args.out, args.jobs)
    if not args.supernet.is_file():
        raise SystemExit(f"error: --supernet {args.supernet}: no such file (train it: qnas train --out {args.supernet.parent})")
    from qnas_cli.export.latency_build import resolve_table

    truth_doc = load_truth(args.truth)
    net, meta = load_supernet(args.supernet)
    data = load_dataset(meta["data"]["spec"] if "data" in meta else "fashion-mnist")
    # the supernet is compared with the truth whatever its own recipe: only space and data must match
    check_truth_matches(truth_doc, net.space, data.describe(), truth_doc["recipe"])
    archs = truth_archs(truth_doc)
    truth = [truth_mean(e) for e in truth_doc["subnets"]]
    table, table_path = resolve_table(args.table, net.space, data.in_channels, data.num_classes)
    pred = Predictor(table, net.space)
    latency = [pred.predict(a) for a in archs]
    mflops = [arch_cost(net.space, a, data.in_channels, data.num_classes).mflops for a in archs]
    print(f"scoring {len(archs)} truth subnets inherited from {args.supernet}")
    inherited = inherited_scores(args.supernet, archs, data, args.calib_images, args.out / "inherited.json",
                                 act_ranges=args.act_ranges)

    budgets = budgets_for(pred, net.space)
    result = {
        "command": "python -m benchmarks.ranking " + " ".join(sys.argv[1:]),
        "commit": _commit(),
        "supernet": {"path": str(args.supernet), "sha256": sha256_file(args.supernet),
                     "training": {k: meta.get("config", {}).get(k) for k in TRAIN_KEYS}},
        "truth": {"path": str(args.truth), "subnets": len(archs), "seed_tau": seed_taus(truth_doc)},
        "table": str(table_path), "calib_images": args.calib_images, "act_ranges": args.act_ranges,
        "kendall_tau": kendall_tau(inherited, truth), "kendall_tau_90": bootstrap_tau(inherited, truth),
        "spearman_rho": spearman(inherited, truth),
        "mflops_tau": kendall_tau(mflops, truth), "mflops_tau_90": bootstrap_tau(mflops, truth),
        "mean_gap_pp": 100 * statistics.mean(i - t for i, t in zip(inherited, truth)),
        "regret": {str(b): {"supernet": regret(truth, inherited, latency, b), "largest_mflops": regret(truth, mflops, latency, b)}
                   for b in budgets},
        "subnets": [{"index": e["index"], "arch": a.key, "mean_kernel": mean_kernel(a), "mflops": m, "latency_ms": ms,
                     "truth": t, "inherited": i}
                    for e, a, m, ms, t, i in zip(truth_doc["subnets"], archs, mflops, latency, truth, inherited)],
    }
    result["kernel_bias"] = kernel_bias(result["subnets"])
    result["choice_worth"] = {"alone": choice_worth(archs, truth), "inherited": choice_worth(archs, inherited)}
    needed = sorted({i for b in budgets for i in top_candidates(inherited, latency, b, args.finetune_top)})
    finetuned, choose_by = finetuned_scores(args.finetuned, result["supernet"]["sha256"]) if args.finetuned else ({}, None)
    missing = [i for i in needed if i not in finetuned]
    if args.finetuned and missing:
        raise SystemExit(f"error: --finetuned {args.finetuned} lacks subnets {','.join(map(str, missing))} of the shortlists")
    if finetuned:
        for b in budgets:
            result["regret"][str(b)][f"finetuned_top{args.finetune_top}"] = rescored_regret(
                truth, inherited, finetuned, latency, b, args.finetune_top, choose_by)
        result["finetuned"] = {"path": str(args.finetuned), "top": args.finetune_top, "subnets": len(finetuned)}
        if len(finetuned) == len(archs):  # every truth subnet fine-tuned: the fine-tune as a ranker of its own
            result["finetuned"]["ranking"] = finetuned_ranking(truth, inherited, finetuned, choose_by)
    spread = [i for i, e in enumerate(truth_doc["subnets"]) if "addition" not in e]
    if len(spread) < len(archs):  # the earlier rows were scored on the MFLOPs spread alone: comparable figures
        pick = lambda v: [v[i] for i in spread]  # noqa: E731
        result["spread"] = {"subnets": len(spread), "kendall_tau": kendall_tau(pick(inherited), pick(truth)),
                            "kendall_tau_90": bootstrap_tau(pick(inherited), pick(truth)),
                            "mflops_tau": kendall_tau(pick(mflops), pick(truth))}
    write_json(args.out / "ranking.json", result)
    lo, hi = result["kendall_tau_90"]
    mlo, mhi = result["mflops_tau_90"]
    print(f"Kendall tau {result['kendall_tau']:+.3f} (90% {lo:+.2f}..{hi:+.2f}), Spearman {result['spearman_rho']:+.3f}; "
          f"MFLOPs alone {result['mflops_tau']:+.3f} ({mlo:+.2f}..{mhi:+.2f}); truth seeds agree at "
          f"{list(result['truth']['seed_tau'].values())[0]:+.3f}; mean gap {result['mean_gap_pp']:+.2f} pp; "
          f"the error follows the mean kernel size at {result['kernel_bias']:+.2f}")
    if all(result["choice_worth"].values()):
        print("  what a choice is worth, pp per standard deviation, alone / inherited: " + worth_line(result["choice_worth"]))
    if "spread" in result:
        sp = result["spread"]
        print(f"  on the {sp['subnets']} subnets of the MFLOPs spread alone: tau {sp['kendall_tau']:+.3f} "
              f"({sp['kendall_tau_90'][0]:+.2f}..{sp['kendall_tau_90'][1]:+.2f}), MFLOPs {sp['mflops_tau']:+.3f}")
    for b, r in result["regret"].items():
        s, n = r["supernet"], r["largest_mflops"]
        print(f"  budget {b} ms: {s.get('fits', 0)} subnets fit; regret supernet {s.get('regret_pp', float('nan')):.2f} pp, "
              f"largest-that-fits {n.get('regret_pp', float('nan')):.2f} pp")
    for b, r in result["regret"].items():
        if (f := r.get(f"finetuned_top{args.finetune_top}", {})).get("shortlist"):
            print(f"  budget {b} ms, winner by fine-tune of the top {args.finetune_top} (chosen on the {f['chosen_by']} split): "
                  f"regret {f['regret_pp']:.2f} pp; "
                  f"ships {f['shipped_vs_best_standalone_pp']:+.2f} pp vs the best subnet under it trained alone")
    if (fr := result.get("finetuned", {}).get("ranking")):
        for name, r in fr.items():
            print(f"  ranked by fine-tuned top-1 on the {name} split: tau {r['kendall_tau']:+.3f} "
                  f"({r['kendall_tau_90'][0]:+.2f}..{r['kendall_tau_90'][1]:+.2f}), paired vs inherited "
                  f"{r['delta_vs_inherited']:+.3f} ({r['delta_90'][0]:+.2f}..{r['delta_90'][1]:+.2f})")
    if not args.finetuned:
        print(f"  re-scoring by fine-tune needs subnets {','.join(map(str, needed))}: python -m benchmarks.finetune "
              f"--supernet {args.supernet} --indices {','.join(map(str, needed))} --no-search --no-curves, then --finetuned")
    _plot(result, args.out / "ranking.png")
    print(f"wrote {args.out / 'ranking.json'} and ranking.png")


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    rows = result["subnets"]
    ax.scatter([100 * r["truth"] for r in rows], [100 * r["inherited"] for r in rows], c=[r["mflops"] for r in rows], cmap="viridis")
    for r in rows:
        ax.annotate(str(r["index"]), (100 * r["truth"], 100 * r["inherited"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("stand-alone int8 test top-1 (%), mean of 2 seeds")
    ax.set_ylabel("inherited int8 test top-1 (%)")
    ax.set_title(f"tau {result['kendall_tau']:+.2f} (MFLOPs alone {result['mflops_tau']:+.2f})")
    save_png(fig, path)


def collect(named: list[str], levers: Path, png: Path, control: str | None = None) -> None:
    """Add ``NAME=ranking.json`` results as lever rows to ``levers`` (a row of the same name is
    replaced) and draw every row's inherited vs truth, one panel each, to ``png``; with ``control``
    (an arm with ARM/SEED rows), print every arm's paired Δτ against it."""
    doc = json.loads(levers.read_text()) if levers.is_file() else {"format": LEVERS_FORMAT, "levers": {}}
    if doc.get("format") != LEVERS_FORMAT:
        raise SystemExit(f"error: {levers}: not a {LEVERS_FORMAT} file")
    for item in named:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"error: --collect {item!r}: expected NAME=PATH to a ranking.json")
        r = json.loads(Path(path).read_text())
        keep = ("command", "commit", "supernet", "truth", "calib_images", "act_ranges", "kendall_tau", "kendall_tau_90",
                "spearman_rho", "mflops_tau", "mflops_tau_90", "mean_gap_pp", "kernel_bias", "regret", "spread", "finetuned")
        doc["levers"][name] = {**{k: r.get(k) for k in keep},
                               "subnets": [{k: s[k] for k in ("index", "truth", "inherited", "mflops", "mean_kernel") if k in s}
                                           for s in r["subnets"]]}
    archs = dict(enumerate(truth_archs(load_truth(DEFAULT_TRUTH))))  # the rows' subnets are the truth's, by index
    for r in doc["levers"].values():
        pick = [archs.get(s["index"]) for s in r["subnets"]]
        worth = {k: choice_worth(pick, [s[key] for s in r["subnets"]]) if None not in pick else None
                 for k, key in (("alone", "truth"), ("inherited", "inherited"))}
        r["choice_worth"] = worth if all(worth.values()) else None
    write_json(levers, doc)
    _plot_levers(doc["levers"], png)
    for name, r in doc["levers"].items():
        lo, hi = r["kendall_tau_90"]
        print(f"{name:28s} tau {r['kendall_tau']:+.3f} ({lo:+.2f}..{hi:+.2f})  MFLOPs {r['mflops_tau']:+.3f}  "
              f"gap {r['mean_gap_pp']:+.2f} pp  ({len(r['subnets'])} subnets)"
              + (f"  error~kernel {r['kernel_bias']:+.2f}" if r.get("kernel_bias") is not None else "")
              + (f"\n{'':28s} worth alone / inherited: {worth_line(r['choice_worth'])}" if r.get("choice_worth") else ""))
    for arm, taus in arm_taus(doc["levers"]).items():
        print(f"{arm + ' (mean of seeds)':28s} tau {statistics.mean(taus):+.3f} (seeds {' '.join(f'{t:+.3f}' for t in taus)})")
    for arm, a in seed_agreement(doc["levers"]).items():
        print(f"{arm + ' (seeds vs each other)':28s} inherited tau {a['inherited_tau']:+.3f}, "
              f"errors vs truth correlate {a['residual_corr']:+.2f}")
    for arm in dict.fromkeys(split[0] for name in doc["levers"] if (split := arm_and_seed(name))) if control else ():
        if arm != control and (p := paired_delta(doc["levers"], arm, control)):
            lo, hi = p["interval"]
            seeds = f"{p['seeds']} seed{'s' * (p['seeds'] > 1)}"
            print(f"{arm + ' - ' + control:28s} paired delta tau {p['delta']:+.3f} (90% {lo:+.2f}..{hi:+.2f}, {seeds})")
    print(f"wrote {levers} and {png}")


def mean_kernel(arch) -> float:
    """The mean depthwise kernel size over a subnet's blocks."""
    return statistics.mean(b.kernel for stage in arch.stages for b in stage.blocks)


CHOICES = {  # a subnet's mean choice per dimension of the space
    "resolution": lambda a: a.resolution,
    "depth": lambda a: sum(len(stage.blocks) for stage in a.stages),
    "expand": lambda a: statistics.mean(b.expand for stage in a.stages for b in stage.blocks),
    "kernel": mean_kernel,
    "width": lambda a: statistics.mean(stage.width for stage in a.stages),
}


def choice_worth(archs, accuracy: list[float]) -> dict[str, float] | None:
    """What each dimension of the space is worth to ``accuracy``: the least-squares slopes, in pp
    per standard deviation of the subnets' mean choice, of all dimensions fitted together (so a
    choice's worth is measured at equal others). Fitted to the truth it says what a choice buys a
    subnet trained alone; to the inherited scores, what the supernet pays for it: issue 31 found
    the two differ per dimension (kernels and widths overpaid, expands underpaid), not by size
    alone. None with fewer than three subnets per fitted value, or a dimension that never varies."""
    x = np.array([[f(a) for f in CHOICES.values()] for a in archs], dtype=float)
    if len(archs) < 3 * (len(CHOICES) + 1) or (x.std(0) == 0).any():
        return None
    z = np.column_stack([(x - x.mean(0)) / x.std(0), np.ones(len(archs))])
    slopes = np.linalg.lstsq(z, 100 * np.asarray(accuracy, dtype=float), rcond=None)[0][:-1]
    return {name: float(v) for name, v in zip(CHOICES, slopes)}


def worth_line(worth: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{name} {worth['alone'][name]:+.2f} / {worth['inherited'][name]:+.2f}" for name in CHOICES)


def kernel_bias(subnets: list[dict]) -> float | None:
    """How the supernet's error (inherited minus truth) follows the subnets' mean depthwise kernel
    size: the correlation over the scored subnets (None for rows scored before it was recorded).
    Issue 31 found the default supernet overrates large kernels (about +0.4): a lever that removes
    the cause should bring it near 0."""
    if any("mean_kernel" not in s for s in subnets):
        return None
    return float(np.corrcoef([s["inherited"] - s["truth"] for s in subnets], [s["mean_kernel"] for s in subnets])[0, 1])


def arm_and_seed(name: str) -> tuple[str, str] | None:
    """A lever row's name ``ARM/SEED`` (e.g. ``default-41/s0``) as (ARM, SEED); None for a row of
    one run."""
    arm, sep, seed = name.rpartition("/")
    return (arm, seed) if sep else None


def arm_seeds(levers: dict) -> dict[str, list[dict]]:
    """The lever rows of each arm that has several training seeds: rows named ARM/SEED scored on
    as many truth subnets are one arm's seeds."""
    arms: dict[tuple[str, int], list[dict]] = {}
    for name, r in levers.items():
        if split := arm_and_seed(name):
            arms.setdefault((split[0], len(r["subnets"])), []).append(r)
    return {arm: rows for (arm, _), rows in arms.items() if len(rows) > 1}


def arm_taus(levers: dict) -> dict[str, list[float]]:
    """Kendall tau per training seed of each arm that has several (``arm_seeds``)."""
    return {arm: [r["kendall_tau"] for r in rows] for arm, rows in arm_seeds(levers).items()}


def _by_seed(levers: dict, arm: str) -> dict[str, dict]:
    """An arm's rows ``ARM/SEED``, by SEED."""
    return {split[1]: r for name, r in levers.items() if (split := arm_and_seed(name)) and split[0] == arm}


def paired_delta(levers: dict, arm: str, control: str, seed: int = 0, n: int = BOOTSTRAP) -> dict | None:
    """An arm's Kendall tau minus the control's, paired by training seed (rows ``ARM/sK`` and
    ``CONTROL/sK`` on the same truth subnets), averaged over the seeds both have, with a 90% interval
    from resampling the subnets (one resample shared by every seed and both arms). The interval
    holds the truth's sampling error, not training-seed variance. None where no seed pairs."""
    rows, ctrl = _by_seed(levers, arm), _by_seed(levers, control)
    pairs = [(rows[k]["subnets"], ctrl[k]["subnets"]) for k in sorted(rows.keys() & ctrl.keys())
             if [s["index"] for s in rows[k]["subnets"]] == [s["index"] for s in ctrl[k]["subnets"]]]
    if not pairs:
        return None

    scores = [([s["inherited"] for s in a], [s["inherited"] for s in c], [s["truth"] for s in a]) for a, c in pairs]
    delta = statistics.mean(kendall_tau(a, t) - kendall_tau(c, t) for a, c, t in scores)
    return {"delta": delta, "interval": paired_tau_diff_90(scores, seed, n), "seeds": len(pairs)}


def paired_tau_diff_90(pairs: list[tuple[list[float], list[float], list[float]]], seed: int = 0,
                       n: int = BOOTSTRAP) -> tuple[float, float]:
    """90% interval of the mean over ``pairs`` (a, b, truth) of tau(a, truth) - tau(b, truth), the
    same subnets resampled for every pair (seeded; resamples with a constant truth skipped): the
    question 'does a beat b', which two separate intervals answer only loosely."""
    m = len(pairs[0][2])
    rng = random.Random(seed)
    diffs = []
    for _ in range(n):
        idx = [rng.randrange(m) for _ in range(m)]
        resampled = [([a[i] for i in idx], [b[i] for i in idx], [t[i] for i in idx]) for a, b, t in pairs]
        if all(len(set(t)) > 1 for _, _, t in resampled):
            diffs.append(statistics.mean(kendall_tau(a, t) - kendall_tau(b, t) for a, b, t in resampled))
    diffs.sort()
    return diffs[int(0.05 * len(diffs))], diffs[int(0.95 * len(diffs)) - 1]


def seed_agreement(levers: dict) -> dict[str, dict[str, float]]:
    """For each arm with two or more seeds (``arm_seeds``): how its training seeds agree with each
    other. ``inherited_tau``: Kendall tau between two seeds' inherited scores (mean over pairs);
    ``residual_corr``: the correlation of their errors (inherited minus truth). An error that two
    seeds share is the recipe's, not training noise: more seeds, or averaging them, cannot remove it."""
    out = {}
    for arm, rows in arm_seeds(levers).items():
        taus, corrs = [], []
        for a, b in itertools.combinations([r["subnets"] for r in rows], 2):
            taus.append(kendall_tau([s["inherited"] for s in a], [s["inherited"] for s in b]))
            corrs.append(float(np.corrcoef([s["inherited"] - s["truth"] for s in a],
                                           [s["inherited"] - s["truth"] for s in b])[0, 1]))
        out[arm] = {"inherited_tau": statistics.mean(taus), "residual_corr": statistics.mean(corrs)}
    return out


def _plot_levers(levers: dict, path: Path) -> None:
    plt = pyplot()
    cols = min(4, len(levers))  # 4 across: the file stays under a megabyte at 30 rows
    rows_n = -(-len(levers) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.3 * rows_n), squeeze=False)
    for ax, (name, r) in zip(axes.flat, levers.items()):
        rows = r["subnets"]
        ax.scatter([100 * s["truth"] for s in rows], [100 * s["inherited"] for s in rows], c=[s["mflops"] for s in rows],
                   cmap="viridis", s=18)
        lo, hi = r["kendall_tau_90"]
        ax.set_title(f"{name}\ntau {r['kendall_tau']:+.2f} ({lo:+.2f}..{hi:+.2f}), MFLOPs {r['mflops_tau']:+.2f}", fontsize=9)
        ax.set_xlabel("stand-alone top-1 (%)", fontsize=8)
        ax.set_ylabel("inherited top-1 (%)", fontsize=8)
    for ax in list(axes.flat)[len(levers):]:
        ax.axis("off")
    save_png(fig, path)


if __name__ == "__main__":
    main()
