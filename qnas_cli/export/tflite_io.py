"""Give the int8 TFLite graph the input and output an app feeds and reads (``pixels.FileIO``).

Three small integer ops, around the graph our rewrite verified, none of which changes a value:
- ``pixels`` (uint8) -> QUANTIZE -> int8: the same scale, zero point 128 lower, so TFLite's
  requantization multiplier is exactly 1 and the op subtracts 128 (every runtime);
- for a grayscale model with RGB input, STRIDED_SLICE takes one channel (the int8 graph input);
- the int8 logits -> QUANTIZE -> ``scores`` (uint8): +128, the same scale.
XNNPACK takes the slice; it leaves the mixed-type QUANTIZE ops to TFLite's built-in kernel,
which runs them as the same subtraction (the gate allows exactly these, see verify.failures).
"""
from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as fb
from ai_edge_litert.tools import flatbuffer_utils as fbu

from qnas_cli.export.pixels import FileIO

INPUT_NAME, OUTPUT_NAME = "pixels", "scores"


def adapt_io(model_bytes: bytes, io: FileIO) -> bytes:
    """The model with ``io``'s input and output; unchanged for int8 in and out."""
    if io.input == "int8" and io.output == "int8":
        return model_bytes
    model = fbu.read_model_from_bytearray(bytearray(model_bytes))
    sg = model.subgraphs[0]
    if io.input == "uint8":
        graph_in = int(sg.inputs[0])
        t = sg.tensors[graph_in]
        h, w = int(t.shape[1]), int(t.shape[2])
        scale, zp = float(t.quantization.scale[0]), int(t.quantization.zeroPoint[0])
        pixels = _tensor(model, INPUT_NAME, [1, h, w, io.channels], fb.TensorType.UINT8, (scale, zp + 128))
        ops = []
        if io.channel is None:
            ops.append(_op(model, fb.BuiltinOperator.QUANTIZE, [pixels], [graph_in]))
        else:
            rgb = _tensor(model, f"{INPUT_NAME}/int8", [1, h, w, 3], fb.TensorType.INT8, (scale, zp))
            consts = [_tensor(model, f"{INPUT_NAME}/{name}", [4], fb.TensorType.INT32, data=np.array(v, np.int32))
                      for name, v in (("begin", [0, 0, 0, io.channel]), ("end", [1, h, w, io.channel + 1]),
                                      ("strides", [1, 1, 1, 1]))]
            ops.append(_op(model, fb.BuiltinOperator.QUANTIZE, [pixels], [rgb]))
            ops.append(_op(model, fb.BuiltinOperator.STRIDED_SLICE, [rgb, *consts], [graph_in],
                           (fb.BuiltinOptions.StridedSliceOptions, fb.StridedSliceOptionsT())))
        sg.operators[0:0] = ops
        sg.inputs = [pixels]
    if io.output == "uint8":
        logits = int(sg.outputs[0])
        t = sg.tensors[logits]
        scale, zp = float(t.quantization.scale[0]), int(t.quantization.zeroPoint[0])
        scores = _tensor(model, OUTPUT_NAME, [int(d) for d in t.shape], fb.TensorType.UINT8, (scale, zp + 128))
        sg.operators.append(_op(model, fb.BuiltinOperator.QUANTIZE, [logits], [scores]))
        sg.outputs = [scores]
    return bytes(fbu.convert_object_to_bytearray(model))


def _tensor(model: fb.ModelT, name: str, shape: list[int], dtype: int, qparams: tuple[float, int] | None = None,
            data: np.ndarray | None = None) -> int:
    buffer = fb.BufferT()
    if data is not None:
        buffer.data = np.frombuffer(data.tobytes(), np.uint8)
    model.buffers.append(buffer)
    t = fb.TensorT()
    t.name, t.shape, t.type, t.buffer = name.encode(), np.array(shape, np.int32), dtype, len(model.buffers) - 1
    if qparams is not None:
        t.quantization = fb.QuantizationParametersT()
        t.quantization.scale, t.quantization.zeroPoint = [qparams[0]], [qparams[1]]
    sg = model.subgraphs[0]
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _op(model: fb.ModelT, code: int, inputs: list[int], outputs: list[int], options=None) -> fb.OperatorT:
    op = fb.OperatorT()
    op.opcodeIndex = _opcode(model, code)
    op.inputs, op.outputs = inputs, outputs
    if options is not None:
        op.builtinOptionsType, op.builtinOptions = options
    return op


def _opcode(model: fb.ModelT, code: int) -> int:
    """Index of ``code`` in the model's operator codes (added once). Version 2: the int8/uint8 kernels."""
    for i, oc in enumerate(model.operatorCodes):
        if fbu.get_builtin_code_from_operator_code(oc) == code:
            return i
    oc = fb.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 2
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1
