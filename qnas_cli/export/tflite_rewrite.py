"""Write our integer parameters into the int8 TFLite flatbuffer that onnx2tf produced.

onnx2tf gives a correctly *structured* fully-int8 graph, but with scales it re-derived from
its own calibration (docs/design.md §10). TFLite derives every requantization multiplier from the
scales stored in the flatbuffer at load time, so replacing them (and the int8 weights and
int32 biases) with ours makes the model compute the integer contract.

Tensors are matched by graph structure, walking from the input: each IntegerGraph op is
paired with the one TFLite op that consumes its (already matched) input tensor(s), has the
right type, kernel shape, stride and fused activation, and, for convs and FC layers, whose
weights dequantize to ours within half a step of onnx2tf's scale. Value-preserving ops
onnx2tf inserts (PAD, RESHAPE, ...) pass a tensor's identity on, and TFLite wants their
input and output to share qparams anyway. Anything left unmatched or matched twice is an
error (`MappingError`); op order is never used.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from ai_edge_litert import schema_py_generated as fb
from ai_edge_litert.tools import flatbuffer_utils as fbu

from qnas_cli.export.graph import Add, Conv, GlobalAvgPool, IntegerGraph, Linear, Op, is_per_channel, real_weight
from qnas_cli.export.onnx_export import tensor_shapes

OP_NAMES = {code: name for name, code in vars(fb.BuiltinOperator).items() if not name.startswith("_")}
TYPE_NAMES = {code: name for name, code in vars(fb.TensorType).items() if not name.startswith("_")}
# Ops that only move int8 values around (PAD fills with the zero point, i.e. real 0).
PASS_THROUGH = frozenset({"PAD", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE"})
# Suffixes of the extra TFLite tensors that hold a graph tensor ('<name>/pad', ...).
ALIAS_ROLES = frozenset({k.lower() for k in PASS_THROUGH} | {"prerelu"})
_NONE, _RELU = fb.ActivationFunctionType.NONE, fb.ActivationFunctionType.RELU


class MappingError(RuntimeError):
    """The TFLite graph does not correspond one-to-one to the IntegerGraph."""


class _Index:
    """Producer/consumer look-ups over the single subgraph of an unpacked model."""

    def __init__(self, model: fb.ModelT) -> None:
        if len(model.subgraphs) != 1:
            raise MappingError(f"expected 1 subgraph, found {len(model.subgraphs)}")
        self.model = model
        self.sg = model.subgraphs[0]
        self.ops = self.sg.operators
        self.kind = [OP_NAMES[fbu.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])]
                     for op in self.ops]
        self.consumers: dict[int, list[tuple[int, int]]] = defaultdict(list)  # tensor -> (op, slot)
        for o, op in enumerate(self.ops):
            op.inputs = [int(i) for i in op.inputs]  # numpy arrays after unpacking; lists are editable
            op.outputs = [int(i) for i in op.outputs]
            for slot, t in enumerate(op.inputs):
                if t >= 0:
                    self.consumers[t].append((o, slot))
        self.buffer_users: dict[int, int] = defaultdict(int)
        for t in self.sg.tensors:
            self.buffer_users[t.buffer] += 1

    def name(self, t: int) -> str:
        return self.sg.tensors[t].name.decode()

    def op_text(self, o: int) -> str:
        return f"TFLite op #{o} {self.kind[o]}"

    def const(self, t: int) -> np.ndarray | None:
        """The constant data of tensor t (typed and shaped), or None for activations."""
        tensor = self.sg.tensors[t]
        data = self.model.buffers[tensor.buffer].data
        if data is None or len(data) == 0:
            return None
        dtype = {fb.TensorType.INT8: np.int8, fb.TensorType.INT32: np.int32,
                 fb.TensorType.FLOAT32: np.float32, fb.TensorType.INT64: np.int64}[tensor.type]
        return np.frombuffer(np.asarray(data, np.uint8).tobytes(), dtype).reshape(tensor.shape)


@dataclass
class Match:
    """The correspondence found between TFLite and IntegerGraph."""

    alias: dict[int, str] = field(default_factory=dict)  # TFLite tensor -> graph tensor
    role: dict[int, str] = field(default_factory=dict)  # "" for the tensor the op writes, else e.g. "pad"
    ops: dict[int, Op] = field(default_factory=dict)  # TFLite op -> graph op
    helpers: set[int] = field(default_factory=set)  # pass-through ops and unfused RELUs


def _dequantized(ix: _Index, t: int) -> np.ndarray | None:
    q, qp = ix.const(t), ix.sg.tensors[t].quantization
    if q is None or qp is None or qp.scale is None or len(qp.scale) == 0:
        return None
    shape = [1] * q.ndim
    if len(qp.scale) > 1:  # per-channel along quantizedDimension
        shape[qp.quantizedDimension] = -1
    scale = np.asarray(qp.scale, np.float64).reshape(shape)
    zp = np.asarray(qp.zeroPoint, np.float64).reshape(shape)
    return (q.astype(np.float64) - zp) * scale


def _weights_agree(ix: _Index, t: int, ours_real: np.ndarray) -> bool:
    """onnx2tf quantized our float weights itself: they must round-trip within half its step."""
    theirs = _dequantized(ix, t)
    if theirs is None or theirs.shape != ours_real.shape:
        return False
    step = float(np.max(ix.sg.tensors[t].quantization.scale))
    return float(np.max(np.abs(theirs - ours_real))) <= 0.6 * step + 1e-6 * float(np.abs(ours_real).max())


def tflite_layout(weight: np.ndarray, kind: str) -> np.ndarray:
    """A weight in the layout `kind` stores: Conv (O, I, k, k) -> CONV_2D OHWI; depthwise
    (O, 1, k, k) -> DEPTHWISE_CONV_2D 1HW(O); FC (O, I) unchanged."""
    if kind == "CONV_2D":
        return weight.transpose(0, 2, 3, 1)
    if kind == "DEPTHWISE_CONV_2D":
        return weight.transpose(1, 2, 3, 0)
    return weight


class _Matcher:
    def __init__(self, ix: _Index, graph: IntegerGraph) -> None:
        self.ix, self.graph, self.m = ix, graph, Match()

    def bind(self, t: int, name: str, role: str = "") -> None:
        """Tensor t holds graph tensor `name`; so does everything pass-through ops make of it."""
        prev = self.m.alias.get(t)
        if prev is not None and prev != name:
            raise MappingError(f"TFLite tensor #{t} '{self.ix.name(t)}' matches both {prev!r} and {name!r}")
        self.m.alias[t] = name
        self.m.role.setdefault(t, role)
        for o, slot in self.ix.consumers[t]:
            if slot == 0 and self.ix.kind[o] in PASS_THROUGH:
                self.m.helpers.add(o)
                self.bind(self.ix.ops[o].outputs[0], name, self.ix.kind[o].lower())

    def readers(self, names: tuple[str, ...], kinds: tuple[str, ...]) -> list[int]:
        """Unmatched TFLite ops of `kinds` reading a tensor bound to one of `names` at slot 0/1."""
        found = {o for t, n in self.m.alias.items() if n in names for o, slot in self.ix.consumers[t]
                 if self.ix.kind[o] in kinds and slot <= 1 and o not in self.m.ops}
        return sorted(found)

    def pick(self, op: Op, cands: list[int], fits: Callable[[int], bool]) -> int:
        """The one candidate that fits; none or several is a MappingError naming them."""
        fitting = [o for o in cands if fits(o)]
        if len(fitting) == 1:
            self.m.ops[fitting[0]] = op
            return fitting[0]
        what = "no" if not fitting else "several"
        seen = ", ".join(self.ix.op_text(o) for o in cands) or "none"
        raise MappingError(
            f"{what} TFLite op matches {type(op).__name__} {op.name!r}; candidates reading its input: {seen}"
            + ("" if not fitting else f"; fitting: {', '.join(self.ix.op_text(o) for o in fitting)}")
        )

    def bind_output(self, o: int, op: Conv | Linear) -> None:
        """Bind the op's output, accepting an unfused RELU right after it."""
        out, act = self.ix.ops[o].outputs[0], self.ix.ops[o].builtinOptions.fusedActivationFunction
        if act == (_RELU if op.relu else _NONE):
            return self.bind(out, op.output)
        users = self.ix.consumers[out]
        if op.relu and act == _NONE and len(users) == 1 and self.ix.kind[users[0][0]] == "RELU":
            # Quantizing the pre-ReLU values with the output's qparams, then ReLU, is the same
            # as the fused op for both zero-point schemes (-128 clamps to real 0 already).
            relu = users[0][0]
            self.m.helpers.add(relu)
            self.bind(out, op.output, "prerelu")
            return self.bind(self.ix.ops[relu].outputs[0], op.output)
        raise MappingError(f"{self.ix.op_text(o)} for {op.name!r} has fused activation "
                           f"{act}, but the graph says relu={op.relu}")

    def conv(self, op: Conv) -> None:
        o_ch, i_per_group, k, _ = op.weight.shape
        real = real_weight(op)

        def fits(o: int) -> bool:
            kind, top = self.ix.kind[o], self.ix.ops[o]
            opts = top.builtinOptions
            if kind == "CONV_2D" and op.groups != 1:
                return False
            if kind == "DEPTHWISE_CONV_2D" and (i_per_group != 1 or opts.depthMultiplier * op.groups != o_ch):
                return False
            return (opts.strideH == opts.strideW == op.stride
                    and opts.dilationHFactor == opts.dilationWFactor == 1
                    and self.m.alias.get(top.inputs[0]) == op.input
                    and _weights_agree(self.ix, top.inputs[1], tflite_layout(real, kind)))

        o = self.pick(op, self.readers((op.input,), ("CONV_2D", "DEPTHWISE_CONV_2D")), fits)
        self.bind_output(o, op)

    def linear(self, op: Linear) -> None:
        real = real_weight(op)

        def fits(o: int) -> bool:
            top = self.ix.ops[o]
            return (self.m.alias.get(top.inputs[0]) == op.input
                    and not top.builtinOptions.keepNumDims
                    and _weights_agree(self.ix, top.inputs[1], real))

        o = self.pick(op, self.readers((op.input,), ("FULLY_CONNECTED",)), fits)
        self.bind_output(o, op)

    def add(self, op: Add) -> None:
        def fits(o: int) -> bool:
            top = self.ix.ops[o]
            return ({self.m.alias.get(t) for t in top.inputs} == set(op.inputs)
                    and top.builtinOptions.fusedActivationFunction == _NONE)

        o = self.pick(op, self.readers(op.inputs, ("ADD",)), fits)
        self.bind(self.ix.ops[o].outputs[0], op.output)

    def pool(self, op: GlobalAvgPool) -> None:
        def fits(o: int) -> bool:
            top = self.ix.ops[o]
            if self.m.alias.get(top.inputs[0]) != op.input:
                return False
            if self.ix.kind[o] == "MEAN":
                axes = self.ix.const(top.inputs[1])
                return axes is not None and sorted(int(a) % 4 for a in axes.ravel()) == [1, 2]
            _, h, w, _ = self.ix.sg.tensors[top.inputs[0]].shape
            opts = top.builtinOptions
            return (opts.filterHeight, opts.filterWidth) == (h, w) and opts.fusedActivationFunction == _NONE

        o = self.pick(op, self.readers((op.input,), ("MEAN", "AVERAGE_POOL_2D")), fits)
        self.bind(self.ix.ops[o].outputs[0], op.output)

    def run(self) -> Match:
        ix, graph = self.ix, self.graph
        n_out = len(graph.outputs)
        if len(ix.sg.inputs) != 1 or len(ix.sg.outputs) != n_out:
            raise MappingError(f"expected 1 input and {n_out} output(s), found {len(ix.sg.inputs)} and {len(ix.sg.outputs)}")
        self.bind(int(ix.sg.inputs[0]), graph.input)
        handlers = {Conv: self.conv, Linear: self.linear, Add: self.add, GlobalAvgPool: self.pool}
        for op in graph.ops:
            handlers[type(op)](op)
        self.check_complete()
        return self.m

    def check_complete(self) -> None:
        ix, m = self.ix, self.m
        left = [ix.op_text(o) for o in range(len(ix.ops)) if o not in m.ops and o not in m.helpers]
        if left:
            raise MappingError(f"TFLite ops with no counterpart in the IntegerGraph: {', '.join(left)}")
        unbound = [f"#{t} '{ix.name(t)}'" for op in ix.ops for t in op.outputs if t not in m.alias]
        if unbound:
            raise MappingError(f"TFLite tensors with no IntegerGraph tensor: {', '.join(unbound)}")
        outs = [m.alias.get(int(t)) for t in ix.sg.outputs]
        if sorted(map(str, outs)) != sorted(self.graph.outputs):
            raise MappingError(f"TFLite outputs are {outs}, expected {list(self.graph.outputs)}")
        shapes = tensor_shapes(self.graph)
        for t, name in m.alias.items():
            if m.role[t]:
                continue  # pass-through results may be padded or reshaped
            got, want = tuple(ix.sg.tensors[t].shape), shapes[name]
            nhwc = (want[0], *want[2:], want[1]) if len(want) == 4 else want
            if got != nhwc and not (len(want) == 2 and got[-1] == want[1] and int(np.prod(got)) == want[1]):
                raise MappingError(f"TFLite tensor '{ix.name(t)}' for {name!r} has shape {got}, expected {nhwc}")


def _quant(scale: float | np.ndarray, zero_point: int, dim: int = 0) -> fb.QuantizationParametersT:
    """Per-tensor qparams, or per-axis ones (``scale`` 1-D: one per index of dimension ``dim``,
    zero points all ``zero_point``), as TFLite's schema stores both."""
    q = fb.QuantizationParametersT()
    scales = [float(v) for v in np.ravel(scale)]
    q.scale, q.zeroPoint = scales, [int(zero_point)] * len(scales)
    q.quantizedDimension = dim if np.ndim(scale) else 0
    return q


# Where the output channels sit in each stored weight layout (tflite_layout): TFLite's per-channel
# conv wants quantizedDimension 0 of OHWI, depthwise 3 of 1HWO (kernels/conv.cc, depthwise_conv.cc
# check filter quantized_dimension against these).
CHANNEL_DIM = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}


def bias_scale(op: Conv | Linear, s_in: float) -> float | np.ndarray:
    """The bias scale TFLite expects, ``s_in * s_w`` (per channel where s_w is), as the product of
    the float32 scales it stores: it checks the bias scale against ``input_scale * filter_scale``
    (tflite/kernels/kernel_util.cc), so it must be that product, not a rounding of ours."""
    product = float(np.float32(s_in)) * np.asarray(op.weight_scale, np.float32).astype(np.float64)
    return product if is_per_channel(op) else float(product)


def _set_const(ix: _Index, o: int, slot: int, data: np.ndarray, ttype: int, scale: float | np.ndarray,
               name: str, dim: int = 0) -> None:
    """Store `data` as input `slot` of op o, in a tensor and buffer that only this op uses."""
    top = ix.ops[o]
    while len(top.inputs) <= slot:
        top.inputs.append(-1)
    t = top.inputs[slot]
    if t < 0 or len(ix.consumers[t]) > 1:  # absent or shared with another op: give this op its own
        ix.sg.tensors.append(fb.TensorT())
        t = top.inputs[slot] = len(ix.sg.tensors) - 1
    tensor = ix.sg.tensors[t]
    if tensor.buffer == 0 or ix.buffer_users[tensor.buffer] > 1:  # buffer 0 is the empty sentinel
        ix.model.buffers.append(fb.BufferT())
        tensor.buffer = len(ix.model.buffers) - 1
        ix.buffer_users[tensor.buffer] = 1
    ix.model.buffers[tensor.buffer].data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
    tensor.shape, tensor.type, tensor.name = list(data.shape), ttype, name.encode()
    tensor.shapeSignature = None
    tensor.quantization = _quant(scale, 0, dim)


def rewrite(tflite_bytes: bytes, graph: IntegerGraph) -> tuple[bytes, Match]:
    """Return the flatbuffer with our qparams, weights and biases written in, and the match.

    Activation tensors are renamed to their IntegerGraph names (aliases get '/pad',
    '/reshape', ... appended, then '#2', '#3' if repeated), constants to '<op>/weight' and
    '<op>/bias', so the stored scales can be checked by name afterwards.
    """
    model = fbu.read_model_from_bytearray(bytearray(tflite_bytes))
    ix = _Index(model)
    m = _Matcher(ix, graph).run()
    taken: set[str] = set()
    for t, name in sorted(m.alias.items()):
        tensor = ix.sg.tensors[t]
        if tensor.type != fb.TensorType.INT8:
            raise MappingError(f"TFLite tensor '{ix.name(t)}' for {name!r} is "
                               f"{TYPE_NAMES[tensor.type]}, expected INT8")
        qp = graph.qparams[name]
        tensor.quantization = _quant(qp.scale, qp.zero_point)
        label = f"{name}/{m.role[t]}" if m.role[t] else name
        label = next(f"{label}#{k}" if k > 1 else label for k in range(1, len(taken) + 2)
                     if (f"{label}#{k}" if k > 1 else label) not in taken)
        taken.add(label)
        tensor.name = label.encode()
    for o, op in m.ops.items():
        if isinstance(op, (Conv, Linear)):
            _set_const(ix, o, 1, tflite_layout(op.weight, ix.kind[o]).astype(np.int8),
                       fb.TensorType.INT8, op.weight_scale, f"{op.name}/weight", CHANNEL_DIM[ix.kind[o]])
            _set_const(ix, o, 2, op.bias.astype("<i4"), fb.TensorType.INT32,
                       bias_scale(op, graph.qparams[op.input].scale), f"{op.name}/bias")
    return bytes(fbu.convert_object_to_bytearray(model)), m
