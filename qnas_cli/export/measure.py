"""Timing int8 TFLite models with the LiteRT interpreter, robustly on a noisy shared machine.

Method (stated in every result, as TFLite's ``benchmark_model`` states its own):
- one interpreter per (model, runtime), created up front, with ``num_threads`` fixed;
- warm-up invokes first (XNNPACK packs weights and plans memory on the first ones);
- then ``rounds`` interleaved rounds: in each round every (model, runtime) pair runs a batch of
  invokes, in an order shuffled per round (seeded), so drift in the machine's load falls on
  all models alike instead of on whichever ran last;
- every invoke is timed on its own (``perf_counter_ns``); ``summarize`` turns them into the
  statistics of ``qnas_cli.latency.STATISTICS`` (the 10th percentile of all invokes, the
  median of the round medians) plus the p90 and the spread of the round medians. Tables,
  export reports and ``qnas latency measure`` give ``qnas_cli.latency.STATISTIC`` unless told
  otherwise, and name the one they give.

A single round is never a figure: on a shared host one round's median moves far from the
median over many rounds.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qnas_cli.checkpoint import versions
from qnas_cli.latency import STATISTIC, STATISTICS

WARMUP = 5  # invokes per (model, runtime) before timing: XNNPACK packs weights on the first


@dataclass
class Timing:
    """One model on one runtime, in milliseconds."""

    median_ms: float  # median over rounds of the round medians
    p10_ms: float  # over every timed invoke
    p90_ms: float
    spread: float  # (max - min) of the round medians / median_ms
    rounds: int
    invokes: int  # timed invokes in all

    def to_dict(self) -> dict:
        return asdict(self)

    def ms(self, statistic: str) -> float:
        """The figure under one of ``STATISTICS``."""
        return {"median": self.median_ms, "p10": self.p10_ms}[statistic]


def runtime_version() -> str:
    return f"ai-edge-litert {versions('ai-edge-litert')['ai-edge-litert']}"


def interpreter(model: bytes | Path, runtime: str, threads: int = 1):
    """A ready LiteRT interpreter: ``xnnpack`` applies the default delegate, ``builtin`` runs the
    optimized built-in kernels without it, ``reference`` TFLite's reference kernels (BUILTIN_REF).

    LiteRT's C++ logging ("Created TensorFlow Lite XNNPACK delegate for CPU.", once per
    interpreter, a thousand times in a table build) is kept off the terminal; when creation
    fails, what it printed becomes part of the error.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if runtime == "micro":
        return MicroInterpreter(model)
    resolver = {"builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                "reference": OpResolverType.BUILTIN_REF,
                "xnnpack": OpResolverType.AUTO}[runtime]  # AUTO applies the XNNPACK delegate
    source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
    with _captured_stderr() as said:
        try:
            it = Interpreter(**source, num_threads=threads, experimental_op_resolver_type=resolver)
            it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"{e} {said()}".strip()) from None
    return it


@contextlib.contextmanager
def _captured_stderr():
    """Redirect file descriptor 2 (C++ logging writes there, not to sys.stderr) to a temp file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)

        def said() -> str:
            os.fsync(tmp.fileno())
            tmp.seek(0)
            lines = [ln for ln in tmp.read().decode(errors="replace").splitlines() if "XNNPACK delegate" not in ln]
            return " ".join(lines)[-300:]
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class MicroInterpreter:
    """TFLite Micro's interpreter (the microcontroller runtime, from the tflite-micro wheel) behind
    the few LiteRT calls verification makes: inputs and outputs by position."""

    def __init__(self, model: bytes | Path) -> None:
        from ai_edge_litert.tools import flatbuffer_utils as fbu
        from tflite_micro.python.tflite_micro import runtime

        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.n_outputs = len(fbu.read_model_from_bytearray(bytearray(data)).subgraphs[0].outputs)
        self.it = runtime.Interpreter.from_bytes(data)

    def get_input_details(self) -> list[dict]:
        return [{"index": 0, **self.it.get_input_details(0)}]

    def get_output_details(self) -> list[dict]:
        return [{"index": i, **self.it.get_output_details(i)} for i in range(self.n_outputs)]

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        self.it.set_input(value, index)

    def invoke(self) -> None:
        self.it.invoke()

    def get_tensor(self, index: int) -> np.ndarray:
        return self.it.get_output(index)


def xnnpack_coverage(it) -> dict:
    """Whether XNNPACK really runs an interpreter's model: its delegate nodes (0: it took nothing;
    None: unknown) and every op left outside them, which run on the built-in kernels, whose
    arithmetic differs, so "xnnpack" figures would silently be something else.

    LiteRT lists the model's original nodes and the delegate nodes that replaced them
    (``_get_ops_details``, a private API present in 2.1); an original op runs outside the
    delegate when it feeds a delegate node or reads one's result (at least one op of any
    undelegated stretch does), or when there is no delegate node at all.
    """
    try:
        details = it._get_ops_details()
    except AttributeError:  # private LiteRT API: unknown
        return {"delegate_nodes": None, "undelegated_ops": []}
    delegates = [d for d in details if d["op_name"] == "DELEGATE"]
    d_in = {int(t) for d in delegates for t in d["inputs"]}
    d_out = {int(t) for d in delegates for t in d["outputs"]}
    outside = [d["op_name"] for d in details if d["op_name"] != "DELEGATE" and
               (not delegates or d_in & {int(t) for t in d["outputs"]} or d_out & {int(t) for t in d["inputs"]})]
    return {"delegate_nodes": len(delegates), "undelegated_ops": sorted(set(outside))}


def _fill_inputs(it, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for d in it.get_input_details():
        info = np.iinfo(d["dtype"]) if np.issubdtype(d["dtype"], np.integer) else None
        data = (rng.integers(info.min, info.max + 1, d["shape"]) if info is not None
                else rng.standard_normal(d["shape"])).astype(d["dtype"])
        it.set_tensor(d["index"], data)


def _time(it, n: int) -> list[int]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        it.invoke()
        out.append(time.perf_counter_ns() - t)
    return out


def measure_models(models: Mapping[str, bytes | Path], runtimes: tuple[str, ...] = ("xnnpack",), threads: int = 1,
                   rounds: int = 10, round_ms: float = 3.0, min_invokes: int = 3, max_invokes: int = 200,
                   warmup: int = WARMUP, seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> dict[tuple[str, str], Timing]:
    """Time every model on every runtime, interleaved; returns {(name, runtime): Timing}.

    Each round gives a pair about ``round_ms`` of invokes (between ``min_invokes`` and
    ``max_invokes``), sized from the warm-up. ``progress(done, total)`` counts rounds.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    pairs = [(name, rt) for name in models for rt in runtimes]
    its = {}
    for name, rt in pairs:
        it = interpreter(models[name], rt, threads)
        _fill_inputs(it, seed)
        its[(name, rt)] = it
    batch = {}
    for pair, it in its.items():
        warm = _time(it, max(1, warmup))
        est_ms = statistics.median(warm) / 1e6
        batch[pair] = int(min(max_invokes, max(min_invokes, math.ceil(round_ms / max(est_ms, 1e-6)))))
    samples: dict[tuple[str, str], list[list[int]]] = {p: [] for p in pairs}
    order = list(pairs)
    rng = random.Random(seed)
    for r in range(rounds):
        rng.shuffle(order)
        for pair in order:
            samples[pair].append(_time(its[pair], batch[pair]))
        if progress:
            progress(r + 1, rounds)
    return {pair: summarize(rows) for pair, rows in samples.items()}


def summarize(rows: list[list[int]]) -> Timing:
    """One (model, runtime)'s invoke times in nanoseconds, one list per round -> its ``Timing`` in ms."""
    medians = [statistics.median(r) / 1e6 for r in rows]
    every = np.concatenate([np.asarray(r, np.float64) for r in rows]) / 1e6
    med = statistics.median(medians)
    return Timing(median_ms=med, p10_ms=float(np.percentile(every, 10)), p90_ms=float(np.percentile(every, 90)),
                  spread=(max(medians) - min(medians)) / med if med > 0 else 0.0,
                  rounds=len(rows), invokes=int(every.size))


def method(threads: int, rounds: int, round_ms: float, warmup: int = WARMUP, statistic: str = STATISTIC) -> dict:
    """How the figures were taken, for headers and reports."""
    return {"threads": threads, "rounds": rounds, "round_ms": round_ms, "warmup_invokes": warmup,
            "statistic": STATISTICS[statistic], "statistic_name": statistic,
            "timer": "perf_counter_ns around Interpreter.invoke", "runtime_version": runtime_version()}


def measure_file(path: Path, runtimes: tuple[str, ...] = ("xnnpack",), threads: int = 1, rounds: int = 10,
                 round_ms: float = 20.0, progress: Callable[[int, int], None] | None = None,
                 statistic: str = STATISTIC) -> dict:
    """``qnas latency measure``: a .tflite timed on each runtime, interleaved, with its method.

    Each runtime's ``latency_ms`` is ``statistic`` (a key of ``STATISTICS``, named in the result
    as ``statistic``); the other statistics come beside it. Refuses (UserError) only a file
    LiteRT cannot load and run; a model that is not a qnas int8 export is timed all the same,
    and the report says what it is.
    """
    from qnas_cli.errors import UserError, choice_error

    if statistic not in STATISTICS:
        raise choice_error("--statistic", statistic, STATISTICS)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    data = path.read_bytes()
    if not data:
        raise UserError(f"{path} is empty, not a .tflite model")
    info = {}
    for rt in runtimes:
        try:
            it = interpreter(data, rt, threads)
            _fill_inputs(it, 0)
            it.invoke()
        except (ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} cannot be run by LiteRT ({rt}): {first}") from None
        info[rt] = {"delegated_nodes": xnnpack_coverage(it)["delegate_nodes"] if rt == "xnnpack" else None}
        if rt == "xnnpack" and info[rt]["delegated_nodes"] == 0:
            info[rt]["warning"] = "XNNPACK took no ops: these figures are the built-in kernels'"
        dtypes = ([str(d["dtype"].__name__) for d in it.get_input_details()],
                  [str(d["dtype"].__name__) for d in it.get_output_details()])
    timings = measure_models({"model": data}, runtimes, threads, rounds, round_ms, progress=progress)
    return {
        "model": str(path), "size_bytes": len(data), "input_dtypes": dtypes[0], "output_dtypes": dtypes[1],
        "int8_in_out": dtypes == (["int8"], ["int8"]), "statistic": statistic,
        "runtimes": {rt: {"latency_ms": timings[("model", rt)].ms(statistic), **timings[("model", rt)].to_dict(), **info[rt]}
                     for rt in runtimes},
        "method": method(threads, rounds, round_ms, statistic=statistic),
    }
