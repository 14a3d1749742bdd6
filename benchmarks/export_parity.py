"""Export parity: our export (onnx2tf structure + qnas parameters) vs plain onnx2tf full-integer.

For each subnet, on the same held-out test images, both int8 TFLite models are compared with
the fake-quant PyTorch subnet's int8 logits, in OUR output LSBs:
- qnas: `qnas export` (export.pipeline.export_subnet); numbers read from its export_report.json;
- plain onnx2tf: the same IntegerGraph -> ONNX -> onnx2tf full-integer quantization with its own
  calibration (export.tflite.run_onnx2tf, first MAX_CALIB_IMAGES of the same calibration images),
  no parameters rewritten. It has its own input/output qparams: our int8 images are dequantized
  with our input qparams and requantized with its own; its int8 logits are dequantized with its
  output qparams and requantized into ours (round half to even, saturate).
Columns: max |Δ| LSB, fraction within 1 LSB / exact, top-1 agreement (XNNPACK and built-in
kernels), test top-1 of the TFLite model (XNNPACK), float tensors, QUANTIZE+DEQUANTIZE ops,
conversion seconds (ONNX + onnx2tf [+ our rewrite]).

    python -m benchmarks.export_parity [--supernet runs/q8/supernet.pt] [--subnets largest,smallest,random:1]
                                       [--images 500] [--out runs/bench/export_parity]

Without --supernet a tiny int8 supernet is trained on Fashion-MNIST into OUT/supernet (under a
minute; reused when present). Writes OUT/export_parity.json and OUT/<subnet>/{qnas,plain}/.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from ai_edge_litert.interpreter import Interpreter

from export.fold import quantize_input, to_integer_graph
from export.graph import QParams
from export.onnx_export import export_onnx
from export.pipeline import ONNX2TF_CALIB_IMAGES, int8_images, export_subnet, prepare
from export.reference import dequantize, quantize
from export.tflite import MAX_CALIB_IMAGES, run_onnx2tf
from export.verify import BACKENDS, op_census, parity, run_tflite
from qnas_cli.calibrate import CALIB_IMAGES
from qnas_cli.checkpoint import versions, write_json
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
    write_json(path, {**arch.to_dict(net.space), "supernet": {"path": str(supernet.resolve()), "sha256": meta["weights"]["sha256"]}})
    return path


def plain_onnx2tf(path: Path, folder: Path, n_images: int) -> dict:
    """Plain onnx2tf full-integer model of the same graph, scored in our output LSBs."""
    sub, _, data = prepare(path, None, None, CALIB_IMAGES)  # the .qnas.pt the qnas export just saved
    sub.eval()
    graph = to_integer_graph(sub, {"arch": sub.arch.key})
    calib = quantize_input(sub, to_input(data.train.get(calibration_indices(data.train, ONNX2TF_CALIB_IMAGES, 2))[0],
                                         data, sub.arch.resolution))
    images, labels, expected = int8_images(sub, data, data.test, n_images)
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
    for b in BACKENDS:
        got = quantize(dequantize(run_tflite(model, fed, b), QParams(s_out, z_out)), ours_out)
        row["parity"][b] = parity(got, expected)
        row[f"top1_{b}"] = float(np.mean(got.argmax(1) == labels))
    row["fake_quant_top1"] = float(np.mean(expected.argmax(1) == labels))
    return row


def cells(r: dict) -> list[str]:
    if "error" in r:
        return [r["error"][:100]]
    out = []
    for b in ("xnnpack", "builtin"):
        p = r["parity"][b]
        out += [f"{p['max_abs_lsb']}", f"{p['within_1lsb']:.4f}", f"{p['exact']:.4f}", f"{p['top1_agreement']:.3f}"]
    c = r["census"]
    return out + [f"{r['top1_xnnpack']:.3f}", f"{c['float_tensors']}", f"{c['quantize_ops']}/{c['dequantize_ops']}", f"{r['seconds']:.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--supernet", type=Path, help="int8 supernet.pt (default: train a tiny one into OUT/supernet)")
    ap.add_argument("--subnets", default="largest,smallest,random:1")
    ap.add_argument("--images", type=int, default=500, help="held-out test images")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/export_parity"))
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
            rep = export_subnet(path, path.parent / "qnas", eval_images=args.images, log=lambda m: print(f"  {m}"))
            export_versions, row["arch"] = rep["versions"], rep["arch_key"]
            row["qnas"] = {k: rep[k] for k in ("parity", "census", "accuracy", "passed", "problems")}
            row["qnas"].update(seconds=rep["seconds"]["total"], seconds_detail=rep["seconds"],
                               top1_xnnpack=rep["accuracy"]["tflite_top1"])
        except Exception as e:  # noqa: BLE001 - one failing subnet must not hide the others
            row["qnas"] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
        print(f"[{spec}] plain onnx2tf")
        try:
            row["plain_onnx2tf"] = plain_onnx2tf(path, path.parent / "plain", args.images)
        except Exception as e:  # noqa: BLE001
            row["plain_onnx2tf"] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
        results.append(row)
    write_json(args.out / "export_parity.json", {"supernet": str(supernet), "images": args.images,
                                                  "results": results, "versions": {**versions(), **export_versions}})
    head = ["subnet", "export", "xnn max|Δ|", "xnn ≤1LSB", "xnn exact", "xnn top1=", "bi max|Δ|", "bi ≤1LSB", "bi exact",
            "bi top1=", "acc", "float T", "Q/DQ ops", "conv s"]
    rows = [[r["subnet"], name, *cells(r[key])] for r in results for name, key in (("qnas", "qnas"), ("plain onnx2tf", "plain_onnx2tf"))]
    widths = [max(len(x) for x in col) for col in zip(head, *[row for row in rows if len(row) == len(head)])]
    print(f"\n{args.images} test images; |Δ| in our output LSBs vs the fake-quant PyTorch subnet; "
          f"xnn = XNNPACK, bi = built-in kernels;\ntop1= is top-1 agreement, acc the TFLite model's test top-1 (XNNPACK)")
    for row in [head, *rows]:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)) if len(row) == len(head) else "  ".join(row))
    print(f"wrote {args.out / 'export_parity.json'}")


if __name__ == "__main__":
    main()
