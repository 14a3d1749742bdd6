"""``qnas export``: calibrated subnet -> integer graph -> int8 TFLite -> verified report.

Writes ``model.onnx``, ``model_int8.tflite``, ``model.onnx2tf.log`` and ``export_report.json``
into the output folder. The model is run on its target runtime over the held-out test images and
must equal the calibrated subnet's exact forward for that runtime bit for bit; the other runtimes
are compared with their own arithmetic on a subset, for information. The report says whether the
model passed, and why not, and how long each stage took.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qnas_cli.calibrate import (CALIB_IMAGES, EVAL_IMAGES_HINT, calibrate_file, calibration_data_spec, calibration_record,
                                default_output, load_calibrated, resolve_supernet, stale_reasons)
from qnas_cli.checkpoint import read_meta, sha256_file, versions, write_json
from qnas_cli.data import Dataset, calibration_indices, load_dataset, ordered_batches, to_input
from qnas_cli.errors import UserError, check_count
from qnas_cli.kernels import check_target
from qnas_cli.layers import set_runtime
from qnas_cli.space import read_structured
from qnas_cli.supernet import Subnet

from .fold import quantize_input, quantize_output, to_integer_graph
from .tflite import MAX_CALIB_IMAGES as ONNX2TF_CALIB_IMAGES  # onnx2tf's calibration only has to yield a full-integer graph

REPORT_SCHEMA = "qnas.export_report/2"  # bump when a documented key (README, "In a CI pipeline") changes meaning
INFO_IMAGES = 500  # the runtimes other than the target: enough to show their drift, at a fraction of the cost
PER_OP_IMAGES = 50


def prepare(subnet_file: Path, supernet: Path | None, data_spec: str | None, calib_images: int,
            device: str = "cpu", eval_images: int | None = None, log=print) -> tuple[Subnet, dict[str, Any], Dataset]:
    """A calibrated subnet: the ``.qnas.pt`` given, the one beside a subnet.json when provably current, or a new one."""
    subnet_file = Path(subnet_file)
    if subnet_file.name.endswith(".qnas.pt"):
        sub, meta = load_calibrated(subnet_file)
    else:
        sub, meta = _current_calibration(subnet_file, supernet, data_spec, calib_images, log)
        if sub is None:
            sub, meta, data = calibrate_file(subnet_file, supernet, data_spec, calib_images, device=device,
                                             eval_images=eval_images)
            return sub, meta, data
    # decoded as at calibration (an older file does not say: then at the subnet's resolution, as before)
    data = load_dataset(data_spec or meta["data"]["spec"], load_size=meta["data"].get("decode_size", sub.arch.resolution))
    return sub, meta, data


def _current_calibration(subnet_file: Path, supernet: Path | None, data_spec: str | None, calib_images: int,
                         log) -> tuple[Subnet | None, dict[str, Any]]:
    """The ``.qnas.pt`` beside ``subnet_file`` if it was calibrated from exactly these inputs, else (None, {}).

    Same architecture is not enough: a retrained supernet, other data, another calibration set or
    a change of the integer contract gives other integers, and the export gate cannot notice
    (it compares the TFLite model with the very subnet it was made from).
    """
    beside = default_output(subnet_file)
    if not beside.is_file():
        return None, {}
    raw = read_structured(subnet_file, "subnet file")
    net_path, recorded_sha = resolve_supernet(raw, subnet_file, supernet)
    try:
        net_meta = read_meta(net_path, recorded_sha)
    except UserError as e:
        raise UserError(f"{e} (to export {beside.name} as it is, pass it instead of {subnet_file.name})") from None
    expected = calibration_record(net_meta["weights"]["sha256"], calibration_data_spec(data_spec, net_meta), calib_images)
    reasons = stale_reasons(read_meta(beside), raw, expected)
    if reasons:
        log(f"recalibrating: {beside.name} was calibrated from other inputs ({'; '.join(reasons)})")
        return None, {}
    sub, meta = load_calibrated(beside)
    log(f"using {beside.name}: calibrated from this supernet, data and calibration set")
    return sub, meta


def int8_images(sub: Subnet, data: Dataset, source, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 inputs (NCHW) and labels of ``limit`` images of ``source`` (class-stratified; all when None)."""
    xs, ys = [], []
    for x, y in ordered_batches(source, 500, limit):
        xs.append(quantize_input(sub, to_input(x, data, sub.arch.resolution)))
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


@torch.no_grad()
def subnet_outputs(sub: Subnet, images: np.ndarray, runtime: str | None, batch: int = 500) -> np.ndarray:
    """The subnet's int8 logits on int8 images, exact for ``runtime`` (None: the fake-quant
    simulation training uses). Dequantized inputs re-quantize to the same integers."""
    q, found = sub.input_q, sub.runtime
    set_runtime(sub, runtime)
    try:
        outs = [quantize_output(sub, sub((torch.from_numpy(images[i: i + batch]).float() - q.zero_point) * q.scale))
                for i in range(0, len(images), batch)]
    finally:
        set_runtime(sub, found)
    return np.concatenate(outs)


def spread(n: int, k: int) -> np.ndarray:
    """``k`` indices evenly spread over ``n`` (a stratified split stays class-balanced)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


def export_subnet(subnet_file: Path, out_dir: Path | None = None, supernet: Path | None = None,
                  data_spec: str | None = None, calib_images: int = CALIB_IMAGES, eval_images: int | None = None,
                  runtime: str = "xnnpack", log=print) -> dict[str, Any]:
    """Run the whole export; returns the report (also written to ``out_dir/export_report.json``)."""
    from .tflite import export_tflite
    from .verify import CHECKED, arithmetic, failures, latency_ms, parity, run_tflite, verify_tflite

    check_target(runtime)
    check_count("--calib-images", calib_images)
    check_count("--eval-images", eval_images, EVAL_IMAGES_HINT)
    out_dir = Path(out_dir) if out_dir else Path(subnet_file).parent
    check_writable(out_dir)
    clock = Clock()
    sub, meta, data = prepare(Path(subnet_file), supernet, data_spec, calib_images, eval_images=eval_images, log=log)
    sub.eval()
    if not sub.cfg.enabled:
        raise UserError("this subnet comes from a float supernet (--quant none): train an int8 supernet to export")
    clock.lap("calibrate")
    _make_folder(out_dir)  # only now: a refused export leaves no empty folder behind
    graph = to_integer_graph(sub, {"arch": sub.arch.key})
    if graph.meta.get("saturated_biases"):
        log(f"warning: int32 biases saturated in {', '.join(graph.meta['saturated_biases'])} (a weight scale at its floor?)")
    calib = quantize_input(sub, to_input(data.train.get(calibration_indices(data.train, ONNX2TF_CALIB_IMAGES, 2))[0],
                                         data, sub.arch.resolution))
    log(f"exporting {sub.arch.key} ({len(graph.ops)} int8 ops) for {runtime}")
    result = export_tflite(graph, calib, out_dir, name="model")
    clock.lap("convert")

    log(f"verifying: {runtime} must equal the exact {runtime} forward bit for bit")
    images, labels = int8_images(sub, data, data.test, eval_images)
    info = spread(len(images), INFO_IMAGES)
    exact = subnet_outputs(sub, images, runtime)  # the gate: every image
    fake_quant = subnet_outputs(sub, images, None)
    # the other runtimes, for information, on an evenly spread subset
    sample = {a: exact[info] if a == runtime else subnet_outputs(sub, images[info], a) for a in {arithmetic(r) for r in CHECKED}}
    clock.lap("pytorch")
    tfl = run_tflite(result.tflite, images, runtime)
    clock.lap(f"tflite_{runtime}")
    runs = {r: (images, exact) if r == runtime else (images[info], sample[arithmetic(r)]) for r in CHECKED}
    report = verify_tflite(result.tflite, graph, runs, outputs={runtime: tfl}, latency=False, per_op_images=PER_OP_IMAGES)
    clock.lap("tflite_checks")
    report["latency_ms"] = latency_ms(result.tflite)
    clock.lap("latency")
    in_q, out_q = graph.qparams[graph.input], graph.qparams[graph.output]
    report = {"schema": REPORT_SCHEMA, "target": runtime, **report}
    report.update({
        "passed": None,
        "arch": meta.get("arch"),
        "arch_key": sub.arch.key,
        "source": {"calibrated": meta.get("weights", {}).get("file"), "supernet": meta.get("supernet")},
        "accuracy": {
            "split": "test", "n_images": int(len(labels)), "runtime": runtime,
            "tflite_top1": float(np.mean(tfl.argmax(1) == labels)),
            "exact_top1": float(np.mean(exact.argmax(1) == labels)),
            "fake_quant_top1": float(np.mean(fake_quant.argmax(1) == labels)),
        },
        "fake_quant_vs_exact": parity(fake_quant, exact),
        "saturated_biases": graph.meta.get("saturated_biases", []),
        "io": {"input": {"layout": "NHWC", "shape": [1, sub.arch.resolution, sub.arch.resolution, sub.in_channels],
                         "dtype": "int8", "scale": in_q.scale, "zero_point": in_q.zero_point,
                         **data.preprocessing(sub.arch.resolution)},
               "output": {"shape": [1, sub.num_classes], "dtype": "int8", "scale": out_q.scale, "zero_point": out_q.zero_point}},
        "size_bytes": result.tflite.stat().st_size,
        "files": {"tflite": result.tflite.name, "onnx": result.onnx.name, "log": result.log.name,
                  "tflite_sha256": sha256_file(result.tflite)},
        "seconds": {**result.seconds, **clock.laps, "total_with_verification": clock.total()},
        "versions": {**versions(), **result.versions},
    })
    report["accuracy"]["delta_pp"] = 100 * (report["accuracy"]["tflite_top1"] - report["accuracy"]["fake_quant_top1"])
    problems = failures(report, runtime)
    report["passed"], report["problems"] = not problems, problems
    write_json(out_dir / "export_report.json", report)
    return report


class Clock:
    """Wall time per stage of the export (``seconds`` in the report)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[f"stage_{name}"] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def check_writable(out_dir: Path) -> None:
    """Fail before any work when ``out_dir`` could not be created or written; creates nothing."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out_dir}: cannot write there ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out_dir}: cannot write there (permission denied on {existing})")


def _make_folder(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot write there ({e.strerror})") from None
