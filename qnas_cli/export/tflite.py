"""IntegerGraph -> fully int8 TFLite: float ONNX -> onnx2tf (full-integer) -> our parameters.

onnx2tf 1.29.24 has one backend, TensorFlow's TFLiteConverter (what onnx2tf 2.x calls
`tf_converter`); we ask it for full-integer, per-tensor, int8-in/int8-out quantization,
calibrated on our own images. It runs in a subprocess inside a private temp dir, because it
- rewrites its input .onnx in place (it gets a copy),
- shells out to the `onnxsim` executable (the venv's bin dir goes first on PATH),
- loads `calibration_image_sample_data_20x128x128x3_float32.npy` from its *working directory*
  for any 3-channel 4-D input of batch <= 20, and downloads it when absent; we write that
  file from our own calibration images, so export never touches the network,
- may sys.exit() on errors and leaves TensorFlow state behind; the caller sees neither.

The TFLite model takes int8 NHWC input (1, H, W, C) with the graph input's qparams and
returns int8 logits (1, classes) with the graph output's qparams, unless ``finish`` gives it
other ends (``tflite_io``: uint8 pixels and scores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qnas_cli.checkpoint import versions, write_bytes
from qnas_cli.export.graph import IntegerGraph
from qnas_cli.export.onnx_export import export_onnx, onnx_name
from qnas_cli.export.reference import dequantize
from qnas_cli.export.tflite_rewrite import rewrite

ONNX2TF_VERSION = "1.29.24"  # the version whose traps (above) this module handles
SAMPLE_DATA_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
MAX_CALIB_IMAGES = 32  # onnx2tf's scales are all replaced, so calibration only has to run

_DRIVER = """
import json, sys
import tensorflow as tf
from tensorflow.lite.python import lite
import onnx2tf

# onnx2tf 1.29 runs TFLiteConverter seven times (float32, float16, dynamic range, int8 with
# float I/O, full int8, and two int16-activation variants); qnas uses only the full-int8 model
# with int8 I/O. Each conversion starts afresh from the same Keras model, so answering the
# other six with an empty model changes nothing in the one we keep and saves most of the time.
INT16 = tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
for cls in (lite.TFLiteKerasModelConverterV2, lite.TFLiteConverterV2):  # from_keras_model, from_concrete_functions
    def only_full_int8(self, _convert=cls.convert):
        full = self.inference_input_type == tf.int8 and INT16 not in set(self.target_spec.supported_ops or ())
        return _convert(self) if full else b""
    cls.convert = only_full_int8

a = json.loads(sys.argv[1])
onnx2tf.convert(
    input_onnx_file_path=a["onnx"], output_folder_path=a["out"],
    output_integer_quantized_tflite=True, quant_type="per-tensor",
    custom_input_op_name_np_data_path=[[a["input"], a["calib"], 0.0, 1.0]],
    input_quant_dtype="int8", output_quant_dtype="int8", verbosity="info",
)
"""


class ExportError(RuntimeError):
    """onnx2tf failed or produced no full-integer model; the message carries its log tail."""


@dataclass
class TFLiteExport:
    """What export_tflite wrote, and how long each step took."""

    tflite: Path  # int8 in (1, H, W, C) NHWC, int8 out (1, classes)
    onnx: Path  # the float ONNX handed to onnx2tf (NCHW)
    log: Path  # onnx2tf's stdout + stderr
    seconds: dict[str, float] = field(default_factory=dict)  # onnx, onnx2tf, rewrite, total
    versions: dict[str, str] = field(default_factory=dict)



def calibration_nhwc(graph: IntegerGraph, images_int8: np.ndarray) -> np.ndarray:
    """Dequantized calibration images, float32 NHWC, as onnx2tf's representative dataset wants."""
    return dequantize(images_int8, graph.qparams[graph.input]).transpose(0, 2, 3, 1).astype(np.float32)


def sample_data(calib_nhwc: np.ndarray) -> np.ndarray:
    """onnx2tf's sample-data file (20, 128, 128, 3) float32, made from our images
    (repeated to 20, nearest-neighbour resized); it uses it only for its own test inference."""
    n, h, w, _ = calib_nhwc.shape
    rows = np.linspace(0, h - 1, 128).round().astype(int)
    cols = np.linspace(0, w - 1, 128).round().astype(int)
    return np.ascontiguousarray(calib_nhwc[np.arange(20) % n][:, rows][:, :, cols], np.float32)


CONVERTER_PACKAGES = ("onnx2tf", "tensorflow", "onnx", "onnxruntime", "onnxsim", "ai-edge-litert", "numpy")


def run_onnx2tf(onnx_path: Path, graph: IntegerGraph, images_int8: np.ndarray, work: Path,
                log_path: Path, timeout_s: float = 1200) -> bytes:
    """Convert `onnx_path` with onnx2tf inside `work`; return the full-integer .tflite bytes."""
    found = versions("onnx2tf")["onnx2tf"]
    if found != ONNX2TF_VERSION:  # its quirks (module docstring) are version-specific
        raise ExportError(f"export needs onnx2tf=={ONNX2TF_VERSION}, found {found}; "
                          f"install it with: pip install onnx2tf=={ONNX2TF_VERSION}")
    calib = calibration_nhwc(graph, images_int8[:MAX_CALIB_IMAGES])
    model = work / "model.onnx"
    model.write_bytes(Path(onnx_path).read_bytes())  # onnx2tf overwrites its input
    np.save(work / "calib.npy", calib)
    if calib.shape[-1] == 3:
        np.save(work / SAMPLE_DATA_FILE, sample_data(calib))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    args = {"onnx": str(model), "out": str(work / "out"), "calib": str(work / "calib.npy"),
            "input": onnx_name(graph.input)}
    try:
        proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(args)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        log = proc.stdout + "\n--- stderr ---\n" + proc.stderr
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"onnx2tf did not finish in {timeout_s:.0f} s") from e
    write_bytes(log_path, log.encode())
    result = work / "out" / "model_full_integer_quant.tflite"
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(log.strip().splitlines()[-25:])
        raise ExportError(f"onnx2tf failed (exit {proc.returncode}; full log: {log_path}):\n{tail}")
    return result.read_bytes()


def export_tflite(graph: IntegerGraph, calib_inputs_int8: np.ndarray, out_dir: Path,
                  name: str = "subnet", finish: Callable[[bytes], bytes] | None = None) -> TFLiteExport:
    """Write `<name>.onnx`, `<name>_int8.tflite` and `<name>.onnx2tf.log` into out_dir.

    calib_inputs_int8: (N, C, H, W) int8 images in the graph input's qparams; onnx2tf needs
    them to run its calibration, whose scales are then replaced by the graph's.
    ``finish``: applied to the rewritten model before it is written (its input and output
    types, its metadata), so that the file on disk is the one verified.
    Raises ExportError (conversion) or MappingError (TFLite graph does not match the graph).
    """
    if (calib_inputs_int8.dtype != np.int8 or len(calib_inputs_int8) == 0
            or calib_inputs_int8.shape[1:] != tuple(graph.input_shape[1:])):
        raise ValueError(f"calibration images must be int8 (N >= 1, {graph.input_shape[1:]}), "
                         f"got {calib_inputs_int8.dtype} {calib_inputs_int8.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    onnx_path = export_onnx(graph, out_dir / f"{name}.onnx")
    seconds["onnx"] = time.perf_counter() - t0
    log_path = out_dir / f"{name}.onnx2tf.log"
    with tempfile.TemporaryDirectory(prefix="qnas_onnx2tf_") as tmp:
        t = time.perf_counter()
        converted = run_onnx2tf(onnx_path, graph, calib_inputs_int8, Path(tmp), log_path)
        seconds["onnx2tf"] = time.perf_counter() - t
    t = time.perf_counter()
    ours, _ = rewrite(converted, graph)
    ours = finish(ours) if finish else ours
    tflite_path = write_bytes(out_dir / f"{name}_int8.tflite", ours)
    seconds["rewrite"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return TFLiteExport(tflite_path, onnx_path, log_path, seconds, versions(*CONVERTER_PACKAGES))
