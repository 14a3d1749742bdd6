"""``qnas finetune``: one searched subnet trained on from its inherited weights.

A subnet inherited from the supernet scores about 2 pp below the same architecture trained alone
(BENCHMARKS.md §1): its weights are shared with every other subnet. A short fine-tune of that one
subnet, starting from those weights, closes the gap (BENCHMARKS.md "Fine-tuning").

The fine-tune is ``qnas train``'s loop (``train.train_loop``) on one subnet (``alone``): the
supernet's own ``QuantConfig`` (fake quant, the batch-statistics fold, its scale mode), the same
data order, augmentation, checkpoints, resume, Ctrl-C, metrics.jsonl and torchrun. What differs:

- the start: the supernet's weights, not a fresh network (no float phase, no scale init);
- the loss: in-place distillation from the supernet's largest subnet as a frozen teacher
  (``--teacher largest``): extracted from the original weights, BN calibrated as for export,
  run in eval mode under ``no_grad`` and never updated; ``--teacher none`` trains on the labels;
- the schedule: its own peak learning rate (measured), warm-up then cosine decay to zero, and no weight
  decay: decay would also shrink the parts of shared tensors this subnet does not use, and only
  its own slices may move (the others get exactly zero gradient, so SGD leaves them bit for bit;
  a ``--kernel-transform`` supernet's transforms on its path move with them);
- the result: ``supernet.pt`` is the original supernet with this subnet's slices fine-tuned,
  marked ``finetuned_for`` (``lineage``: search and other subnets are refused), and
  ``subnet.json`` names it (path + sha256) with a ``finetune`` lineage block, so that
  ``qnas calibrate`` and ``qnas export`` take it as they take any subnet.json.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .calibrate import (calibrated_subnet, calibration_data_spec, check_data_fits, evaluate, resolve_supernet,
                        subnet_document)
from .checkpoint import atomic_write, save_weights, write_json
from .data import Dataset, load_dataset, to_input
from .errors import UserError, choice_error
from .event_log import open_event_log
from .guard import CollapseGuard
from .layers import set_runtime
from .lineage import FINETUNED_FOR, check_serves, finetuned_for, original_supernet
from .run_folder import (check_fresh, check_resumable, checkpoint_to_resume, remove_temp_files, save_checkpoint,
                         start_afresh, truncate_metrics)
from .space import Arch, SearchSpace, read_structured, sample
from .supernet import Supernet, load_supernet
from .train import (Dist, Phase, StepCallback, Teacher, TrainConfig, epoch_steps, leave_distributed, make_optimizer, plan_record,
                    resolve_device, setup_distributed, supernet_payload, train_loop)

# Measured on the default `small` supernet (2,800 steps; benchmarks/finetune.py, BENCHMARKS.md
# "Fine-tuning"): a quarter of the stand-alone run's 2,800 steps, the most the target allows.
# Every curve still rises at the end of the schedule (subnet #19 at peak lr 0.1: 89.3% at 400 of 700 steps
# mid-schedule, 90.1% at 700), so a shorter default would give up accuracy; about 2 minutes of the
# 2-core host for a mid-sized `small` subnet.
DEFAULT_FINETUNE_STEPS = 700
TEACHERS = ("largest", "none")
RESULT_SUBNET = "subnet.json"  # the fine-tuned subnet's file in the run folder, beside supernet.pt


@dataclass
class FinetuneConfig(TrainConfig):
    """``TrainConfig`` for one subnet (``subnet``: its subnet.json) started from its supernet.

    ``space`` and ``quant`` are the supernet's (set by ``finetune``); epochs, float phases and
    the sandwich's random subnets do not apply."""

    data: str | None = None  # default: the data the supernet was trained on
    out: str | None = None  # default: beside the subnet file, <stem>_finetuned/
    steps: int | None = DEFAULT_FINETUNE_STEPS
    lr: float = 0.06  # peak; measured on 8 subnets (BENCHMARKS.md "Fine-tuning"): 0.06 beat 0.1 and 0.03 (0.01 worse)
    weight_decay: float = 0.0  # must stay 0: see the module docstring
    warmup_steps: int = 20
    supernet: str | None = None  # default: the one the subnet file names
    teacher: str = "largest"  # largest: distil from the supernet's largest subnet (frozen) | none: labels only
    # Filled in by ``finetune`` from the inputs; checkpoints record them, so --resume refuses other inputs.
    origin_sha256: str | None = None
    arch_key: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher not in TEACHERS:
            raise choice_error("--teacher", self.teacher, TEACHERS)
        if self.weight_decay != 0:
            raise UserError("finetune: weight decay must be 0: it would also shrink the weights of the other "
                            "subnets that share this one's tensors")
        if self.subnet is None:
            raise UserError("finetune: give the subnet.json to fine-tune")

    RESUME_KEYS = ("space", "data", "quant", "steps", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing",
                   "kd_ratio", "kd_temperature", "warmup_steps", "clip_grad", "seed", "teacher", "origin_sha256", "arch_key")
    LENGTH_KEYS = ("steps",)


def default_out(subnet: Path) -> Path:
    """``search/subnet_1ms.json`` -> ``search/subnet_1ms_finetuned/``."""
    return Path(subnet).with_name(Path(subnet).stem + "_finetuned")


def check_teacher(teacher: str, meta: dict[str, Any], arch: Arch, space: SearchSpace, path: Path) -> None:
    """A teacher the supernet cannot serve: the largest subnet when it is the subnet itself (it
    would be distilled from its own starting point, which only holds it back), or when the
    supernet is itself fine-tuned (its largest shares the weights that fine-tune moved: it is
    no longer the network that taught the subnets)."""
    if teacher != "largest":
        return
    if arch.key == sample(space, "largest").key:
        raise UserError(f"--teacher largest: the subnet is the supernet's largest, the teacher itself; "
                        "fine-tune it with --teacher none")
    if finetuned_for(meta):
        raise UserError(f"--teacher largest: {path} is itself fine-tuned (for {finetuned_for(meta)}), so its largest "
                        f"subnet is not the trained one; use --teacher none, or start from {original_supernet(meta)}")


def frozen_teacher(supernet: Supernet, data: Dataset, calib_images: int, device: str) -> Teacher:
    """The supernet's largest subnet as a fixed function of a batch: extracted (a copy: the
    supernet is never touched), BN calibrated as export calibrates it, run in eval mode with
    the fake-quant simulation (training's arithmetic), without gradients."""
    largest = sample(supernet.space, "largest")
    net = calibrated_subnet(supernet, largest, data, calib_images, device)
    set_runtime(net, None)
    net.requires_grad_(False)

    @torch.no_grad()
    def logits(x_u8: Tensor) -> Tensor:  # (N, C, H, W) uint8, augmented as the student's
        return net(to_input(x_u8, data, largest.resolution).to(device))
    return logits


@dataclass
class _Inputs:
    """Everything ``finetune`` reads, checked before anything is written."""

    cfg: FinetuneConfig
    arch: Arch
    origin: Supernet  # the supernet as loaded: the teacher's and the inherited accuracy's source, never trained
    origin_path: Path
    data: Dataset
    out: Path


def _read_inputs(cfg: FinetuneConfig) -> _Inputs:
    subnet_path = Path(cfg.subnet)
    raw = read_structured(subnet_path, "subnet file")
    net_path, recorded_sha = resolve_supernet(raw, subnet_path, Path(cfg.supernet) if cfg.supernet else None)
    origin, meta = load_supernet(net_path, recorded_sha)
    arch = Arch.from_dict(raw, origin.space)
    check_serves(meta, arch.key, net_path)
    check_teacher(cfg.teacher, meta, arch, origin.space, net_path)
    out = Path(cfg.out) if cfg.out else default_out(subnet_path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; the run folder must be a folder (or not exist yet)")
    for written, name in ((out / "supernet.pt", "supernet.pt"), (out / RESULT_SUBNET, RESULT_SUBNET)):
        for given in (net_path, subnet_path):
            if written.resolve() == Path(given).resolve():
                raise UserError(f"--out {out} would overwrite the input {given} (it writes {name}): choose another --out")
    spec = calibration_data_spec(cfg.data, meta)
    data = load_dataset(spec, load_size=max(origin.space.resolutions))
    check_data_fits(data, origin.in_channels, origin.num_classes)
    cfg = replace(cfg, out=str(out), data=spec, space=origin.space.name, quant=origin.cfg,
                  origin_sha256=meta["weights"]["sha256"], arch_key=arch.key)
    return _Inputs(cfg, arch, origin, net_path, data, out)


def finetune(cfg: FinetuneConfig, resume: bool = False, on_step: StepCallback | None = None,
             log: Callable[[str], None] = print, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune ``cfg.subnet``; returns the summary also written to ``OUT/supernet.json``
    (``metrics``: inherited and fine-tuned test top-1; ``subnet``: the new subnet.json).

    As ``train.train``: every input is checked before the run folder is touched; an earlier run
    there is refused unless ``overwrite`` (``resume`` continues it); ``Interrupted`` after a
    checkpoint on SIGINT/SIGTERM; every rank leaves the process group on every exit."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    inputs = _read_inputs(cfg)
    d = setup_distributed(inputs.cfg.device if inputs.cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        summary = _finetune(inputs, d, resume, overwrite, on_step, log)
    except BaseException:
        leave_distributed(d, wait=False)
        raise
    leave_distributed(d)
    return summary


def _finetune(inputs: _Inputs, d: Dist, resume: bool, overwrite: bool, on_step: StepCallback | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    cfg, arch, data, out = inputs.cfg, inputs.arch, inputs.data, inputs.out
    space = inputs.origin.space
    device = resolve_device(cfg.device, d)
    steps_per_epoch = epoch_steps(data, cfg, d)
    plan = [Phase("finetune", inputs.origin.cfg, 0, cfg.steps)]
    guard = CollapseGuard(data.num_classes, cfg.collapse_patience, cfg.collapse_give_up)
    origin = inputs.origin.to(device).requires_grad_(False)
    model = copy.deepcopy(origin).requires_grad_(True)
    opt = make_optimizer(model, cfg)
    start = 0
    if resume:
        payload, meta = checkpoint_to_resume(out, log)
        check_resumable(meta, cfg.to_dict(), FinetuneConfig.RESUME_KEYS, space, cfg.space, plan_record(plan),
                        length_keys=FinetuneConfig.LENGTH_KEYS)
        try:
            start = int(payload["step"])
            model.load_state_dict(payload["model"])
            opt.load_state_dict(payload["optimizer"])
            guard.load_state_dict(payload.get("guard"))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"--resume: {meta['weights']['file']} is not a checkpoint of this fine-tune: "
                            f"{str(e).splitlines()[0][:200]}") from None
    else:
        check_fresh(out, overwrite)  # every rank, reading only: all refuse together
        if (out / RESULT_SUBNET).exists() and not overwrite:
            raise UserError(f"{out} holds a {RESULT_SUBNET} (another fine-tune's, or a subnet file): pass --overwrite "
                            "to replace it, or choose a new --out")
    teacher = frozen_teacher(origin, data, cfg.calib_images, device) if cfg.teacher == "largest" else None
    if d.main:
        remove_temp_files(out)
        if resume:
            log(f"resuming from step {start} ({meta['weights']['file']})")
            truncate_metrics(out / "metrics.jsonl", start)
        else:
            start_afresh(out, log, overwrite)
            (out / RESULT_SUBNET).unlink(missing_ok=True)  # --overwrite: the earlier run's result goes with it
            atomic_write(out / "metrics.jsonl", lambda f: None)
            log(f"fine-tuning {arch.key} from {inputs.origin_path} for {cfg.steps} steps "
                f"(teacher: {cfg.teacher}, peak lr {cfg.lr:g})")

    def finish(model: Supernet, opt: torch.optim.Optimizer, total: int) -> dict[str, Any]:
        return _finish(inputs, model, opt, total, plan, guard, device, d.world, log)

    with open_event_log(cfg.tensorboard and d.main, out, purge_step=start + 1 if resume else None,
                        fresh=d.main and not resume) as events:
        return train_loop(cfg, space, arch, out, d, on_step, log, data, plan, guard, model, opt, start, 0, arch,
                          steps_per_epoch, device, events, teacher=teacher, finish=finish)


def _finish(inputs: _Inputs, model: Supernet, opt: torch.optim.Optimizer, total: int, plan: list[Phase],
            guard: CollapseGuard, device: str, world: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Rank 0: the last checkpoint, the inherited and fine-tuned top-1 on the test and the search
    split (calibrated as export calibrates), then supernet.pt (+ sidecar) and subnet.json naming it."""
    cfg, arch, data, out = inputs.cfg, inputs.arch, inputs.data, inputs.out
    save_checkpoint(out, model, opt, total, cfg.to_dict(), guard, plan_record(plan))  # first: a kill during evaluation loses no training
    results = {}
    for how, net in (("inherited", inputs.origin), ("finetuned", model)):
        sub = calibrated_subnet(net, arch, data, cfg.calib_images, device)
        # The search split is held out of training as the test split is: choosing among fine-tuned
        # candidates by it leaves the test figures unbiased (benchmarks.ranking's re-scoring does).
        results[how] = {"arch": arch.key, "test_top1": evaluate(sub, data.test, data, arch.resolution, device, cfg.eval_images),
                        "search_top1": evaluate(sub, data.search, data, arch.resolution, device, cfg.eval_images)}
        log(f"{how} {arch.key}: test top-1 {100 * results[how]['test_top1']:.2f}%, "
            f"search split {100 * results[how]['search_top1']:.2f}%")
    lineage = {"supernet": {"path": str(inputs.origin_path.resolve()), "sha256": cfg.origin_sha256},
               "arch_key": arch.key, "steps": total, "teacher": cfg.teacher, "lr": cfg.lr,
               "kd_ratio": cfg.kd_ratio if cfg.teacher != "none" else None, "batch_size": cfg.batch_size,
               "world_size": world, "seed": cfg.seed, "data": data.describe(), "eval_images": cfg.eval_images,
               "test_top1": {how: r["test_top1"] for how, r in results.items()},
               "search_top1": {how: r["search_top1"] for how, r in results.items()}}
    meta = save_weights(out / "supernet.pt", {**supernet_payload(model), FINETUNED_FOR: arch.key}, {
        "kind": "qnas.supernet", "space": model.space.to_dict(), "config": cfg.to_dict(), "data": data.describe(),
        "steps": total, "world_size": world, "metrics": results, "quant": asdict(model.cfg), "phases": plan_record(plan),
        "collapse_events": guard.events, FINETUNED_FOR: arch.key, "finetune": lineage,
    })
    write_json(out / RESULT_SUBNET, {**subnet_document(arch, model.space, "supernet.pt", meta["weights"]["sha256"]),
                                     "finetune": lineage})
    log(f"wrote {out / RESULT_SUBNET} (its supernet: {out / 'supernet.pt'}); export it with: qnas export {out / RESULT_SUBNET}")
    return {**meta, "subnet": str(out / RESULT_SUBNET)}
