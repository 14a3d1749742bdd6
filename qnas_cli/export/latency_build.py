"""Build latency tables: convert cover graphs, cut every part out, time them, fit whole models.

The path is the export's own (``export_tflite``: IntegerGraph -> ONNX -> onnx2tf -> rewrite
with our integers), applied to a few *cover graphs* (qnas_cli/export/blocks.py) instead of one graph
per part: one onnx2tf call per input resolution converts every part of the space at that
resolution, and each part is then cut out of the converted flatbuffer (qnas_cli/export/cut.py). The
conversions do not depend on the runtime, so they are cached and serve every table of the
space (XNNPACK and built-in kernels, any thread count, and the phone pack).

Whole subnets for the correction fit ride along in the cover graphs as separate branches
from the input; cut out, each is exactly the model ``qnas export`` writes for that
architecture (same ops, same options), and it is timed end to end.
"""
from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qnas_cli.checkpoint import write_json
from qnas_cli.errors import UserError, choice_error
from qnas_cli.latency import (RUNTIMES, STATISTIC, Fit, LatencyTable, cache_dir, fit_correction, host_device, host_table_path,
                              key_text, load_table, part_keys, table_statistic)
from qnas_cli.space import Arch, SearchSpace, sample

from .blocks import PartSpan, cover_graph
from .cut import Cutter
from .measure import Timing, measure_models, method, runtime_version
from .tflite import ONNX2TF_VERSION, export_tflite

N_WHOLE = 12  # whole subnets timed end to end for the fit: largest, smallest, 10 random
COVER_FORMAT = "qnas.latency_cover/1"


@dataclass
class Cover:
    """The converted cover graphs of one (space, input, classes): every part and whole model as bytes."""

    parts: dict[str, bytes]  # key_text -> single-part int8 TFLite
    wholes: list[tuple[Arch, bytes]]  # whole subnets (for the fit) -> their int8 TFLite
    seconds: float  # wall time of converting (or reusing) and cutting
    folder: Path


def fit_archs(space: SearchSpace, n: int = N_WHOLE, seed: int = 0) -> list[Arch]:
    """The whole subnets the correction is fitted on: the extremes and seeded random ones."""
    rng = random.Random(seed)
    archs = {a.key: a for a in (sample(space, "largest"), sample(space, "smallest"))}
    for _ in range(100 * n):  # bounded: a space may hold fewer than n subnets
        if len(archs) >= n:
            break
        a = sample(space, "random", rng)
        archs.setdefault(a.key, a)
    return list(archs.values())[:n]


def cover_folder(root: Path, space: SearchSpace, in_channels: int, num_classes: int) -> Path:
    return Path(root) / f"cover-{space.name}-{space.fingerprint}-c{in_channels}-n{num_classes}-onnx2tf{ONNX2TF_VERSION}"


def convert_covers(space: SearchSpace, in_channels: int, num_classes: int, folder: Path,
                   wholes: list[Arch], jobs: int = 2, log: Callable[[str], None] = print,
                   on_done: Callable[[int], None] | None = None) -> Cover:
    """Convert one cover graph per resolution (``jobs`` onnx2tf processes at once) and cut.

    Reuses a previous conversion in ``folder`` when its manifest matches (same space, input,
    whole subnets and onnx2tf version); each finished resolution is kept, so an interrupted
    build resumes where it stopped.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs_list = []
    for r in space.resolutions:
        ws = [a for a in wholes if a.resolution == r]
        graph, spans, whole_out = cover_graph(space, r, in_channels, num_classes, ws, seed=r)
        jobs_list.append((r, graph, spans, whole_out))

    def convert(job) -> tuple[int, bytes, list[PartSpan], list[tuple[Arch, str]]]:
        r, graph, spans, whole_out = job
        manifest = {"format": COVER_FORMAT, "resolution": r, "space": space.fingerprint,
                    "in_channels": in_channels, "num_classes": num_classes, "onnx2tf": ONNX2TF_VERSION,
                    "ops": len(graph.ops), "wholes": [a.key for a, _ in whole_out]}
        tfl, meta = folder / f"cover_r{r}_int8.tflite", folder / f"cover_r{r}.json"
        if tfl.is_file() and meta.is_file() and json.loads(meta.read_text()) == manifest:
            log(f"{r} px: reusing the converted cover graph {tfl}")
        else:
            log(f"{r} px: converting {len(graph.ops)} int8 ops ({len(spans)} parts, {len(whole_out)} whole subnets) with onnx2tf")
            rng = np.random.default_rng(r)
            calib = rng.integers(-128, 128, size=(4, *graph.input_shape[1:])).astype(np.int8)
            export_tflite(graph, calib, folder, name=f"cover_r{r}")
            write_json(meta, manifest)
        if on_done:
            on_done(r)
        return r, tfl.read_bytes(), spans, whole_out

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # onnx2tf runs in subprocesses
        results = list(pool.map(convert, jobs_list))
    parts: dict[str, bytes] = {}
    wholes_out: list[tuple[Arch, bytes]] = []
    for _, tflite, spans, whole_out in results:
        cutter = Cutter(tflite)
        for span in spans:
            parts.setdefault(key_text(span.key), cutter.cut(span.input, span.output))
        wholes_out += [(arch, cutter.cut("input", out)) for arch, out in whole_out]
    return Cover(parts, wholes_out, time.perf_counter() - t0, folder)


def build_tables(space: SearchSpace, in_channels: int, num_classes: int, runtimes: tuple[str, ...],
                 threads: int = 1, rounds: int = 40, round_ms: float = 3.0, cache: Path | None = None,
                 n_whole: int = N_WHOLE, jobs: int = 2, statistic: str = STATISTIC,
                 log: Callable[[str], None] = print,
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, LatencyTable]:
    """One table per runtime, all parts timed in one interleaved session."""
    cover, timings = time_cover(space, in_channels, num_classes, runtimes, threads, rounds, round_ms, cache,
                                n_whole, jobs, log, progress)
    return tables_from_timings(space, in_channels, num_classes, cover, timings, statistic)


@dataclass
class CoverTimings:
    """Every part and whole subnet of a cover, timed: what tables are made of, under any statistic."""

    timings: dict[tuple[str, str], Timing]  # (key_text or "whole:<arch>", runtime) -> timing
    runtimes: tuple[str, ...]
    threads: int
    rounds: int
    round_ms: float
    measure_s: float
    started: float  # perf_counter at the build's start, for its total time


def time_cover(space: SearchSpace, in_channels: int, num_classes: int, runtimes: tuple[str, ...],
               threads: int = 1, rounds: int = 40, round_ms: float = 3.0, cache: Path | None = None,
               n_whole: int = N_WHOLE, jobs: int = 2, log: Callable[[str], None] = print,
               progress: Callable[[str, int, int], None] | None = None) -> tuple[Cover, CoverTimings]:
    """Convert (or reuse) the space's cover graphs and time every part and fit subnet, interleaved."""
    t0 = time.perf_counter()
    wholes = fit_archs(space, n_whole)
    folder = cover_folder(cache or cache_dir() / "latency", space, in_channels, num_classes)
    n_res = len(space.resolutions)
    done: list[int] = []

    def converted(r: int) -> None:
        done.append(r)
        if progress:
            progress("convert", len(done), n_res)

    cover = convert_covers(space, in_channels, num_classes, folder, wholes, jobs, log, converted)
    models: dict[str, bytes] = dict(cover.parts)
    models.update({whole_name(a): m for a, m in cover.wholes})
    log(f"timing {len(cover.parts)} parts and {len(cover.wholes)} whole subnets on {', '.join(runtimes)}, "
        f"{threads} thread(s), {rounds} interleaved rounds")
    t_measure = time.perf_counter()
    timings = measure_models(models, runtimes, threads, rounds, round_ms,
                             progress=(lambda d, n: progress("measure", d, n)) if progress else None)
    return cover, CoverTimings(timings, tuple(runtimes), threads, rounds, round_ms, time.perf_counter() - t_measure, t0)


def whole_name(arch: Arch) -> str:
    return f"whole:{arch.key}"


def tables_from_timings(space: SearchSpace, in_channels: int, num_classes: int, cover: Cover, timed: CoverTimings,
                        statistic: str = STATISTIC) -> dict[str, LatencyTable]:
    """One table per timed runtime, entries and fit under ``statistic`` (a key of ``STATISTICS``)."""
    tables = {}
    for rt in timed.runtimes:
        t = {k: v for (k, r), v in timed.timings.items() if r == rt}
        entries = {k: t[k].ms(statistic) for k in cover.parts}
        spread = {k: t[k].spread for k in cover.parts}
        measured = {arch.key: t[whole_name(arch)].ms(statistic) for arch, _ in cover.wholes}
        tables[rt] = make_table(
            space, in_channels, num_classes, entries, [a for a, _ in cover.wholes], measured, spread=spread,
            header={"runtime": rt, "runtime_version": runtime_version(), "threads": timed.threads, "device": host_device(),
                    "method": method(timed.threads, timed.rounds, timed.round_ms, statistic=statistic),
                    "conversion": conversion_header(cover),
                    "seconds": {"convert": round(cover.seconds, 1), "measure": round(timed.measure_s, 1),
                                "total": round(time.perf_counter() - timed.started, 1)}})
    return tables


def conversion_header(cover: Cover) -> dict:
    return {"path": "IntegerGraph -> ONNX -> onnx2tf -> qnas rewrite (qnas export's path); one cover graph "
                    "per resolution, each part cut out of the converted flatbuffer",
            "onnx2tf": ONNX2TF_VERSION, "seconds": round(cover.seconds, 1), "folder": str(cover.folder)}


def make_table(space: SearchSpace, in_channels: int, num_classes: int, entries: dict[str, float],
               wholes: list[Arch], measured: dict[str, float], header: dict, spread: dict | None = None) -> LatencyTable:
    """Fit the whole-model correction and assemble a table (host builds and phone imports alike).

    header must name runtime, threads and device; space, input, date and part count are added.
    """
    points = []
    for arch in wholes:
        keys = part_keys(space, arch, in_channels, num_classes)
        points.append({"arch": arch.key, "sum_ms": sum(entries[key_text(k)] for k in keys),
                       "n_parts": len(keys), "measured_ms": measured[arch.key]})
    a, b = fit_correction((p["sum_ms"], p["n_parts"], p["measured_ms"]) for p in points)
    fit = Fit(a, b, points)
    for p in points:
        p["predicted_ms"] = fit.apply(p["sum_ms"], p["n_parts"])
        p["error"] = p["predicted_ms"] / p["measured_ms"] - 1
    full = {"space": {"name": space.name, "fingerprint": space.fingerprint, "definition": space.to_dict()},
            "in_channels": in_channels, "num_classes": num_classes, **header,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "parts": len(entries)}
    return LatencyTable(full, dict(entries), fit, dict(spread or {}))


def save_table(table: LatencyTable, path: Path) -> None:
    write_json(path, table.to_dict())


def table_outputs(out: Path | None, space: SearchSpace, in_channels: int, num_classes: int,
                  runtimes: tuple[str, ...], threads: int) -> dict[str, Path]:
    """Where each runtime's table goes: ``out`` for one runtime, ``out`` with the runtime in its
    name for several, the host cache when ``out`` is None."""
    if out is None:
        return {rt: host_table_path(space, in_channels, num_classes, rt, threads) for rt in runtimes}
    out = Path(out)
    if len(runtimes) == 1:
        return {runtimes[0]: out}
    return {rt: out.with_name(f"{out.stem}.{rt}{out.suffix or '.json'}") for rt in runtimes}


def resolve_table(table_path: Path | str | None, space: SearchSpace, in_channels: int, num_classes: int,
                  runtime: str = "xnnpack", threads: int = 1,
                  log: Callable[[str], None] = print) -> tuple[LatencyTable, Path]:
    """The latency table a search uses: ``--table`` (checked against the space and input), else
    this host's for ``runtime`` and ``threads``, built on first use (converts and times: minutes)."""
    if table_path:
        return load_table(Path(table_path), space, in_channels, num_classes), Path(table_path)
    return ensure_host_table(space, in_channels, num_classes, runtime, threads, log=log)


def ensure_host_table(space: SearchSpace, in_channels: int, num_classes: int, runtime: str = "xnnpack",
                      threads: int = 1, log: Callable[[str], None] = print, **build) -> tuple[LatencyTable, Path]:
    """The cached host table for this (space, input, runtime, threads), built on first use."""
    # Only the runtimes a table may hold (load_table refuses the others): a table timed on the
    # reference kernels or TFLite Micro would be built, refused on load and rebuilt on every use.
    if runtime not in RUNTIMES:
        raise choice_error("--table-runtime", runtime, RUNTIMES)
    path = host_table_path(space, in_channels, num_classes, runtime, threads)
    if path.is_file():
        try:
            table = load_table(path, space, in_channels, num_classes)
            if table_statistic(table.header) == STATISTIC:
                return table, path
            log(f"rebuilding the cached latency table: its entries are the {table_statistic(table.header)} "
                f"of the invoke times, the default is now the {STATISTIC}")
        except UserError as e:
            log(f"rebuilding the cached latency table: {e}")
    log(f"building the host latency table for {space.name} ({runtime}, {threads} thread(s)) once, cached in {path}")
    table = build_tables(space, in_channels, num_classes, (runtime,), threads, log=log, **build)[runtime]
    save_table(table, path)
    return table, path
