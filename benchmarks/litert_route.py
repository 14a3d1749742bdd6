"""The route a PyTorch user would take today: litert-torch float export + ai-edge-quantizer static int8.

Claim 6 of BENCHMARKS.md compares qnas's export with it on the same subnet. The float network is
the calibrated subnet's own: each Conv/FC of its integer graph with the weights and biases
dequantized (BN folded, exactly the real values qnas's int8 model computes with), so the two
routes start from the same numbers and differ only in how they quantize and convert.

litert-torch 0.10 and ai-edge-quantizer 0.10 need ai-edge-litert 2.3 (qnas pins 2.1), so they
live in their own venv (``make baselines-venv``: ``.venv-baselines``). This module runs on both
sides: ``float_program`` (qnas's venv) saves the float network as a ``torch.export`` program
and the calibration images; ``python benchmarks/litert_route.py DIR`` (the baselines venv)
converts it with ``litert_torch.convert`` and quantizes it with ai-edge-quantizer (``RECIPES``,
calibrated on those images).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

BASELINES_PYTHON = Path(".venv-baselines/bin/python")
PROGRAM, CALIB, FLOAT_TFLITE, REPORT = "float.pt2", "calib.npy", "model_float.tflite", "route.json"
# ai-edge-quantizer recipes: everything it supports in int8 (the PyTorch user's full-int8 route), and
# only the convolutions and FC layers, residual adds and pooling left in float between
# DEQUANTIZE/QUANTIZE pairs (how a partially quantized supernet, BatchQuant's or OQA's, ships:
# claim 5). BN is folded into the convs either way (the float network's weights are folded).
RECIPES = ("static_wi8_ai8", "conv_only_wi8_ai8")
INT8_TFLITE = "model_aeq_static_wi8_ai8.tflite"


def recipe_file(recipe: str) -> str:
    return f"model_aeq_{recipe}.tflite"


def float_module(graph):
    """The float torch network an IntegerGraph describes (NCHW, batch-first): dequantized weights."""
    import torch
    from torch import nn

    from qnas_cli.export.graph import Add, Conv, GlobalAvgPool, Linear, channel_scale, real_weight

    qp = graph.qparams

    class GraphNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleDict()
            for i, op in enumerate(graph.ops):
                if isinstance(op, (Conv, Linear)):
                    w = torch.tensor(real_weight(op), dtype=torch.float32)
                    b = torch.tensor(op.bias.astype(np.float64) * qp[op.input].scale * channel_scale(op, 1), dtype=torch.float32)
                    if isinstance(op, Conv):
                        k = op.weight.shape[-1]
                        layer = nn.Conv2d(w.shape[1] * op.groups, w.shape[0], k, op.stride, k // 2, groups=op.groups)
                    else:
                        layer = nn.Linear(w.shape[1], w.shape[0])
                    layer.weight.data.copy_(w)
                    layer.bias.data.copy_(b)
                    self.layers[str(i)] = layer

        def forward(self, x):
            values = {graph.input: x}
            for i, op in enumerate(graph.ops):
                if isinstance(op, Add):
                    y = values[op.inputs[0]] + values[op.inputs[1]]
                elif isinstance(op, GlobalAvgPool):
                    y = values[op.input].mean(dim=(2, 3))
                else:
                    y = self.layers[str(i)](values[op.input])
                    if op.relu:
                        y = torch.relu(y)
                values[op.output] = y
            return values[graph.output]

    return GraphNet().eval()


def float_program(graph, calib: np.ndarray, folder: Path) -> Path:
    """Save the float network (a ``torch.export`` program) and float calibration images (NCHW)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    sample = torch.tensor(calib[:1], dtype=torch.float32)
    torch.export.save(torch.export.export(float_module(graph), (sample,)), folder / PROGRAM)
    np.save(folder / CALIB, calib.astype(np.float32))
    return folder


def run_route(graph, calib: np.ndarray, folder: Path, timeout_s: int = 900) -> Path:
    """qnas's venv: save the float program, run the conversion in the baselines venv, return the
    int8 model (RuntimeError naming the step when the venv is missing or a step fails)."""
    import subprocess

    if not BASELINES_PYTHON.is_file():
        raise RuntimeError(f"{BASELINES_PYTHON} is missing: make baselines-venv")
    float_program(graph, calib, folder)
    proc = subprocess.run([str(BASELINES_PYTHON), __file__, str(folder)], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"litert-torch / ai-edge-quantizer failed: {last[:300]}")
    return folder / INT8_TFLITE


def run_model(path: Path, images_nchw: np.ndarray, runtime: str = "xnnpack") -> np.ndarray:
    """Float outputs (N, classes) of a float-in/float-out model (its own input layout, NCHW or NHWC)."""
    from qnas_cli.export.measure import interpreter

    it = interpreter(path, runtime)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    nhwc = tuple(inp["shape"][1:]) != images_nchw.shape[1:]
    rows = []
    for img in images_nchw:
        x = img.transpose(1, 2, 0) if nhwc else img
        if inp["dtype"] != np.float32:  # integer input: quantize with the model's own input qparams
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max)
        it.set_tensor(inp["index"], np.ascontiguousarray(x[None], dtype=inp["dtype"]))
        it.invoke()
        y = it.get_tensor(out["index"]).reshape(-1).astype(np.float64)
        scale, zero = out["quantization"]
        rows.append((y - zero) * scale if out["dtype"] != np.float32 else y)
    return np.stack(rows)


def convert(folder: Path) -> dict:
    """In the baselines venv: float TFLite with litert-torch, then static int8 with ai-edge-quantizer."""
    import litert_torch
    import torch
    from ai_edge_quantizer import quantizer, recipe

    calib = np.load(folder / CALIB)
    module = torch.export.load(folder / PROGRAM).module()
    t0 = time.perf_counter()
    edge = litert_torch.convert(module, (torch.tensor(calib[:1]),))
    edge.export(str(folder / FLOAT_TFLITE))
    t_convert = time.perf_counter() - t0
    signature, name = _signature_input(folder / FLOAT_TFLITE)
    report = {"convert_s": t_convert, "quantize_s": {}, "calib_images": len(calib), "versions": _versions()}
    for which in RECIPES:
        qt = quantizer.Quantizer(str(folder / FLOAT_TFLITE))
        qt.load_quantization_recipe(recipe.static_wi8_ai8() if which == "static_wi8_ai8" else _conv_only())
        t1 = time.perf_counter()
        result = qt.calibrate({signature: [{name: x[None]} for x in calib]}, num_threads=2)
        qt.quantize(result).export_model(str(folder / recipe_file(which)), overwrite=True)
        report["quantize_s"][which] = time.perf_counter() - t1
    (folder / REPORT).write_text(json.dumps(report, indent=1))
    return report


def _conv_only():
    from ai_edge_quantizer import qtyping, recipe_manager

    rm = recipe_manager.RecipeManager()
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        rm.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName[op], activation_num_bits=8, weight_num_bits=8)
    return rm.get_quantization_recipe()


def _signature_input(path: Path) -> tuple[str, str]:
    """(signature key, input name) of a one-signature, one-input model."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    key = next(iter(it.get_signature_list()))
    return key, next(iter(it.get_signature_runner(key).get_input_details()))


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert", "torch")}


if __name__ == "__main__":
    print(json.dumps(convert(Path(sys.argv[1]))))
