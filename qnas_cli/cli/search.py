"""``qnas search``: the most accurate int8 subnet for each latency budget."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import UserError
from ..fitness import SEARCH_RUNTIMES
from ..latency import RUNTIMES
from ..rescore import DEFAULT_TOP
from ..search import PAPER, PARENT_RATIO
from ..search_job import SearchConfig, prepare_search, run_search
from .common import console, err_console, interactive, logger, print_json, say

D = SearchConfig(budgets_ms=[1.0])


def _budgets(text: str) -> list[float]:
    try:  # an empty entry ("1,,2", "1,") is a typo, not a budget to skip
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--latency-ms: {text!r} is not a comma-separated list of milliseconds (e.g. 0.3,0.6,1.0)") from None


def _top(text: str) -> int:
    """``--rescore-top``, parsed here so that a non-integer is one line, as a negative one is."""
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--rescore-top must be a non-negative integer (0: no re-scoring), got {text!r}") from None


def search(
    latency_ms: Annotated[str, typer.Option("--latency-ms", help="Latency budget(s) in ms, comma-separated: one search per budget.")],
    supernet: Annotated[Path, typer.Option(help="The int8 supernet.pt to search.")] = Path(D.supernet),
    data: Annotated[str, typer.Option(help="Dataset spec (default: the one the supernet was trained on). Fitness uses its held-out search split, never the test set.")] = None,
    flops_m: Annotated[float, typer.Option("--flops-m", help="Also at most this many million multiply-adds.")] = None,
    params_k: Annotated[float, typer.Option("--params-k", help="Also at most this many thousand parameters.")] = None,
    size_kb: Annotated[float, typer.Option("--size-kb", help="Also at most this many KiB of int8 .tflite file (predicted from the shapes: weights, biases and per-op bytes fitted on real exports by benchmarks/tflite_size.py).")] = None,
    table: Annotated[Path, typer.Option(help="Latency table (`qnas latency build`/`import`; default: this host's, built on first use).")] = None,
    runtime: Annotated[str, typer.Option(help=f"Target runtime, {' | '.join(SEARCH_RUNTIMES)}: fitness is its exact int8 forward "
                                                "(the accuracy `qnas calibrate --runtime` and `qnas export --runtime` report). builtin has no exact "
                                                "forward: it is scored with xnnpack's arithmetic (pareto.json: fitness_arithmetic).")] = D.runtime,
    table_runtime: Annotated[str, typer.Option(help=f"Runtime the default host table times, {' | '.join(RUNTIMES)} (the only ones "
                                                    "timed; default: --runtime where timed, else xnnpack). Ignored with --table: "
                                                    "its own runtime gives the latency.")] = None,
    threads: Annotated[int, typer.Option(help="Threads of the default host table.")] = D.threads,
    population: Annotated[int, typer.Option(help="Subnets per generation (paper: 512).")] = PAPER["population"],
    generations: Annotated[int, typer.Option(help="Generations per budget (paper: 20).")] = PAPER["generations"],
    mutate_prob: Annotated[float, typer.Option(help=f"Mutation: each gene resampled with this probability (paper: 0.2). "
                                                    f"Each generation the best {int(100 * PARENT_RATIO)}% breed; half the "
                                                    "children are mutants, half crossovers.")] = PAPER["mutate_prob"],
    crossover_prob: Annotated[float, typer.Option(help="Crossover: each gene taken from the second parent with this probability (paper: 0.25).")] = PAPER["crossover_prob"],
    screen: Annotated[float, typer.Option(help="Share of each generation's new children evaluated: the ones an accuracy predictor "
                                               "(ridge regression on the architecture, fitted on every subnet evaluated so far) "
                                               "ranks highest; 1 evaluates every child. Every accuracy reported was measured.")] = D.screen,
    calib_images: Annotated[int, typer.Option(help="Training images for each candidate's BN re-estimation (seeded, class-stratified, as `qnas calibrate`; 250 ranks subnets as 2,000 do, see README).")] = D.calib_images,
    eval_images: Annotated[int, typer.Option(help="Search-split images scored per candidate: a seeded, class-stratified subset, the same for every candidate (the ranking noise: about 1 pp at 2,000).")] = D.eval_images,
    rescore_top: Annotated[str, typer.Option("--rescore-top", metavar="K",
                                             help="Last stage: each budget's top K distinct candidates by fitness are re-scored as "
                                                  "`qnas export` calibrates them (2,000 images), on the whole search split; the winner "
                                                  "is the best re-scored (pareto.json: rescore). 0 turns it off.")] = str(DEFAULT_TOP),
    seed: Annotated[int, typer.Option(help="Seed of the evolution (budget i uses seed + i).")] = D.seed,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (default: SUPERNET's folder/search).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted search in --out: evaluated subnets are not evaluated again.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard", help="Also write TensorBoard event files into --out "
                                                                                "(per budget per generation: best top-1, evaluations, cache "
                                                                                "hits; at the end the Pareto front): tensorboard --logdir runs/")] = D.tensorboard,
    json_out: Annotated[bool, typer.Option("--json", help="Print pareto.json's summary as JSON.")] = False,
) -> None:
    """Evolutionary search of the int8 supernet under predicted int8 TFLite latency (QuantNAS §5.1).

    Fitness is the calibrated int8 subnet's top-1 on the held-out search split, computed with the
    exact integer forward of --runtime; latency is predicted from the table (--table, or this
    host's, timed on --table-runtime). Every candidate
    meets every constraint by prediction. Writes pareto.json, pareto.png and one
    subnet_<budget>ms.json per budget (ready for `qnas export`) into --out.
    Many processes share the evaluations, with the same result as one:
    torchrun --nproc_per_node 2 -m qnas_cli search --table TABLE.json --latency-ms 1.0
    """
    cfg = SearchConfig(supernet=str(supernet), budgets_ms=_budgets(latency_ms), flops_m=flops_m, params_k=params_k, size_kb=size_kb,
                       data=data, table=str(table) if table else None, runtime=runtime, table_runtime=table_runtime, threads=threads,
                       population=population, generations=generations, mutate_prob=mutate_prob,
                       crossover_prob=crossover_prob, screen=screen, calib_images=calib_images, eval_images=eval_images,
                       rescore_top=_top(rescore_top), seed=seed,
                       out=str(out) if out else None, resume=resume, tensorboard=tensorboard)
    if cfg.table is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun, before any work
        raise UserError("under torchrun, pass --table (build it first with `qnas latency build`): "
                        "timing a table while other processes evaluate would measure their load")
    log = logger(err_console if json_out else console)
    setup = prepare_search(cfg)  # the supernet and --data, checked before a table is built
    from ..export.latency_build import resolve_table  # converts and times: TensorFlow, LiteRT

    net = setup.net
    resolved = resolve_table(cfg.table, net.space, net.in_channels, net.num_classes, cfg.timed_runtime, cfg.threads, log)
    if interactive() and not json_out:
        result = _with_progress(cfg, log, resolved, setup)
    else:
        def plain(budget, g):
            log(f"budget {budget:g} ms, generation {g.index}/{cfg.generations}: best {100 * g.best[1]:.2f}% "
                f"({g.evaluated} new evaluations, {g.cache_hits} cache hits)")
        result = run_search(cfg, log, plain, table=resolved, setup=setup)
    if result is None:  # a non-zero torchrun rank: rank 0 reports
        return
    if json_out:
        print_json({k: result[k] for k in ("chosen", "evaluations", "seconds", "table", "supernet", "out")})
        return
    t = Table(title=f"qnas search (latency: {result['table']['runtime']}, {result['table']['threads']} thread(s); "
                    f"top-1: {result['fitness_arithmetic']} arithmetic)")
    rescored = result["rescore"]["top"] > 0
    for col in ("budget", "predicted ms", "search top-1", *(["re-scored top-1"] if rescored else []), "MFLOPs", "k params", "KiB", "file"):
        t.add_column(col, overflow="fold")
    for c in result["chosen"]:
        t.add_row(f"{c['budget_ms']:g} ms", f"{c['latency_ms']:.4f}", f"{100 * c['search_top1']:.2f}%",
                  *([f"{100 * c['rescore_top1']:.2f}%"] if rescored else []),
                  f"{c['mflops']:.2f}", f"{c['params_k']:.1f}", f"{c['tflite_kb']:.0f}", escape(c["file"]))
    console.print(t)
    for c in result["chosen"]:
        say(console, f"{c['budget_ms']:g} ms: {c['arch']}")
    e, s = result["evaluations"], result["seconds"]
    say(console, f"{e['count']} subnets evaluated ({e['new']} now, {e['cache_hits']} cache hits) in {s['wall']:.0f} s "
                 f"(calibration {s['calibrate']:.0f} s, scoring {s['score']:.0f} s, latency prediction "
                 f"{s['latency_prediction']:.1f} s, re-scoring {s['rescore']:.0f} s); wrote pareto.json, pareto.png and the subnet files to {result['out']}")


def _with_progress(cfg: SearchConfig, log, table, setup) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn()]
    with Progress(*cols, console=console) as bar:
        tasks = {}

        def on_generation(budget, g):
            if budget not in tasks:
                tasks[budget] = bar.add_task(f"{budget:g} ms", total=cfg.generations, info="")
            bar.update(tasks[budget], completed=g.index,
                       info=f"best {100 * g.best[1]:.2f}%  new {g.evaluated}  hits {g.cache_hits}")

        return run_search(cfg, logger(bar.console), on_generation, table=table, setup=setup)
