"""Search spaces and subnets as data.

A space is MobileNetV3-style (no SE, ReLU): a stem conv, stages of inverted residual blocks,
a 1x1 head conv, global average pooling, an optional feature-mix FC, and the classifier.
Each stage chooses an output width, a depth, and per block a depthwise kernel and an expand
ratio. A subnet (``Arch``) is one choice of all of these plus the input resolution.

Spaces come from presets (``tiny``, ``small``, ``mbv3``) or JSON/TOML files with the same fields.
"""
from __future__ import annotations

import hashlib
import json
import random
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, choice_error

ARCH_FORMAT = "qnas.subnet/1"
# Sanity bounds: far beyond any mobile network, low enough that a typo fails here, not in malloc.
LIMITS = {"channels": 8192, "resolution": 1024, "depth": 16, "kernel": 15, "expand": 16}


@dataclass(frozen=True)
class StageSpec:
    widths: tuple[int, ...]  # output channel choices
    depths: tuple[int, ...]  # number-of-blocks choices
    kernels: tuple[int, ...]  # depthwise kernel choices (odd)
    expands: tuple[int, ...]  # expand ratio choices (1 = no expand conv)
    stride: int  # stride of the stage's first block


@dataclass(frozen=True)
class SearchSpace:
    name: str
    resolutions: tuple[int, ...]
    stem_channels: int
    stem_stride: int
    stages: tuple[StageSpec, ...]
    head_channels: int  # 1x1 conv before pooling
    feature_channels: int = 0  # FC after pooling (MobileNetV3's 1280); 0 = none

    def __post_init__(self) -> None:
        _check_space(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fingerprint(self) -> str:
        """A short hash of everything but the name: two spaces with one fingerprint are one space."""
        body = {k: v for k, v in self.to_dict().items() if k != "name"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str | None = None) -> SearchSpace:
        known = {"name", "resolutions", "stem_channels", "stem_stride", "stages", "head_channels", "feature_channels"}
        _reject_unknown(d, known, "space")
        stage_keys = {"widths", "depths", "kernels", "expands", "stride"}
        try:
            stages = []
            for i, s in enumerate(d["stages"]):
                if not isinstance(s, dict):
                    raise UserError(f"space.stages[{i}]: expected a table/object, got {s!r}")
                _reject_unknown(s, stage_keys, f"space.stages[{i}]")
                stages.append(
                    StageSpec(
                        widths=_int_tuple(s["widths"], f"stages[{i}].widths"),
                        depths=_int_tuple(s["depths"], f"stages[{i}].depths"),
                        kernels=_int_tuple(s["kernels"], f"stages[{i}].kernels"),
                        expands=_int_tuple(s["expands"], f"stages[{i}].expands"),
                        stride=_int(s["stride"], f"stages[{i}].stride"),
                    )
                )
            return cls(
                name=str(name or d.get("name", "custom")),
                resolutions=_int_tuple(d["resolutions"], "resolutions"),
                stem_channels=_int(d["stem_channels"], "stem_channels"),
                stem_stride=_int(d["stem_stride"], "stem_stride"),
                stages=tuple(stages),
                head_channels=_int(d["head_channels"], "head_channels"),
                feature_channels=_int(d.get("feature_channels", 0), "feature_channels"),
            )
        except KeyError as e:
            raise UserError(f"space: missing field {e.args[0]!r}") from None
        except TypeError as e:
            raise UserError(f"space: malformed ({e})") from None


def _reject_unknown(d: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} (known fields: {', '.join(sorted(known))})")


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"space.{where}: expected an integer, got {v!r}")
    return v


def _int_tuple(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list | tuple):
        raise UserError(f"space.{where}: expected a list of integers, got {v!r}")
    return tuple(_int(x, where) for x in v)


def _check_space(s: SearchSpace) -> None:
    def positive(values: tuple[int, ...], where: str, limit: int = LIMITS["channels"]) -> None:
        if not values:
            raise UserError(f"space.{where}: the list of choices is empty")
        bad = [v for v in values if v <= 0]
        if bad:
            raise UserError(f"space.{where}: {bad[0]} is not a positive integer")
        if max(values) > limit:
            raise UserError(f"space.{where}: {max(values)} exceeds the limit of {limit}")
        if len(set(values)) != len(values):
            raise UserError(f"space.{where}: choices repeat ({list(values)})")

    positive(s.resolutions, "resolutions", LIMITS["resolution"])
    positive((s.stem_channels,), "stem_channels")
    positive((s.head_channels,), "head_channels")
    if s.feature_channels < 0:
        raise UserError(f"space.feature_channels: {s.feature_channels} is negative (0 means no feature-mix layer)")
    if s.stem_stride not in (1, 2):
        raise choice_error("space.stem_stride", s.stem_stride, (1, 2))
    if not s.stages:
        raise UserError("space.stages: a space needs at least one stage")
    for i, st in enumerate(s.stages):
        positive(st.widths, f"stages[{i}].widths")
        positive(st.depths, f"stages[{i}].depths", LIMITS["depth"])
        positive(st.kernels, f"stages[{i}].kernels", LIMITS["kernel"])
        positive(st.expands, f"stages[{i}].expands", LIMITS["expand"])
        even = [k for k in st.kernels if k % 2 == 0]
        if even:
            raise UserError(f"space.stages[{i}].kernels: {even[0]} is even; depthwise kernels must be odd (e.g. 3, 5, 7)")
        if st.stride not in (1, 2):
            raise choice_error(f"space.stages[{i}].stride", st.stride, (1, 2))


@dataclass(frozen=True)
class Block:
    kernel: int
    expand: int


@dataclass(frozen=True)
class Stage:
    width: int
    blocks: tuple[Block, ...]  # depth = len(blocks)


@dataclass(frozen=True)
class Arch:
    """One subnet: the architecture as data. Serialised as ``subnet.json``."""

    resolution: int
    stages: tuple[Stage, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # provenance, metrics

    @property
    def key(self) -> str:
        """A compact, unique string, e.g. ``r28-w16:k3e4,k5e6-w32:k3e3`` (cache keys, logs)."""
        stages = "-".join(f"w{s.width}:" + ",".join(f"k{b.kernel}e{b.expand}" for b in s.blocks) for s in self.stages)
        return f"r{self.resolution}-{stages}"

    def to_dict(self, space: SearchSpace) -> dict[str, Any]:
        return {
            "format": ARCH_FORMAT,
            "space": {"name": space.name, "fingerprint": space.fingerprint},
            "resolution": self.resolution,
            "stages": [
                {"width": s.width, "blocks": [{"kernel": b.kernel, "expand": b.expand} for b in s.blocks]}
                for s in self.stages
            ],
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Any, space: SearchSpace) -> Arch:
        """Parse and validate against ``space``; every problem is a one-line ``UserError``."""
        if not isinstance(d, dict):
            raise UserError(f"subnet: expected a JSON object, got {type(d).__name__}")
        if d.get("format", ARCH_FORMAT) != ARCH_FORMAT:
            raise choice_error("subnet.format", d.get("format"), (ARCH_FORMAT,))
        declared = d.get("space")
        if isinstance(declared, dict) and declared.get("fingerprint") not in (None, space.fingerprint):
            raise UserError(
                f"subnet.space: this subnet belongs to space {declared.get('name')!r} "
                f"(fingerprint {declared.get('fingerprint')}), not to {space.name!r} ({space.fingerprint}); "
                "pass the space it was made for with --space"
            )
        if "resolution" not in d or "stages" not in d:
            raise UserError("subnet: missing field 'resolution' or 'stages'")
        res = d["resolution"]
        if not _is_int(res) or res not in space.resolutions:
            raise choice_error("subnet.resolution", res, space.resolutions)
        stages_in = d["stages"]
        if not isinstance(stages_in, list) or len(stages_in) != len(space.stages):
            got = len(stages_in) if isinstance(stages_in, list) else stages_in
            raise UserError(f"subnet.stages: expected a list of {len(space.stages)} stages, got {got!r}")
        stages = []
        for i, (sd, spec) in enumerate(zip(stages_in, space.stages)):
            where = f"subnet.stages[{i}]"
            if not isinstance(sd, dict) or not isinstance(sd.get("blocks"), list):
                raise UserError(f"{where}: expected {{'width': ..., 'blocks': [...]}}, got {sd!r}")
            if not _is_int(sd.get("width")) or sd.get("width") not in spec.widths:
                raise choice_error(f"{where}.width", sd.get("width"), spec.widths)
            if len(sd["blocks"]) not in spec.depths:
                raise choice_error(f"{where}.depth (number of blocks)", len(sd["blocks"]), spec.depths)
            blocks = []
            for j, bd in enumerate(sd["blocks"]):
                if not isinstance(bd, dict):
                    raise UserError(f"{where}.blocks[{j}]: expected {{'kernel': ..., 'expand': ...}}, got {bd!r}")
                if not _is_int(bd.get("kernel")) or bd.get("kernel") not in spec.kernels:
                    raise choice_error(f"{where}.blocks[{j}].kernel", bd.get("kernel"), spec.kernels)
                if not _is_int(bd.get("expand")) or bd.get("expand") not in spec.expands:
                    raise choice_error(f"{where}.blocks[{j}].expand", bd.get("expand"), spec.expands)
                blocks.append(Block(int(bd["kernel"]), int(bd["expand"])))
            stages.append(Stage(int(sd["width"]), tuple(blocks)))
        extra = {k: v for k, v in d.items() if k not in ("format", "space", "resolution", "stages")}
        return cls(res, tuple(stages), extra)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def sample(space: SearchSpace, how: str = "random", rng: random.Random | None = None) -> Arch:
    """The largest, the smallest, or a uniformly random subnet of ``space``."""
    if how not in ("largest", "smallest", "random"):
        raise choice_error("sample", how, ("largest", "smallest", "random"))
    rng = rng or random.Random(0)
    pick = {"largest": max, "smallest": min, "random": rng.choice}[how]
    stages = []
    for spec in space.stages:
        width, depth = pick(spec.widths), pick(spec.depths)
        blocks = tuple(Block(pick(spec.kernels), pick(spec.expands)) for _ in range(depth))
        stages.append(Stage(width, blocks))
    return Arch(pick(space.resolutions), tuple(stages))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channel counts to a multiple of 8 (as MobileNets do), never down by more than 10%."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


# ---- presets --------------------------------------------------------------------------------

def _stage(widths, depths, stride, kernels=(3, 5, 7), expands=(3, 4, 6)) -> StageSpec:
    return StageSpec(tuple(widths), tuple(depths), tuple(kernels), tuple(expands), stride)


PRESETS: dict[str, SearchSpace] = {
    # Unit tests: a forward+backward in milliseconds.
    "tiny": SearchSpace(
        name="tiny",
        resolutions=(16, 20),
        stem_channels=8,
        stem_stride=2,
        stages=(_stage((8, 12), (1, 2), 1, (3, 5), (2, 3)), _stage((12, 16), (1, 2), 2, (3, 5), (2, 3))),
        head_channels=32,
    ),
    # 28-32 px inputs (Fashion-MNIST, CIFAR-10) on a laptop CPU: stride-2 stem keeps it fast.
    "small": SearchSpace(
        name="small",
        resolutions=(24, 28, 32),
        stem_channels=16,
        stem_stride=2,
        stages=(
            _stage((16, 24), (1, 2), 1),
            _stage((24, 32), (2, 3), 2),
            _stage((40, 48), (2, 3), 2),
            _stage((64, 80), (2, 3), 1),
        ),
        head_channels=256,
    ),
    # ImageNet scale: OQA Table 4 (MobileNetV3 without SE, ReLU instead of h-swish).
    "mbv3": SearchSpace(
        name="mbv3",
        resolutions=(128, 160, 192, 224),
        stem_channels=16,
        stem_stride=2,
        stages=(
            _stage((16,), (1,), 1, (3,), (1,)),
            _stage((24,), (2, 3, 4), 2),
            _stage((40,), (2, 3, 4), 2),
            _stage((80,), (2, 3, 4), 2),
            _stage((112,), (2, 3, 4), 1),
            _stage((160,), (2, 3, 4), 2),
        ),
        head_channels=960,
        feature_channels=1280,
    ),
}


def load_space(spec: str | Path) -> SearchSpace:
    """A preset name or a path to a ``.json``/``.toml`` space file."""
    text = str(spec)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if path.suffix.lower() not in (".json", ".toml"):
        raise UserError(f"--space: {text!r} is neither a preset ({', '.join(PRESETS)}) nor a .json/.toml file")
    data = read_structured(path, "space file")
    return SearchSpace.from_dict(data, name=data.get("name") or path.stem)


def read_structured(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON or TOML file into a dict, with one-line errors for every failure."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist or is not a file")
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode()) if path.suffix.lower() == ".toml" else json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad syntax or encoding, 4300+ digit integers, absurd nesting
        raise UserError(f"{what} {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected an object at the top level")
    return data


def load_arch(path: Path, space: SearchSpace) -> Arch:
    return Arch.from_dict(read_structured(Path(path), "subnet file"), space)
