"""Run independent jobs (training runs) a few at a time, each with its share of the CPU threads;
and tell whether a finished training run is the one a benchmark would train (its reuse check).

On a 2-core host, two single-thread training runs side by side do about 1.6x the work of one
two-thread run (measured: 100 img/s each vs 120 img/s for one int8 run), since one small
network's kernels do not keep two cores busy. Per-job wall times are then those of a shared core.
"""
from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from qnas_cli.errors import UserError
from qnas_cli.run_folder import check_resumable
from qnas_cli.space import load_space
from qnas_cli.train import TrainConfig, phase_plan, plan_record


# The supernet `make bench` trains first (benchmarks.supernet_accuracy's default recipe): the
# default --supernet of the benchmarks that search one, so that they run on a clean clone.
BENCH_SUPERNET = "runs/bench/supernet_accuracy/default/supernet.pt"


def trained_supernet(text: str) -> Path:
    """argparse ``type`` of a --supernet (its default included): a supernet.pt that exists, else
    one line naming what makes it."""
    path = Path(text)
    if not path.is_file():
        make = ("python -m benchmarks.supernet_accuracy first (make bench does)" if path == Path(BENCH_SUPERNET)
                else f"qnas train --out {path.parent} first")
        raise argparse.ArgumentTypeError(f"{path} does not exist: run {make}, or pass another --supernet")
    return path


def threads_per_job(jobs: int) -> int:
    return max(1, torch.get_num_threads() // jobs)


def run_parallel(fn: Callable[..., Any], calls: Iterable[tuple], jobs: int) -> Iterator[Any]:
    """``fn(*args)`` for each ``args`` in ``calls``, ``jobs`` at a time; results in order, as they finish.
    ``fn`` must be a module-level function (it runs in a spawned process)."""
    calls = list(calls)
    # spawn, not fork: a forked child inherits the parent's OpenMP thread pool in an undefined state
    with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), torch.set_num_threads, (threads_per_job(jobs),)) as pool:
        for future in [pool.submit(fn, *args) for args in calls]:
            yield future.result()


def run_difference(meta: dict[str, Any], cfg: TrainConfig, keys: tuple[str, ...] = TrainConfig.RESUME_KEYS,
                   data: dict[str, Any] | None = None) -> str | None:
    """Why the finished run that ``meta`` records (a supernet.json, or a result written with the
    same ``config``/``space``/``phases``/``data`` keys) is not the run ``cfg`` would train; None
    when it is. Compared: what was trained, never where it lies: the options ``keys`` (recipe,
    data spec, seed, subnet, ...), the space's fingerprint, the resolved phase plan (`--resume`'s
    check, so a run under an older default length differs) and, given ``data`` (a
    ``Dataset.describe()``), the data it was trained on."""
    plan = plan_record(phase_plan(cfg, steps_per_epoch=0))  # benchmarks give --steps or its default, never --epochs
    try:
        check_resumable(meta, cfg.to_dict(), keys, load_space(cfg.space), cfg.space, plan, length_keys=TrainConfig.LENGTH_KEYS)
    except UserError as e:
        return str(e).removeprefix("--resume: ").split("; ")[0].replace("interrupted", "finished")
    if data is not None and meta.get("data") != data:
        return f"trained on other data ({meta.get('data')!r} there, {data!r} now)"
    return None
