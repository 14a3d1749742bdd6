"""`qnas search`: supernet + latency table -> the most accurate int8 subnet per latency budget.

One seeded evolution per budget (qnas_cli/search.py), all sharing one fitness cache
(qnas_cli/fitness.py). Constraints are met by prediction: latency from the table (the int8
TFLite that `qnas export` ships, on the table's runtime and device), MFLOPs and parameters from
the architecture. Writes into ``out``: ``evaluations.jsonl`` (the cache, for --resume),
``pareto.json``, ``pareto.png`` and one ``subnet_<budget>ms.json`` per budget, ready for
`qnas export`.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .calibrate import subnet_document
from .checkpoint import sha256_file, versions, write_json
from .cost import arch_cost
from .data import load_dataset
from .errors import UserError, check_count
from .fitness import Fitness
from .latency import LatencyTable, Predictor, load_table, table_statistic
from .search import PAPER, PARENT_RATIO, Generation, evolve, pareto_front
from .space import Arch, sample
from .supernet import load_supernet


@dataclass
class SearchConfig:
    supernet: str = "runs/default/supernet.pt"
    budgets_ms: list[float] = field(default_factory=list)  # one evolution per budget
    flops_m: float | None = None  # every candidate also within these
    params_k: float | None = None
    size_kb: float | None = None  # predicted int8 .tflite size (cost.Cost.tflite_kb)
    data: str | None = None  # default: the supernet's
    table: str | None = None  # default: the host table, built on first use
    runtime: str = "xnnpack"
    threads: int = 1
    population: int = PAPER["population"]
    generations: int = PAPER["generations"]
    mutate_prob: float = PAPER["mutate_prob"]
    crossover_prob: float = PAPER["crossover_prob"]
    # Measured by benchmarks/search_cost.py (README "Search: what it costs"): 250 calibration
    # images rank subnets as 500 or 2,000 do; the scored images set the ranking noise; the
    # predictor evaluates the quarter of the children it ranks highest (the share that breeds).
    screen: float = 0.25  # share of each generation's new children evaluated (predictor-ranked); 1: all
    calib_images: int = 250  # BN re-estimation per candidate
    eval_images: int | None = 2000  # search-split images per candidate (None: all)
    seed: int = 0
    out: str | None = None  # default: <supernet folder>/search
    resume: bool = False

    def __post_init__(self) -> None:
        if not self.budgets_ms:
            raise UserError("--latency-ms: give at least one budget (e.g. --latency-ms 0.5 or --latency-ms 0.3,0.6,1.0)")
        for b in self.budgets_ms:
            if not b > 0:
                raise UserError(f"--latency-ms: budgets must be positive milliseconds, got {b}")
        for name in ("flops_m", "params_k", "size_kb"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if not 0.0 < self.screen <= 1.0:
            raise UserError(f"--screen must be in (0, 1], got {self.screen}")
        for name in ("calib_images", "threads", "eval_images", "population", "generations"):
            check_count(f"--{name.replace('_', '-')}", getattr(self, name))


def run_search(cfg: SearchConfig, log: Callable[[str], None] = print,
               on_generation: Callable[[float, Generation], None] | None = None,
               on_evaluation: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """The search; returns pareto.json's content on rank 0 (None on the other torchrun ranks)."""
    from .train import leave_distributed, setup_distributed  # torchrun: each rank evaluates its share of every generation

    t_start = time.perf_counter()
    d = setup_distributed("cpu")
    net, meta = load_supernet(cfg.supernet)
    if not net.cfg.enabled:
        raise UserError(f"{cfg.supernet} is a {net.cfg.label} supernet: search needs a fully int8 one (--quant int8)")
    space = net.space
    out = Path(cfg.out) if cfg.out else Path(cfg.supernet).parent / "search"
    table, table_path = _table(cfg, net, log if d.main else (lambda m: None), d.world)
    pred = Predictor(table, space)

    def cost(a: Arch):
        return arch_cost(space, a, net.in_channels, net.num_classes)

    def within_others(a: Arch) -> bool:
        c = cost(a)
        return ((cfg.flops_m is None or c.mflops <= cfg.flops_m) and (cfg.params_k is None or c.params / 1e3 <= cfg.params_k)
                and (cfg.size_kb is None or c.tflite_kb <= cfg.size_kb))

    seeds = _check_feasible(cfg, space, pred, cost, within_others, table)
    data = load_dataset(cfg.data or meta.get("config", {}).get("data", "fashion-mnist"), load_size=max(space.resolutions))
    identity = {"supernet_sha256": meta["weights"]["sha256"], "data": data.spec, "calib_images": cfg.calib_images,
                "eval_images": cfg.eval_images}
    fitness = Fitness(net, data, identity, out / "evaluations.jsonl", cfg.resume, cfg.calib_images, cfg.eval_images,
                      rank=d.rank, world=d.world)
    if not d.main:  # the other ranks only evaluate; rank 0 reports and writes
        log, on_generation = (lambda m: None), None
    if fitness.scores:
        log(f"resuming: {len(fitness.scores)} subnets already evaluated in {out / 'evaluations.jsonl'}")
    archs: dict[str, Arch] = {}

    def scored(batch: list[Arch]) -> list[float]:
        archs.update((a.key, a) for a in batch)
        return fitness(batch, on_evaluation)

    predict_s = [0.0]  # time in constraint checks: latency prediction and FLOPs/params from shapes

    def feasible(a: Arch, budget: float) -> bool:
        t = time.perf_counter()
        ok = pred.predict(a) <= budget and within_others(a)
        predict_s[0] += time.perf_counter() - t
        return ok

    winners, history = {}, {}
    for i, budget in enumerate(sorted(cfg.budgets_ms)):
        log(f"budget {budget:g} ms: population {cfg.population}, {cfg.generations} generations")
        res = evolve(space, scored, lambda a, b=budget: feasible(a, b),
                     cfg.population, cfg.generations, cfg.mutate_prob, cfg.crossover_prob, PARENT_RATIO,
                     seed=cfg.seed + i, on_generation=(lambda g, b=budget: on_generation(b, g)) if on_generation else None,
                     seeds=tuple(seeds), screen=cfg.screen)
        winners[budget] = res.best
        history[budget] = [{"generation": g.index, "best_top1": g.best[1], "evaluated": g.evaluated,
                            "cache_hits": g.cache_hits, "predictor_tau": g.predictor_tau} for g in res.history]
    if not d.main:
        leave_distributed(d)
        return None
    # A budget's winner is the best subnet evaluated by any budget's evolution that fits it:
    # a tighter budget's winner often fits a looser one, and its score is already known.
    for budget in winners:
        fits = [a for a in archs.values() if pred.predict(a) <= budget and within_others(a)]
        winners[budget] = max(fits, key=lambda a: (fitness.scores[a.key], -pred.predict(a)))

    def figures(a: Arch) -> dict[str, float]:
        c = cost(a)
        return {"latency_ms": pred.predict(a), "search_top1": fitness.scores[a.key], "mflops": c.mflops,
                "params_k": c.params / 1e3, "tflite_kb": c.tflite_kb}

    rows = [{"arch": key, **figures(a)} for key, a in archs.items()]
    for j in pareto_front([(r["latency_ms"], r["search_top1"]) for r in rows]):
        rows[j]["pareto"] = True
    rel = lambda p: os.path.relpath(Path(p).resolve(), out.resolve())  # noqa: E731
    provenance = {"supernet": {"path": str(Path(cfg.supernet).resolve()), "sha256": meta["weights"]["sha256"]},
                  "table": {"path": str(Path(table_path).resolve()), "sha256": sha256_file(table_path),
                            "runtime": table.header["runtime"], "threads": table.header["threads"],
                            "statistic": table_statistic(table.header), "device": table.header["device"]}}
    chosen = []
    for budget, a in winners.items():
        doc = {**subnet_document(a, space, rel(cfg.supernet), meta["weights"]["sha256"]),
               "search": {"budget_ms": budget, "runtime": table.header["runtime"], "threads": table.header["threads"],
                          "latency_statistic": table_statistic(table.header), **figures(a)}}
        name = f"subnet_{budget:g}ms.json"
        write_json(out / name, doc)
        chosen.append({"budget_ms": budget, "file": name, "arch": a.key, **figures(a)})
    result = {"format": "qnas.search/1", "config": asdict(cfg), **provenance, "chosen": chosen,
              "evaluations": {"count": len(fitness.scores), "new": fitness.evaluations,
                              # children already scored (this evolution's or another budget's) or in a resumed cache
                              "cache_hits": fitness.hits + sum(g["cache_hits"] for h in history.values() for g in h)},
              "seconds": _seconds(time.perf_counter() - t_start, fitness.seconds, predict_s[0], d.world),
              "generations": {f"{b:g}": h for b, h in history.items()},
              "subnets": sorted(rows, key=lambda r: r["latency_ms"]), "versions": versions()}
    write_json(out / "pareto.json", result)
    plot_pareto(result, out / "pareto.png")
    leave_distributed(d)
    result["out"] = str(out)
    return result


def _seconds(wall: float, evaluation: dict[str, float], predict: float, world: int) -> dict[str, float]:
    """Where the search's wall time went. Evaluation seconds are summed over ranks (CPU-process
    seconds); per rank they overlap, so ``other`` counts them divided by the ranks."""
    spent = sum(evaluation.values()) / world + predict
    return {"wall": round(wall, 1), **{k: round(v, 1) for k, v in evaluation.items()}, "latency_prediction": round(predict, 2),
            "other": round(max(wall - spent, 0.0), 1), "ranks": world}


def _table(cfg: SearchConfig, net, log, world: int) -> tuple[LatencyTable, Path]:
    if cfg.table:
        return load_table(Path(cfg.table), net.space, net.in_channels, net.num_classes), Path(cfg.table)
    if world > 1:
        raise UserError("under torchrun, pass --table (build it first with `qnas latency build`): "
                        "timing a table while other processes evaluate would measure their load")
    from qnas_cli.export.latency_build import ensure_host_table  # converts and times: TensorFlow, LiteRT

    return ensure_host_table(net.space, net.in_channels, net.num_classes, cfg.runtime, cfg.threads, log=log)


def _check_feasible(cfg, space, pred: Predictor, cost, within_others, table) -> list[Arch]:
    """Exit 2 naming the fastest subnet when a budget is below anything the space can do;
    else return the fastest subnets that meet the other constraints (seeds for tight budgets)."""
    rng = random.Random(0)
    candidates = [sample(space, "smallest")] + [sample(space, "random", rng) for _ in range(2000)]
    fastest = min(candidates, key=pred.predict)
    fast_ms = pred.predict(fastest)
    ok = [a for a in candidates if within_others(a)]
    h = table.header
    where = f"on {h['runtime']}, {h['threads']} thread(s), {h['device'].get('cpu', h['device'].get('kind'))}"
    if not ok:
        c = cost(sample(space, "smallest"))
        raise UserError(f"--flops-m/--params-k/--size-kb: no subnet of space {space.name!r} fits; the smallest has "
                        f"{c.mflops:.2f} MFLOPs, {c.params / 1e3:.1f} k parameters and {c.tflite_kb:.1f} KiB as int8 TFLite")
    for budget in cfg.budgets_ms:
        if budget < fast_ms:
            c = cost(fastest)
            raise UserError(f"--latency-ms {budget:g}: no subnet of space {space.name!r} is predicted that fast {where}; "
                            f"the fastest takes about {fast_ms:.4f} ms ({fastest.key}: {c.mflops:.2f} MFLOPs, "
                            f"{c.params / 1e3:.1f} k parameters, {c.tflite_kb:.1f} KiB)")
    return sorted(ok, key=pred.predict)[:8]


def plot_pareto(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["subnets"]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([r["latency_ms"] for r in rows], [100 * r["search_top1"] for r in rows], s=8, color="0.7",
               label=f"evaluated ({len(rows)})")
    front = [r for r in rows if r.get("pareto")]
    ax.plot([r["latency_ms"] for r in front], [100 * r["search_top1"] for r in front], "o-", ms=4, label="Pareto front")
    for c in result["chosen"]:
        ax.axvline(c["budget_ms"], color="tab:red", ls=":", lw=0.8)
        ax.plot(c["latency_ms"], 100 * c["search_top1"], "*", ms=14, color="tab:red")
        ax.annotate(f"{c['budget_ms']:g} ms", (c["latency_ms"], 100 * c["search_top1"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    t = result["table"]
    ax.set(xlabel=f"predicted int8 TFLite latency (ms; {t['runtime']}, {t['threads']} thread(s))",
           ylabel="top-1 on the search split (%), calibrated int8", title="qnas search: accuracy vs latency")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
