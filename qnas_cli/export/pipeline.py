"""``qnas export``: calibrated subnet -> integer graph -> int8 TFLite -> verified report.

Writes ``model.onnx``, ``model_int8.tflite``, ``model.onnx2tf.log`` and ``export_report.json``
into the output folder. The calibrated subnet's exact forward for the target runtime scores every
held-out test image; the file itself runs on that runtime over a class-spread subset of them
(``--verify-images``, all on request) and must equal the exact forward there bit for bit, end to
end and op by op; the other runtimes are compared with their own arithmetic on a smaller subset,
for information. The report says whether the model passed, and why not, and how long each stage
took.

Where the time goes, and why the work is split this way (largest ``small`` subnet, 10,000 test
images, 2 cores): its XNNPACK file runs 5.7 ms per image (the 7x7 depthwise slow path), so the
file on every image alone is a minute of both cores, while the exact PyTorch forward scores all
10,000 in 14 s. Bit-equality on 2,000 images and on every op's own inputs is the evidence that
the file computes the exact forward; running it on the other 8,000 would add a minute and no
further kind of evidence. onnx2tf (a subprocess, 12 s) runs beside the PyTorch passes.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qnas_cli.calibrate import (CALIB_IMAGES, EVAL_BATCH, EVAL_IMAGES_HINT, VERIFY_IMAGES, calibrate_file,
                                calibration_data_spec, calibration_record, check_data_fits, default_output, load_calibrated,
                                resolve_supernet, stale_reasons)
from qnas_cli.checkpoint import read_meta, sha256_file, versions, write_bytes, write_json
from qnas_cli.data import Dataset, calibration_indices, load_dataset, ordered_batches, to_input
from qnas_cli.errors import UserError, check_count
from qnas_cli.kernels import check_target
from qnas_cli.layers import fixed_integers, set_runtime
from qnas_cli.quant import QuantConfig
from qnas_cli.space import read_structured
from qnas_cli.supernet import Subnet

from .fold import quantize_input, quantize_output, to_integer_graph
from .pixels import FileIO, check_choices, file_io, on_pixel_grid
from .tflite_io import INPUT_NAME, OUTPUT_NAME, adapt_io
from .tflite_metadata import LABELS_FILE, ClassifierMetadata, attach, labels_text
from .tflite import MAX_CALIB_IMAGES as ONNX2TF_CALIB_IMAGES  # onnx2tf's calibration only has to yield a full-integer graph

REPORT_SCHEMA = "qnas.export_report/4"  # bump when a documented key (README, "In a CI pipeline") changes meaning
INFO_IMAGES = 100  # the runtimes other than the target: enough to show their drift (1,000 logits), not to gate
PER_OP_IMAGES = 50


def prepare(subnet_file: Path, supernet: Path | None, data_spec: str | None, calib_images: int,
            device: str = "cpu", eval_images: int | None = None, log=print,
            evaluate_splits: bool = True) -> tuple[Subnet, dict[str, Any], Dataset]:
    """A calibrated subnet: the ``.qnas.pt`` given, the one beside a subnet.json when provably
    current, or a new one (scored on the test and search splits unless ``evaluate_splits`` is False)."""
    subnet_file = Path(subnet_file)
    if subnet_file.name.endswith(".qnas.pt"):
        sub, meta = load_calibrated(subnet_file)
    else:
        sub, meta = _current_calibration(subnet_file, supernet, data_spec, calib_images, log)
        if sub is None:
            sub, meta, data = calibrate_file(subnet_file, supernet, data_spec, calib_images, device=device,
                                             eval_images=eval_images, evaluate_splits=evaluate_splits)
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


def calibrated_path(subnet_file: Path) -> Path:
    """The calibrated ``subnet.qnas.pt`` an export of ``subnet_file`` uses (given, or beside it)."""
    return subnet_file if subnet_file.name.endswith(".qnas.pt") else default_output(subnet_file)


def file_subnet(report: dict) -> tuple[Subnet, Dataset]:
    """The subnet whose exact forward an export_report.json's file computes (the calibrated one,
    on the file's input grid) and the data it was exported with: for clients checking the file."""
    sub, meta = load_calibrated(Path(report["source"]["calibrated_path"]))
    data = load_dataset(meta["data"]["spec"], load_size=meta["data"].get("decode_size", sub.arch.resolution))
    pixels = report["io"]["file"]["input"] == "uint8"
    return (on_pixel_grid(sub, meta["data"]) if pixels else sub).eval(), data


def int8_images(sub: Subnet, data: Dataset, source, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 inputs (NCHW) and labels of ``limit`` images of ``source`` (class-stratified; all when None)."""
    xs, ys = [], []
    for x, y in ordered_batches(source, 500, limit):
        xs.append(quantize_input(sub, to_input(x, data, sub.arch.resolution)))
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


@torch.no_grad()
def subnet_outputs(sub: Subnet, images: np.ndarray, runtime: str | None, batch: int = EVAL_BATCH) -> np.ndarray:
    """The subnet's int8 logits on int8 images, exact for ``runtime`` (None: the fake-quant
    simulation training uses). Dequantized inputs re-quantize to the same integers."""
    q, found = sub.input_q, sub.runtime
    set_runtime(sub, runtime)
    try:
        with fixed_integers(sub):  # static subnet: its integers once, not per batch
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
                  runtime: str = "xnnpack", verify_images: int | None = VERIFY_IMAGES, log=print,
                  input_type: str | None = None, output_type: str = "uint8", color_space: str | None = None,
                  labels_file: Path | None = None) -> dict[str, Any]:
    """Run the whole export; returns the report (also written to ``out_dir/export_report.json``).
    ``verify_images``: test images the file itself runs on (None: every one ``eval_images`` selects).
    ``input_type``, ``output_type``, ``color_space``: what the file takes and gives (``pixels.py``; None: its default);
    ``labels_file``: class names, one per line (default: the dataset's)."""
    from .tflite import export_tflite
    from .verify import CHECKED, arithmetic, failures, latency_ms, parity, run_tflite, verify_tflite

    check_target(runtime)
    check_count("--calib-images", calib_images)
    check_count("--eval-images", eval_images, EVAL_IMAGES_HINT)
    check_count("--verify-images", verify_images)
    out_dir = Path(out_dir) if out_dir else Path(subnet_file).parent
    check_writable(out_dir)
    trained_on = check_exportable(Path(subnet_file), supernet)  # before calibration writes subnet.qnas.pt
    check_choices(input_type, output_type, color_space)
    io = file_io(input_type, output_type, color_space, trained_on) if trained_on else None
    names = read_labels(labels_file, trained_on["num_classes"] if trained_on else None) if labels_file else None
    clock = Clock()
    # the export scores the test split itself, below; the search split says nothing about the file
    sub, meta, data = prepare(Path(subnet_file), supernet, data_spec, calib_images, eval_images=eval_images, log=log,
                              evaluate_splits=False)
    sub.eval()
    _refuse_unless_int8(sub.cfg)
    check_data_fits(data, sub.in_channels, sub.num_classes, "the subnet")
    trained_on = meta.get("data") or data.describe()
    io = io or file_io(input_type, output_type, color_space, trained_on)
    names = names or data.class_names or tuple(str(i) for i in range(sub.num_classes))  # --labels was read above
    if len(names) != sub.num_classes:
        raise UserError(f"--labels {labels_file}: {len(names)} names for a model of {sub.num_classes} classes")
    clock.lap("calibrate")
    _make_folder(out_dir)  # only now: a refused export leaves no empty folder behind
    if input_type is None and io.input == "int8":
        log(f"input: int8, not uint8 pixels: {trained_on['spec']} normalises each channel its own way, which one "
            "input scale cannot hold (normalise in the app as export_report.json's io.input says)")
    sub = on_pixel_grid(sub, trained_on) if io.input == "uint8" else sub
    graph = to_integer_graph(sub, {"arch": sub.arch.key})
    if graph.meta.get("saturated_biases"):
        log(f"warning: int32 biases saturated in {', '.join(graph.meta['saturated_biases'])} (a weight scale at its floor?)")
    calib = quantize_input(sub, to_input(data.train.get(calibration_indices(data.train, ONNX2TF_CALIB_IMAGES, 2))[0],
                                         data, sub.arch.resolution))
    images, labels = int8_images(sub, data, data.test, eval_images)
    verify = spread(len(images), verify_images or len(images))
    info = spread(len(images), INFO_IMAGES)
    log(f"exporting {sub.arch.key} ({len(graph.ops)} int8 ops) for {runtime}; "
        f"scoring {len(images)} test images with the exact {runtime} forward meanwhile")
    meta_for_file = classifier_metadata(sub, meta, trained_on, io, names, runtime)
    write_bytes(out_dir / LABELS_FILE, labels_text(names).encode())
    with ThreadPoolExecutor(1) as conversion:  # onnx2tf is a subprocess: it runs beside the PyTorch passes
        converted = conversion.submit(export_tflite, graph, calib, out_dir, "model",
                                      lambda model: attach(adapt_io(model, io), meta_for_file))
        exact = subnet_outputs(sub, images, runtime)  # every image: the accuracy
        fake_quant = subnet_outputs(sub, images[verify], None)
        # the other runtimes, for information, on a smaller spread subset
        sample = {a: exact[info] if a == runtime else subnet_outputs(sub, images[info], a) for a in {arithmetic(r) for r in CHECKED}}
        clock.lap("pytorch")
        result = converted.result()
    clock.lap("convert_wait")
    log(f"verifying: on {len(verify)} of the images, {runtime} must equal the exact {runtime} forward bit for bit")
    tfl = run_tflite(result.tflite, images[verify], runtime)
    clock.lap(f"tflite_{runtime}")
    runs = {r: (images[verify], exact[verify]) if r == runtime else (images[info], sample[arithmetic(r)]) for r in CHECKED}
    report = verify_tflite(result.tflite, graph, runs, outputs={runtime: tfl}, latency=False, per_op_images=PER_OP_IMAGES)
    clock.lap("tflite_checks")
    report["latency_ms"] = latency_ms(result.tflite)
    clock.lap("latency")
    in_q, out_q = graph.qparams[graph.input], graph.qparams[graph.output]
    report = {"schema": REPORT_SCHEMA, "target": runtime, **report}
    tflite_top1, fake_quant_top1 = (float(np.mean(o.argmax(1) == labels[verify])) for o in (tfl, fake_quant))
    report.update({
        "passed": None,
        "arch": meta.get("arch"),
        "arch_key": sub.arch.key,
        "quant": asdict(sub.cfg),  # weight_granularity: per-tensor or per-channel (per-axis) conv weights
        "source": {"calibrated": meta.get("weights", {}).get("file"), "calibrated_path": str(calibrated_path(Path(subnet_file)).resolve()),
                   "supernet": meta.get("supernet")},
        "accuracy": {
            "split": "test", "runtime": runtime,
            "n_images": int(len(labels)), "top1": float(np.mean(exact.argmax(1) == labels)),
            "tflite_images": int(len(verify)), "tflite_top1": tflite_top1, "fake_quant_top1": fake_quant_top1,
            "delta_pp": 100 * (tflite_top1 - fake_quant_top1),
        },
        "fake_quant_vs_exact": parity(fake_quant, exact[verify]),
        "saturated_biases": graph.meta.get("saturated_biases", []),
        "io": io_record(io, sub, in_q, out_q, data.preprocessing(sub.arch.resolution)),
        "labels": {"file": LABELS_FILE, "names": list(names), "in_metadata": True},
        "size_bytes": result.tflite.stat().st_size,
        "files": {"tflite": result.tflite.name, "onnx": result.onnx.name, "log": result.log.name,
                  "tflite_sha256": sha256_file(result.tflite)},
        "seconds": {**result.seconds, **clock.laps, "total_with_verification": clock.total()},
        "versions": {**versions(), **result.versions},
    })
    problems = failures(report, runtime)
    report["passed"], report["problems"] = not problems, problems
    write_json(out_dir / "export_report.json", report)
    return report


def check_exportable(subnet_file: Path, supernet: Path | None) -> dict | None:
    """Refuse, before anything is written, a subnet whose supernet is not fully int8 (a float or
    convs-only one): from the sidecar of ``subnet.qnas.pt`` or of the supernet a subnet.json names.
    Returns the data the model was trained on as recorded there (None where unreadable)."""
    try:
        if subnet_file.name.endswith(".qnas.pt"):
            meta = read_meta(subnet_file)
        else:
            net_path, recorded_sha = resolve_supernet(read_structured(subnet_file, "subnet file"), subnet_file, supernet)
            meta = read_meta(net_path, recorded_sha)
        cfg = QuantConfig(**meta["quant"])
    except (UserError, KeyError, TypeError):
        return None  # not ours to judge: ``prepare`` names what is wrong with these files, before it writes anything
    _refuse_unless_int8(cfg)
    return meta.get("data")


def _refuse_unless_int8(cfg: QuantConfig) -> None:
    if not cfg.enabled:
        raise UserError(f"this subnet comes from a {cfg.label} supernet: qnas exports fully int8 subnets "
                        "(train one with --quant int8)")


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


def read_labels(path: Path, classes: int | None) -> tuple[str, ...]:
    """--labels: one class name per line (blank lines at the end ignored), as many as the classes."""
    try:
        names = tuple(Path(path).read_text(encoding="utf-8").rstrip("\n").split("\n"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--labels {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if any(not n.strip() for n in names):
        raise UserError(f"--labels {path}: a line is empty (one class name per line)")
    if classes is not None and len(names) != classes:
        raise UserError(f"--labels {path}: {len(names)} names for a model of {classes} classes")
    return names


def io_record(io: FileIO, sub: Subnet, in_q, out_q, preprocessing: dict) -> dict:
    """The report's ``io``: what the file takes and gives, and how to make it from an image file."""
    r = sub.arch.resolution
    graph_in = {"scale": in_q.scale, "zero_point": in_q.zero_point}
    if io.input == "uint8":
        file_in = {"name": INPUT_NAME, "shape": [1, r, r, io.channels], "dtype": "uint8", "color_space": io.color_space,
                   "values": "raw pixels 0-255: the model normalises them itself",
                   "scale": in_q.scale, "zero_point": in_q.zero_point + 128}
        if io.channel is not None:
            file_in["reads_channel"] = "RGB"[io.channel]
    else:
        file_in = {"name": "input", "shape": [1, r, r, sub.in_channels], "dtype": "int8", **graph_in,
                   "values": "normalised pixels, quantized: round(x / scale) + zero_point"}
    scores = {"shape": [1, sub.num_classes], "scale": out_q.scale}
    file_out = ({"name": OUTPUT_NAME, **scores, "dtype": "uint8", "zero_point": out_q.zero_point + 128} if io.output == "uint8"
                else {"name": "logits", **scores, "dtype": "int8", "zero_point": out_q.zero_point})
    return {"file": io.to_dict(), "input": {"layout": "NHWC", **file_in, **preprocessing,
                                            "graph_input": graph_in},
            "output": {**file_out, "values": "class scores (logits): (q - zero_point) * scale; the largest is the prediction"}}


def classifier_metadata(sub: Subnet, meta: dict, trained_on: dict, io: FileIO, names: tuple[str, ...],
                        runtime: str) -> ClassifierMetadata:
    """TFLite metadata for the file: what it is, its labels, how its input is normalised."""
    from qnas_cli import __version__

    q = sub.input_q
    if io.input == "uint8":  # the model's real input is (pixel - zero_point) * scale
        mean, std = float(q.zero_point + 128), 1.0 / float(q.scale.item())
        values = f"raw {io.color_space.upper()} pixels 0-255 (uint8); the model normalises them itself"
    else:  # an app normalises and quantizes: (p / 255 - m) / s, as 255-based pixel statistics
        mean, std = 255.0 * trained_on["mean"][0], 255.0 * trained_on["std"][0]
        values = "normalised pixels quantized to int8 (export_report.json io.input)"
    supernet = (meta.get("supernet") or {}).get("sha256", "")[:12]
    return ClassifierMetadata(
        name=f"qnas {((meta.get('arch') or {}).get('space') or {}).get('name', 'subnet')} {trained_on['spec']} classifier",
        description=(f"Fully int8 image classifier found by qnas (quantization-aware NAS), subnet {sub.arch.key}, "
                     f"exported for {runtime}; trained on {trained_on['spec']}."),
        version=f"qnas {__version__}; supernet {supernet}" if supernet else f"qnas {__version__}",
        labels=names, color_space=io.color_space, width=sub.arch.resolution, height=sub.arch.resolution,
        mean=mean, std=std, input_description=values,
        output_description="One score per class (logits); the largest is the prediction. Labels: labels.txt.")
