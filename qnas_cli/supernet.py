"""The elastic supernet and the static subnets extracted from it.

``Supernet(space, ...)(x, arch)`` runs any subnet of the space; ``supernet.extract(arch)``
returns a ``Subnet``: the same modules cut to exactly the active sizes, so its output equals
the supernet's in that configuration bit for bit (eval mode; the same holds in train mode for
the float supernet).

Layout (NCHW): input quant -> stem conv -> stages of inverted residual blocks -> 1x1 head conv
-> global average pool (keeps the head's int8 parameters, as TFLite requires) -> optional
feature-mix FC -> classifier FC -> quantized logits.
"""
from __future__ import annotations

import random

from torch import Tensor, nn

from .layers import ActQuant, Exact, QConvBN, QLinear, exact_add
from .quant import QuantConfig, global_avg_pool
from .space import Arch, Block, SearchSpace, make_divisible, sample


def mid_channels(in_channels: int, expand: int) -> int:
    return in_channels if expand == 1 else make_divisible(in_channels * expand)


class MBBlock(nn.Module, Exact):
    """Inverted residual: 1x1 expand (ReLU) -> kxk depthwise (ReLU) -> 1x1 project (linear) [+ x].

    Only blocks after the first of each stage have the residual (stride 1, equal widths).
    """

    def __init__(self, in_max: int, out_max: int, kernel_max: int, expand_max: int, stride: int,
                 residual: bool, cfg: QuantConfig, kernel_transforms: tuple[int, ...] = (),
                 separate_kernels: tuple[int, ...] = ()) -> None:
        super().__init__()
        mid_max = mid_channels(in_max, expand_max)
        self.expand = QConvBN(in_max, mid_max, 1, 1, cfg) if expand_max > 1 else None
        self.depthwise = QConvBN(mid_max, mid_max, kernel_max, stride, cfg, depthwise=True, kernel_transforms=kernel_transforms,
                                 separate_kernels=separate_kernels)
        self.project = QConvBN(mid_max, out_max, 1, 1, cfg, relu=False)
        self.add_q = ActQuant(cfg, relu=False) if residual else None

    def forward(self, x: Tensor, q_in: ActQuant, width: int, block: Block) -> Tensor:
        """``x`` on the grid of ``q_in`` (the previous layer's output quantizer)."""
        h, s = x, q_in.scale
        if block.expand > 1:
            h = self.expand(h, s, mid_channels(x.shape[1], block.expand), 1)
            s = self.expand.out_q.scale
        h = self.depthwise(h, s, h.shape[1], block.kernel)
        h = self.project(h, self.depthwise.out_q.scale, width, 1)
        if self.add_q is None:
            return h
        if self.exact() and self.add_q.enabled:
            return exact_add(h, self.project.out_q, x, q_in, self.add_q, self.runtime)
        return self.add_q(h + x)

    @property
    def out_q(self) -> ActQuant:
        return self.add_q if self.add_q is not None else self.project.out_q

    def extract(self, in_channels: int, width: int, block: Block) -> MBBlock:
        mid = mid_channels(in_channels, block.expand)
        m = MBBlock.__new__(MBBlock)
        nn.Module.__init__(m)
        m.expand = self.expand.extract(in_channels, mid, 1) if block.expand > 1 else None
        m.depthwise = self.depthwise.extract(mid, mid, block.kernel)
        m.project = self.project.extract(mid, width, 1)
        m.add_q = self.add_q.extract() if self.add_q is not None else None
        m.runtime = self.runtime
        return m


class _Net(nn.Module, Exact):
    """The forward pass shared by ``Supernet`` and ``Subnet`` (they differ only in sizes)."""

    input_q: ActQuant
    stem: QConvBN
    stages: nn.ModuleList  # of ModuleList[MBBlock]
    head: QConvBN
    feature: QLinear | None
    classifier: QLinear

    def run(self, x: Tensor, arch: Arch) -> Tensor:  # x: (N, C, R, R), R = arch.resolution
        x = self.input_q(x)
        x = self.stem(x, self.input_q.scale, self.stem.out_max, self.stem.kernel_max)
        out_q = self.stem.out_q
        for blocks, stage in zip(self.stages, arch.stages):
            for block, choice in zip(blocks, stage.blocks):
                x = block(x, out_q, stage.width, choice)
                out_q = block.out_q
        x = self.head(x, out_q.scale, self.head.out_max, 1)
        q = self.head.out_q  # TFLite's pooling keeps its input's scale and zero point
        x = global_avg_pool(x, q.scale, q.zero_point, self.runtime if self.exact() else "xnnpack") if q.enabled else x.mean(dim=(2, 3))
        s = q.scale
        if self.feature is not None:
            x = self.feature(x, s)
            s = self.feature.out_q.scale
        return self.classifier(x, s)


class Supernet(_Net):
    """``kernel_transform``: smaller depthwise kernels through OFA's learned transforms (``QConvBN``)
    instead of the plain centre crop; the extracted subnets hold the transformed kernels.
    ``separate_kernels``: each smaller depthwise kernel choice has weights of its own instead."""

    def __init__(self, space: SearchSpace, in_channels: int, num_classes: int, cfg: QuantConfig,
                 kernel_transform: bool = False, separate_kernels: bool = False) -> None:
        super().__init__()
        if kernel_transform and separate_kernels:
            raise ValueError("kernel transforms and separate kernels are two ways to make a smaller kernel: choose one")
        self.space, self.in_channels, self.num_classes, self.cfg = space, in_channels, num_classes, cfg
        self.kernel_transform, self.separate_kernels = kernel_transform, separate_kernels
        self.input_q = ActQuant(cfg, relu=False)
        self.stem = QConvBN(in_channels, space.stem_channels, 3, space.stem_stride, cfg)
        stages, c_in = [], space.stem_channels
        for spec in space.stages:
            c_out = max(spec.widths)
            blocks = [
                MBBlock(c_in if j == 0 else c_out, c_out, max(spec.kernels), max(spec.expands),
                        spec.stride if j == 0 else 1, residual=j > 0, cfg=cfg,
                        kernel_transforms=tuple(spec.kernels) if kernel_transform else (),
                        separate_kernels=tuple(spec.kernels) if separate_kernels else ())
                for j in range(max(spec.depths))
            ]
            stages.append(nn.ModuleList(blocks))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.head = QConvBN(c_in, space.head_channels, 1, 1, cfg)
        feat = space.feature_channels
        self.feature = QLinear(space.head_channels, feat, cfg, relu=True) if feat else None
        self.classifier = QLinear(feat or space.head_channels, num_classes, cfg, relu=False)

    def forward(self, x: Tensor, arch: Arch) -> Tensor:
        return self.run(x, arch)

    def sample(self, how: str = "random", rng: random.Random | None = None) -> Arch:
        return sample(self.space, how, rng)

    def extract(self, arch: Arch) -> Subnet:
        """A static network holding exactly ``arch``'s slices (copies; the supernet is untouched)."""
        return Subnet(self, arch)


class Subnet(_Net):
    """A static subnet: every layer's size is the active size; ``forward(x)`` takes no arch."""

    def __init__(self, supernet: Supernet, arch: Arch) -> None:
        super().__init__()
        self.arch, self.cfg = arch, supernet.cfg
        self.in_channels, self.num_classes = supernet.in_channels, supernet.num_classes
        self.input_q = supernet.input_q.extract()
        stem = supernet.stem
        self.stem = stem.extract(supernet.in_channels, stem.out_max, stem.kernel_max)
        stages, c_in = [], stem.out_max
        for blocks, stage in zip(supernet.stages, arch.stages):
            extracted = []
            for j, choice in enumerate(stage.blocks):
                extracted.append(blocks[j].extract(c_in if j == 0 else stage.width, stage.width, choice))
            stages.append(nn.ModuleList(extracted))
            c_in = stage.width
        self.stages = nn.ModuleList(stages)
        self.head = supernet.head.extract(c_in, supernet.head.out_max, 1)
        self.feature = supernet.feature.extract() if supernet.feature is not None else None
        self.classifier = supernet.classifier.extract()
        self.runtime = supernet.runtime

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x, self.arch)


def set_bn_momentum(model: nn.Module, momentum: float | None) -> None:
    """None: BN running statistics become the cumulative average of the batches that follow."""
    for m in model.modules():
        if isinstance(m, QConvBN):
            m.bn_momentum = momentum


def reset_bn_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QConvBN):
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.num_batches_tracked.zero_()





def load_supernet(path, expected_sha256: str | None = None) -> tuple[Supernet, dict]:
    """Rebuild a supernet from ``supernet.pt`` (verified against its sidecar; no code is unpickled)."""
    from .checkpoint import load_weights
    from .errors import UserError

    payload, meta = load_weights(path, expected_sha256)
    try:
        space = SearchSpace.from_dict(payload["space"])
        net = Supernet(space, int(payload["in_channels"]), int(payload["num_classes"]), QuantConfig(**payload["quant"]),
                       kernel_transform=bool(payload.get("kernel_transform", False)),  # absent: from before the option
                       separate_kernels=bool(payload.get("separate_kernels", False)))
        net.load_state_dict(payload["model"])
    except KeyError as e:
        raise UserError(f"{path} is not a qnas supernet: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a qnas supernet: {str(e).splitlines()[0][:200]}") from None
    return net, meta
