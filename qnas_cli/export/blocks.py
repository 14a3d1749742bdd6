"""Synthetic integer graphs for latency: whole subnets, and *cover graphs* holding every part.

Latency does not depend on weight values, so these graphs carry random int8 weights and
fixed, plausible scales; their structure (op types, shapes, strides, fused ReLUs, residual
adds, pooling, FC layers) is exactly what ``qnas_cli/export/fold.py`` produces for a calibrated
subnet, op for op (tests/test_latency.py checks this against a real extracted subnet).

A cover graph converts many parts in one onnx2tf call (one conversion costs 12-15 s; a table
has hundreds of parts): for one input resolution, a tree rooted at the input in which every
part of the space at that resolution appears once, each reading a tensor of the shape it
needs, plus optional whole subnets as separate branches (for the whole-model fit). After
conversion and the usual rewrite, ``qnas_cli/export/cut.py`` cuts each part out of the flatbuffer as
its own model, so every op measured is an op the real export produced.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qnas_cli.latency import PartKey, conv_out, head_text, space_part_keys
from qnas_cli.space import Arch, SearchSpace
from qnas_cli.supernet import mid_channels

from .graph import Add, Conv, GlobalAvgPool, IntegerGraph, Linear, QParams

ACT = QParams(0.05, 0)  # every activation: latency is independent of the scale's value


@dataclass(frozen=True)
class PartSpan:
    """Where a part sits in a graph: the tensor it reads and the tensor it writes."""

    key: PartKey
    input: str
    output: str


class _Builder:
    """Appends ops with random integer parameters; names are unique within one graph."""

    def __init__(self, in_channels: int, size: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.ops: list = []
        self.qparams: dict[str, QParams] = {"input": QParams(1 / 64, 0)}
        self.channels: dict[str, int] = {"input": in_channels}
        self.input_shape = (1, in_channels, size, size)

    def _weights(self, shape: tuple[int, ...], fan_in: int) -> tuple[np.ndarray, float]:
        q = self.rng.integers(-127, 128, size=shape, dtype=np.int64).astype(np.int8)
        # Real weights of He-like magnitude keep the float ONNX finite for onnx2tf's calibration.
        return q, float(np.sqrt(3.0 / fan_in) / 127.0)

    def conv(self, name: str, src: str, c_out: int, k: int, stride: int = 1, depthwise: bool = False,
             relu: bool = True) -> str:
        c_in = self.channels[src]
        groups = c_in if depthwise else 1
        c_out = c_in if depthwise else c_out
        w, s_w = self._weights((c_out, c_in // groups, k, k), (c_in // groups) * k * k)
        bias = self.rng.integers(-500, 500, size=c_out).astype(np.int32)
        self.ops.append(Conv(name, src, name, w, bias, s_w, stride, groups, relu))
        self.qparams[name], self.channels[name] = ACT, c_out
        return name

    def linear(self, name: str, src: str, c_out: int, relu: bool) -> str:
        c_in = self.channels[src]
        w, s_w = self._weights((c_out, c_in), c_in)
        bias = self.rng.integers(-500, 500, size=c_out).astype(np.int32)
        self.ops.append(Linear(name, src, name, w, bias, s_w, relu))
        self.qparams[name], self.channels[name] = ACT, c_out
        return name

    def block(self, p: str, src: str, c_out: int, k: int, e: int, stride: int, residual: bool) -> str:
        """Inverted residual as qnas_cli/export/fold.py writes it: [expand] -> depthwise -> project [-> add]."""
        x = src
        if e > 1:
            x = self.conv(f"{p}_expand", x, mid_channels(self.channels[src], e), 1)
        x = self.conv(f"{p}_dw", x, 0, k, stride, depthwise=True)
        x = self.conv(f"{p}_project", x, c_out, 1, relu=False)
        if residual:
            self.ops.append(Add(f"{p}_add", (x, src), f"{p}_add"))
            self.qparams[f"{p}_add"], self.channels[f"{p}_add"] = ACT, c_out
            x = f"{p}_add"
        return x

    def head(self, p: str, src: str, space: SearchSpace, num_classes: int) -> str:
        x = self.conv(f"{p}head", src, space.head_channels, 1)
        self.ops.append(GlobalAvgPool(f"{p}pool", x, f"{p}pool"))  # keeps its input's qparams
        self.qparams[f"{p}pool"], self.channels[f"{p}pool"] = self.qparams[x], self.channels[x]
        x = f"{p}pool"
        if space.feature_channels:
            x = self.linear(f"{p}feature", x, space.feature_channels, relu=True)
        return self.linear(f"{p}logits", x, num_classes, relu=False)

    def subnet(self, p: str, space: SearchSpace, arch: Arch, num_classes: int) -> str:
        """A whole subnet from the input, with qnas_cli/export/fold.py's op names under prefix ``p``."""
        x = self.conv(f"{p}stem", "input", space.stem_channels, 3, space.stem_stride)
        for i, (spec, stage) in enumerate(zip(space.stages, arch.stages)):
            for j, b in enumerate(stage.blocks):
                x = self.block(f"{p}s{i}b{j}", x, stage.width, b.kernel, b.expand,
                               spec.stride if j == 0 else 1, residual=j > 0)
        return self.head(p, x, space, num_classes)

    def graph(self, meta: dict, output: str | None = None) -> IntegerGraph:
        """The graph with every leaf as an output; ``output``, when given, must be the only leaf."""
        consumed = {t for op in self.ops for t in (op.inputs if isinstance(op, Add) else (op.input,))}
        leaves = [op.output for op in self.ops if op.output not in consumed]
        if output is not None and leaves != [output]:
            raise ValueError(f"graph leaves {leaves[:3]} are not just {output!r}")
        return IntegerGraph("input", self.input_shape, leaves[0], self.ops,
                            {k: self.qparams[k] for k in self.channels}, meta, tuple(leaves[1:]))


def arch_graph(space: SearchSpace, arch: Arch, in_channels: int, num_classes: int, seed: int = 0) -> IntegerGraph:
    """The integer graph of ``arch`` with random weights: what `qnas export` converts, less the training."""
    b = _Builder(in_channels, arch.resolution, seed)
    out = b.subnet("", space, arch, num_classes)
    return b.graph({"arch": arch.key, "synthetic": True}, output=out)


def cover_graph(space: SearchSpace, resolution: int, in_channels: int, num_classes: int,
                wholes: list[Arch] = (), seed: int = 0) -> tuple[IntegerGraph, list[PartSpan], list[tuple[Arch, str]]]:
    """Every part of ``space`` at ``resolution`` in one graph, plus the whole subnets ``wholes``.

    Returns the graph, where each part sits in it, and each whole subnet's output tensor.
    Parts of the same shape family share inputs: a stage's first-block variants all read the
    tensor of their input width, and the later blocks of a stage are chained (each reads the
    previous one's output), so the graph needs no adapter ops at all.
    """
    wanted = space_part_keys(space, in_channels, num_classes, (resolution,))
    b = _Builder(in_channels, resolution, seed)
    spans: list[PartSpan] = []
    stem = b.conv("stem", "input", space.stem_channels, 3, space.stem_stride)
    spans.append(PartSpan(("stem", resolution, in_channels, space.stem_channels, 3, 1, space.stem_stride, False),
                          "input", stem))
    size = conv_out(resolution, space.stem_stride)
    avail = {space.stem_channels: stem}  # width -> a tensor of that width at the current size
    for i, spec in enumerate(space.stages):
        out_size, nxt = conv_out(size, spec.stride), {}
        for c_in, src in avail.items():
            for w in spec.widths:
                for k in spec.kernels:
                    for e in spec.expands:
                        y = b.block(f"s{i}_first_{c_in}_{w}_k{k}e{e}", src, w, k, e, spec.stride, residual=False)
                        spans.append(PartSpan(("block", size, c_in, w, k, e, spec.stride, False), src, y))
                        nxt.setdefault(w, y)
        if max(spec.depths) > 1:
            for w, src in nxt.items():
                for k in spec.kernels:
                    for e in spec.expands:
                        y = b.block(f"s{i}_rest_{w}_k{k}e{e}", src, w, k, e, 1, residual=True)
                        spans.append(PartSpan(("block", out_size, w, w, k, e, 1, True), src, y))
                        src = y
        size, avail = out_size, nxt
    for c, src in avail.items():
        y = b.head(f"head_{c}_", src, space, num_classes)
        spans.append(PartSpan(("head", size, c, head_text(space, num_classes), 1, 1, 1, False), src, y))
    whole_out = []
    for n, arch in enumerate(wholes):
        if arch.resolution != resolution:
            raise ValueError(f"whole subnet {arch.key} is not at {resolution} px")
        whole_out.append((arch, b.subnet(f"w{n}_", space, arch, num_classes)))
    got = {s.key for s in spans}
    if got != set(wanted):  # the walk above and space_part_keys must describe one set of parts
        raise AssertionError(f"cover graph parts differ from the space's: {sorted(set(wanted) ^ got)[:3]}")
    spans = list({s.key: s for s in spans}.values())  # identical shapes at one size: keep one
    return b.graph({"cover": space.name, "resolution": resolution}), spans, whole_out

