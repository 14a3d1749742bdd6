"""Check an exported int8 TFLite model: exactness on its target runtime (end to end and per op),
the other runtimes for information, op census, stored scales and constants, host latency.
Everything returned is JSON-ready.

Parity is a property of a runtime, not of the file: XNNPACK, TFLite's reference kernels and its
optimized built-in kernels round requantization differently (``qnas_cli/kernels.py`` states
how), and one-LSB differences compound with depth. So the model is run on each runtime and
compared with the *exact* integer forward for that runtime (``qnas_cli/export/reference.py`` per op,
the calibrated subnet end to end): the target runtime must agree bit for bit. The optimized
built-in kernels round differently in their vector blocks and scalar tails and are not
emulated; they are compared with the reference arithmetic, the closest, and reported only.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as fb
from ai_edge_litert.tools import flatbuffer_utils as fbu

from qnas_cli.export.graph import Conv, IntegerGraph, Linear, channel_scales, is_per_channel
from qnas_cli.export.measure import interpreter, measure_models, xnnpack_coverage
from qnas_cli.export.onnx_export import tensor_shapes
from qnas_cli.export.reference import run_op
from qnas_cli.export.tflite_rewrite import ALIAS_ROLES, CHANNEL_DIM, OP_NAMES, TYPE_NAMES, tflite_layout
from qnas_cli.kernels import TARGETS
from qnas_cli.latency import STATISTIC, RUNTIMES as TIMED  # (xnnpack, builtin): what latency is reported for

CHECKED = ("xnnpack", "reference", "micro", "builtin")  # every runtime the model is run on


def arithmetic(runtime: str) -> str:
    """The emulated arithmetic a runtime's outputs are compared with (builtin: the closest)."""
    return runtime if runtime in TARGETS else "reference"

_FLOAT_TYPES = {fb.TensorType.FLOAT16, fb.TensorType.FLOAT32, fb.TensorType.FLOAT64}


def _read(path: Path) -> fb.ModelT:
    return fbu.read_model_from_bytearray(bytearray(Path(path).read_bytes()))


def op_census(path: Path) -> dict:
    """Op types, tensor types and in/out dtypes of the flatbuffer (all subgraphs)."""
    model = _read(path)
    ops: Counter[str] = Counter()
    types: Counter[str] = Counter()
    for sg in model.subgraphs:
        for op in sg.operators:
            ops[OP_NAMES[fbu.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])]] += 1
        for t in sg.tensors:
            types[TYPE_NAMES[t.type]] += 1
    sg = model.subgraphs[0]
    return {
        "ops": dict(sorted(ops.items())),
        "tensor_types": dict(sorted(types.items())),
        "float_tensors": sum(1 for s in model.subgraphs for t in s.tensors if t.type in _FLOAT_TYPES),
        "input_dtype": TYPE_NAMES[sg.tensors[sg.inputs[0]].type].lower(),
        "output_dtype": TYPE_NAMES[sg.tensors[sg.outputs[0]].type].lower(),
        "input_shape": [int(d) for d in sg.tensors[sg.inputs[0]].shape],
        "input_layout": "NHWC",
        "quantize_ops": ops.get("QUANTIZE", 0),
        "dequantize_ops": ops.get("DEQUANTIZE", 0),
        "size_bytes": Path(path).stat().st_size,
    }


def float_ops(path: Path) -> dict:
    """Ops of the file that compute in float (their first input is a float tensor), by kind;
    QUANTIZE is not counted (its float input is the conversion into int8, not float work)."""
    model = _read(path)
    kinds: Counter[str] = Counter()
    for sg in model.subgraphs:
        for op in sg.operators:
            first = next((t for t in op.inputs if t >= 0), None)
            kind = OP_NAMES[fbu.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])]
            if first is not None and sg.tensors[first].type in _FLOAT_TYPES and kind != "QUANTIZE":
                kinds[kind] += 1
    return dict(sorted(kinds.items()))


def stored_scales(path: Path, graph: IntegerGraph) -> dict:
    """Intended vs stored qparams of every graph tensor and of every conv/FC weight and bias (by
    the names the rewrite gave them), plus whether every stored weight and bias equals ours.

    Weights and biases are compared per axis: as many scales as intended (one, or one per output
    channel), zero points 0, and for per-channel ones the quantized dimension the consuming op's
    layout needs (``CHANNEL_DIM``: 3 for depthwise); any of those wrong counts as an infinite error.
    """
    model = _read(path)
    sg = model.subgraphs[0]
    names = [t.name.decode() for t in sg.tensors]
    rows, worst, missing = [], 0.0, []
    for name, qp in graph.qparams.items():
        found = [i for i, n in enumerate(names) if n == name or
                 (n.startswith(f"{name}/") and n[len(name) + 1:].split("#")[0] in ALIAS_ROLES)]
        missing += [] if found else [name]
        for i in found:
            q = sg.tensors[i].quantization
            s, z = float(q.scale[0]), int(q.zeroPoint[0])
            rel = abs(s - qp.scale) / qp.scale
            worst = max(worst, rel if z == qp.zero_point and len(q.scale) == 1 else float("inf"))
            rows.append({"tensor": names[i], "intended": [qp.scale, qp.zero_point], "stored": [s, z],
                         "rel_err": rel})
    index = {n: i for i, n in enumerate(names)}
    kinds = _consumer_kinds(model)
    mismatched = []
    for op in graph.ops:
        if not isinstance(op, (Conv, Linear)):
            continue
        for suffix, ours in (("weight", op.weight), ("bias", op.bias)):
            i = index.get(f"{op.name}/{suffix}")
            if i is None:
                mismatched.append(f"{op.name}/{suffix}")
                continue
            t = sg.tensors[i]
            data = np.frombuffer(np.asarray(model.buffers[t.buffer].data, np.uint8).tobytes(), ours.dtype)
            layouts = ([tflite_layout(ours, k) for k in ("CONV_2D", "DEPTHWISE_CONV_2D")]
                       if suffix == "weight" and isinstance(op, Conv) else [ours])
            if not any(w.shape == tuple(t.shape) and np.array_equal(data.reshape(w.shape), w) for w in layouts):
                mismatched.append(f"{op.name}/{suffix}")
            dim = CHANNEL_DIM.get(kinds.get(i, ""), 0) if suffix == "weight" else 0
            row = _constant_row(names[i], t.quantization, _intended_scales(op, suffix, graph), dim)
            worst = max(worst, row["rel_err"])
            rows.append(row)
    return {"tensors": rows, "max_rel_err": worst, "missing": missing, "constants_mismatched": mismatched}


def _consumer_kinds(model: fb.ModelT) -> dict[int, str]:
    """Tensor -> the kind of the (last) op reading it: where a weight's output channels lie."""
    sg, kinds = model.subgraphs[0], {}
    for op in sg.operators:
        kind = OP_NAMES[fbu.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])]
        kinds.update({int(t): kind for t in op.inputs if t >= 0})
    return kinds


def _intended_scales(op: Conv | Linear, suffix: str, graph: IntegerGraph) -> np.ndarray:
    """The scales a weight or bias should carry: s_w, or s_in * s_w (one per output channel where
    the op is per channel)."""
    s_w = channel_scales(op) if is_per_channel(op) else np.asarray([op.weight_scale], np.float64)
    return s_w if suffix == "weight" else graph.qparams[op.input].scale * s_w


def _constant_row(name: str, q: fb.QuantizationParametersT | None, intended: np.ndarray, dim: int) -> dict:
    """One weight or bias: its stored scales vs intended, relative error (inf if the count, a zero
    point or, for per-axis scales, the quantized dimension is wrong)."""
    stored = np.asarray([] if q is None or q.scale is None else q.scale, np.float64)
    zps = np.asarray([] if q is None or q.zeroPoint is None else q.zeroPoint, np.int64)
    row = {"tensor": name, "channels": len(intended), "stored_channels": len(stored),
           "zero_points_zero": bool(len(zps) == len(stored) and not zps.any()),
           "quantized_dimension": int(q.quantizedDimension) if q else None}
    if len(intended) == 1:  # per-tensor: the values themselves (per channel they would be most of the report)
        row.update(intended=intended.tolist(), stored=stored.tolist())
    ok = (len(stored) == len(intended) == len(zps) and not zps.any()
          and (len(intended) == 1 or q.quantizedDimension == dim))
    row["rel_err"] = float(np.max(np.abs(stored - intended) / intended)) if ok else float("inf")
    return row


def run_tflite(path: Path | bytes, images_nchw: np.ndarray, runtime: str = "xnnpack",
               workers: int | None = None) -> np.ndarray:
    """Int8 outputs (N, classes) of the model on int8 NCHW images, one image per invoke, in
    ``workers`` interpreters side by side, each single-threaded. Default: one per core for LiteRT,
    which releases the GIL while it invokes (2.0x on 2 cores for the largest ``small`` subnet);
    one for TFLite Micro, whose wrapper holds it."""
    workers = workers or (1 if runtime == "micro" else cores())
    chunks = [c for c in np.array_split(images_nchw, max(1, min(workers, len(images_nchw)))) if len(c)]
    if len(chunks) <= 1:
        return _invoke_each(path, images_nchw, runtime)
    with ThreadPoolExecutor(len(chunks)) as pool:
        return np.concatenate(list(pool.map(lambda c: _invoke_each(path, c, runtime), chunks)))


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _invoke_each(path: Path | bytes, images_nchw: np.ndarray, runtime: str) -> np.ndarray:
    it = interpreter(path, runtime)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    results = [np.zeros((0, int(np.prod(out["shape"]))), np.int8)]
    for img in images_nchw:
        it.set_tensor(inp["index"], as_file_input(img, inp))
        it.invoke()
        results.append(as_logits(it.get_tensor(out["index"]).reshape(1, -1), out))
    return np.concatenate(results)


def as_file_input(image_chw: np.ndarray, detail: dict) -> np.ndarray:
    """One int8 graph input (C, H, W) as the file's input tensor takes it (``pixels.FileIO``):
    uint8 pixels are the int8 values + 128, an RGB input of a grayscale graph repeats the value."""
    x = image_chw.transpose(1, 2, 0)[None]
    if detail["dtype"] == np.uint8:
        x = (x.astype(np.int16) + 128).astype(np.uint8)
    elif detail["dtype"] != np.int8:
        raise ValueError(f"model input is {detail['dtype']}, expected int8 or uint8")
    channels = int(detail["shape"][-1])
    if channels != x.shape[-1]:
        x = np.repeat(x, channels, axis=-1)
    return np.ascontiguousarray(x)


def as_logits(values: np.ndarray, detail: dict) -> np.ndarray:
    """The file's output as the graph's int8 logits (uint8 scores are the logits + 128)."""
    return (values.astype(np.int16) - 128).astype(np.int8) if detail["dtype"] == np.uint8 else values.copy()


def parity(got: np.ndarray, expected: np.ndarray) -> dict:
    """Agreement of int8 outputs (N, classes), in output LSBs."""
    diff = np.abs(got.astype(np.int32) - expected.astype(np.int32))
    return {
        "n_images": int(got.shape[0]),
        "max_abs_lsb": int(diff.max()),
        "exact": float(np.mean(diff == 0)),
        "within_1lsb": float(np.mean(diff <= 1)),
        "top1_agreement": float(np.mean(got.argmax(1) == expected.argmax(1))),
    }


def all_tensors(path: Path, graph: IntegerGraph, images_nchw: np.ndarray, runtime: str) -> dict[str, np.ndarray]:
    """Every graph tensor (NCHW, or (N, C)) the runtime computes on the images.

    The model is re-packed with every graph tensor as an output, so the runtime (XNNPACK too)
    must materialise them; the ops themselves are unchanged.
    """
    model = _read(path)
    sg = model.subgraphs[0]
    index = {t.name.decode(): i for i, t in enumerate(sg.tensors)}
    names = [graph.input] + [op.output for op in graph.ops]
    sg.outputs = [index[n] for n in names]
    it = interpreter(bytes(fbu.convert_object_to_bytearray(model)), runtime)
    inp = it.get_input_details()[0]
    outs = dict(zip(names, (d["index"] for d in it.get_output_details())))  # in the order sg.outputs lists them
    shapes = tensor_shapes(graph)
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for img in images_nchw:
        it.set_tensor(inp["index"], as_file_input(img, inp))
        it.invoke()
        for n in names:
            v = it.get_tensor(outs[n])
            got[n].append(v.transpose(0, 3, 1, 2) if len(shapes[n]) == 4 else v.reshape(1, -1))
    return {n: np.concatenate(v) for n, v in got.items()}


def per_op_parity(path: Path, graph: IntegerGraph, images_nchw: np.ndarray, runtime: str = "xnnpack") -> dict[str, dict]:
    """Each op's int8 output on ``runtime`` vs that runtime's arithmetic applied to the op's
    *actual* int8 inputs. End-to-end differences grow with depth; this isolates each kernel."""
    got = all_tensors(path, graph, images_nchw, runtime)
    stats = {}
    for op in graph.ops:
        diff = np.abs(got[op.output].astype(np.int32) - run_op(op, got, graph.qparams, arithmetic(runtime)))
        stats[op.name] = {"max_abs_lsb": int(diff.max()), "exact": float(np.mean(diff == 0))}
    return stats


def latency_ms(path: Path, rounds: int = 8) -> dict:
    """Single-thread latency (ms) per runtime, timed interleaved (qnas_cli/export/measure.py), under the
    latency tables' statistic, so that it compares with what the search predicted."""
    timings = measure_models({"model": Path(path)}, TIMED, threads=1, rounds=rounds, round_ms=10.0)
    return ({b: timings[("model", b)].ms(STATISTIC) for b in TIMED}
            | {"num_threads": 1, "rounds": rounds, "statistic": STATISTIC})


def verify_tflite(path: Path, graph: IntegerGraph, runs: dict[str, tuple[np.ndarray, np.ndarray]],
                  outputs: dict[str, np.ndarray] | None = None, latency: bool = True, per_op_images: int = 50) -> dict:
    """The full report. ``runs``: per checked runtime, int8 NCHW images and the exact forward's
    int8 outputs on them in that runtime's arithmetic (``arithmetic(runtime)``). ``outputs``:
    the model's outputs per runtime on those images, when the caller already has them."""
    outputs = dict(outputs or {})
    report: dict = {"parity": {}, "per_op": {}}
    for runtime, (images, want) in runs.items():
        got = outputs[runtime] if runtime in outputs else run_tflite(path, images, runtime)
        report["parity"][runtime] = parity(got, want) | {"compared_with": arithmetic(runtime)}
        report["per_op"][runtime] = per_op_parity(path, graph, images[:per_op_images], runtime)
    report["xnnpack_coverage"] = xnnpack_coverage(interpreter(path, "xnnpack"))
    report["census"] = op_census(path)
    report["scales"] = stored_scales(path, graph)
    if latency:
        report["latency_ms"] = latency_ms(path)
    return report


def reference_runs(graph: IntegerGraph, images_nchw: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``runs`` for ``verify_tflite`` from the graph executor alone (no PyTorch subnet): every
    checked runtime on all the images."""
    from qnas_cli.export.reference import run_reference

    want = {a: run_reference(graph, images_nchw, a) for a in TARGETS}
    return {r: (images_nchw, want[arithmetic(r)]) for r in CHECKED}


def failures(report: dict, target: str = "xnnpack") -> list[str]:
    """Human-readable reasons the report fails (empty list: it passes).

    Gates: on the ``target`` runtime, every output equals the exact forward bit for bit, and so
    does every op on its own inputs (a wrong scale, weight or layout shows up there at once);
    for ``xnnpack``, the delegate took every op; census and stored parameters exact. The other
    runtimes are information: a model is built for one runtime's arithmetic.
    """
    bad = []
    p = report["parity"][target]
    if p["exact"] < 1.0:
        bad.append(f"{target}: {1 - p['exact']:.2%} of outputs differ from the exact {target} forward "
                   f"(max {p['max_abs_lsb']} LSB, top-1 agreement {p['top1_agreement']:.4f}, {p['n_images']} images)")
    inexact = {name: o for name, o in report["per_op"][target].items() if o["exact"] < 1.0}
    if inexact:
        name, o = min(inexact.items(), key=lambda kv: kv[1]["exact"])
        bad.append(f"{target}: {len(inexact)} op(s) not bit-exact on their own inputs, worst {name!r} "
                   f"exact on {o['exact']:.4f} of values (max {o['max_abs_lsb']} LSB)")
    c = report["census"]
    io = report.get("io", {}).get("file", {"input": "int8", "output": "int8"})
    # the uint8 ends are one QUANTIZE each, a shift by 128 that XNNPACK leaves to the built-in kernel
    adapters = (io["input"] == "uint8") + (io["output"] == "uint8")
    cov = report.get("xnnpack_coverage", {})
    left = [op for op in cov.get("undelegated_ops") or [] if not (op == "QUANTIZE" and adapters)]
    if target == "xnnpack" and (left or not cov.get("delegate_nodes")):
        bad.append(f"xnnpack: the delegate did not take the whole model (ops left on built-in kernels: "
                   f"{', '.join(left or ['all'])})")
    if c["float_tensors"]:
        bad.append(f"{c['float_tensors']} float tensors in the model")
    if (c["input_dtype"], c["output_dtype"]) != (io["input"], io["output"]):
        bad.append(f"input/output are {c['input_dtype']}/{c['output_dtype']}, expected {io['input']}/{io['output']}")
    if c["quantize_ops"] != adapters or c["dequantize_ops"]:
        bad.append(f"{c['quantize_ops']} QUANTIZE and {c['dequantize_ops']} DEQUANTIZE ops "
                   f"(expected {adapters} QUANTIZE: the uint8 ends)")
    s = report["scales"]
    if s["max_rel_err"] > 1e-6 or s["missing"] or s["constants_mismatched"]:
        bad.append(f"stored parameters differ: max scale rel err {s['max_rel_err']:.2e}, "
                   f"missing {s['missing']}, constants {s['constants_mismatched']}")
    return bad
