"""Search fitness: top-1 of the calibrated int8 subnet on the held-out search split, cached.

Each subnet is extracted, its BN statistics re-estimated on a seeded set of training images
(the procedure of `qnas calibrate`, with ``calib_images`` images), its weight scales predicted
from the calibrated sigma, and it is scored on the search split (never the test set). Results
are cached by architecture in memory and appended to a JSONL file, one fsynced line each, so
an interrupted search resumes without evaluating anything twice.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from .calibrate import EVAL_BATCH, calibrated_subnet, calibration_images, calibration_record, top1
from .data import Dataset, ordered_batches, to_input
from .errors import UserError, choice_error
from .kernels import TARGETS
from .latency import RUNTIMES
from .space import Arch
from .supernet import Supernet

CACHE_FORMAT = "qnas.search_evaluations/2"  # /2: the identity is calibrate.calibration_record's, plus the arithmetic
# What `qnas search --runtime` targets: every runtime with an exact forward, and the timed-only built-in kernels.
SEARCH_RUNTIMES = tuple(dict.fromkeys((*TARGETS, *RUNTIMES)))


def fitness_arithmetic(runtime: str) -> str:
    """The exact integer forward that scores a search for ``runtime``: its own where qnas has it
    (``kernels.TARGETS``). The built-in optimized kernels have none (their vector blocks and
    scalar tails round differently), so a search for them is scored with XNNPACK's arithmetic
    and says so (pareto.json ``fitness_arithmetic``)."""
    if runtime not in SEARCH_RUNTIMES:
        raise choice_error("--runtime", runtime, SEARCH_RUNTIMES)
    return runtime if runtime in TARGETS else "xnnpack"


def cache_identity(supernet_sha256: str, data_spec: str, calib_images: int, eval_images: int | None,
                   arithmetic: str) -> dict[str, Any]:
    """Everything a cached score depends on besides the architecture (the cache's header; --resume
    refuses a cache whose header differs): the calibrated subnet's inputs, as a reused
    ``.qnas.pt`` is checked (``calibration_record``: seed, subset and integer contract included),
    then how it is scored."""
    return {**calibration_record(supernet_sha256, data_spec, calib_images), "eval_images": eval_images,
            "fitness_arithmetic": arithmetic}


class Fitness:
    """``fitness(archs) -> accuracies``, memoised by architecture key and kept on disk."""

    def __init__(self, net: Supernet, data: Dataset, identity: dict[str, Any], path: Path, resume: bool,
                 device: str = "cpu", rank: int = 0, world: int = 1) -> None:
        """``identity``: ``cache_identity(...)``, what the scores depend on besides the architecture;
        the calibration and scoring sizes and the arithmetic are read from it, so the cache's
        header cannot say other than what was done."""
        self.net, self.device, self.runtime = net, device, identity["fitness_arithmetic"]
        self.path = Path(path)
        self.rank, self.world = rank, world  # under torchrun each rank evaluates its share; rank 0 writes
        self.scores: dict[str, float] = {}
        self.seconds = {"calibrate": 0.0, "score": 0.0}  # this search's evaluations (all ranks)
        self.evaluations = self.hits = 0
        header = {"format": CACHE_FORMAT, **identity}
        exists = self.path.is_file()
        _barrier(world)  # every rank has looked before rank 0 writes
        if exists and resume:
            self._load(header)
        elif exists:
            raise UserError(f"{self.path} holds an earlier search's evaluations: pass --resume to continue it, "
                            "or choose another --out")
        elif rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append(header)
        self.inputs = SearchInputs(data, identity["calib_images"], identity["eval_images"])  # decoded once the cache is known usable

    def _load(self, header: dict) -> None:
        lines = self.path.read_text().splitlines()
        try:
            first = json.loads(lines[0])
        except (IndexError, ValueError):
            raise UserError(f"{self.path} is not a qnas search cache (first line unreadable)") from None
        if first != header:
            diff = sorted(k for k in set(first) | set(header) if first.get(k) != header.get(k))
            raise UserError(f"--resume: {self.path} was written by a search with other settings "
                            f"({', '.join(diff)} differ); use the same settings or another --out")
        for line in lines[1:]:
            try:
                row = json.loads(line)
                self.scores[row["arch"]] = float(row["accuracy"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill: that subnet is evaluated again

    def _append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def evaluate_one(self, arch: Arch) -> dict[str, Any]:
        return evaluate_arch(self.net, arch, self.inputs, self.device, self.runtime)

    def __call__(self, archs: list[Arch], on_each: Callable[[], None] | None = None) -> list[float]:
        new = list({a.key: a for a in archs if a.key not in self.scores}.values())
        self.hits += len(archs) - len(new)
        rows = []
        for a in new[self.rank :: self.world]:  # this rank's share, in a fixed order
            rows.append(self.evaluate_one(a))
            if self.world == 1:  # one process: each result is on disk as soon as it exists
                self._append(rows[-1])
            if on_each:
                on_each()
        if self.world > 1:
            rows = _gathered(rows, self.world)
            if self.rank == 0:
                for row in rows:
                    self._append(row)
        for row in rows:
            self.scores[row["arch"]] = row["accuracy"]
            for part in self.seconds:
                self.seconds[part] += row.get(f"{part}_seconds", 0.0)
        self.evaluations += len(rows)
        return [self.scores[a.key] for a in archs]


def evaluate_arch(net: Supernet, arch: Arch, inputs: SearchInputs, device: str = "cpu",
                  runtime: str = "xnnpack") -> dict[str, Any]:
    """One fitness evaluation, timed: extract, calibrate BN, score on the search subset with the
    exact integer forward of ``runtime`` (``kernels.TARGETS``), as `qnas calibrate --runtime` does."""
    t0 = time.perf_counter()
    sub = calibrated_subnet(net, arch, inputs.data, device=device, batches=inputs.calibration(arch.resolution))
    t1 = time.perf_counter()
    acc = top1(sub, inputs.search(arch.resolution), device, runtime)
    t2 = time.perf_counter()
    return {"arch": arch.key, "accuracy": acc, "seconds": round(t2 - t0, 3),
            "calibrate_seconds": round(t1 - t0, 3), "score_seconds": round(t2 - t1, 3)}


class SearchInputs:
    """The calibration images and the search-split subset, decoded once and kept; network
    inputs made once per resolution (an image folder is never decoded twice, and the 8,000
    evaluations of a paper-sized search never resize an image again). Exactly the images and
    batches ``qnas calibrate`` and ``calibrate.evaluate`` use for the same sizes."""

    CACHE_BYTES = 1 << 29  # float inputs of every resolution kept up to 512 MiB; beyond, made per use

    def __init__(self, data: Dataset, calib_images: int, eval_images: int | None) -> None:
        self.data = data
        # uint8 images at the decode size: the calibration set's ``calibration_batches`` ...
        self.calib_u8 = list(calibration_images(data, calib_images))
        # ... and the search split's seeded class-stratified subset, in ``evaluate``'s batches
        self.search_u8 = list(ordered_batches(data.search, EVAL_BATCH, eval_images))
        self._float: dict[int, tuple[list[Tensor], list[tuple[Tensor, Tensor]]]] = {}

    def calibration(self, resolution: int) -> list[Tensor]:
        return self._inputs(resolution)[0]

    def search(self, resolution: int) -> list[tuple[Tensor, Tensor]]:
        return self._inputs(resolution)[1]

    def _inputs(self, resolution: int) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
        if resolution in self._float:
            return self._float[resolution]
        made = ([to_input(x, self.data, resolution) for x in self.calib_u8],
                [(to_input(x, self.data, resolution), y) for x, y in self.search_u8])
        size = sum(t.numel() * 4 for t in made[0]) + sum(x.numel() * 4 for x, _ in made[1])
        if size * (len(self._float) + 1) <= self.CACHE_BYTES:
            self._float[resolution] = made
        return made


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gathered(rows: list[dict], world: int) -> list[dict]:
    """Every rank's rows, in rank order then evaluation order (the same on every rank)."""
    import torch.distributed as dist

    parts: list[list[dict] | None] = [None] * world
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]
