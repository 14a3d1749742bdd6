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

from .calibrate import calibrated_subnet, evaluate
from .data import Dataset
from .errors import UserError
from .space import Arch
from .supernet import Supernet

CACHE_FORMAT = "qnas.search_evaluations/1"


class Fitness:
    """``fitness(archs) -> accuracies``, memoised by architecture key and kept on disk."""

    def __init__(self, net: Supernet, data: Dataset, identity: dict[str, Any], path: Path, resume: bool,
                 calib_images: int, eval_images: int | None, device: str = "cpu", rank: int = 0, world: int = 1) -> None:
        self.net, self.data, self.device = net, data, device
        self.calib_images, self.eval_images = calib_images, eval_images
        self.path = Path(path)
        self.rank, self.world = rank, world  # under torchrun each rank evaluates its share; rank 0 writes
        self.scores: dict[str, float] = {}
        self.seconds = 0.0
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
        t = time.perf_counter()
        sub = calibrated_subnet(self.net, arch, self.data, self.calib_images, self.device)
        acc = evaluate(sub, self.data.search, self.data, arch.resolution, self.device, self.eval_images)
        return {"arch": arch.key, "accuracy": acc, "seconds": round(time.perf_counter() - t, 3)}

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
            self.seconds += row["seconds"]
        self.evaluations += len(rows)
        return [self.scores[a.key] for a in archs]


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
