"""Check an exported int8 TFLite model: parity with expected outputs (end to end and per op),
op census, stored scales and constants, host latency. Everything returned is JSON-ready.

Parity runs the LiteRT interpreter twice: built-in kernels without delegates, and the default
(XNNPACK). Measured on this host, per op:
- XNNPACK requantizes convs/FC in fp32 with round-half-to-even, as the contract does; it
  differs only where fp32 rounding of the scale product moves a value across a tie (~1e-5 of
  elements). Its ADD uses fixed-point multipliers: off by one in ~0.02-0.15% of elements.
- The built-in kernels use gemmlowp's double rounding (fixed-point high-mul, then a rounding
  shift), which sends values within 2^-(shift+1) LSB of a tie the other way: 0.1-2% of
  elements per conv are off by one, and MEAN (fixed-point 1/(H*W)) 2-6%.
Single-LSB differences then grow with depth, so end-to-end agreement is a property of the
network as much as of the export; per-op parity is the sharp check of the export itself.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as fb
from ai_edge_litert.tools import flatbuffer_utils as fbu

from export.graph import Conv, IntegerGraph, Linear
from export.measure import delegated_nodes, interpreter, measure_models
from qnas_cli.latency import RUNTIMES as BACKENDS  # (xnnpack, builtin)
from export.onnx_export import tensor_shapes
from export.reference import run_op, run_reference
from export.tflite_rewrite import ALIAS_ROLES, OP_NAMES, TYPE_NAMES, tflite_layout

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


def stored_scales(path: Path, graph: IntegerGraph) -> dict:
    """Intended vs stored qparams of every graph tensor (by the names the rewrite gave them),
    plus whether every stored weight and bias equals ours."""
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
            worst = max(worst, rel if z == qp.zero_point else float("inf"))
            rows.append({"tensor": names[i], "intended": [qp.scale, qp.zero_point], "stored": [s, z],
                         "rel_err": rel})
    index = {n: i for i, n in enumerate(names)}
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
    return {"tensors": rows, "max_rel_err": worst, "missing": missing, "constants_mismatched": mismatched}


def run_tflite(path: Path, images_nchw: np.ndarray, backend: str = "xnnpack") -> np.ndarray:
    """Int8 outputs (N, classes) of the model on int8 NCHW images, one image per invoke."""
    it = interpreter(path, backend)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    if inp["dtype"] != np.int8:
        raise ValueError(f"model input is {inp['dtype']}, expected int8")
    results = []
    for img in images_nchw:
        it.set_tensor(inp["index"], np.ascontiguousarray(img.transpose(1, 2, 0)[None]))
        it.invoke()
        results.append(it.get_tensor(out["index"]).reshape(-1).copy())
    return np.stack(results)


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


def per_op_parity(path: Path, graph: IntegerGraph, images_nchw: np.ndarray,
                  backend: str = "builtin") -> dict[str, dict]:
    """Each op's int8 output vs the contract applied to that op's *actual* int8 inputs.

    End-to-end differences grow with depth; this isolates each kernel. The model is re-packed
    with every graph tensor as an output, so the backend (XNNPACK too) must materialise them.
    """
    model = _read(path)
    sg = model.subgraphs[0]
    index = {t.name.decode(): i for i, t in enumerate(sg.tensors)}
    names = [graph.input] + [op.output for op in graph.ops]
    sg.outputs = [index[n] for n in names]
    it = interpreter(bytes(fbu.convert_object_to_bytearray(model)), backend)
    inp = it.get_input_details()[0]
    outs = {d["name"]: d["index"] for d in it.get_output_details()}
    shapes = tensor_shapes(graph)
    stats = {op.name: [0, 0, 0] for op in graph.ops}  # max diff, exact count, element count
    for img in images_nchw:
        it.set_tensor(inp["index"], np.ascontiguousarray(img.transpose(1, 2, 0)[None]))
        it.invoke()
        got = {}
        for n in names:
            v = it.get_tensor(outs[n])
            got[n] = v.transpose(0, 3, 1, 2) if len(shapes[n]) == 4 else v.reshape(1, -1)
        for op in graph.ops:
            diff = np.abs(got[op.output].astype(np.int32) - run_op(op, got, graph.qparams))
            s = stats[op.name]
            s[0], s[1], s[2] = max(s[0], int(diff.max())), s[1] + int((diff == 0).sum()), s[2] + diff.size
    return {name: {"max_abs_lsb": mx, "exact": ex / n} for name, (mx, ex, n) in stats.items()}


def latency_ms(path: Path, rounds: int = 8) -> dict:
    """Median single-thread latency (ms) per backend, timed interleaved (export/measure.py)."""
    timings = measure_models({"model": Path(path)}, BACKENDS, threads=1, rounds=rounds, round_ms=10.0)
    return {b: timings[("model", b)].median_ms for b in BACKENDS} | {"num_threads": 1, "rounds": rounds}


def verify_tflite(path: Path, graph: IntegerGraph, images_nchw: np.ndarray,
                  expected: np.ndarray | None = None, latency: bool = True,
                  per_op_images: int = 100, outputs: dict[str, np.ndarray] | None = None) -> dict:
    """The full report: end-to-end parity per backend against `expected` (default: the numpy
    reference on the same images), per-op parity on the first `per_op_images`, op census,
    stored scales and constants, latency. `outputs`: the model's int8 outputs per backend on
    `images_nchw`, when the caller already has them (each pass over a test set costs seconds)."""
    expected = run_reference(graph, images_nchw) if expected is None else expected
    outputs = outputs or {b: run_tflite(path, images_nchw, b) for b in BACKENDS}
    report: dict = {
        "parity": {b: parity(outputs[b], expected) for b in BACKENDS},
        "per_op": {b: per_op_parity(path, graph, images_nchw[:per_op_images], b) for b in BACKENDS},
        "census": op_census(path),
        "scales": stored_scales(path, graph),
    }
    report["parity"]["xnnpack"]["delegated_nodes"] = delegated_nodes(interpreter(path, "xnnpack"))
    if latency:
        report["latency_ms"] = latency_ms(path)
    return report


def failures(report: dict, max_op_lsb: int = 1, e2e_backends: tuple[str, ...] = ("xnnpack",),
             min_within_1lsb: float = 0.99, min_top1: float = 0.99, min_op_exact: float = 0.99) -> list[str]:
    """Human-readable reasons the report fails (empty list: it passes).

    Gates: every op of every backend within `max_op_lsb` of the contract on its own inputs
    (a wrong scale, weight or layout shows up here at once); end-to-end agreement only for
    `e2e_backends`, because single-LSB flips grow with depth, faster through the built-in
    kernels' double rounding (module docstring); census and stored parameters exact.
    """
    bad = []
    for backend, ops in report["per_op"].items():
        worst = max(ops.items(), key=lambda kv: kv[1]["max_abs_lsb"])
        if worst[1]["max_abs_lsb"] > max_op_lsb:
            bad.append(f"{backend}: op {worst[0]!r} is {worst[1]['max_abs_lsb']} LSB off (> {max_op_lsb})")
        if backend in e2e_backends:  # XNNPACK rounds like the contract: whole channels off by one mean a wrong parameter
            least = min(ops.items(), key=lambda kv: kv[1]["exact"])
            if least[1]["exact"] < min_op_exact:
                bad.append(f"{backend}: op {least[0]!r} exact on only {least[1]['exact']:.4f} of values (< {min_op_exact})")
    for backend in e2e_backends:
        p = report["parity"][backend]
        if p["within_1lsb"] < min_within_1lsb:
            bad.append(f"{backend}: only {p['within_1lsb']:.4f} of outputs within 1 LSB (< {min_within_1lsb})")
        if p["top1_agreement"] < min_top1:
            bad.append(f"{backend}: top-1 agreement {p['top1_agreement']:.4f} < {min_top1}")
    c = report["census"]
    if c["float_tensors"]:
        bad.append(f"{c['float_tensors']} float tensors in the model")
    if (c["input_dtype"], c["output_dtype"]) != ("int8", "int8"):
        bad.append(f"input/output are {c['input_dtype']}/{c['output_dtype']}, expected int8/int8")
    if c["quantize_ops"] or c["dequantize_ops"]:
        bad.append(f"{c['quantize_ops']} QUANTIZE and {c['dequantize_ops']} DEQUANTIZE ops")
    s = report["scales"]
    if s["max_rel_err"] > 1e-6 or s["missing"] or s["constants_mismatched"]:
        bad.append(f"stored parameters differ: max scale rel err {s['max_rel_err']:.2e}, "
                   f"missing {s['missing']}, constants {s['constants_mismatched']}")
    return bad
