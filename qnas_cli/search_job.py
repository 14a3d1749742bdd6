"""`qnas search`: supernet + latency table -> the most accurate int8 subnet per latency budget.

One seeded evolution per budget (qnas_cli/search.py), all sharing one fitness cache
(qnas_cli/fitness.py). Constraints are met by prediction: latency from the table (the int8
TFLite that `qnas export` ships, on the table's runtime and device), MFLOPs and parameters from
the architecture. Writes into ``out``: ``evaluations.jsonl`` (the cache, for --resume),
``pareto.json``, ``pareto.png`` and one ``subnet_<budget>ms.json`` per budget, ready for
`qnas export`. A last stage (qnas_cli/rescore.py, ``rescores.jsonl``) re-scores each budget's
best candidates on more images before its winner is chosen.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .calibrate import calibration_data_spec, check_data_fits, subnet_document
from .checkpoint import sha256_file, versions, write_json
from .cost import arch_cost
from .data import Dataset, load_dataset
from .errors import UserError, check_count, choice_error
from .event_log import EventLog, NoEventLog, open_event_log
from .fitness import Fitness, cache_identity, fitness_arithmetic
from .lineage import check_searchable
from .rescore import DEFAULT_TOP, RESCORE_FILE, RULE, best_rescored, check_top, rescore_identity, shortlist
from .latency import RUNTIMES, LatencyTable, Predictor, table_statistic
from .search import PAPER, PARENT_RATIO, Generation, check_settings, evolve, pareto_front
from .space import Arch, SearchSpace, sample
from .supernet import Supernet, load_supernet

# Seeding a budget's first population: only where random sampling rarely meets the budget.
# Seeds take the place of random subnets, and the fastest are the weakest: under a loose budget
# they would spend the first generation on the least accurate subnets.
CANDIDATES = 2000  # seeded random subnets drawn to check the budgets and to find seeds
SEED_BELOW = 0.05  # seed a budget when fewer than this share of them meet it (evolve redraws a subnet up to 200 times)
MAX_SEEDS = 8


@dataclass
class SearchConfig:
    supernet: str = "runs/default/supernet.pt"
    budgets_ms: list[float] = field(default_factory=list)  # one evolution per budget
    flops_m: float | None = None  # every candidate also within these
    params_k: float | None = None
    size_kb: float | None = None  # predicted int8 .tflite size (cost.Cost.tflite_kb)
    data: str | None = None  # default: the supernet's
    table: str | None = None  # default: the host table, built on first use (resolved by the caller: resolve_table)
    # The target runtime: its exact integer forward scores fitness (fitness_arithmetic: builtin has
    # none and is scored with XNNPACK's). Latency comes from the table, timed on table_runtime.
    runtime: str = "xnnpack"
    # Only xnnpack and builtin are timed (latency.RUNTIMES); None: the runtime's own table where it
    # is timed, else XNNPACK's (reference and micro do not run on a phone CPU).
    table_runtime: str | None = None
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
    # The last stage (rescore.py): each budget's top K distinct candidates by fitness re-scored with
    # export's calibration on the whole search split; the winner is the best re-scored. 0: off.
    rescore_top: int = DEFAULT_TOP
    seed: int = 0
    out: str | None = None  # default: <supernet folder>/search
    resume: bool = False
    tensorboard: bool = True  # TensorBoard events in out (rank 0): per budget per generation, and the Pareto front

    def __post_init__(self) -> None:
        """Every option checked before a search does any work or writes anything."""
        if not self.budgets_ms:
            raise UserError("--latency-ms: give at least one budget (e.g. --latency-ms 0.5 or --latency-ms 0.3,0.6,1.0)")
        for b in self.budgets_ms:
            if not 0 < b < math.inf:
                raise UserError(f"--latency-ms: budgets must be positive, finite milliseconds, got {b}")
        for name in ("flops_m", "params_k", "size_kb"):
            v = getattr(self, name)
            if v is not None and not 0 < v < math.inf:
                raise UserError(f"--{name.replace('_', '-')} must be positive and finite, got {v}")
        fitness_arithmetic(self.runtime)  # refuses a runtime outside SEARCH_RUNTIMES
        if self.table_runtime is not None and self.table_runtime not in RUNTIMES:
            raise choice_error("--table-runtime", self.table_runtime, RUNTIMES)
        for name in ("calib_images", "threads", "eval_images"):
            check_count(f"--{name.replace('_', '-')}", getattr(self, name))
        check_settings(self.population, self.generations, self.mutate_prob, self.crossover_prob, self.screen)
        check_top(self.rescore_top)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer (as qnas train's), got {self.seed}")
        for p in (self.out_dir, *self.out_dir.parents):  # the nearest existing one must be a folder
            if p.exists():
                if not p.is_dir():
                    raise UserError(f"--out {self.out_dir}: {p} is a file, not a folder; choose another --out")
                break
        if self.resume and not (self.out_dir / "evaluations.jsonl").is_file():
            raise UserError(f"--resume: {self.out_dir} holds no earlier search (no evaluations.jsonl); "
                            "leave out --resume to start one")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.supernet).parent / "search"

    @property
    def timed_runtime(self) -> str:
        """The runtime of the default host table (latency); ``runtime`` is the arithmetic (accuracy)."""
        return self.table_runtime or (self.runtime if self.runtime in RUNTIMES else "xnnpack")


@dataclass
class SearchSetup:
    """What a search reads before it does any work, checked: the int8 supernet and the data it fits."""

    net: Supernet
    meta: dict[str, Any]
    data_spec: str
    data: Dataset


def prepare_search(cfg: SearchConfig) -> SearchSetup:
    """Load and check the supernet and the data (before a latency table is built or anything written)."""
    net, meta = load_supernet(cfg.supernet)
    check_searchable(meta, cfg.supernet)
    if not net.cfg.enabled:
        raise UserError(f"{cfg.supernet} is a {net.cfg.label} supernet: search needs a fully int8 one (--quant int8)")
    spec = calibration_data_spec(cfg.data, meta)
    data = load_dataset(spec, load_size=max(net.space.resolutions))
    check_data_fits(data, net.in_channels, net.num_classes)
    return SearchSetup(net, meta, spec, data)


def random_candidates(space: SearchSpace) -> list[Arch]:
    """The smallest subnet and ``CANDIDATES`` seeded random ones: what the budgets are checked on."""
    rng = random.Random(0)
    return [sample(space, "smallest")] + [sample(space, "random", rng) for _ in range(CANDIDATES)]


def budget_seeds(candidates: list[Arch], fits: Callable[[Arch], bool]) -> tuple[Arch, ...]:
    """A budget's seeds for ``evolve``: none when random sampling meets it often enough (the first
    population is then random, as the paper's), else up to ``MAX_SEEDS`` distinct ``candidates``
    that meet it (``fits``), in draw order: the feasible subnets random sampling rarely finds.
    Benchmarks give the same seeds to every arm they compare."""
    ok = [a for a in candidates if fits(a)]
    if len(ok) >= SEED_BELOW * len(candidates):
        return ()
    return tuple({a.key: a for a in ok}.values())[:MAX_SEEDS]


def run_search(cfg: SearchConfig, log: Callable[[str], None] = print,
               on_generation: Callable[[float, Generation], None] | None = None,
               on_evaluation: Callable[[], None] | None = None, *,
               table: tuple[LatencyTable, Path] | None = None, setup: SearchSetup | None = None) -> dict[str, Any] | None:
    """The search; returns pareto.json's content on rank 0 (None on the other torchrun ranks).

    ``table``: the latency table and its file, from ``qnas_cli.export.latency_build.resolve_table``
    (``cfg.table`` or the host's for ``cfg.timed_runtime``): building one converts and times, which
    the model core does not. ``setup``: ``prepare_search(cfg)`` when the caller has it already."""
    from .train import leave_distributed, setup_distributed  # torchrun: each rank evaluates its share of every generation

    t_start = time.perf_counter()
    setup = setup or prepare_search(cfg)
    if table is None:
        raise TypeError("run_search needs table=resolve_table(...) (qnas_cli.export.latency_build)")
    table, table_path = table
    d = setup_distributed("cpu")
    # TensorBoard (rank 0): nothing is written before the first generation, after every check. A
    # resumed search replays every generation (from the cache): its events replace the earlier ones.
    events = open_event_log(cfg.tensorboard and d.main, cfg.out_dir, fresh=True)
    try:
        result = _search(cfg, log, on_generation, on_evaluation, table, table_path, setup, d, t_start, events)
    except BaseException:  # Ctrl-C, SIGTERM, a bug: leave the process group all the same (gloo aborts
        leave_distributed(d, wait=False)  # at exit otherwise), without a barrier another rank may never reach
        raise
    finally:
        events.close()
    leave_distributed(d)
    return result


def _search(cfg: SearchConfig, log: Callable[[str], None], on_generation, on_evaluation, table: LatencyTable,
            table_path: Path, setup: SearchSetup, d, t_start: float, events: EventLog | NoEventLog) -> dict[str, Any] | None:
    """``run_search`` inside the process group: evolve every budget, then (rank 0) write the results
    (``events``: the TensorBoard log)."""
    net, meta, data = setup.net, setup.meta, setup.data
    space = net.space
    out = cfg.out_dir
    pred = Predictor(table, space)

    def cost(a: Arch):
        return arch_cost(space, a, net.in_channels, net.num_classes, per_channel=net.cfg.per_channel)

    def within_others(a: Arch) -> bool:
        c = cost(a)
        return ((cfg.flops_m is None or c.mflops <= cfg.flops_m) and (cfg.params_k is None or c.params / 1e3 <= cfg.params_k)
                and (cfg.size_kb is None or c.tflite_kb <= cfg.size_kb))

    predict_s = [0.0]  # time in constraint checks: latency prediction and FLOPs/params from shapes

    def feasible(a: Arch, budget: float) -> bool:
        t = time.perf_counter()
        ok = pred.predict(a) <= budget and within_others(a)
        predict_s[0] += time.perf_counter() - t
        return ok

    candidates = random_candidates(space)
    _check_feasible(cfg, space, pred, cost, within_others, table, candidates)
    seeds = {b: budget_seeds(candidates, lambda a, b=b: feasible(a, b)) for b in cfg.budgets_ms}
    arithmetic = fitness_arithmetic(cfg.runtime)
    identity = cache_identity(meta["weights"]["sha256"], setup.data_spec, cfg.calib_images, cfg.eval_images, arithmetic)
    fitness = Fitness(net, data, identity, out / "evaluations.jsonl", cfg.resume, rank=d.rank, world=d.world)
    # Made before any evolution, so that a re-score cache with other inputs is refused before the work.
    rescorer = (Fitness(net, data, rescore_identity(meta["weights"]["sha256"], setup.data_spec, arithmetic),
                        out / RESCORE_FILE, cfg.resume, rank=d.rank, world=d.world) if cfg.rescore_top else None)
    if not d.main:  # the other ranks only evaluate; rank 0 reports and writes
        log, on_generation = (lambda m: None), None
    if fitness.scores:
        log(f"resuming: {len(fitness.scores)} subnets already evaluated in {out / 'evaluations.jsonl'}")
    archs: dict[str, Arch] = {}

    def generation_done(budget: float, g: Generation) -> None:
        values = {"best_top1": g.best[1], "evaluations": g.evaluated, "cache_hits": g.cache_hits, "predictor_tau": g.predictor_tau}
        events.scalars(f"search/{budget:g}ms", values, g.index)  # None (no predictor yet) is skipped
        if on_generation:
            on_generation(budget, g)

    def scored(batch: list[Arch]) -> list[float]:
        archs.update((a.key, a) for a in batch)
        return fitness(batch, on_evaluation)

    winners, history = {}, {}
    for i, budget in enumerate(sorted(cfg.budgets_ms)):
        log(f"budget {budget:g} ms: population {cfg.population}, {cfg.generations} generations"
            + (f", {len(seeds[budget])} feasible seed(s): few random subnets meet it" if seeds[budget] else ""))
        res = evolve(space, scored, lambda a, b=budget: feasible(a, b),
                     cfg.population, cfg.generations, cfg.mutate_prob, cfg.crossover_prob, PARENT_RATIO,
                     seed=cfg.seed + i, on_generation=lambda g, b=budget: generation_done(b, g),
                     seeds=seeds[budget], screen=cfg.screen)
        winners[budget] = res.best
        history[budget] = [{"generation": g.index, "best_top1": g.best[1], "evaluated": g.evaluated,
                            "cache_hits": g.cache_hits, "predictor_tau": g.predictor_tau} for g in res.history]
    # A budget's winner is the best subnet evaluated by any budget's evolution that fits it:
    # a tighter budget's winner often fits a looser one, and its score is already known.
    for budget in winners:
        fits = [a for a in archs.values() if feasible(a, budget)]
        winners[budget] = max(fits, key=lambda a: (fitness.scores[a.key], -pred.predict(a)))
    stage = None
    if rescorer is not None:  # every rank: the candidates are the same on each, the re-scores are shared like evaluations
        stage = _rescore_stage(cfg.rescore_top, winners, list(archs.values()), feasible, fitness.scores, pred.predict,
                               rescorer, len(data.search), log)
        winners = {b: archs[stage["budgets"][f"{b:g}"]["winner"]] for b in winners}
    if not d.main:
        return None

    def figures(a: Arch) -> dict[str, float]:
        c = cost(a)
        rescored = {"rescore_top1": rescorer.scores[a.key]} if rescorer is not None and a.key in rescorer.scores else {}
        return {"latency_ms": pred.predict(a), "search_top1": fitness.scores[a.key], **rescored, "mflops": c.mflops,
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
                          "latency_statistic": table_statistic(table.header), "fitness_arithmetic": arithmetic,
                          **figures(a)}}
        name = f"subnet_{budget:g}ms.json"
        write_json(out / name, doc)
        chosen.append({"budget_ms": budget, "file": name, "arch": a.key, **figures(a)})
    result = {"format": "qnas.search/1", "config": asdict(cfg), **provenance, "chosen": chosen,
              "runtime": cfg.runtime, "fitness_arithmetic": arithmetic,  # builtin: scored with another's arithmetic
              "seeds": {f"{b:g}": [a.key for a in seeds[b]] for b in sorted(seeds)},
              "evaluations": {"count": len(fitness.scores), "new": fitness.evaluations,
                              # children already scored (this evolution's or another budget's) or in a resumed cache
                              "cache_hits": fitness.hits + sum(g["cache_hits"] for h in history.values() for g in h)},
              "rescore": stage or {"top": 0},
              "seconds": _seconds(time.perf_counter() - t_start, fitness.seconds, predict_s[0], d.world,
                                  stage["seconds"] if stage else 0.0),
              "generations": {f"{b:g}": h for b, h in history.items()},
              "subnets": sorted(rows, key=lambda r: r["latency_ms"]), "versions": versions()}
    write_json(out / "pareto.json", result)
    plot_pareto(result, out / "pareto.png", events)
    result["out"] = str(out)
    return result


def _seconds(wall: float, evaluation: dict[str, float], predict: float, world: int, rescore: float) -> dict[str, float]:
    """Where the search's wall time went. Evaluation seconds are summed over ranks (CPU-process
    seconds); per rank they overlap, so ``other`` counts them divided by the ranks. ``rescore``:
    the last stage's wall time (its own evaluations are not in ``evaluation``)."""
    spent = sum(evaluation.values()) / world + predict + rescore
    return {"wall": round(wall, 1), **{k: round(v, 1) for k, v in evaluation.items()}, "latency_prediction": round(predict, 2),
            "rescore": round(rescore, 1), "other": round(max(wall - spent, 0.0), 1), "ranks": world}


def _rescore_stage(top: int, proxy_winners: dict[float, Arch], evaluated: list[Arch], feasible, proxy: dict[str, float],
                   latency, rescorer: Fitness, split_images: int, log) -> dict[str, Any]:
    """The last stage (rescore.py): every budget's shortlist re-scored in one batch (shared by the
    torchrun ranks, cached in ``rescorer``), then each budget's winner by ``RULE``; what
    pareto.json records under ``rescore``."""
    t0 = time.perf_counter()
    lists = {b: shortlist(evaluated, lambda a, b=b: feasible(a, b), proxy, latency, top) for b in proxy_winners}
    union = list({a.key: a for s in lists.values() for a in s}.values())
    log(f"re-scoring the top {top} of each budget ({len(union)} distinct subnets) with export's calibration "
        f"({_calib(rescorer)} images) on the whole search split ({split_images} images)")
    new_before = rescorer.evaluations
    rescorer(union)
    budgets = {}
    for b, proxy_pick in proxy_winners.items():
        fits = lambda a, b=b: feasible(a, b)  # noqa: E731
        won = best_rescored(union, fits, rescorer.scores, proxy, latency)
        pool = sorted((a for a in union if fits(a)), key=lambda a: (-proxy[a.key], latency(a), a.key))
        short = {a.key for a in lists[b]}
        budgets[f"{b:g}"] = {
            "winner": won.key, "proxy_winner": proxy_pick.key,
            "candidates": [{"arch": a.key, "search_top1": proxy[a.key], "rescore_top1": rescorer.scores[a.key],
                            "latency_ms": latency(a), "shortlist": a.key in short} for a in pool]}
        if won.key != proxy_pick.key:
            log(f"budget {b:g} ms: re-scoring changed the winner to {won.key} ({100 * rescorer.scores[won.key]:.2f}% "
                f"re-scored; the fitness's pick {proxy_pick.key} re-scored {100 * rescorer.scores.get(proxy_pick.key, float('nan')):.2f}%)")
    return {"top": top, "calib_images": _calib(rescorer), "eval_images": split_images, "file": RESCORE_FILE,
            "rule": RULE.format(top=top), "rescored": len(union), "new": rescorer.evaluations - new_before,
            "seconds": round(time.perf_counter() - t0, 2), "budgets": budgets}


def _calib(rescorer: Fitness) -> int:
    """The calibration images the re-scores were made with (``calibrate.CALIB_IMAGES``, or fewer in a smaller training split)."""
    return sum(len(x) for x in rescorer.inputs.calib_u8)


def _check_feasible(cfg, space, pred: Predictor, cost, within_others, table, candidates: list[Arch]) -> None:
    """Exit 2 naming the fastest subnet when a budget is below anything the space can do."""
    ok = [a for a in candidates if within_others(a)]
    h = table.header
    where = f"on {h['runtime']}, {h['threads']} thread(s), {h['device'].get('cpu', h['device'].get('kind'))}"
    if not ok:
        c = cost(sample(space, "smallest"))
        raise UserError(f"--flops-m/--params-k/--size-kb: no subnet of space {space.name!r} fits; the smallest has "
                        f"{c.mflops:.2f} MFLOPs, {c.params / 1e3:.1f} k parameters and {c.tflite_kb:.1f} KiB as int8 TFLite")
    fastest = min(ok, key=pred.predict)  # of the subnets that meet the other constraints: the fastest feasible one
    fast_ms = pred.predict(fastest)
    for budget in cfg.budgets_ms:
        if budget < fast_ms:
            c = cost(fastest)
            raise UserError(f"--latency-ms {budget:g}: no subnet of space {space.name!r} is predicted that fast {where}; "
                            f"the fastest takes about {fast_ms:.4f} ms ({fastest.key}: {c.mflops:.2f} MFLOPs, "
                            f"{c.params / 1e3:.1f} k parameters, {c.tflite_kb:.1f} KiB)")


def plot_pareto(result: dict, path: Path, events=None) -> None:
    """pareto.png; the same figure into ``events`` (an ``event_log.EventLog``) as ``search/pareto``."""
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
    if events is not None:
        events.figure("search/pareto", fig)
    plt.close(fig)
