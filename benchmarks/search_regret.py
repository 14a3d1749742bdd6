"""The search's regret on an exhaustively scored `tiny` supernet, with and without its final
re-scoring stage (issue 31, part 4; docs/design.md §8).

Every subnet of the `tiny` space (3,200) is scored three ways, each exactly as qnas computes it:
- the search's proxy fitness: BN calibrated on 250 training images, exact int8 top-1 on the seeded
  class-stratified 1,000 (the demo's `--eval-images`) and 2,000 (the default's) search-split images;
- the re-scoring stage's figure: calibrated as `qnas calibrate`/`qnas export` calibrate
  (``calibrate.CALIB_IMAGES``), top-1 on the whole search split (5,000; also its 2,000 subset);
- the truth: the same export-calibrated subnet on the whole test split (10,000).
Then, per budget (three, as the demo picks them from the host table), ``qnas search`` runs at the
demo's size (population 32 x 5 generations, 1,000 images) for several seeds and each
``--rescore-top`` K, fed from the table (its caches hold the scores: the searches are the real
code, nothing is re-evaluated); regret = truth of the best subnet under the budget minus truth
of the winner. One search per K in ``--timed`` also runs for real, from empty caches: the
stage's cost as a share of the search's time, and a check that its scores equal the table's.

    python -m benchmarks.search_regret [--seeds 5] [--out runs/bench/search_regret] [--quick]

The supernet is `qnas train --space tiny` (the default recipe), reused when OUT/supernet holds
that finished run. The table (OUT/subnets.jsonl) is reused row by row when its header (the
supernet's hash, data, calibration record, arithmetic) matches, so a killed run resumes.
Writes OUT/search_regret.json, OUT/search_regret.png and prints the table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from qnas_cli.calibrate import CALIB_IMAGES, calibrated_subnet, correct
from qnas_cli.checkpoint import versions, write_json
from qnas_cli.data import load_dataset, ordered_batches, stratified_indices, to_input
from qnas_cli.demo import budgets_for
from qnas_cli.export.latency_build import resolve_table
from qnas_cli.fitness import SearchInputs, cache_identity
from qnas_cli.latency import Predictor
from qnas_cli.space import Arch, Block, SearchSpace, Stage
from qnas_cli.supernet import load_supernet
from qnas_cli.train import TrainConfig, train

from benchmarks.parallel import run_difference, run_parallel

DATA = "fashion-mnist"
ARITHMETIC = "xnnpack"  # the search's default --runtime
PROXY = {"calib_images": 250, "eval_images": (1000, 2000)}  # qnas search's calibration; the demo's and the default's images
TABLE_FORMAT = "qnas.bench.search_regret/1"
CHUNK = 40  # subnets per job: the table grows (and a killed run resumes) a chunk at a time


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


def table_header(sha256: str) -> dict[str, Any]:
    """What every row of the table depends on besides its architecture (a row is reused only under it)."""
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
        _WORKER.update(path=supernet, net=net, data=data, proxy=SearchInputs(data, PROXY["calib_images"], big),
                       rescore=SearchInputs(data, CALIB_IMAGES, None), in_big=in_big, nested=nested, test={})
    return _WORKER


def score_subnets(supernet: str, keys: list[str], part: str) -> list[dict[str, Any]]:
    """Table rows (correct-image counts) of the subnets ``keys``; runs in a worker process.
    ``part``: "proxy" (the search's fitness at each size) or "export" (calibrated as export does:
    the whole search split, its 2,000 subset, the whole test split)."""
    w = _worker_state(supernet)
    net, data = w["net"], w["data"]
    rows = []
    for key in keys:
        arch = _arch_of(key, net.space)
        r = arch.resolution
        t0 = time.perf_counter()
        if part == "proxy":
            hits = correct(calibrated_subnet(net, arch, data, batches=w["proxy"].calibration(r)), w["proxy"].search(r))
            rows.append({"arch": key, **{f"proxy_{n}": int(hits[m].sum()) for n, m in w["nested"].items()},
                         "proxy_seconds": round(time.perf_counter() - t0, 3)})
            continue
        sub = calibrated_subnet(net, arch, data, batches=w["rescore"].calibration(r))
        search = correct(sub, w["rescore"].search(r))  # the whole split, in file order
        t1 = time.perf_counter()
        if r not in w["test"]:
            w["test"][r] = [(to_input(x, data, r), y) for x, y in ordered_batches(data.test, 100)]
        test = correct(sub, w["test"][r])
        rows.append({"arch": key, "rescore": int(search.sum()), f"rescore_{max(PROXY['eval_images'])}": int(search[w["in_big"]].sum()),
                     "test": int(test.sum()), "search_images": len(search), "test_images": len(test),
                     "rescore_seconds": round(t1 - t0, 3)})
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
    field = "proxy_1000" if part == "proxy" else "test"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/search_regret"))
    ap.add_argument("--table", type=Path, help="latency table (default: this host's XNNPACK table, built on first use)")
    ap.add_argument("--jobs", type=int, default=2, help="processes scoring the table (one thread each)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: a few training steps, a few subnets, tiny searches")
    args = ap.parse_args()
    torch.set_num_threads(1)  # on a loaded 2-core host one thread per process is several times faster than two
    supernet = trained_supernet(args.out, args.quick)
    net, _ = load_supernet(supernet)
    table, table_path = resolve_table(args.table, net.space, net.in_channels, net.num_classes, ARITHMETIC, 1, log=print)
    pred = Predictor(table, net.space)
    budgets = budgets_for(pred, net.space)
    archs = every_subnet(net.space)
    print(f"{len(archs)} subnets; budgets {budgets} ms (the demo's, from {table_path})")
    path = args.out / "subnets.jsonl"
    rows = open_table(supernet, path)
    fill_table(rows, supernet, [a.key for a in archs], "proxy", path, args.jobs)


if __name__ == "__main__":
    main()
