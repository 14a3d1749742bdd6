"""Does a hybrid ranker (supernet score plus cost features) rank subnets better than the supernet
alone, on subnets it was not fitted on? (issue 31, part 3, last bullet)

Reads what `python -m benchmarks.ranking` wrote (per subnet: inherited score, MFLOPs, predicted
latency, stand-alone truth), adds each subnet's parameter count (`qnas_cli.cost.arch_cost`, the
architecture from the truth file) and compares rankers by Kendall tau against the truth **on
held-out subnets only**:
- no fitting: (a) inherited alone, (b) MFLOPs alone, (c) parameters alone, predicted latency alone,
  (f) the mean of the inherited and MFLOPs ranks;
- fitted on the truth: ridge regression on (d) [inherited, MFLOPs] and (e) [inherited, MFLOPs,
  parameters, latency], the pre-declared hybrid. Cost features enter as logs (accuracy grows
  with the log of size, decided before looking), every feature is standardised with its
  training fold's mean and deviation, and the penalty is chosen inside the training fold by its
  own leave-one-out error (closed form), never on the test subnet.
Protocol: leave-one-out (LOO) scores for every subnet, then tau of the pooled LOO scores vs truth
with a bootstrap 90% interval (`benchmarks.ranking.bootstrap_tau`) and a paired bootstrap of the
difference to the supernet alone; repeated 5-fold cross-validation (seeded splits), tau both
within each 4-subnet test fold (averaged) and pooled over the 5 folds; regret at ranking.json's
three latency budgets from the LOO scores (`benchmarks.ranking.regret`).
A fitted ranker's score is its linear part only, without the intercept: the intercept does not
order the subnets of one fold, and pooled across folds it is the training mean of the truth,
which falls as the held-out subnet's truth rises, a spurious negative correlation.
Verdict: the hybrid is adopted only if the lower end of its LOO tau interval lies above the
supernet alone's tau.

    python -m benchmarks.hybrid_ranker [--ranking runs/bench/ranking/ranking.json]
        [--out runs/bench/hybrid_ranker] [--png docs/bench/hybrid_ranker.png] [--bootstrap 2000] [--cv-repeats 200]

Seconds on one core (numpy, 20 subnets); trains and scores nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qnas_cli.checkpoint import write_json
from qnas_cli.cost import arch_cost
from qnas_cli.ranking import kendall_tau
from qnas_cli.space import Arch, load_space

from benchmarks.plots import pyplot, save_png
from benchmarks.ranking import BOOTSTRAP, bootstrap_tau, paired_tau_diff_90, regret
from benchmarks.truth import DEFAULT_TRUTH, load_truth

DEFAULT_RANKING = Path("runs/bench/ranking/ranking.json")
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)  # ridge penalties, times the training fold's size (standardised features)
COST_FEATURES = ("mflops", "params", "latency_ms")  # enter the fits as logs
FEATURES = ("inherited", *COST_FEATURES)
CV_FOLDS, CV_REPEATS = 5, 200
CANDIDATE = "ridge_all"  # the hybrid the issue asks about; the verdict is about it


@dataclass(frozen=True)
class Ranker:
    name: str
    features: tuple[str, ...]
    kind: str  # "raw": the feature itself, larger is better; "ridge": fitted; "rank_mean": mean of the features' ranks
    label: str


RANKERS = (
    Ranker("inherited", ("inherited",), "raw", "(a) supernet alone"),
    Ranker("mflops", ("mflops",), "raw", "(b) MFLOPs alone"),
    Ranker("params", ("params",), "raw", "(c) parameters alone"),
    Ranker("latency", ("latency_ms",), "raw", "    latency alone"),
    Ranker("ridge_inherited_mflops", ("inherited", "mflops"), "ridge", "(d) ridge inherited+MFLOPs"),
    Ranker("ridge_all", FEATURES, "ridge", "(e) ridge all four"),
    Ranker("rank_mean_inherited_mflops", ("inherited", "mflops"), "rank_mean", "(f) rank mean inherited+MFLOPs"),
)


# ---- inputs --------------------------------------------------------------------------------------

def load_ranking(path: Path) -> dict:
    """benchmarks.ranking's output, or one line saying how to make it."""
    if not path.is_file():
        raise SystemExit(f"error: --ranking {path}: no such file (make it: python -m benchmarks.ranking "
                         f"--supernet SUPERNET.pt --out {path.parent})")
    return json.loads(path.read_text())


def subnet_params(ranking: dict) -> list[int]:
    """Each subnet's stored parameters: ranking.json names subnets by arch key only, so their
    architectures come from the truth file it was scored against (the committed one if that path
    is gone), matched by key."""
    truth_path = Path(ranking["truth"]["path"])
    truth = load_truth(truth_path if truth_path.is_file() else DEFAULT_TRUTH)
    space = load_space(truth["space"]["name"])
    by_key = {e["arch_key"]: e["arch"] for e in truth["subnets"]}
    missing = [r["arch"] for r in ranking["subnets"] if r["arch"] not in by_key]
    if missing:
        raise SystemExit(f"error: subnet {missing[0]} of the ranking is not in truth file {truth_path}")
    data = truth["data"]
    return [arch_cost(space, Arch.from_dict(by_key[r["arch"]], space), data["in_channels"], data["num_classes"]).params
            for r in ranking["subnets"]]


def columns(ranking: dict, params: list[int] | None = None) -> dict[str, list[float]]:
    """Per-subnet columns: truth, the four features, index."""
    rows = ranking["subnets"]
    cols = {k: [float(r[k]) for r in rows] for k in ("truth", "inherited", "mflops", "latency_ms")}
    cols["params"] = [float(p) for p in (params if params is not None else subnet_params(ranking))]
    cols["index"] = [r.get("index", i) for i, r in enumerate(rows)]
    return cols


def design(cols: dict[str, list[float]], features: tuple[str, ...]) -> np.ndarray:
    """The feature matrix (subnets x features), cost features as logs."""
    return np.array([[math.log(cols[f][i]) if f in COST_FEATURES else cols[f][i] for f in features]
                     for i in range(len(cols["truth"]))], dtype=np.float64)


def mean_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``v``, ties given their mean rank."""
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=np.float64)
    for value in np.unique(v):
        tied = v == value
        r[tied] = r[tied].mean()
    return r


# ---- fitting, inside a training fold only ---------------------------------------------------------

def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training fold's mean and deviation per feature (a constant feature keeps deviation 1)."""
    mu, sd = x.mean(0), x.std(0)
    return mu, np.where(sd > 0, sd, 1.0)


def ridge(z: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge weights on standardised ``z`` and centred ``y``; ``alpha`` is per subnet (times len(y))."""
    return np.linalg.solve(z.T @ z + alpha * len(y) * np.eye(z.shape[1]), z.T @ (y - y.mean()))


def inner_loo_alpha(z: np.ndarray, y: np.ndarray, alphas: tuple[float, ...] = ALPHAS) -> float:
    """The penalty with the least leave-one-out squared error *within* the training fold (closed
    form: residual / (1 - leverage), the intercept's 1/n included), so the test subnet never
    chooses it."""
    n = len(y)
    yc = y - y.mean()
    best = None
    for alpha in alphas:
        hat = z @ np.linalg.solve(z.T @ z + alpha * n * np.eye(z.shape[1]), z.T) + 1.0 / n
        resid = yc - (hat - 1.0 / n) @ yc
        press = float(np.mean((resid / (1 - np.diag(hat))) ** 2))
        if best is None or press < best[0] - 1e-15:
            best = (press, alpha)
    return best[1]


def fold_scores(ranker: Ranker, x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                alphas: tuple[float, ...] = ALPHAS) -> tuple[np.ndarray, float | None]:
    """Scores of the ``test`` subnets by ``ranker`` fitted on ``train`` only, and the penalty used.
    ``x`` for "raw" and "rank_mean" rankers holds no truth: their scores need no fold."""
    if ranker.kind == "raw":
        return x[test, 0], None
    if ranker.kind == "rank_mean":  # ranks among all candidates: features only, as a search has them
        return np.mean([mean_ranks(x[:, j]) for j in range(x.shape[1])], axis=0)[test], None
    mu, sd = standardise(x[train])
    z = (x[train] - mu) / sd
    alpha = inner_loo_alpha(z, y[train], alphas) if len(alphas) > 1 else alphas[0]
    return ((x[test] - mu) / sd) @ ridge(z, y[train], alpha), alpha


def loo_scores(ranker: Ranker, x: np.ndarray, y: np.ndarray,
               alphas: tuple[float, ...] = ALPHAS) -> tuple[np.ndarray, list[float | None]]:
    """Every subnet's score from the ranker fitted on the other n-1, and each fold's penalty."""
    n = len(y)
    scores, chosen = np.empty(n), []
    for i in range(n):
        s, a = fold_scores(ranker, x, y, np.delete(np.arange(n), i), np.array([i]), alphas)
        scores[i] = s[0]
        chosen.append(a)
    return scores, chosen


def cv_taus(ranker: Ranker, x: np.ndarray, y: np.ndarray, folds: int = CV_FOLDS, repeats: int = CV_REPEATS,
            seed: int = 0, alphas: tuple[float, ...] = ALPHAS) -> dict:
    """Repeated k-fold tau over seeded random splits: 'within' averages tau inside each test fold
    (only one model's scores compared; 4 subnets, 6 pairs each, so coarse), 'pooled' is tau of a
    split's n held-out scores together. Mean and 5-95% range over the repeats."""
    rng = random.Random(seed)
    n = len(y)
    within, pooled = [], []
    for _ in range(repeats):
        perm = list(range(n))
        rng.shuffle(perm)
        scores, per_fold = np.empty(n), []
        for f in range(folds):
            test = np.array(sorted(perm[f::folds]))
            train = np.setdiff1d(np.arange(n), test)
            scores[test], _ = fold_scores(ranker, x, y, train, test, alphas)
            per_fold.append(kendall_tau(scores[test].tolist(), y[test].tolist()))
        within.append(float(np.mean(per_fold)))
        pooled.append(kendall_tau(scores.tolist(), y.tolist()))
    return {k: {"mean": float(np.mean(v)), "p5_p95": [float(np.percentile(v, 5)), float(np.percentile(v, 95))]}
            for k, v in (("within_fold", within), ("pooled", pooled))}


# ---- the comparison -------------------------------------------------------------------------------

def compare(cols: dict[str, list[float]], budgets: list[float], rankers=RANKERS, boot: int = BOOTSTRAP,
            repeats: int = CV_REPEATS, alphas: tuple[float, ...] = ALPHAS) -> dict:
    """Every ranker's LOO tau (with interval and paired difference to the supernet alone), in-sample
    tau (fitted on all subnets: what LOO guards against), repeated 5-fold tau and LOO regret."""
    y = np.array(cols["truth"])
    truth = cols["truth"]
    out = {}
    loo = {}
    for r in rankers:
        x = design(cols, r.features)
        scores, chosen = loo_scores(r, x, y, alphas)
        loo[r.name] = scores.tolist()
        every = np.arange(len(y))
        in_sample, _ = fold_scores(r, x, y, every, every, alphas)
        out[r.name] = {
            "label": r.label.strip(), "features": list(r.features), "kind": r.kind,
            "loo_tau": kendall_tau(loo[r.name], truth), "loo_tau_90": list(bootstrap_tau(loo[r.name], truth, n=boot)),
            "in_sample_tau": kendall_tau(in_sample.tolist(), truth),
            "cv5": cv_taus(r, x, y, repeats=repeats, alphas=alphas),
            "alphas_chosen": dict(Counter(str(a) for a in chosen)) if r.kind == "ridge" else None,
            "weights_all_subnets": _weights(r, x, y, alphas),
            "regret": {str(b): regret(truth, loo[r.name], cols["latency_ms"], b) for b in budgets},
            "loo_scores": loo[r.name],
        }
    for base in ("inherited", "mflops"):
        for r in rankers:
            if base in loo and r.name != base:
                out[r.name][f"loo_tau_minus_{base}_90"] = list(paired_tau_diff_90([(loo[r.name], loo[base], truth)], n=boot))
    return out


def _weights(ranker: Ranker, x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...]) -> dict | None:
    """A ridge ranker's standardised weights fitted on all subnets (to read which feature it leans
    on; every tau above comes from the held-out fits)."""
    if ranker.kind != "ridge":
        return None
    mu, sd = standardise(x)
    z = (x - mu) / sd
    alpha = inner_loo_alpha(z, y, alphas)
    return {"alpha": alpha, **{f: float(w) for f, w in zip(ranker.features, ridge(z, y, alpha))}}


def verdict(rankers: dict) -> tuple[bool, str]:
    """Adopt the hybrid only if its LOO interval lies wholly above the supernet alone's tau."""
    base, hyb = rankers["inherited"]["loo_tau"], rankers[CANDIDATE]
    lo, hi = hyb["loo_tau_90"]
    adopt = lo > base
    why = (f"hybrid ({hyb['label']}) LOO tau {hyb['loo_tau']:+.3f} (90% {lo:+.3f}..{hi:+.3f}) vs supernet alone "
           f"{base:+.3f}: {'ADOPT' if adopt else 'do not adopt'}")
    if not adopt:
        why += (f" (its interval starts below the supernet's tau; with {len(hyb['loo_scores'])} subnets it is "
                f"{hi - lo:.2f} wide)")
    d = hyb.get("loo_tau_minus_inherited_90")
    if d:
        why += f"; paired difference to the supernet 90% {d[0]:+.2f}..{d[1]:+.2f}"
    mf = rankers.get("mflops")
    if mf is not None:
        dm = hyb.get("loo_tau_minus_mflops_90")
        beats = "beats" if hyb["loo_tau"] > mf["loo_tau"] else "does not beat"
        why += (f"; it {beats} MFLOPs alone ({mf['loo_tau']:+.3f}"
                + (f", paired difference {dm[0]:+.2f}..{dm[1]:+.2f}" if dm else "") + ")")
    return adopt, why


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranking", type=Path, default=DEFAULT_RANKING, help="benchmarks.ranking's ranking.json")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/hybrid_ranker"))
    ap.add_argument("--png", type=Path, default=Path("docs/bench/hybrid_ranker.png"))
    ap.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="bootstrap resamples of the intervals")
    ap.add_argument("--cv-repeats", type=int, default=CV_REPEATS, help=f"random {CV_FOLDS}-fold splits")
    args = ap.parse_args()
    ranking = load_ranking(args.ranking)
    cols = columns(ranking)
    budgets = [float(b) for b in ranking.get("regret", {})]
    rankers = compare(cols, budgets, boot=args.bootstrap, repeats=args.cv_repeats)
    adopt, why = verdict(rankers)
    result = {"ranking": {"path": str(args.ranking), "supernet": ranking.get("supernet"),
                          "kendall_tau": ranking.get("kendall_tau"), "mflops_tau": ranking.get("mflops_tau")},
              "subnets": len(cols["truth"]), "features": {"columns": list(FEATURES), "log": list(COST_FEATURES),
                                                          "params": cols["params"]},
              "protocol": {"loo": "pooled leave-one-out scores (linear part, no intercept) vs truth",
                           "interval": f"bootstrap 90%, {args.bootstrap} resamples of the subnets",
                           "cv5": f"{args.cv_repeats} seeded random {CV_FOLDS}-fold splits; within_fold: mean of per-fold "
                                  f"tau; pooled: tau of the 20 held-out scores",
                           "alphas": list(ALPHAS), "alpha_choice": "inner LOO squared error in the training fold"},
              "budgets": budgets, "rankers": rankers, "candidate": CANDIDATE, "adopt": adopt, "verdict": why}
    write_json(args.out / "hybrid_ranker.json", result)
    _print_table(rankers, budgets)
    print(why)
    _plot(rankers, cols["truth"], args.png)
    print(f"wrote {args.out / 'hybrid_ranker.json'} and {args.png}")


def _print_table(rankers: dict, budgets: list[float]) -> None:
    head = (f"{'ranker':34s} {'LOO tau (90%)':>22s} {'d vs (a) 90%':>14s} {'in-sample':>9s} {'5-fold within':>19s} "
            f"{'5-fold pooled':>19s}  " + " ".join(f"{'regret@' + str(b):>10s}" for b in budgets))
    print(head)
    for r in RANKERS:
        v = rankers[r.name]
        lo, hi = v["loo_tau_90"]
        d = v.get("loo_tau_minus_inherited_90")
        cw, cp = v["cv5"]["within_fold"], v["cv5"]["pooled"]
        regrets = " ".join(f"{v['regret'][str(b)].get('regret_pp', float('nan')):9.2f}p" for b in budgets)
        print(f"{r.label:34s} {v['loo_tau']:+.3f} ({lo:+.2f}..{hi:+.2f}) "
              f"{(f'{d[0]:+.2f}..{d[1]:+.2f}' if d else '-'):>14s} {v['in_sample_tau']:+9.3f} "
              f"{cw['mean']:+.3f} ({cw['p5_p95'][0]:+.2f}..{cw['p5_p95'][1]:+.2f}) "
              f"{cp['mean']:+.3f} ({cp['p5_p95'][0]:+.2f}..{cp['p5_p95'][1]:+.2f})  {regrets}")


def _plot(rankers: dict, truth: list[float], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.2))
    for ax, r in zip(axes.flat, RANKERS):
        v = rankers[r.name]
        ax.scatter([100 * t for t in truth], v["loo_scores"], s=14)
        ax.set_title(f"{r.label.strip()}\nLOO tau {v['loo_tau']:+.2f}", fontsize=8)
        ax.set_xlabel("stand-alone top-1 (%)", fontsize=7)
        ax.set_ylabel("held-out score" + (" (log)" if r.kind == "raw" and r.features[0] in COST_FEATURES else ""), fontsize=7)
        ax.tick_params(labelsize=6)
    axes.flat[-1].axis("off")
    save_png(fig, path)


if __name__ == "__main__":
    main()
