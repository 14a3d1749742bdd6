"""Cut a sub-model out of a converted int8 TFLite flatbuffer: the ops between two tensors.

The latency tables (qnas_cli/export/latency_build.py) convert many parts in one onnx2tf call and cut
each part out as its own model, so every op timed is an op the export produced, with its
exact options, shapes, padding ops and quantization parameters. Tensors are found by the
names ``tflite_rewrite.rewrite`` gave them (the IntegerGraph's names), never by position.

The cut model keeps only what its ops use: tensors, constant buffers and metadata are
re-indexed; signature definitions (which name the big model's tensors) are dropped.
"""
from __future__ import annotations

import copy

from ai_edge_litert import schema_py_generated as fb
from ai_edge_litert.tools import flatbuffer_utils as fbu


class CutError(ValueError):
    """The requested tensors do not delimit a sub-model."""


class Cutter:
    """Reads a model once; ``cut(input, output)`` then returns each sub-model's bytes."""

    def __init__(self, tflite: bytes) -> None:
        self.model = fbu.read_model_from_bytearray(bytearray(tflite))
        if len(self.model.subgraphs) != 1:
            raise CutError(f"expected 1 subgraph, found {len(self.model.subgraphs)}")
        sg = self.model.subgraphs[0]
        self.index = {t.name.decode(): i for i, t in enumerate(sg.tensors)}
        self.producer = {int(t): o for o, op in enumerate(sg.operators) for t in op.outputs}

    def tensor(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise CutError(f"no tensor named {name!r} in the model") from None

    def _is_const(self, t: int) -> bool:
        data = self.model.buffers[self.model.subgraphs[0].tensors[t].buffer].data
        return data is not None and len(data) > 0

    def op_span(self, input_name: str, output_name: str) -> list[int]:
        """Indices of the ops that compute ``output_name`` from ``input_name`` (and constants)."""
        sg = self.model.subgraphs[0]
        t_in, t_out = self.tensor(input_name), self.tensor(output_name)
        ops, todo, seen = set(), [t_out], set()
        while todo:
            t = todo.pop()
            if t == t_in or t in seen:
                continue
            seen.add(t)
            o = self.producer.get(t)
            if o is None:
                if self._is_const(t):
                    continue
                raise CutError(f"tensor {sg.tensors[t].name.decode()!r} is needed for {output_name!r} "
                               f"but is not computed from {input_name!r}")
            ops.add(o)
            todo += [int(i) for i in sg.operators[o].inputs if i >= 0]
        return sorted(ops)

    def cut(self, input_name: str, output_name: str) -> bytes:
        """A single-input, single-output model of the ops between the two tensors."""
        m, sg = self.model, self.model.subgraphs[0]
        ops = self.op_span(input_name, output_name)
        t_in, t_out = self.tensor(input_name), self.tensor(output_name)
        tensor_map: dict[int, int] = {}
        buffers: list = [fb.BufferT()]  # buffer 0: the empty sentinel non-constant tensors use
        tensors: list = []

        def remap(t: int) -> int:
            if t < 0:
                return t
            if t not in tensor_map:
                new = copy.copy(sg.tensors[t])
                if self._is_const(t):
                    buffers.append(m.buffers[new.buffer])
                    new.buffer = len(buffers) - 1
                else:
                    new.buffer = 0
                tensor_map[t] = len(tensors)
                tensors.append(new)
            return tensor_map[t]

        new_ops = []
        for o in ops:
            op = copy.copy(sg.operators[o])
            op.inputs = [remap(int(t)) for t in sg.operators[o].inputs]
            op.outputs = [remap(int(t)) for t in sg.operators[o].outputs]
            op.intermediates = [remap(int(t)) for t in (sg.operators[o].intermediates or [])] or None
            new_ops.append(op)
        sub = fb.SubGraphT()
        sub.tensors, sub.operators = tensors, new_ops
        sub.inputs, sub.outputs = [remap(t_in)], [remap(t_out)]
        sub.name = f"{input_name}->{output_name}".encode()
        model = fb.ModelT()
        model.version, model.operatorCodes, model.description = m.version, m.operatorCodes, m.description
        model.subgraphs, model.buffers = [sub], buffers
        model.metadata = []
        for meta in m.metadata or []:  # min_runtime_version, conversion metadata
            kept = copy.copy(meta)
            buffers.append(m.buffers[meta.buffer])
            kept.buffer = len(buffers) - 1
            model.metadata.append(kept)
        model.signatureDefs = []
        return bytes(fbu.convert_object_to_bytearray(model))
