"""Latency tables: the int8 TFLite latency of any subnet as a sum of look-ups (docs/design.md §9).

A subnet's int8 TFLite model is a chain of *parts*, each a run of TFLite ops the export
produces: the stem conv, each inverted-residual block (expand, depthwise, project, residual
add), and the head (1x1 conv, pooling, feature FC, classifier). A part's latency depends only
on its shapes, so a table holds one measured figure per part key, e.g.
``block:14px:16>24:k5:e6:s2`` (input 14x14, 16 -> 24 channels, 5x5 depthwise, expand 6,
stride 2; ``:res`` when it ends in a residual add). A prediction is

    latency_ms = a * sum(part entries) + b * (number of parts)

where (a, b) is fitted on whole subnets measured end to end: each separately timed part pays
the interpreter's per-invoke overhead once where the whole model pays it once in all (b, a
small negative number), and caches and memory traffic differ between one model and many (a).
A constant term was tried and dropped: with a dozen noisy points it traded off against b and
extrapolated badly (benchmarks/latency_model.py scores corrections on real exports; BENCHMARKS.md
keeps its results).

This module is the model core: it imports no TensorFlow or LiteRT. Measuring and converting
live in ``qnas_cli/export/latency_build.py``.
"""
from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError, choice_error
from .space import Arch, SearchSpace, read_structured

TABLE_FORMAT = "qnas.latency_table/1"
# A table belongs to one runtime: the two differ per kernel configuration, not by a factor. On
# x86, XNNPACK's int8 depthwise kernels stop at 25 taps (google/XNNPACK src/configs/dwconv-config.c:
# tiles 3p/9p/25p), so a 7x7 depthwise conv falls back to a padded grouped IGEMM
# (src/operators/convolution-nhwc.c) and runs slower than TFLite's built-in DepthwiseConvGeneral,
# while 3x3 depthwise and 1x1 convs run faster (benchmarks/latency_model.py times them op by op).
# Only these two are timed: the reference kernels (bit-reproducible checks) and TFLite Micro
# (microcontrollers) are export targets without tables, so a table naming them is refused.
RUNTIMES = ("xnnpack", "builtin")
RUNTIME_HELP = {
    "xnnpack": "LiteRT with its default XNNPACK delegate (what the TFLite/LiteRT interpreter runs on a phone CPU by default)",
    "builtin": "LiteRT's built-in optimized kernels, no delegate (ruy/gemmlowp; what runs when XNNPACK is off)",
}

# How a table's figures summarise an entry's invoke times (qnas_cli/export/measure.py times them). The header
# names it; an entry and a whole-model measurement are only comparable under the same one. A low
# quantile is the steadier estimate on a busy machine: interference only ever adds time. The
# default is the statistic whose tables predict real exports best: benchmarks/latency_model.py
# builds tables under both from one timing session and scores each against exported subnets
# timed under the same statistic (results in BENCHMARKS.md). Tables, export reports and
# `qnas latency measure` all give STATISTIC unless told otherwise, and name it.
STATISTICS = {
    "median": "median over interleaved rounds of each round's median invoke time",
    "p10": "10th percentile of every timed invoke over the interleaved rounds",
}
STATISTIC = "p10"

PartKey = tuple  # ("stem", size, c_in, c_out, 3, 1, stride, False) and the like; see part_keys


def conv_out(size: int, stride: int) -> int:
    """Output size of an odd-kernel conv with 'same' padding k//2 (independent of k)."""
    return (size - 1) // stride + 1


def key_text(key: PartKey) -> str:
    """The table's string form of a part key (JSON object keys)."""
    kind, size, c_in, c_out, k, e, s, res = key
    if kind == "block":
        return f"block:{size}px:{c_in}>{c_out}:k{k}:e{e}:s{s}" + (":res" if res else "")
    if kind == "stem":
        return f"stem:{size}px:{c_in}>{c_out}:k{k}:s{s}"
    return f"head:{size}px:{c_in}>{c_out}"  # c_out is the head's description, e.g. '256>10'


def part_keys(space: SearchSpace, arch: Arch, in_channels: int, num_classes: int) -> list[PartKey]:
    """The parts of ``arch``'s int8 model, in execution order (the same walk as qnas_cli/export/fold.py)."""
    size = arch.resolution
    keys: list[PartKey] = [("stem", size, in_channels, space.stem_channels, 3, 1, space.stem_stride, False)]
    size, c = conv_out(size, space.stem_stride), space.stem_channels
    for spec, stage in zip(space.stages, arch.stages):
        for j, b in enumerate(stage.blocks):
            stride = spec.stride if j == 0 else 1
            # Only blocks after a stage's first have the residual add (qnas_cli/supernet.py).
            keys.append(("block", size, c, stage.width, b.kernel, b.expand, stride, j > 0))
            size, c = conv_out(size, stride), stage.width
    keys.append(("head", size, c, head_text(space, num_classes), 1, 1, 1, False))
    return keys


def head_text(space: SearchSpace, num_classes: int) -> str:
    """What follows the last stage: 1x1 head conv, pool, optional feature FC, classifier."""
    return f"{space.head_channels}" + (f">fc{space.feature_channels}" if space.feature_channels else "") + f">{num_classes}"


def space_part_keys(space: SearchSpace, in_channels: int, num_classes: int,
                    resolutions: Iterable[int] | None = None) -> list[PartKey]:
    """Every part any subnet of ``space`` can contain (what a table must hold), in a fixed order;
    only those of subnets at ``resolutions`` when given."""
    keys: list[PartKey] = []
    for r in space.resolutions if resolutions is None else resolutions:
        keys.append(("stem", r, in_channels, space.stem_channels, 3, 1, space.stem_stride, False))
        size, widths_in = conv_out(r, space.stem_stride), (space.stem_channels,)
        for spec in space.stages:
            out = conv_out(size, spec.stride)
            for c_in in widths_in:
                for w in spec.widths:
                    keys += [("block", size, c_in, w, k, e, spec.stride, False) for k in spec.kernels for e in spec.expands]
            if max(spec.depths) > 1:
                for w in spec.widths:
                    keys += [("block", out, w, w, k, e, 1, True) for k in spec.kernels for e in spec.expands]
            size, widths_in = out, spec.widths
        keys += [("head", size, c, head_text(space, num_classes), 1, 1, 1, False) for c in widths_in]
    return list(dict.fromkeys(keys))


# ---- the table ------------------------------------------------------------------------------

@dataclass
class Fit:
    """Whole-model correction: latency = a * sum(parts) + b * n_parts (milliseconds)."""

    a: float = 1.0
    b: float = 0.0
    points: list[dict[str, Any]] = field(default_factory=list)  # the whole subnets it was fitted on

    def apply(self, total_ms: float, n_parts: int) -> float:
        return self.a * total_ms + self.b * n_parts


def fit_correction(rows: Iterable[tuple[float, int, float]]) -> tuple[float, float]:
    """Least squares in *relative* error of measured ~ a * sum + b * n.

    rows: (sum of part entries, number of parts, measured whole-model latency), all in ms.
    Relative, because the table's promise is a percentage (±10%) from 0.02 ms to 20 ms.
    With fewer than two independent points only the scale a is fitted.
    """
    data = np.asarray(list(rows), np.float64).reshape(-1, 3)
    s, n, y = data[:, 0], data[:, 1], data[:, 2]
    for cols in ((s, n), (s,)):
        design = np.stack(cols, axis=1) / y[:, None]
        if len(y) >= len(cols) and np.linalg.matrix_rank(design) == len(cols):
            coef, *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
            return float(coef[0]), float(coef[1]) if len(cols) == 2 else 0.0
    return 1.0, 0.0


@dataclass
class LatencyTable:
    """Measured part latencies (ms) for one (space, input, runtime, threads, device)."""

    header: dict[str, Any]
    entries: dict[str, float]  # key_text(part) -> ms, under the statistic the header names (table_statistic)
    fit: Fit
    spread: dict[str, float] = field(default_factory=dict)  # key -> round-to-round spread / median, informative

    def __post_init__(self) -> None:
        self._lookup: dict[PartKey, float] | None = None

    def lookup(self) -> dict[PartKey, float]:
        """Tuple-keyed entries (built once): the fast path of ``predict``."""
        if self._lookup is None:
            self._lookup = {parse_key(k): v for k, v in self.entries.items()}
        return self._lookup

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "header": self.header,
                "fit": {"a": self.fit.a, "b": self.fit.b, "points": self.fit.points},
                "entries": self.entries, "spread": self.spread}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> LatencyTable:
        if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise UserError(f"{where}: not a qnas latency table (format {got!r}, expected {TABLE_FORMAT!r})")
        try:
            header, fit, entries = d["header"], d["fit"], d["entries"]
            for k in ("space", "runtime", "threads", "in_channels", "num_classes", "device"):
                header[k]  # noqa: B018 - presence check
            for k in ("space", "device"):
                if not isinstance(header[k], dict):
                    raise UserError(f"{where}: header.{k} must be an object, got {header[k]!r}")
            for k in ("threads", "in_channels", "num_classes"):
                if isinstance(header[k], bool) or not isinstance(header[k], int) or header[k] <= 0:
                    raise UserError(f"{where}: header.{k} must be a positive integer, got {header[k]!r}")
            if header["runtime"] not in RUNTIMES:
                raise choice_error(f"{where}: header.runtime", header["runtime"], RUNTIMES)
            if table_statistic(header) not in (*STATISTICS, "phone"):
                raise choice_error(f"{where}: header.method.statistic_name", table_statistic(header), STATISTICS)
            clean = {str(k): float(v) for k, v in entries.items()}
            for k, v in clean.items():
                parse_key(k)
                if not 0 < v < math.inf:
                    raise UserError(f"{where}: entry {k!r} has a latency {v} that is not a positive number")
            if not isinstance(fit.get("points", []), list):
                raise UserError(f"{where}: fit.points must be a list, got {fit['points']!r}")
            f = Fit(float(fit["a"]), float(fit["b"]), list(fit.get("points", [])))
            if not (math.isfinite(f.a) and math.isfinite(f.b)):
                raise UserError(f"{where}: fit ({f.a}, {f.b}) is not finite")
            spread = {str(k): float(v) for k, v in d.get("spread", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where}: malformed latency table ({type(e).__name__}: {e})") from None
        return cls(header, clean, f, spread)


def table_statistic(header: dict) -> str:
    """The statistic a table's entries are (tables from before it was recorded: the median;
    tables imported from a phone: whatever benchmark_model averaged, "phone")."""
    method = header.get("method")
    if isinstance(method, dict) and "statistic_name" in method:
        return method["statistic_name"]
    return "phone" if "benchmark_model" in str(method) else "median"


def parse_key(text: str) -> PartKey:
    """Inverse of ``key_text``; a malformed key is a UserError naming it."""
    try:
        fields = text.split(":")
        kind, size = fields[0], int(fields[1].removesuffix("px"))
        c_in, c_out = fields[2].split(">", 1)
        if kind == "block":
            res = len(fields) == 7 and fields[6] == "res"
            if len(fields) not in (6, 7) or (len(fields) == 7 and not res):
                raise ValueError
            return ("block", size, int(c_in), int(c_out), int(fields[3][1:]), int(fields[4][1:]), int(fields[5][1:]), res)
        if kind == "stem" and len(fields) == 5:
            return ("stem", size, int(c_in), int(c_out), int(fields[3][1:]), 1, int(fields[4][1:]), False)
        if kind == "head" and len(fields) == 3:
            return ("head", size, int(c_in), c_out, 1, 1, 1, False)
    except (ValueError, IndexError):
        pass
    raise UserError(f"latency table: malformed entry key {text!r}")


def load_table(path: Path, space: SearchSpace | None = None, in_channels: int | None = None,
               num_classes: int | None = None) -> LatencyTable:
    """Read and validate a table; with ``space`` given, refuse one built for another space."""
    path = Path(path)
    table = LatencyTable.from_dict(read_structured(path, "latency table"), f"latency table {path}")
    if space is not None:
        check_table_fits(table, space, in_channels, num_classes, f"latency table {path}")
    return table


def check_table_fits(table: LatencyTable, space: SearchSpace, in_channels: int | None,
                     num_classes: int | None, where: str) -> None:
    h = table.header["space"]
    if h.get("fingerprint") != space.fingerprint:
        raise UserError(f"{where} was built for space {h.get('name')!r} (fingerprint {h.get('fingerprint')}), "
                        f"not {space.name!r} ({space.fingerprint}): build one with `qnas latency build --space ...`")
    for what, want in (("in_channels", in_channels), ("num_classes", num_classes)):
        if want is not None and int(table.header[what]) != want:
            raise UserError(f"{where} was built for {what}={table.header[what]}, this model has {want}: "
                            f"build one with `qnas latency build --{what.replace('_', '-')} {want}`")


def table_space(table: LatencyTable) -> SearchSpace:
    """The search space a table was built for (its header carries the definition)."""
    h = table.header["space"]
    if not isinstance(h.get("definition"), dict):
        raise UserError("latency table: its header has no space definition; rebuild it with `qnas latency build`")
    space = SearchSpace.from_dict(h["definition"], name=h.get("name"))
    if space.fingerprint != h.get("fingerprint"):
        raise UserError(f"latency table: its space definition does not match its fingerprint {h.get('fingerprint')} "
                        "(edited by hand?); rebuild it")
    return space


class Predictor:
    """``predict(arch) -> ms`` for one table and space: a sum of look-ups plus the fit."""

    def __init__(self, table: LatencyTable, space: SearchSpace) -> None:
        check_table_fits(table, space, None, None, "latency table")
        self.table, self.space = table, space
        self.in_channels = int(table.header["in_channels"])
        self.num_classes = int(table.header["num_classes"])
        self._entries = table.lookup()
        missing = [key_text(k) for k in space_part_keys(space, self.in_channels, self.num_classes)
                   if k not in self._entries]
        if missing:
            raise UserError(f"latency table lacks {len(missing)} part(s) of space {space.name!r}, "
                            f"e.g. {missing[0]!r}: rebuild it with `qnas latency build`")
        self._a, self._b = table.fit.a, table.fit.b
        self._strides = [spec.stride for spec in space.stages]  # the hot loop builds no strings
        self._head = head_text(space, self.num_classes)

    def predict(self, arch: Arch) -> float:
        e, sp = self._entries, self.space
        size = arch.resolution
        total = e[("stem", size, self.in_channels, sp.stem_channels, 3, 1, sp.stem_stride, False)]
        n = 2
        size, c = (size - 1) // sp.stem_stride + 1, sp.stem_channels
        for stride, stage in zip(self._strides, arch.stages):
            w = stage.width
            first = True
            for b in stage.blocks:
                if first:
                    total += e[("block", size, c, w, b.kernel, b.expand, stride, False)]
                    size, c, first = (size - 1) // stride + 1, w, False
                else:
                    total += e[("block", size, w, w, b.kernel, b.expand, 1, True)]
                n += 1
        total += e[("head", size, c, self._head, 1, 1, 1, False)]
        return self._a * total + self._b * n

    def parts(self, arch: Arch) -> list[tuple[str, float]]:
        """Each part's entry, for explaining a prediction."""
        return [(key_text(k), self._entries[k]) for k in part_keys(self.space, arch, self.in_channels, self.num_classes)]


# ---- where tables live ----------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_device() -> dict[str, Any]:
    return {"kind": "host", "cpu": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count()}


def cache_dir() -> Path:
    """``$QNAS_CACHE`` or ``$XDG_CACHE_HOME/qnas`` (default ``~/.cache/qnas``)."""
    if os.environ.get("QNAS_CACHE"):
        return Path(os.environ["QNAS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qnas"


def host_table_path(space: SearchSpace, in_channels: int, num_classes: int, runtime: str, threads: int) -> Path:
    """Where the host table for this (space, input, device, runtime, threads) is cached."""
    import hashlib

    device = hashlib.sha256(json.dumps(host_device(), sort_keys=True).encode()).hexdigest()[:8]
    name = f"{space.name}-{space.fingerprint}-c{in_channels}-n{num_classes}-{runtime}-t{threads}-host{device}.json"
    return cache_dir() / "latency" / name
