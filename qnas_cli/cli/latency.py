"""``qnas latency``: time int8 TFLite models, build and import latency tables, predict subnets."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import UserError, check_count, choice_error
from ..latency import RUNTIME_HELP, RUNTIMES, STATISTIC, STATISTICS, Predictor, load_table, table_space
from ..space import load_arch, load_space
from .common import console, err_console, interactive, logger, print_json, say

app = typer.Typer(help="Latency of int8 TFLite models: measure a file, build or import a table, predict subnets.",
                  no_args_is_help=True)

_RT_TEXT = "; ".join(f"{k}: {v}" for k, v in RUNTIME_HELP.items())
RuntimeOpt = Annotated[str, typer.Option(help=f"xnnpack | builtin | both. {_RT_TEXT}.")]
ThreadsOpt = Annotated[int, typer.Option(help="Interpreter threads (num_threads). Tables hold one thread count.")]
_STAT_TEXT = "; ".join(f"{k}: {v}" for k, v in STATISTICS.items())
StatisticOpt = Annotated[str, typer.Option(help=f"The figure given (and named in the output): {_STAT_TEXT}. "
                                                "A low quantile is the default: interference on a busy machine only "
                                                "adds time (benchmarks/latency_model.py scores both).")]


def _runtimes(runtime: str) -> tuple[str, ...]:
    if runtime == "both":
        return RUNTIMES
    if runtime not in RUNTIMES:
        from ..kernels import TARGETS

        if runtime in TARGETS:  # an export target whose arithmetic qnas emulates, but which has no tables
            raise UserError(f"--runtime {runtime}: latency tables and timings are for {', '.join(RUNTIMES)} only "
                            f"({runtime} is an export target for exact integers, not timed); pick one of "
                            f"{', '.join((*RUNTIMES, 'both'))}")
        raise choice_error("--runtime", runtime, (*RUNTIMES, "both"))
    return (runtime,)


def _check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise choice_error("--statistic", statistic, STATISTICS)


def _check_parent(out: Path, option: str) -> None:
    """The nearest existing folder above ``out`` must be a folder this user may write in."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {out}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{option} {out}: cannot write in {parent} (permission denied)")
            return


def check_out_file(out: Path, option: str = "--out") -> None:
    """Refuse, before any work, a file to write that is a folder or cannot be created."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{option} {out} is a folder; give the file to write, e.g. {out / 'table.json'}")
    _check_parent(out, option)


def check_out_folder(out: Path, option: str = "--out") -> None:
    """Refuse, before any work, a folder to write that is a file, is not empty, or cannot be created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file; give a new (or empty) folder")
    if out.is_dir():
        try:
            if any(out.iterdir()):
                raise UserError(f"{option} {out}: the folder is not empty; choose a new one")
        except OSError as e:
            raise UserError(f"{option} {out}: cannot read the folder ({e.strerror})") from None
    _check_parent(out, option)


class _Progress:
    """A Rich bar per stage on a terminal; one plain line per step elsewhere (CI logs)."""

    def __init__(self, log) -> None:
        self.log, self.bar, self.tasks = log, None, {}

    def __enter__(self):
        if interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=err_console)
            self.bar.__enter__()
            self.log = logger(self.bar.console)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None:
            self.log(f"{stage}: {done}/{total}")
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)


@app.command("measure")
def measure(
    model: Annotated[Path, typer.Argument(help="An int8 .tflite file (e.g. model_int8.tflite from `qnas export`).")],
    runtime: RuntimeOpt = "xnnpack",
    threads: ThreadsOpt = 1,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds of invokes (about 20 ms per runtime each).")] = 10,
    statistic: StatisticOpt = STATISTIC,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Time one model with the LiteRT interpreter: --statistic (p10 by default, as tables and
    export reports), with the other statistics, p90 and round-to-round spread beside it.

    After warm-up, each round runs about 20 ms of invokes per runtime, runtimes interleaved, so
    a noisy machine spreads its noise over both. The output states the statistic, threads,
    rounds and invokes.
    """
    from qnas_cli.export.measure import measure_file

    check_count("--threads", threads)
    check_count("--rounds", rounds)
    _check_statistic(statistic)
    runtimes = _runtimes(runtime)
    with _Progress(logger(err_console)) as prog:
        r = measure_file(model, runtimes, threads, rounds, progress=lambda d, n: prog("measure", d, n), statistic=statistic)
    if json_out:
        print_json(r)
        return
    others = [s for s in STATISTICS if s != statistic]
    t = Table(title=f"{escape(str(model))}  ({r['size_bytes']} bytes, {threads} thread(s)); "
                    f"latency = {statistic}: {STATISTICS[statistic]}")
    for col in ("runtime", f"latency ms ({statistic})", *(f"{s} ms" for s in others), "p90 ms", "round spread",
                "rounds x invokes"):
        t.add_column(col)
    for rt, v in r["runtimes"].items():
        t.add_row(rt, f"{v['latency_ms']:.4f}", *(f"{v[f'{s}_ms']:.4f}" for s in others), f"{v['p90_ms']:.4f}",
                  f"{100 * v['spread']:.1f}%", f"{v['rounds']} x {v['invokes'] // v['rounds']}")
    console.print(t)
    for rt, v in r["runtimes"].items():
        if v.get("warning"):
            say(err_console, f"warning: {rt}: {v['warning']}")
    if not r["int8_in_out"]:
        say(console, f"note: input/output are {r['input_dtypes']}/{r['output_dtypes']}, not a qnas int8 export")


@app.command("build")
def build(
    space: Annotated[str, typer.Option("--space", "-s", help="Preset (tiny, small, mbv3) or a .json/.toml space file.")] = "small",
    supernet: Annotated[Path, typer.Option(help="Take space, input channels and classes from this supernet.pt.")] = None,
    in_channels: Annotated[int, typer.Option(help="Input channels (ignored with --supernet).")] = 1,
    classes: Annotated[int, typer.Option(help="Classifier outputs (ignored with --supernet).")] = 10,
    runtime: RuntimeOpt = "xnnpack",
    threads: ThreadsOpt = 1,
    rounds: Annotated[int, typer.Option(help="Interleaved timing rounds over all parts (this shared host drifts: fewer rounds, noisier entries).")] = 40,
    statistic: StatisticOpt = STATISTIC,
    out: Annotated[Path, typer.Option("--out", "-o", help="Table file (default: the host cache, "
                                                           "$QNAS_CACHE or ~/.cache/qnas/latency). With --runtime both, "
                                                           "the runtime is added to the name.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a summary as JSON.")] = False,
) -> None:
    """Measure every part of a space on this machine: a table that predicts int8 TFLite latency.

    Each part (stem, every block configuration at every resolution, head) is an int8 model made
    by qnas export's own path: one onnx2tf conversion per resolution converts all parts at once,
    and each part is cut out of the flatbuffer. A fit on whole subnets, timed end to end, turns
    the sum of parts into whole-model latency. Conversions are cached and reused.
    """
    from qnas_cli.export.latency_build import build_tables, save_table, table_outputs

    sp, in_ch, n_cls = _space_and_io(space, supernet, in_channels, classes)
    check_count("--threads", threads)
    check_count("--rounds", rounds)
    _check_statistic(statistic)
    runtimes = _runtimes(runtime)
    paths = table_outputs(out, sp, in_ch, n_cls, runtimes, threads)
    for path in paths.values():  # before minutes of conversion and timing
        check_out_file(path)
    with _Progress(logger(err_console if json_out else console)) as prog:
        tables = build_tables(sp, in_ch, n_cls, runtimes, threads, rounds, statistic=statistic, log=prog.log, progress=prog)
    summary = {}
    for rt, table in tables.items():
        save_table(table, paths[rt])
        pts = table.fit.points
        summary[rt] = {"table": str(paths[rt]), "parts": len(table.entries), "seconds": table.header["seconds"],
                       "fit": {"a": table.fit.a, "b": table.fit.b},
                       "fit_max_error": max(abs(p["error"]) for p in pts) if pts else None}
    if json_out:
        print_json(summary)
        return
    t = Table(title=f"latency tables for {sp.name} ({in_ch} ch in, {n_cls} classes, {threads} thread(s))")
    for col in ("runtime", "parts", "fit: a*sum + b*n", "worst fit point", "seconds (convert / measure)", "file"):
        t.add_column(col, overflow="fold")
    for rt, s in summary.items():
        f = s["fit"]
        t.add_row(rt, str(s["parts"]), f"{f['a']:.3f}*sum {1000 * f['b']:+.2f} us*n",
                  "-" if s["fit_max_error"] is None else f"{100 * s['fit_max_error']:.1f}%",
                  f"{s['seconds']['convert']:.0f} / {s['seconds']['measure']:.0f}", escape(s["table"]))
    console.print(t)


def _space_and_io(space: str, supernet: Path | None, in_channels: int, classes: int):
    if supernet is not None:
        from ..supernet import load_supernet

        net, _ = load_supernet(supernet)
        return net.space, net.in_channels, net.num_classes
    check_count("--in-channels", in_channels)
    check_count("--classes", classes)
    return load_space(space), in_channels, classes


@app.command("predict")
def predict(
    subnets: Annotated[list[Path], typer.Argument(help="One or more subnet.json files.")],
    table: Annotated[Path, typer.Option("--table", "-t", help="A latency table (from `qnas latency build` or `import`).")],
    explain: Annotated[bool, typer.Option("--explain", help="Also print each part's entry.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the predictions as JSON.")] = False,
) -> None:
    """Predicted int8 TFLite latency of subnets: a sum of table look-ups plus the whole-model fit."""
    tab = load_table(table)
    sp = table_space(tab)
    pred = Predictor(tab, sp)
    rows = []
    for path in subnets:
        arch = load_arch(path, sp)
        rows.append({"subnet": str(path), "arch": arch.key, "latency_ms": pred.predict(arch),
                     **({"parts": dict(pred.parts(arch))} if explain else {})})
    h = tab.header
    result = {"table": str(table), "runtime": h["runtime"], "threads": h["threads"], "device": h["device"],
              "predictions": rows}
    if json_out:
        print_json(result)
        return
    t = Table(title=f"predicted latency ({h['runtime']}, {h['threads']} thread(s), {escape(str(h['device'].get('cpu', h['device'])))})")
    for col in ("subnet", "architecture", "ms"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(escape(r["subnet"]), r["arch"], f"{r['latency_ms']:.4f}")
    console.print(t)
    if explain:
        for r in rows:
            say(console, f"{r['subnet']}:")
            for k, v in r["parts"].items():
                say(console, f"  {k:<40} {v:.4f} ms")


@app.command("pack")
def pack(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pack (models/, manifest.json, run_benchmarks.sh).")],
    space: Annotated[str, typer.Option("--space", "-s", help="Preset or space file.")] = "small",
    supernet: Annotated[Path, typer.Option(help="Take space, input channels and classes from this supernet.pt.")] = None,
    in_channels: Annotated[int, typer.Option(help="Input channels (ignored with --supernet).")] = 1,
    classes: Annotated[int, typer.Option(help="Classifier outputs (ignored with --supernet).")] = 10,
    runtime: Annotated[str, typer.Option(help="xnnpack (--use_xnnpack=true, a phone's default) | builtin (--use_xnnpack=false).")] = "xnnpack",
    threads: ThreadsOpt = 1,
    rounds: Annotated[int, typer.Option(help="Rounds over all models on the phone.")] = 3,
    runs: Annotated[int, typer.Option(help="benchmark_model --num_runs per model and round.")] = 100,
    warmup: Annotated[int, typer.Option(help="benchmark_model --warmup_runs per model and round.")] = 20,
) -> None:
    """Write a phone pack: every part and the fit's whole subnets as .tflite, and an adb script.

    On the machine the phone is attached to: ./run_benchmarks.sh (runs TFLite's benchmark_model
    over adb), then `qnas latency import DIR --out TABLE.json` reads the results into a table.
    """
    from qnas_cli.export.latency_build import N_WHOLE, convert_covers, cover_folder, fit_archs
    from qnas_cli.export.phone import write_pack
    from ..latency import cache_dir

    sp, in_ch, n_cls = _space_and_io(space, supernet, in_channels, classes)
    for v, o in ((threads, "--threads"), (rounds, "--rounds"), (runs, "--runs"), (warmup, "--warmup")):
        check_count(o, v)
    rt = _runtimes(runtime)
    if len(rt) != 1:
        raise UserError("--runtime: a pack times one runtime (xnnpack or builtin)")
    check_out_folder(out)
    done: list[int] = []
    with _Progress(logger(console)) as prog:
        def converted(r: int) -> None:
            done.append(r)
            prog("convert", len(done), len(sp.resolutions))

        cover = convert_covers(sp, in_ch, n_cls, cover_folder(cache_dir() / "latency", sp, in_ch, n_cls),
                               fit_archs(sp, N_WHOLE), log=prog.log, on_done=converted)
    man = write_pack(cover, sp, in_ch, n_cls, out, threads, rt[0], rounds, warmup, runs)
    say(console, f"wrote {len(man['files'])} models to {out}; on the machine the phone is attached to, run "
                 f"{out / 'run_benchmarks.sh'}, then: qnas latency import {out} --out TABLE.json")


@app.command("import")
def import_(
    pack_dir: Annotated[Path, typer.Argument(help="A pack folder after run_benchmarks.sh filled its results/.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The table to write.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the table's header and fit as JSON.")] = False,
) -> None:
    """Turn a phone's benchmark_model outputs into a latency table (with the whole-model fit)."""
    from qnas_cli.export.latency_build import save_table
    from qnas_cli.export.phone import import_pack

    check_out_file(out)
    tab = import_pack(pack_dir)
    save_table(tab, out)
    fit = tab.fit
    if json_out:
        print_json({"table": str(out), "header": tab.header, "fit": {"a": fit.a, "b": fit.b, "points": fit.points}})
        return
    worst = max((abs(p["error"]) for p in fit.points), default=0.0)
    say(console, f"wrote {out}: {len(tab.entries)} parts, fit {fit.a:.3f}*sum {1000 * fit.b:+.2f} us*n "
                 f"(worst whole-model point {100 * worst:.1f}%)")
