"""``qnas export``: calibrated subnet -> integer graph -> int8 TFLite -> verified report.

Writes ``model.onnx``, ``model_int8.tflite``, ``model.onnx2tf.log`` and ``export_report.json``
into the output folder. Everything is checked against the fake-quant PyTorch subnet on held-out
test images; the report says whether the model passed, and why not.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qnas_cli.calibrate import CALIB_IMAGES, calibrate_file, load_calibrated
from qnas_cli.checkpoint import sha256_file, versions, write_json
from qnas_cli.data import Dataset, calibration_indices, load_dataset, ordered_batches, to_input
from qnas_cli.errors import UserError
from qnas_cli.space import read_structured
from qnas_cli.supernet import Subnet

from .fold import quantize_input, quantize_output, to_integer_graph

ONNX2TF_CALIB_IMAGES = 200  # onnx2tf's own calibration only has to produce a full-integer graph


def prepare(subnet_file: Path, supernet: Path | None, data_spec: str | None, calib_images: int,
            device: str = "cpu") -> tuple[Subnet, dict[str, Any], Dataset]:
    """A calibrated subnet from ``.qnas.pt``, from a matching ``.qnas.pt`` beside a subnet.json, or by calibrating."""
    subnet_file = Path(subnet_file)
    if subnet_file.name.endswith(".qnas.pt"):
        sub, meta = load_calibrated(subnet_file)
    else:
        beside = subnet_file.with_suffix(".qnas.pt")
        sub = None
        if beside.is_file() and supernet is None and data_spec is None:
            cand, meta = load_calibrated(beside)
            raw = read_structured(subnet_file, "subnet file")
            arch = meta.get("arch") or {}
            same_arch = {k: raw.get(k) for k in ("resolution", "stages")} == {k: arch.get(k) for k in ("resolution", "stages")}
            if same_arch and meta.get("calib_images") == calib_images:
                sub = cand
        if sub is None:
            sub, meta, data = calibrate_file(subnet_file, supernet, data_spec, calib_images, device=device)
            return sub, meta, data
    data = load_dataset(data_spec or meta["data"]["spec"], load_size=sub.arch.resolution)
    return sub, meta, data


@torch.no_grad()
def _int8_images(sub: Subnet, data: Dataset, source, limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 inputs, labels, and the fake-quant model's int8 logits on them."""
    xs, ys, outs = [], [], []
    for x, y in ordered_batches(source, 500, limit):
        z = to_input(x, data, sub.arch.resolution)
        xs.append(quantize_input(sub, z))
        outs.append(quantize_output(sub, sub(z)))
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(outs)


def export_subnet(subnet_file: Path, out_dir: Path | None = None, supernet: Path | None = None,
                  data_spec: str | None = None, calib_images: int = CALIB_IMAGES, eval_images: int | None = None,
                  log=print) -> dict[str, Any]:
    """Run the whole export; returns the report (also written to ``out_dir/export_report.json``)."""
    from .tflite import export_tflite
    from .verify import failures, run_tflite, verify_tflite

    out_dir = Path(out_dir) if out_dir else Path(subnet_file).parent
    _check_writable(out_dir)
    t0 = time.perf_counter()
    sub, meta, data = prepare(Path(subnet_file), supernet, data_spec, calib_images)
    sub.eval()
    if not sub.cfg.enabled:
        raise UserError("this subnet comes from a float supernet (--quant none): train an int8 supernet to export")
    graph = to_integer_graph(sub, {"arch": sub.arch.key})
    calib = quantize_input(sub, to_input(data.train.get(calibration_indices(data.train, ONNX2TF_CALIB_IMAGES, 2))[0],
                                         data, sub.arch.resolution))
    log(f"exporting {sub.arch.key} ({len(graph.ops)} int8 ops)")
    result = export_tflite(graph, calib, out_dir, name="model")

    log("verifying against the fake-quant PyTorch subnet")
    images, labels, expected = _int8_images(sub, data, data.test, eval_images)
    report = verify_tflite(result.tflite, graph, images, expected=expected)
    tfl = run_tflite(result.tflite, images, "xnnpack")
    in_q, out_q = graph.qparams[graph.input], graph.qparams[graph.output]
    report.update({
        "passed": None,
        "arch": meta.get("arch"),
        "arch_key": sub.arch.key,
        "source": {"calibrated": meta.get("weights", {}).get("file"), "supernet": meta.get("supernet")},
        "accuracy": {
            "split": "test", "n_images": int(len(labels)),
            "fake_quant_top1": float(np.mean(expected.argmax(1) == labels)),
            "tflite_top1": float(np.mean(tfl.argmax(1) == labels)),
        },
        "io": {"input": {"layout": "NHWC", "shape": [1, sub.arch.resolution, sub.arch.resolution, sub.in_channels],
                         "dtype": "int8", "scale": in_q.scale, "zero_point": in_q.zero_point,
                         "normalisation": {"mean": list(data.mean), "std": list(data.std), "of": "pixels / 255"}},
               "output": {"shape": [1, sub.num_classes], "dtype": "int8", "scale": out_q.scale, "zero_point": out_q.zero_point}},
        "size_bytes": result.tflite.stat().st_size,
        "files": {"tflite": result.tflite.name, "onnx": result.onnx.name, "log": result.log.name,
                  "tflite_sha256": sha256_file(result.tflite)},
        "seconds": {**result.seconds, "total_with_verification": time.perf_counter() - t0},
        "versions": {**versions(), **result.versions},
    })
    report["accuracy"]["delta_pp"] = 100 * (report["accuracy"]["tflite_top1"] - report["accuracy"]["fake_quant_top1"])
    problems = failures(report)
    report["passed"], report["problems"] = not problems, problems
    write_json(out_dir / "export_report.json", report)
    return report


def _check_writable(out_dir: Path) -> None:
    """Fail before any work when the output folder cannot take files."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".qnas-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot write there ({e.strerror})") from None
