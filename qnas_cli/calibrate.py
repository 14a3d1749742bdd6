"""BN calibration and evaluation of subnets (docs/design.md §7).

A subnet's BN statistics are re-estimated after extraction: reset, then the cumulative average
over a fixed, seeded set of training images (no augmentation). In int8 mode the scale predictor
then reads the calibrated sigma, so every subnet gets its own weight scales.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import load_weights, save_weights, sidecar
from .data import Dataset, ImageSource, calibration_indices, load_dataset, ordered_batches, to_input
from .errors import UserError, check_count
from .kernels import check_target
from .lineage import check_serves
from .layers import BN_MOMENTUM, exact_statistics, fixed_integers, set_runtime
from .quant import INTEGER_CONTRACT_VERSION, QuantConfig
from .space import Arch, SearchSpace
from .supernet import Subnet, Supernet, load_supernet, reset_bn_stats, set_bn_momentum

CALIB_IMAGES = 2000
CALIB_SEED = 0  # the calibration images are a seeded subset: recorded so a reused subnet is provably the same
CALIB_SUBSET = "stratified/1"  # how that subset is drawn (data.stratified_indices); older files used a plain permutation
EVAL_BATCH = 100  # the exact forward gives the same results at any batch size; measured fastest on CPU (activations stay in cache): 500 is 1.3x slower
CALIB_BATCH = 250  # part of the calibration recipe: the batch-statistics fold sees one batch at a time
EVAL_IMAGES_HINT = " (leave it out to evaluate the whole split)"
VERIFY_IMAGES = 2000  # test images an exported file itself runs on for its gate (the exact forward scores them all)


def calibration_images(data: Dataset, images: int = CALIB_IMAGES, batch_size: int = CALIB_BATCH,
                       seed: int = CALIB_SEED) -> Iterator[Tensor]:
    """The fixed, seeded, class-stratified calibration images (uint8, as stored), in the batches
    calibration sees them."""
    idx = calibration_indices(data.train, images, seed)
    for i in range(0, len(idx), batch_size):
        yield data.train.get(idx[i : i + batch_size])[0]


def calibration_batches(data: Dataset, resolution: int, images: int = CALIB_IMAGES) -> Iterator[Tensor]:
    """``calibration_images`` as the network's input batches at ``resolution``."""
    return (to_input(x, data, resolution) for x in calibration_images(data, images))


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: Iterable[Tensor], device: str = "cpu") -> None:
    """Reset every BN and set its running statistics to the average over the input ``batches``
    (``calibration_batches``; the batch size matters: the batch-statistics fold sees each batch).
    An int8 model's statistics and the activations between its layers are computed exactly
    (``layers.exact_statistics``): the same integers on any thread count, process count or CPU."""
    was_training = model.training
    reset_bn_stats(model)
    set_bn_momentum(model, None)
    model.train()
    try:
        with exact_statistics(model):
            for x in batches:
                model(x.to(device))
    finally:
        set_bn_momentum(model, BN_MOMENTUM)
        model.train(was_training)


def calibrated_subnet(supernet: Supernet, arch: Arch, data: Dataset, images: int = CALIB_IMAGES,
                      device: str = "cpu", batches: Iterable[Tensor] | None = None) -> Subnet:
    """Extract ``arch`` and calibrate its BN statistics; returned in eval mode. ``batches``: the
    calibration inputs at ``arch.resolution`` when the caller has them already (the search)."""
    sub = supernet.extract(arch).to(device)
    calibrate_bn(sub, calibration_batches(data, arch.resolution, images) if batches is None else batches, device)
    return sub.eval()


@torch.no_grad()
def correct(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: str = "cpu",
            runtime: str | None = "xnnpack") -> Tensor:
    """Per image, in batch order, whether ``model``'s top-1 in eval mode is the label: for an
    int8 model, of the exact integer forward for ``runtime`` (``kernels.TARGETS``; None: the
    fake-quant simulation)."""
    was_training = model.training
    set_runtime(model, runtime)
    model.eval()
    hits = [torch.zeros(0, dtype=torch.bool)]
    with fixed_integers(model):  # the model is static here: its integers are computed once, not per batch
        for x, y in batches:
            hits.append(model(x.to(device)).argmax(1).cpu() == y)
    model.train(was_training)
    return torch.cat(hits)


def top1(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: str = "cpu",
         runtime: str | None = "xnnpack") -> float:
    """Top-1 accuracy (fraction) of ``model`` on (input, label) ``batches`` (see ``correct``)."""
    hits = correct(model, batches, device, runtime)
    return int(hits.sum()) / max(len(hits), 1)


def evaluate(model: nn.Module, source: ImageSource, data: Dataset, resolution: int, device: str = "cpu",
             limit: int | None = None, batch_size: int = EVAL_BATCH, runtime: str | None = "xnnpack") -> float:
    """``top1`` on ``source`` (all of it, or its seeded class-stratified subset of ``limit`` images)."""
    batches = ((to_input(x, data, resolution), y) for x, y in ordered_batches(source, batch_size, limit))
    return top1(model, batches, device, runtime)


# ---- the calibrated subnet artifact (subnet.qnas.pt + subnet.qnas.json) --------------------------

def subnet_document(arch: Arch, space: SearchSpace, supernet: Path | str, sha256: str) -> dict[str, Any]:
    """A subnet.json: the architecture and the supernet it is taken from (path, sha256), which
    ``resolve_supernet`` reads back; a relative path is relative to the subnet file."""
    return {**arch.to_dict(space), "supernet": {"path": str(supernet), "sha256": sha256}}


def resolve_supernet(raw: dict, subnet_path: Path, supernet: Path | None) -> tuple[Path, str | None]:
    """The supernet a subnet file names (path relative to the file), or ``--supernet``; and its sha256."""
    ref = raw.get("supernet") if isinstance(raw.get("supernet"), dict) else {}
    recorded = ref.get("sha256")
    if supernet is not None:
        return Path(supernet), recorded
    if not ref.get("path"):
        raise UserError(f"{subnet_path} names no supernet: pass --supernet PATH (e.g. runs/default/supernet.pt)")
    path = Path(ref["path"])
    if not path.is_absolute() and not path.exists():
        path = subnet_path.parent / path
    return path, recorded


def calibration_data_spec(data_spec: str | None, supernet_meta: dict[str, Any]) -> str:
    """``--data``, or else the data the supernet was trained on."""
    return data_spec or supernet_meta.get("config", {}).get("data", "fashion-mnist")


def calibration_record(supernet_sha256: str, data_spec: str, calib_images: int) -> dict[str, Any]:
    """Everything a calibrated subnet's integers depend on besides its architecture: what a
    reused ``.qnas.pt`` is checked against, and the core of the search cache's identity
    (``search_job``), so that a change here (a contract bump) invalidates both."""
    return {"supernet_sha256": supernet_sha256, "data": data_spec, "calib_images": calib_images,
            "calib_seed": CALIB_SEED, "calib_subset": CALIB_SUBSET, "integer_contract": INTEGER_CONTRACT_VERSION}


def check_data_fits(data: Dataset, in_channels: int, num_classes: int, model: str = "the supernet") -> None:
    """Refuse data the model was not built for: other channels fail deep in a conv (not the
    user's words), more classes score silently wrong (labels the classifier cannot output)."""
    if (data.in_channels, data.num_classes) != (in_channels, num_classes):
        raise UserError(f"--data {data.spec}: {data.in_channels} channels / {data.num_classes} classes, but {model} "
                        f"was trained for {in_channels} / {num_classes}")


def stale_reasons(meta: dict[str, Any], arch: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Why a calibrated subnet (its sidecar ``meta``) is not the one ``arch`` + ``expected`` would give; [] if it is."""
    recorded_arch = meta.get("arch") if isinstance(meta.get("arch"), dict) else {}
    reasons = [] if all(recorded_arch.get(k) == arch.get(k) for k in ("resolution", "stages")) else ["another architecture"]
    recorded = meta.get("calibration")
    if not isinstance(recorded, dict):
        return reasons + ["it records no calibration inputs (made by an older qnas)"]
    for key, value in expected.items():
        if recorded.get(key) != value:
            reasons.append(f"{key} {_short(recorded.get(key))} != {_short(value)}")
    return reasons


def _short(value: Any) -> str:
    text = repr(value)
    return text[:14] + "…'" if isinstance(value, str) and len(value) == 64 else text  # a sha256: its prefix is enough


def check_outputs(out: Path, inputs: list[Path]) -> None:
    """Refuse an ``--out`` whose weights or sidecar would overwrite an input (``X.pt`` writes ``X.json``)."""
    if out.suffix != ".pt":
        raise UserError(f"--out {out}: a weights file must end in .pt (its sidecar is the same name with .json)")
    for written in (out, sidecar(out)):
        for given in inputs:
            if written.resolve() == given.resolve():
                raise UserError(f"--out {out} would overwrite the input {given} (it writes {out.name} and "
                                f"{sidecar(out).name}): choose another name, e.g. {out.with_suffix('')}.qnas.pt")


def calibrate_file(subnet_path: Path, supernet: Path | None = None, data_spec: str | None = None,
                   calib_images: int = CALIB_IMAGES, out: Path | None = None, device: str = "cpu",
                   eval_images: int | None = None, runtime: str = "xnnpack",
                   evaluate_splits: bool = True) -> tuple[Subnet, dict[str, Any], Dataset]:
    """``qnas calibrate``: subnet.json -> calibrated static int8 subnet, saved with its accuracy
    (``evaluate_splits=False``: without, for a caller that scores the subnet itself, as export does)."""
    from .space import read_structured

    check_target(runtime)
    check_count("--calib-images", calib_images)
    check_count("--eval-images", eval_images, EVAL_IMAGES_HINT)
    subnet_path = Path(subnet_path)
    raw = read_structured(subnet_path, "subnet file")
    net_path, recorded_sha = resolve_supernet(raw, subnet_path, supernet)
    out = Path(out) if out else default_output(subnet_path)
    check_outputs(out, [subnet_path, net_path, sidecar(net_path)])
    net, net_meta = load_supernet(net_path, recorded_sha)
    arch = Arch.from_dict(raw, net.space)
    check_serves(net_meta, arch.key, net_path)  # a fine-tuned supernet holds one subnet, no other
    spec = calibration_data_spec(data_spec, net_meta)
    data = load_dataset(spec, load_size=max(net.space.resolutions))
    check_data_fits(data, net.in_channels, net.num_classes)
    sub = calibrated_subnet(net, arch, data, calib_images, device)
    def score(split: ImageSource) -> float | None:
        return evaluate(sub, split, data, arch.resolution, device, eval_images, runtime=runtime) if evaluate_splits else None

    acc = {"test_top1": score(data.test), "search_top1": score(data.search)}
    meta = save_weights(out, {
        "subnet": sub.state_dict(), "arch": arch.to_dict(net.space), "space": net.space.to_dict(),
        "in_channels": net.in_channels, "num_classes": net.num_classes, "quant": asdict(net.cfg),
    }, {
        "kind": "qnas.calibrated_subnet", "arch": arch.to_dict(net.space), "arch_key": arch.key,
        "supernet": {"path": str(net_path), "sha256": net_meta["weights"]["sha256"]},
        "data": data.describe(), "calib_images": calib_images, "quant": asdict(net.cfg),
        "calibration": calibration_record(net_meta["weights"]["sha256"], spec, calib_images),
        "accuracy": {**acc, "kind": f"exact int8 ({runtime})" if net.cfg.enabled else
                     "fake-quant, convs only" if net.cfg.quantized else "float", "runtime": runtime,
                     "eval_images": eval_images},
    })
    return sub, meta, data


def default_output(subnet_path: Path) -> Path:
    """``subnet.json`` -> ``subnet.qnas.pt`` (sidecar ``subnet.qnas.json``)."""
    return Path(subnet_path).with_suffix(".qnas.pt")


def load_calibrated(path: Path) -> tuple[Subnet, dict[str, Any]]:
    """Rebuild a calibrated subnet from ``subnet.qnas.pt`` (verified; no code unpickled)."""
    payload, meta = load_weights(path)
    try:
        space = SearchSpace.from_dict(payload["space"])
        arch = Arch.from_dict(payload["arch"], space)
        shell = Supernet(space, int(payload["in_channels"]), int(payload["num_classes"]), QuantConfig(**payload["quant"]))
        sub = shell.extract(arch)
        sub.load_state_dict(payload["subnet"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path} is not a calibrated qnas subnet: {str(e).splitlines()[0][:200]}") from None
    return sub.eval(), meta
