"""Export parity: is the int8 TFLite bit-exact on each runtime, and what does verification cost?

For each subnet (`--subnets`, of one `--supernet`), on the same held-out test images:
- qnas: `qnas export` (export.pipeline.export_subnet, target XNNPACK); per runtime (XNNPACK,
  TFLite reference kernels, optimized built-in kernels) the share of int8 logits exactly equal
  to the calibrated subnet's exact forward for that runtime (built-in: vs the reference
  arithmetic, the closest; it is not emulated), and "before": the same outputs against the
  fake-quant forward, which is what the gate compared with before the exact forward existed;
- plain onnx2tf: the same IntegerGraph -> ONNX -> onnx2tf full-integer quantization with its
  own calibration and scales, scored against the exact XNNPACK forward in our output LSBs;
- litert-torch + ai-edge-quantizer (the route a PyTorch user picks today, benchmarks/litert_route.py):
  the same float numbers exported by litert-torch and quantized with ``static_wi8_ai8``, scored
  the same way (``--no-litert-torch`` skips it; it needs ``make baselines-venv``);
- cost: `qnas export` as a user runs it (its own process, the whole test split, default
  checks), wall time split by stage, and the exact forward's time relative to the fake-quant
  one (same images, same batches). Target: the largest `small` subnet in <= 60 s on 2 cores.

    python -m benchmarks.export_parity [--supernet runs/q8/supernet.pt] [--subnets largest,smallest,random:1]
                                       [--images 500] [--out runs/bench/export_parity]

Without --supernet a tiny int8 supernet is trained on Fashion-MNIST into OUT/supernet (under a
minute; reused when present). Writes OUT/export_parity.json and OUT/<subnet>/{qnas,plain,litert_torch}/.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ai_edge_litert.interpreter import Interpreter

from qnas_cli.export.fold import quantize_input, to_integer_graph
from qnas_cli.export.graph import QParams
from qnas_cli.export.onnx_export import export_onnx
from qnas_cli.export.pipeline import ONNX2TF_CALIB_IMAGES, int8_images, prepare, subnet_outputs
from qnas_cli.export.reference import dequantize, quantize
from qnas_cli.export.tflite import MAX_CALIB_IMAGES, run_onnx2tf
from qnas_cli.export.verify import CHECKED, arithmetic, float_ops, op_census, parity, run_tflite
from qnas_cli.calibrate import CALIB_IMAGES, subnet_document
from qnas_cli.checkpoint import versions, write_json
from qnas_cli.kernels import TARGETS
from qnas_cli.data import calibration_indices, to_input
from qnas_cli.space import sample
from qnas_cli.supernet import load_supernet
from qnas_cli.train import TrainConfig, train


def subnet_file(supernet: Path, spec: str, out: Path) -> Path:
    """Write OUT/<spec>/subnet.json for 'largest', 'smallest' or 'random:SEED'."""
    how, _, seed = spec.partition(":")
    net, meta = load_supernet(supernet)
    arch = sample(net.space, how, random.Random(int(seed or 0)))
    path = out / spec.replace(":", "") / "subnet.json"
    write_json(path, subnet_document(arch, net.space, supernet.resolve(), meta["weights"]["sha256"]))
    return path


def timed_export(path: Path, out: Path) -> tuple[dict, float]:
    """`qnas export PATH --out OUT --json` as a user runs it; its report and wall seconds (process start included)."""
    t0 = time.perf_counter()
    # int8 ends, as the peer converters here are asked for: this compares graphs (the default uint8 file
    # in a client: benchmarks/task_api.py)
    proc = subprocess.run([sys.executable, "-m", "qnas_cli", "export", str(path), "--out", str(out), "--json",
                           "--input", "int8", "--output", "int8"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"qnas export exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout), wall


def plain_onnx2tf(path: Path, folder: Path, n_images: int) -> dict:
    """Plain onnx2tf full-integer model of the same graph, scored in our output LSBs."""
    sub, _, data = prepare(path, None, None, CALIB_IMAGES)  # the .qnas.pt the qnas export just saved
    sub.eval()
    graph = to_integer_graph(sub, {"arch": sub.arch.key})
    calib = quantize_input(sub, to_input(data.train.get(calibration_indices(data.train, ONNX2TF_CALIB_IMAGES, 2))[0],
                                         data, sub.arch.resolution))
    images, labels = int8_images(sub, data, data.test, n_images)
    expected = subnet_outputs(sub, images, "xnnpack")
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    onnx_path = export_onnx(graph, folder / "model.onnx")
    with tempfile.TemporaryDirectory(prefix="qnas_plain_") as tmp:
        tfl = run_onnx2tf(onnx_path, graph, calib, Path(tmp), folder / "model.onnx2tf.log")
    seconds = time.perf_counter() - t0
    model = folder / "model_plain_int8.tflite"
    model.write_bytes(tfl)
    io = Interpreter(model_path=str(model))
    (s_in, z_in), (s_out, z_out) = (io.get_input_details()[0]["quantization"], io.get_output_details()[0]["quantization"])
    ours_in, ours_out = graph.qparams[graph.input], graph.qparams[graph.output]
    fed = quantize(dequantize(images, ours_in), QParams(s_in, z_in))
    row = {"parity": {}, "census": op_census(model), "seconds": seconds, "calib_images": min(len(calib), MAX_CALIB_IMAGES),
           "qparams": {"input": [s_in, z_in], "output": [s_out, z_out],
                       "ours_input": [ours_in.scale, ours_in.zero_point], "ours_output": [ours_out.scale, ours_out.zero_point]}}
    got = quantize(dequantize(run_tflite(model, fed, "xnnpack"), QParams(s_out, z_out)), ours_out)
    row["parity"]["xnnpack"] = parity(got, expected)
    row["top1_xnnpack"] = float(np.mean(got.argmax(1) == labels))
    row["float_ops"] = float_ops(model)
    row["size_bytes"] = model.stat().st_size
    return row


def litert_torch(path: Path, folder: Path, n_images: int) -> dict:
    """The same subnet through litert-torch + ai-edge-quantizer (static int8, its own calibration on
    the same training images as plain onnx2tf), scored like it: in our output LSBs against the
    exact XNNPACK forward, test top-1, and what the file holds."""
    from benchmarks.litert_route import REPORT, run_model, run_route

    sub, _, data = prepare(path, None, None, CALIB_IMAGES)
    sub.eval()
    graph = to_integer_graph(sub, {"arch": sub.arch.key})
    idx = calibration_indices(data.train, ONNX2TF_CALIB_IMAGES, 2)
    ours_in, ours_out = graph.qparams[graph.input], graph.qparams[graph.output]
    # inputs on qnas's own input grid, so both routes see the same information
    calib = dequantize(quantize_input(sub, to_input(data.train.get(idx)[0], data, sub.arch.resolution)), ours_in)
    images, labels = int8_images(sub, data, data.test, n_images)
    expected = subnet_outputs(sub, images, "xnnpack")
    model = run_route(graph, calib.astype(np.float32), folder)
    logits = run_model(model, dequantize(images, ours_in).astype(np.float32), "xnnpack")
    got = quantize(logits, ours_out)
    census = op_census(model)
    return {"parity": {"xnnpack": parity(got, expected)}, "census": census, "top1_xnnpack": float(np.mean(logits.argmax(1) == labels)),
            "float_ops": float_ops(model), "size_bytes": Path(model).stat().st_size, "route": json.loads((folder / REPORT).read_text())}


def exactness(path: Path, tflite: Path, n_images: int) -> dict:
    """Per runtime: the file's outputs vs the exact forward (after) and vs fake-quant (before),
    and what the exact forward costs relative to the fake-quant one."""
    sub, _, data = prepare(path, None, None, CALIB_IMAGES)
    sub.eval()
    images, labels = int8_images(sub, data, data.test, n_images)
    row: dict = {"ops": None, "runtimes": {}, "forward_seconds": {}}
    for runtime in (None, *TARGETS):
        subnet_outputs(sub, images[:50], runtime)  # warm-up
        t = time.perf_counter()
        out = subnet_outputs(sub, images, runtime)
        row["forward_seconds"][runtime or "fake_quant"] = time.perf_counter() - t
        row[f"outputs_{runtime or 'fake_quant'}"] = out
    for runtime in CHECKED:
        got = run_tflite(tflite, images, runtime)
        row["runtimes"][runtime] = {"after": parity(got, row[f"outputs_{arithmetic(runtime)}"]) | {"compared_with": arithmetic(runtime)},
                                    "before": parity(got, row["outputs_fake_quant"]),
                                    "top1": float(np.mean(got.argmax(1) == labels))}
    for k in [k for k in row if k.startswith("outputs_")]:
        del row[k]
    f = row["forward_seconds"]
    row["exact_cost_vs_fake_quant"] = {r: f[r] / f["fake_quant"] for r in TARGETS}
    row["ops"] = sum(op_census(tflite)["ops"].values())
    return row


def table(results: list[dict], images: int) -> None:
    head = ["subnet", "ops", "runtime", "exact after", "max LSB", "exact before", "max LSB before", "top-1 agree before", "TFLite top-1"]
    rows = []
    for r in results:
        for runtime, x in r.get("exactness", {}).get("runtimes", {}).items():
            a, b = x["after"], x["before"]
            rows.append([r["subnet"], str(r["exactness"]["ops"]), runtime + ("" if runtime in TARGETS else " (vs ref)"),
                         f"{100 * a['exact']:.2f}%", str(a["max_abs_lsb"]), f"{100 * b['exact']:.2f}%", str(b["max_abs_lsb"]),
                         f"{100 * b['top1_agreement']:.2f}%", f"{100 * x['top1']:.2f}%"])
    _print(head, rows, f"\n{images} test images; int8 logits of the exported file on each runtime vs the exact forward for "
                       f"that runtime (after) and vs the fake-quant forward (before: what parity meant until now)")
    head = ["subnet", "arch", "export s", "calibrate", "pytorch", "onnx2tf (beside)", "convert wait", "tflite target", "checks", "latency",
            "exact xnn / fq", "exact ref / fq", "exact micro / fq", "plain onnx2tf max LSB", "plain exact"]
    rows = []
    for r in results:
        q, e, p = r.get("qnas", {}), r.get("exactness", {}), r.get("plain_onnx2tf", {})
        sec = q.get("seconds_detail", {})
        stage = lambda k: f"{sec.get(k, float('nan')):.1f}"  # noqa: E731
        rows.append([r["subnet"], r.get("arch", "?")[:28], f"{q.get('wall_seconds', float('nan')):.1f}",
                     stage("stage_calibrate"), stage("stage_pytorch"), stage("onnx2tf"), stage("stage_convert_wait"),
                     stage("stage_tflite_xnnpack"),
                     stage("stage_tflite_checks"), stage("stage_latency"),
                     f"{e.get('exact_cost_vs_fake_quant', {}).get('xnnpack', float('nan')):.2f}x",
                     f"{e.get('exact_cost_vs_fake_quant', {}).get('reference', float('nan')):.2f}x",
                     f"{e.get('exact_cost_vs_fake_quant', {}).get('micro', float('nan')):.2f}x",
                     str(p.get("parity", {}).get("xnnpack", {}).get("max_abs_lsb", p.get("error", "?")))[:30],
                     f"{100 * p.get('parity', {}).get('xnnpack', {}).get('exact', float('nan')):.2f}%"])
    _print(head, rows, "\nwall seconds of `qnas export` (whole test split, its own process) by stage (onnx2tf runs beside "
                       "the PyTorch passes); exact forward time relative to fake-quant; plain onnx2tf vs exact XNNPACK")


def routes_table(results: list[dict], images: int) -> None:
    """The three routes side by side on XNNPACK: qnas, plain onnx2tf, litert-torch + ai-edge-quantizer."""
    head = ["subnet", "route", "exact vs qnas forward", "max LSB", "top-1 agree", "TFLite top-1", "float ops", "QUANTIZE/DEQUANTIZE",
            "size (bytes)"]
    rows = []
    for r in results:
        x = r.get("exactness", {}).get("runtimes", {}).get("xnnpack")
        routes = {"qnas export": (x["after"], x["top1"], r["qnas"]) if x and "census" in r.get("qnas", {}) else None}
        for key, label in (("plain_onnx2tf", "plain onnx2tf"), ("litert_torch", "litert-torch + AEQ")):
            p = r.get(key, {})
            routes[label] = (p["parity"]["xnnpack"], p["top1_xnnpack"], p) if "parity" in p else p.get("error", "not run")
        for label, v in routes.items():
            if not isinstance(v, tuple):
                rows.append([r["subnet"], label, str(v)[:60], "", "", "", "", "", ""])
                continue
            par, top1, doc = v
            c = doc["census"]
            rows.append([r["subnet"], label, f"{100 * par['exact']:.2f}%", str(par["max_abs_lsb"]),
                         f"{100 * par['top1_agreement']:.2f}%", f"{100 * top1:.2f}%", str(sum(doc.get("float_ops", {}).values())),
                         f"{c['quantize_ops']}/{c['dequantize_ops']}", str(doc.get("size_bytes", "?"))])
    _print(head, rows, f"\nroutes on XNNPACK, {images} test images: int8 logits in qnas's output LSBs vs qnas's exact forward "
                       "(the trained numbers); float ops: ops whose input is float32")


def _print(head: list[str], rows: list[list[str]], title: str) -> None:
    print(title)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for row in [head, *rows]:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--supernet", type=Path, help="int8 supernet.pt (default: train a tiny one into OUT/supernet)")
    ap.add_argument("--subnets", default="largest,smallest,random:1")
    ap.add_argument("--images", type=int, default=500, help="held-out test images")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/export_parity"))
    ap.add_argument("--litert-torch", action=argparse.BooleanOptionalAction, default=True,
                    help="also the litert-torch + ai-edge-quantizer route (needs .venv-baselines: make baselines-venv)")
    args = ap.parse_args()
    supernet = args.supernet
    if supernet is None:
        supernet = args.out / "supernet" / "supernet.pt"
        if not supernet.is_file():
            print(f"training a tiny int8 supernet into {supernet.parent}")
            train(TrainConfig(space="tiny", out=str(supernet.parent), steps=40, batch_size=32, lr=0.1, warmup_steps=5,
                              eval_images=200, calib_images=128, ckpt_every=1000), log=lambda *a, **k: None)
    results, export_versions = [], {}
    for spec in args.subnets.split(","):
        path, row = subnet_file(supernet, spec, args.out), {"subnet": spec}
        print(f"[{spec}] qnas export")
        try:
            rep, wall = timed_export(path, path.parent / "qnas")
            export_versions, row["arch"] = rep["versions"], rep["arch_key"]
            row["qnas"] = {k: rep[k] for k in ("parity", "census", "accuracy", "passed", "problems", "xnnpack_coverage", "size_bytes")}
            row["qnas"].update(seconds_detail=rep["seconds"], wall_seconds=wall,
                               float_ops=float_ops(path.parent / "qnas" / "model_int8.tflite"))
        except Exception as e:  # noqa: BLE001 - one failing subnet must not hide the others
            row["qnas"] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
        print(f"[{spec}] exactness per runtime, before and after")
        try:
            row["exactness"] = exactness(path, path.parent / "qnas" / "model_int8.tflite", args.images)
        except Exception as e:  # noqa: BLE001
            row["exactness"] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
        print(f"[{spec}] plain onnx2tf")
        try:
            row["plain_onnx2tf"] = plain_onnx2tf(path, path.parent / "plain", args.images)
        except Exception as e:  # noqa: BLE001
            row["plain_onnx2tf"] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
        if args.litert_torch:
            print(f"[{spec}] litert-torch + ai-edge-quantizer")
            try:
                row["litert_torch"] = litert_torch(path, path.parent / "litert_torch", args.images)
            except Exception as e:  # noqa: BLE001
                row["litert_torch"] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
        results.append(row)
    write_json(args.out / "export_parity.json", {"supernet": str(supernet), "images": args.images,
                                                  "results": results, "versions": {**versions(), **export_versions}})
    table(results, args.images)
    routes_table(results, args.images)
    print(f"wrote {args.out / 'export_parity.json'}")


if __name__ == "__main__":
    main()
