"""The rest of `make demo` after training: latency table -> search -> finetune -> export -> one summary.

    python -m qnas_cli.demo runs/demo/train/supernet.pt --out runs/demo

Builds (or reuses) this host's XNNPACK latency table for the supernet's space, picks three
budgets across the table's range (fast, middle, slow), runs a demo-sized search (the paper's
operators, a smaller population), fine-tunes each distinct winner from its inherited weights
(`qnas finetune`, a demo-sized run), exports it with its parity gate, and prints one table:
budget, predicted and measured latency, inherited and fine-tuned int8 test accuracy, parity,
file size. Everything lands in OUT (search/, finetune_<budget>ms/, export_<budget>ms/, summary.json).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .checkpoint import write_json
from .cli import _Group
from .cli.common import console, logger
from .errors import check_count
from .latency import STATISTIC, Predictor
from .search_job import SearchConfig, prepare_search, run_search
from .space import sample

BUDGET_POINTS = (0.15, 0.4, 0.8)  # where the budgets sit between the fastest and the slowest subnet
# The demo's fine-tune per winner: sized so that `make demo` stays within 12 minutes on 2 cores (about
# 25 s of steps per winner there, plus the teacher's calibration and two evaluations). `qnas finetune`'s
# default (measured on a fully trained supernet) is longer.
DEMO_FINETUNE_STEPS = 100
# The demo's search. benchmarks/search_regret.py (BENCHMARKS.md "Search: the winners' test regret")
# scored every `tiny` subnet: at 32 x 5 generations on 1,000 images per candidate the winners sat
# 0.97 pp below each budget's best on the test split (mean of 12 seeds, three budgets); 2,000
# images (the default search's) halve that, and a population of 64 brings it to 0.34 pp, the
# re-scoring stage then costing 16% of the search instead of 35%, for 2.2x the search's time there.
DEMO_SEARCH = {"population": 64, "generations": 5, "eval_images": 2000}


def budgets_for(pred: Predictor, space) -> list[float]:
    """Three budgets across the predicted latency range, rounded to two significant digits."""
    lo, hi = pred.predict(sample(space, "smallest")), pred.predict(sample(space, "largest"))
    return [float(f"{lo + f * (hi - lo):.2g}") for f in BUDGET_POINTS]


# The qnas CLI's error handling (_Group: a UserError is exit 2 and one line, --debug shows the
# traceback), for a command that is a module of its own. Its one callback is the whole demo.
app = typer.Typer(cls=_Group, invoke_without_command=True, add_completion=False, pretty_exceptions_enable=False,
                  subcommand_metavar="", help=__doc__.split("\n")[0],
                  context_settings={"allow_interspersed_args": True, "help_option_names": ["-h", "--help"]})


@app.callback()
def demo(
    supernet: Annotated[Path, typer.Argument(help="The int8 supernet.pt (`qnas train`).", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    population: Annotated[int, typer.Option(help="Subnets per generation.")] = DEMO_SEARCH["population"],
    generations: Annotated[int, typer.Option(help="Generations per budget.")] = DEMO_SEARCH["generations"],
    eval_images: Annotated[int, typer.Option(help="Test images for each export's parity and accuracy.")] = 2000,
    finetune_steps: Annotated[int, typer.Option(help="Fine-tune steps per distinct winner before its export (qnas finetune; 0: export the inherited subnet).")] = DEMO_FINETUNE_STEPS,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """The rest of `make demo` after training: latency table -> search -> export -> one summary."""
    for name, v in (("--population", population), ("--generations", generations), ("--eval-images", eval_images)):
        check_count(name, v)
    if finetune_steps:
        check_count("--finetune-steps", finetune_steps, " (0: no fine-tune)")
    from qnas_cli.export.latency_build import resolve_table
    from qnas_cli.export.pipeline import export_subnet

    log = logger(console)
    t0 = time.perf_counter()
    # Every option and input checked before the table is built: the budgets come from the table,
    # so the search's settings are checked with a stand-in budget, then given the real ones.
    cfg = SearchConfig(supernet=str(supernet), budgets_ms=[1.0], population=population, generations=generations,
                       eval_images=DEMO_SEARCH["eval_images"], out=str(out / "search"), resume=(out / "search" / "evaluations.jsonl").is_file())
    setup = prepare_search(cfg)
    net = setup.net
    table, table_path = resolve_table(None, net.space, net.in_channels, net.num_classes, cfg.timed_runtime, cfg.threads, log)
    budgets = budgets_for(Predictor(table, net.space), net.space)
    log(f"latency table {table_path}; budgets {', '.join(f'{b:g} ms' for b in budgets)}")
    t_search = time.perf_counter()
    result = run_search(replace(cfg, budgets_ms=budgets, table=str(table_path)), log,
                        lambda b, g: log(f"  {b:g} ms, generation {g.index}: best {100 * g.best[1]:.2f}% "
                                         f"({g.evaluated} new, {g.cache_hits} cached)"),
                        table=(table, table_path), setup=setup)
    search_s = time.perf_counter() - t_search
    rows, exported = [], {}
    for c in result["chosen"]:
        if c["arch"] in exported:  # a tighter budget's winner also won this one: one file, one gate
            folder, r = exported[c["arch"]]
            log(f"the {c['budget_ms']:g} ms winner is the one already exported to {folder}")
        else:
            folder = out / f"export_{c['budget_ms']:g}ms"
            subnet, inherited = out / "search" / c["file"], None
            if finetune_steps:
                teacher = "none" if c["arch"] == sample(net.space, "largest").key else "largest"  # the largest has no teacher but itself
                subnet, inherited = _finetuned(subnet, out / f"finetune_{c['budget_ms']:g}ms", finetune_steps, teacher,
                                               eval_images, log)
            log(f"exporting the {c['budget_ms']:g} ms winner to {folder}")
            r = export_subnet(subnet, folder, eval_images=eval_images, log=log)
            r["inherited_test_top1"] = r["accuracy"]["top1"] if inherited is None else inherited
            exported[c["arch"]] = folder, r
        x = r["parity"]["xnnpack"]  # the gate's target: exact on every image the file ran when passed
        rows.append({"budget_ms": c["budget_ms"], "arch": c["arch"], "predicted_ms": c["latency_ms"],
                     "measured_ms": r["latency_ms"]["xnnpack"], "search_top1": c["search_top1"],
                     "inherited_test_top1": r["inherited_test_top1"],
                     "test_top1": r["accuracy"]["top1"], "fake_quant_test_top1": r["accuracy"]["fake_quant_top1"],
                     "max_lsb": x["max_abs_lsb"], "exact": x["exact"], "size_kb": r["size_bytes"] / 1024,
                     "passed": r["passed"], "tflite": str(folder / r["files"]["tflite"])})
    summary = {"rows": rows, "table": str(table_path), "search": result["evaluations"], "search_seconds": round(search_s, 1),
               "seconds_after_training": round(time.perf_counter() - t0, 1), "test_images": eval_images,
               "latency_statistic": STATISTIC, "finetune_steps": finetune_steps}
    write_json(out / "summary.json", summary)
    t = Table(title=f"qnas demo: int8 TFLite per latency budget (XNNPACK, 1 thread, {STATISTIC} "
                    f"of the invoke times; {eval_images} test images)")
    for col in ("budget", "pred. ms", "meas. ms", "search top-1", "inherited test",
                f"fine-tuned test ({finetune_steps} steps)" if finetune_steps else "int8 test", "exact", "max LSB", "KB", "gate"):
        t.add_column(col)
    for r in rows:
        t.add_row(f"{r['budget_ms']:g} ms", f"{r['predicted_ms']:.3f}", f"{r['measured_ms']:.3f}",
                  f"{100 * r['search_top1']:.2f}%", f"{100 * r['inherited_test_top1']:.2f}%", f"{100 * r['test_top1']:.2f}%",
                  f"{100 * r['exact']:.2f}%",
                  str(r["max_lsb"]),
                  f"{r['size_kb']:.0f}", "PASS" if r["passed"] else "FAIL")
    console.print(t)
    for r in rows:
        log(f"{r['budget_ms']:g} ms: {r['arch']} -> {r['tflite']}")
    log(f"search {search_s:.0f} s, everything after training {summary['seconds_after_training']:.0f} s; "
        f"pictures: {out / 'search' / 'pareto.png'}; figures: {out / 'summary.json'}")


def _finetuned(subnet: Path, out: Path, steps: int, teacher: str, eval_images: int, log) -> tuple[Path, float]:
    """`qnas finetune` of one winner: its subnet.json and the inherited test top-1 it was
    measured at, on the test images the export scores."""
    from .finetune import FinetuneConfig, finetune

    log(f"fine-tuning {subnet.name} for {steps} steps into {out}")
    summary = finetune(FinetuneConfig(subnet=str(subnet), out=str(out), steps=steps, teacher=teacher, eval_images=eval_images),
                       log=lambda *a, **k: None, overwrite=True)
    m = summary["metrics"]
    log(f"  inherited {100 * m['inherited']['test_top1']:.2f}% -> fine-tuned {100 * m['finetuned']['test_top1']:.2f}% "
        f"(test top-1, {eval_images} images)")
    return Path(summary["subnet"]), m["inherited"]["test_top1"]


def main() -> None:
    app(prog_name="python -m qnas_cli.demo")


if __name__ == "__main__":
    main()
