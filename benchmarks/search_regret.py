"""The search's regret on an exhaustively scored `tiny` supernet, with and without its final
re-scoring stage (issue 31, part 4; docs/design.md §8; BENCHMARKS.md "Search: the winners' test regret").

Every subnet of the `tiny` space (3,200) that meets a budget is scored, each exactly as qnas computes it:
- the search's fitness: BN calibrated on 250 training images, exact int8 top-1 on the seeded
  class-stratified 1,000 (the demo's `--eval-images`) and 2,000 (the default's) search-split images;
- the truth: calibrated as `qnas calibrate`/`qnas export` calibrate (``calibrate.CALIB_IMAGES``),
  exact int8 top-1 on the whole test split (10,000); nearest first to the best fitness under its
  tightest budget, and with ``--margin-pp M`` only within M pp of it (the report gives each
  budget's test-best's distance, to show whether the margin bound).
- the re-score: what the search's last stage computes (export's calibration, the whole search split),
  for the same subnets as the truth;
- the fitness with more calibration images (``CALIB_VARIANTS``: 1,000), for the same subnets: is
  the proxy's error its 250-image calibration or its 1,000-2,000 images?
Then, per budget (three, as the demo picks them from the host table), ``qnas search`` runs at each
search size of ``SIZES`` (the demo's first: population 64 x 5 generations, 2,000 images) for
``--seeds`` seeds and each ``--rescore-top`` K in ``TOPS``, on caches filled from the table (the
searches are the real code, and evaluate nothing the table holds); regret = truth of the best
subnet under the budget minus truth of the winner. Also reported: the floor (the best on test of
what each search evaluated: a perfect last stage's pick), the fitness's exhaustive optimum and the
re-score's (the best any search on the search split could pick). Per size, two searches (K=0 and
the default K) run from empty caches: the stage's cost as a share of the search's time, and a
check that their scores equal the table's.

    python -m benchmarks.search_regret [--margin-pp 2.5] [--seeds 12] [--sizes 64x5-2000,...] [--out runs/bench/search_regret] [--quick]

The supernet is `qnas train --space tiny` (the default recipe), reused when OUT/supernet holds
that finished run. The table (OUT/subnets.jsonl) is reused row by row when its header (the
supernet's hash, data, calibration record, arithmetic) matches, so a killed run resumes; a new
one starts from ``COMMITTED_TABLE`` when that header matches. On this 2-core host (2026-12-08,
alone): training 5 min, the fitness of every subnet 10 min, the truth 0.86 s per subnet (2,318
within 2.5 pp: 33 min), the re-scores 22 min, the 1,000-image calibration 9 min, the searches 4-6
min per size.
Writes OUT/search_regret.json, OUT/search_regret.png and prints the table.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from qnas_cli.calibrate import CALIB_IMAGES, calibrated_subnet, correct
from qnas_cli.checkpoint import versions, write_json
from qnas_cli.data import load_dataset, ordered_batches, stratified_indices, to_input
from qnas_cli.demo import DEMO_SEARCH, budgets_for
from qnas_cli.export.latency_build import resolve_table
from qnas_cli.fitness import CACHE_FORMAT, SearchInputs, cache_identity, fitness_arithmetic
from qnas_cli.latency import Predictor
from qnas_cli.rescore import DEFAULT_TOP, RESCORE_FILE, rescore_identity
from qnas_cli.search_job import SearchConfig, prepare_search, run_search
from qnas_cli.space import Arch, Block, SearchSpace, Stage
from qnas_cli.supernet import load_supernet
from qnas_cli.train import TrainConfig, train

from benchmarks.parallel import run_difference, run_parallel
from benchmarks.plots import pyplot, save_png

DATA = "fashion-mnist"
ARITHMETIC = "xnnpack"  # the search's default --runtime
PROXY = {"calib_images": 250, "eval_images": (1000, 2000)}  # qnas search's calibration; the demo's and the default's images
# The search's fitness with more calibration images (``--calib-images``), scored for the truth's
# subnets only (as ``proxy_c<N>_<images>``): is the proxy's noise its calibration or its images?
CALIB_VARIANTS = (1000,)
TABLE_FORMAT = "qnas.bench.search_regret/1"
# The table as committed (2026-12-08, `qnas train --space tiny` at its defaults, every part scored
# within 2.5 pp): a run whose supernet hashes the same starts from it instead of 80 minutes of scoring.
COMMITTED_TABLE = Path(__file__).parent / "data" / "search_regret_tiny_fashion-mnist.jsonl.gz"
CHUNK = 20  # subnets per job: the table grows (and a killed run resumes) a chunk at a time
# Search sizes compared, named population x generations - images per candidate [- calibration
# images], the demo's first (qnas_cli/demo.py's search, its other settings the defaults; the
# top-level report describes it): the demo's size before
# 2026-12-08 (32x5-1000), and what lowers its floor (more subnets evaluated) or its noise (the
# default search's 2,000 images, more calibration).
SIZES = {"64x5-2000": DEMO_SEARCH, "32x5-1000": {"population": 32, "generations": 5, "eval_images": 1000},
         "32x5-2000": {"population": 32, "generations": 5, "eval_images": 2000},
         "32x5-1000-c1000": {"population": 32, "generations": 5, "eval_images": 1000, "calib_images": 1000}}
QUICK = {"population": 4, "generations": 1, "eval_images": 1000}
TOPS = (0, 1, 2, 3, 5, 8)  # --rescore-top values compared


def every_subnet(space: SearchSpace) -> list[Arch]:
    """Every architecture of ``space``: resolution x per stage (width, depth, per block kernel x expand)."""
    def stage_choices(spec):
        blocks = [Block(k, e) for k in spec.kernels for e in spec.expands]
        return [Stage(w, combo) for w in spec.widths for d in spec.depths for combo in itertools.product(blocks, repeat=d)]

    return [Arch(r, stages) for r in space.resolutions for stages in itertools.product(*map(stage_choices, space.stages))]


def trained_supernet(out: Path, quick: bool) -> Path:
    """OUT/supernet/supernet.pt: `qnas train --space tiny` (the default recipe; --quick: a few steps),
    reused when the finished run there is that run (``run_difference``)."""
    options = dict(steps=40, batch_size=32, warmup_steps=2, eval_images=200, calib_images=64) if quick else {}
    cfg = TrainConfig(space="tiny", data=DATA, out=str(out / "supernet"), tensorboard=False, **options)
    meta = out / "supernet" / "supernet.json"
    why = run_difference(json.loads(meta.read_text()), cfg) if meta.is_file() else "none trained yet"
    if why is None:
        print(f"reusing {cfg.out}/supernet.pt (the same run)")
    else:
        print(f"training {cfg.out}/supernet.pt: qnas train --space tiny ({why})", flush=True)
        t = time.perf_counter()
        train(cfg, log=lambda *a, **k: None, overwrite=True)
        print(f"  trained in {time.perf_counter() - t:.0f} s")
    return out / "supernet" / "supernet.pt"


def proxy_calib(part: str) -> int | None:
    """The calibration images of a fitness ``part`` of the table ("proxy", "proxy-c<N>"); None for the others."""
    if part == "proxy":
        return PROXY["calib_images"]
    return int(part.removeprefix("proxy-c")) if part.startswith("proxy-c") else None


def proxy_field(calib_images: int, eval_images: int) -> str:
    """The table's field of the fitness with ``calib_images`` calibration and ``eval_images`` search images."""
    return f"proxy_{eval_images}" if calib_images == PROXY["calib_images"] else f"proxy_c{calib_images}_{eval_images}"


def _size_name(name: str) -> bool:
    if name not in SIZES:
        raise argparse.ArgumentTypeError(f"unknown search size {name!r}: choose from {', '.join(SIZES)}")
    return True


def table_header(sha256: str) -> dict[str, Any]:
    """What every row of the table depends on besides its architecture (a row is reused only under it)."""
    # "rescore": the calibration of the test rows (export's), as the stage's cache records it
    return {"format": TABLE_FORMAT, "proxy": cache_identity(sha256, DATA, PROXY["calib_images"], max(PROXY["eval_images"]), ARITHMETIC),
            "rescore": cache_identity(sha256, DATA, CALIB_IMAGES, None, ARITHMETIC), "test": "whole split"}


_WORKER: dict[str, Any] = {}  # per process: the supernet, the data and their inputs, loaded once


def _worker_state(supernet: str) -> dict[str, Any]:
    if _WORKER.get("path") != supernet:
        net, _ = load_supernet(supernet)
        data = load_dataset(DATA, load_size=max(net.space.resolutions))
        big = max(PROXY["eval_images"])
        in_big = stratified_indices(data.search, big).sort().values  # the order ordered_batches scores them in
        nested = {n: torch.isin(in_big, stratified_indices(data.search, n)) for n in PROXY["eval_images"]}
        _WORKER.update(path=supernet, net=net, data=data, calib={PROXY["calib_images"]: SearchInputs(data, PROXY["calib_images"], big)},
                       export=SearchInputs(data, CALIB_IMAGES, None), in_big=in_big, nested=nested, test={})
    return _WORKER


def score_subnets(supernet: str, keys: list[str], part: str) -> list[dict[str, Any]]:
    """Table rows (correct-image counts) of the subnets ``keys``; runs in a worker process.
    ``part``: "proxy" (the search's fitness at each of ``PROXY``'s sizes), "proxy-c<N>" (the same
    with N calibration images, one of ``CALIB_VARIANTS``), "test" (the truth:
    calibrated as `qnas export` calibrates, top-1 on the whole test split) or "rescore" (the
    search's last stage: calibrated the same, top-1 on the whole search split)."""
    w = _worker_state(supernet)
    net, data = w["net"], w["data"]
    rows = []
    for key in keys:
        arch = _arch_of(key, net.space)
        r = arch.resolution
        t0 = time.perf_counter()
        if (calib := proxy_calib(part)) is not None:
            if calib not in w["calib"]:
                w["calib"][calib] = SearchInputs(data, calib, max(PROXY["eval_images"]))
            inputs = w["calib"][calib]
            hits = correct(calibrated_subnet(net, arch, data, batches=inputs.calibration(r)), inputs.search(r))
            rows.append({"arch": key, **{proxy_field(calib, n): int(hits[m].sum()) for n, m in w["nested"].items()},
                         f"{part}_seconds": round(time.perf_counter() - t0, 3)})
            continue
        if part == "rescore":
            hits = correct(calibrated_subnet(net, arch, data, batches=w["export"].calibration(r)), w["export"].search(r))
            rows.append({"arch": key, "rescore": int(hits.sum()), "rescore_images": len(hits),
                         "rescore_seconds": round(time.perf_counter() - t0, 3)})
            continue
        if r not in w["test"]:
            w["test"][r] = [(to_input(x, data, r), y) for x, y in ordered_batches(data.test, 100)]
        hits = correct(calibrated_subnet(net, arch, data, batches=w["export"].calibration(r)), w["test"][r])
        rows.append({"arch": key, "test": int(hits.sum()), "test_images": len(hits),
                     "test_seconds": round(time.perf_counter() - t0, 3)})
    return rows


_ARCHS: dict[str, dict[str, Arch]] = {}


def _arch_of(key: str, space: SearchSpace) -> Arch:
    if space.fingerprint not in _ARCHS:
        _ARCHS[space.fingerprint] = {a.key: a for a in every_subnet(space)}
    return _ARCHS[space.fingerprint][key]


def open_table(supernet: Path, path: Path) -> dict[str, dict[str, Any]]:
    """The rows already in ``path`` (one subnet's parts merged) when its header is this supernet's
    and these settings'; else an empty table there."""
    _, meta = load_supernet(supernet)
    header = table_header(meta["weights"]["sha256"])
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file() and COMMITTED_TABLE.is_file():
        lines = gzip.decompress(COMMITTED_TABLE.read_bytes()).decode().splitlines()
        if lines and json.loads(lines[0]) == header:
            print(f"starting from {COMMITTED_TABLE} (made for this supernet)")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
        else:
            print(f"{COMMITTED_TABLE}: made for another supernet; scoring from the start")
    if path.is_file():
        lines = path.read_text().splitlines()
        if lines and json.loads(lines[0]) == header:
            for line in lines[1:]:
                try:
                    row = json.loads(line)
                    rows.setdefault(row["arch"], {}).update(row)
                except (ValueError, KeyError):
                    continue  # cut short by a kill
        else:
            print(f"{path}: made for another supernet or other settings; scoring again")
            path.unlink()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(header) + "\n")
    return rows


def fill_table(rows: dict[str, dict[str, Any]], supernet: Path, keys: list[str], part: str, path: Path, jobs: int) -> None:
    """Score ``part`` of every subnet of ``keys`` that lacks it, ``jobs`` processes at a time,
    appended to ``path`` a chunk at a time (a killed run resumes from there)."""
    field = part if (calib := proxy_calib(part)) is None else proxy_field(calib, min(PROXY["eval_images"]))
    todo = [k for k in dict.fromkeys(keys) if field not in rows.get(k, {})]
    if not todo:
        return
    print(f"scoring {part} of {len(todo)} subnets ({len(keys) - len(todo)} already in {path})", flush=True)
    t = time.perf_counter()
    chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
    calls = [(str(supernet), c, part) for c in chunks]
    done = 0
    with open(path, "a") as f:
        for got in (run_parallel(score_subnets, calls, jobs) if jobs > 1 else (score_subnets(*c) for c in calls)):
            for row in got:
                rows.setdefault(row["arch"], {}).update(row)
                f.write(json.dumps(row) + "\n")
            f.flush()
            done += len(got)
            print(f"  {part}: {done}/{len(todo)} ({time.perf_counter() - t:.0f} s)", flush=True)


def proxy_gaps(rows: dict[str, dict[str, Any]], latency: dict[str, float], budgets: list[float]) -> dict[str, float]:
    """Per subnet that meets a budget: how far (fraction) its proxy score lies below the best one
    under the tightest budget it meets (the smaller gap of the two sizes). The truth is scored
    nearest first, so that a margin (``--margin-pp``) or a run cut short leaves out only the
    subnets least likely to be a budget's best; a budget's best keeps its gap in the report."""
    best = {b: {n: max((rows[a][f"proxy_{n}"] / n for a in latency if latency[a] <= b), default=0.0) for n in PROXY["eval_images"]}
            for b in budgets}
    gaps = {}
    for a in latency:
        if latency[a] <= max(budgets):
            b = min(x for x in budgets if latency[a] <= x)
            gaps[a] = min(best[b][n] - rows[a][f"proxy_{n}"] / n for n in PROXY["eval_images"])
    return dict(sorted(gaps.items(), key=lambda kv: kv[1]))


def write_cache(path: Path, identity: dict[str, Any], scores: dict[str, float]) -> None:
    """A search cache (``fitness.Fitness``'s file) holding ``scores``: a search resumed on it
    evaluates only what is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"format": CACHE_FORMAT, **identity})] + [json.dumps({"arch": k, "accuracy": v}) for k, v in scores.items()]
    path.write_text("\n".join(lines) + "\n")


def read_cache(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    return {r["arch"]: r["accuracy"] for r in map(json.loads, path.read_text().splitlines()[1:])}


def fed_search(cfg: SearchConfig, setup, table, proxy: dict[str, float], rescores: dict[str, float]) -> dict[str, Any]:
    """``qnas search`` (run_search) resumed on caches that hold the table's proxy scores and every
    re-score made so far (``rescores``, grown with this run's): the real code, evaluating only what
    the table lacks."""
    out = Path(cfg.out)
    shutil.rmtree(out, ignore_errors=True)
    sha, arithmetic = setup.meta["weights"]["sha256"], fitness_arithmetic(cfg.runtime)
    write_cache(out / "evaluations.jsonl", cache_identity(sha, setup.data_spec, cfg.calib_images, cfg.eval_images, arithmetic), proxy)
    if cfg.rescore_top:
        write_cache(out / RESCORE_FILE, rescore_identity(sha, setup.data_spec, arithmetic), rescores)
    result = run_search(replace(cfg, resume=True), log=lambda m: None, table=table, setup=setup)
    rescores.update(read_cache(out / RESCORE_FILE))
    proxy.update(read_cache(out / "evaluations.jsonl"))  # what the table lacked (a calibration variant's subnets outside the truth)
    return result


def timed_search(cfg: SearchConfig, setup, table) -> dict[str, Any]:
    """One search from empty caches (what a user's search costs)."""
    shutil.rmtree(cfg.out, ignore_errors=True)
    t = time.perf_counter()
    result = run_search(cfg, log=lambda m: None, table=table, setup=setup)
    return {**result, "measured_wall": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/search_regret"))
    ap.add_argument("--table", type=Path, help="latency table (default: this host's XNNPACK table, built on first use)")
    ap.add_argument("--seeds", type=int, default=12, help="searches per K (seeds 0..N-1)")
    ap.add_argument("--jobs", type=int, default=2, help="processes scoring the table (one thread each)")
    ap.add_argument("--margin-pp", type=float, help="score the truth only of the subnets whose proxy score lies within this "
                                                    "many pp of the best under their tightest budget (default: every subnet)")
    ap.add_argument("--sizes", type=lambda t: [n for n in t.split(",") if _size_name(n)], default=list(SIZES),
                    help=f"search sizes to compare, comma-separated (default: all of {', '.join(SIZES)})")
    ap.add_argument("--quick", action="store_true", help="a smoke test: a few training steps, 24 subnets, tiny searches")
    args = ap.parse_args()
    torch.set_num_threads(1)  # on a loaded 2-core host one thread per process is several times faster than two
    t_start = time.perf_counter()
    supernet = trained_supernet(args.out, args.quick)
    net, _ = load_supernet(supernet)
    table, table_path = resolve_table(args.table, net.space, net.in_channels, net.num_classes, ARITHMETIC, 1, log=print)
    pred = Predictor(table, net.space)
    budgets = budgets_for(pred, net.space)
    archs = every_subnet(net.space)
    if args.quick:
        archs = [archs[0], archs[-1]] + random.Random(0).sample(archs[1:-1], 22)
    latency = {a.key: pred.predict(a) for a in archs}
    print(f"{len(archs)} subnets; budgets {budgets} ms (the demo's, from {table_path})")
    path = args.out / "subnets.jsonl"
    rows = open_table(supernet, path)
    fill_table(rows, supernet, list(latency), "proxy", path, args.jobs)
    gaps = proxy_gaps(rows, latency, budgets)
    margin = math.inf if args.margin_pp is None else args.margin_pp / 100
    truth = [a for a, g in gaps.items() if g <= margin]  # nearest the budget's best first
    for part in ("test", "rescore", *(f"proxy-c{c}" for c in CALIB_VARIANTS)):
        fill_table(rows, supernet, truth, part, path, args.jobs)

    sizes = {"quick": QUICK} if args.quick else {n: SIZES[n] for n in args.sizes}
    tops, seeds = ((0, 2), 1) if args.quick else (TOPS, args.seeds)
    docs = {}
    for name, size in sizes.items():
        docs[name] = searched_size(name, size, supernet, rows, latency, budgets, (table, table_path), tops, seeds, args, pred, net, gaps)
        print_report(docs[name])
    first = next(iter(docs.values()))
    doc = {**first, "sizes": docs}  # the top level: the first size's (the demo's) report
    doc["truth"] = {"margin_pp": args.margin_pp, "scored": sum("test" in rows.get(a, {}) for a in gaps), "meet_a_budget": len(gaps)}
    doc.update(supernet={"path": str(supernet), "sha256": first["sha256"]}, table=str(table_path),
               command="python -m benchmarks.search_regret" + (" --quick" if args.quick else f" --sizes {','.join(sizes)}"),
               minutes=round((time.perf_counter() - t_start) / 60, 1), versions=versions())
    write_json(args.out / "search_regret.json", doc)
    plot(doc, args.out / "search_regret.png")
    print(f"wrote {args.out / 'search_regret.json'} and search_regret.png ({doc['minutes']} min)")


def searched_size(name, size, supernet, rows, latency, budgets, table, tops, seeds, args, pred, net, gaps) -> dict[str, Any]:
    """``--seeds`` searches per K at one search ``size``, fed from the table, and two timed from
    empty caches; their report."""
    base = SearchConfig(supernet=str(supernet), budgets_ms=budgets, table=str(table[1]), tensorboard=False,
                        **{"calib_images": PROXY["calib_images"], **size})
    setup = prepare_search(base)
    n, field = base.eval_images, proxy_field(base.calib_images, base.eval_images)
    proxy = {k: r[field] / n for k, r in rows.items() if field in r}
    rescores = {k: r["rescore"] / r["rescore_images"] for k, r in rows.items() if "rescore" in r}
    runs = []
    print(f"searches of size {name} ({size}), K in {tops}, seeds 0..{seeds - 1}, fed from the table", flush=True)
    for k in tops:
        for seed in range(seeds):
            res = fed_search(replace(base, rescore_top=k, seed=seed, out=str(args.out / "searches" / name / f"k{k}_s{seed}")),
                             setup, table, proxy, rescores)
            runs.append({"top": k, "seed": seed, "winners": {f"{c['budget_ms']:g}": c["arch"] for c in res["chosen"]},
                         # the best on test of every subnet this search evaluated under each budget: what a perfect
                         # last stage could pick, so the regret its coverage alone leaves
                         "oracle": {f"{b:g}": max((s["arch"] for s in res["subnets"] if s["latency_ms"] <= b and "test" in rows.get(s["arch"], {})),
                                                  key=lambda a: rows[a]["test"], default=None) for b in budgets},
                         "rescored": res["rescore"].get("rescored", 0), "new_evaluations": res["evaluations"]["new"]})
    # One search per arm for real, from empty caches: the stage's cost, and the table's scores checked
    timed = {}
    for k in (0, DEFAULT_TOP if not args.quick else 2):
        res = timed_search(replace(base, rescore_top=k, seed=0, out=str(args.out / "timed" / name / f"k{k}")), setup, table)
        made = read_cache(args.out / "timed" / name / f"k{k}" / "evaluations.jsonl")
        timed[k] = {"wall_s": round(res["measured_wall"], 1), "rescore_s": res["seconds"]["rescore"],
                    "rescored": res["rescore"].get("rescored", 0), "evaluations": res["evaluations"]["new"],
                    "equal_to_table": sum(proxy.get(a) == v for a, v in made.items()), "in_table": sum(a in proxy for a in made)}
        print(f"timed search, K={k}: {timed[k]}", flush=True)
    missing = {a for r in runs for a in r["winners"].values() if "test" not in rows.get(a, {})}
    missing |= {a for b in budgets for m in PROXY["eval_images"] if (a := fitness_optimum(rows, latency, b, proxy_field(PROXY["calib_images"], m))) and "test" not in rows[a]}
    if missing:  # quick mode: winners outside its sample
        path = args.out / "subnets.jsonl"
        fill_table(rows, supernet, sorted(missing), "test", path, 1)
        fill_table(rows, supernet, sorted(missing), "rescore", path, 1)
        for a in missing:
            latency[a] = pred.predict(_arch_of(a, net.space))
    doc = report(rows, latency, budgets, runs, timed, tops, size, len(latency), gaps)
    return {**doc, "name": name, "sha256": setup.meta["weights"]["sha256"]}


def report(rows, latency, budgets, runs, timed, tops, size, universe, gaps) -> dict[str, Any]:
    """Per budget and K: the winners' test top-1 and regret over the seeds; the stage's cost."""
    test = {a: r["test"] / r["test_images"] for a, r in rows.items() if "test" in r}
    per_rescore = timed[max(timed)]["rescore_s"] / max(timed[max(timed)]["rescored"], 1)
    search_s = timed[0]["wall_s"]
    out_rows = []
    for b in budgets:
        under = [a for a in test if latency.get(a, math.inf) <= b]
        best = max(under, key=lambda a: test[a])
        oracle = [100 * (test[best] - test[r["oracle"][f"{b:g}"]]) for r in runs if r["top"] == tops[0] and r["oracle"][f"{b:g}"]]
        # keyed "<calibration images>/<search images>"; a calibration variant's over the truth's subnets only
        optimum = {f"{c}/{n}": round(100 * (test[best] - test[fitness_optimum(rows, latency, b, proxy_field(c, n))]), 2)
                   for c in (PROXY["calib_images"], *CALIB_VARIANTS) for n in PROXY["eval_images"]
                   if any(proxy_field(c, n) in rows[a] for a in under)}
        # the best re-score under the budget (the truth's subnets): what a search that re-scored everything would pick
        by_rescore = max((a for a in test if latency.get(a, math.inf) <= b and "rescore" in rows[a]),
                         key=lambda a: (rows[a]["rescore"], -latency[a]))
        for k in tops:
            picks = [r["winners"][f"{b:g}"] for r in runs if r["top"] == k]
            regret = [100 * (test[best] - test[a]) for a in picks]
            out_rows.append({"budget_ms": b, "top": k, "subnets_under": len(under), "best_test_top1": test[best], "best": best,
                             "best_proxy_gap_pp": round(100 * gaps.get(best, math.nan), 2),
                             # None: no subnet a search evaluated has a truth (--quick's sample)
                             "oracle_mean_regret_pp": sum(oracle) / len(oracle) if oracle else None, "fitness_optimum_regret_pp": optimum,
                             "rescore_optimum_regret_pp": round(100 * (test[best] - test[by_rescore]), 2),
                             "winners_test_top1": [test[a] for a in picks], "regret_pp": regret,
                             "mean_regret_pp": sum(regret) / len(regret), "max_regret_pp": max(regret)})
    cost = {}
    for k in tops:
        rescored = [r["rescored"] for r in runs if r["top"] == k]
        cost[k] = {"mean_rescored": sum(rescored) / len(rescored),
                   "estimated_pct": 100 * per_rescore * sum(rescored) / len(rescored) / search_s}
    return {"budgets": budgets, "search": size, "subnets": universe, "tops": list(tops), "rows": out_rows, "timed": timed,
            "seconds_per_rescore": round(per_rescore, 2), "cost": cost,
            "measured_cost_pct": round(100 * timed[max(timed)]["rescore_s"] / search_s, 1), "runs": runs}


def fitness_optimum(rows, latency, budget: float, field: str) -> str:
    """The subnet under ``budget`` with the best fitness ``field`` (``proxy_field``) over the table (ties: faster)."""
    return max((a for a in rows if latency.get(a, math.inf) <= budget and field in rows[a]),
               key=lambda a: (rows[a][field], -latency[a]))


def print_report(doc: dict[str, Any]) -> None:
    print(f"\nsearch size {doc['name']} ({doc['search']}): regret = test top-1 of the best subnet under the budget - the "
          f"winner's (pp), {len(doc['runs']) // len(doc['tops'])} seed(s); {doc['subnets']} subnets")
    print(f"{'budget':>9} {'best test':>9} {'its gap':>7} | " + " | ".join(f"K={k}: mean / max" for k in doc["tops"]))
    for b in doc["budgets"]:
        rows = [r for r in doc["rows"] if r["budget_ms"] == b]
        print(f"{b:>7g}ms {100 * rows[0]['best_test_top1']:>8.2f}% {rows[0]['best_proxy_gap_pp']:>7.2f} | "
              + " | ".join(f"{r['mean_regret_pp']:>6.2f} / {r['max_regret_pp']:>5.2f}" for r in rows))
    means = {k: sum(r["mean_regret_pp"] for r in doc["rows"] if r["top"] == k) / len(doc["budgets"]) for k in doc["tops"]}
    print("mean over budgets: " + ", ".join(f"K={k}: {v:.2f} pp" for k, v in means.items()))
    first = [r for r in doc["rows"] if r["top"] == doc["tops"][0]]
    print("floor, the best on test of what each search evaluated: "
          + ", ".join(f"{r['budget_ms']:g} ms {r['oracle_mean_regret_pp'] or math.nan:.2f} pp" for r in first))
    print("the fitness's exhaustive optimum (every subnet): " + ", ".join(f"{r['budget_ms']:g} ms {r['fitness_optimum_regret_pp']}" for r in first))
    print("the re-score's exhaustive optimum (every subnet with a truth): "
          + ", ".join(f"{r['budget_ms']:g} ms {r['rescore_optimum_regret_pp']}" for r in first))
    print("stage cost, % of the search's time: " + ", ".join(f"K={k}: {c['estimated_pct']:.1f}%" for k, c in doc["cost"].items())
          + f" (estimated from {doc['seconds_per_rescore']} s per re-score; measured at K={max(doc['timed'])}: {doc['measured_cost_pct']}%)")


def plot(doc: dict[str, Any], path: Path) -> None:
    """Left: the first size's regret per budget against K. Right: every size's mean over the budgets."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for b in doc["budgets"]:
        rows = [r for r in doc["rows"] if r["budget_ms"] == b]
        ax.errorbar([r["top"] for r in rows], [r["mean_regret_pp"] for r in rows],
                    yerr=[[0] * len(rows), [r["max_regret_pp"] - r["mean_regret_pp"] for r in rows]], marker="o", capsize=3,
                    label=f"{b:g} ms ({rows[0]['subnets_under']} subnets)")
    ax.set(xlabel="--rescore-top K (0: the fitness's winner)", ylabel="test regret (pp): mean, bar to max",
           title=f"size {doc['name']}: {doc['search']['population']} x {doc['search']['generations']}, "
                 f"{doc['search']['eval_images']} images")
    for d in doc["sizes"].values():
        means = [sum(r["mean_regret_pp"] for r in d["rows"] if r["top"] == k) / len(d["budgets"]) for k in d["tops"]]
        ax2.plot(d["tops"], means, marker="o",
                 label=f"{d['name']}: K={DEFAULT_TOP} costs {d['cost'][DEFAULT_TOP]['estimated_pct']:.0f}%" if DEFAULT_TOP in d["cost"] else d["name"])
    ax2.set(xlabel="--rescore-top K", ylabel="test regret, mean over the budgets (pp)", title=f"every search size (tiny, {len(doc['runs']) // len(doc['tops'])} seed(s) per K)")
    for a in (ax, ax2):
        a.axhline(0.3, color="0.5", ls=":", label="target 0.3 pp")
        a.legend(fontsize=8)
    save_png(fig, path)


if __name__ == "__main__":
    main()
