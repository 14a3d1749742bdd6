"""Supernet training: the sandwich rule with in-place distillation (AttentiveNAS §C).

Each step trains the largest subnet on the labels, then the smallest and ``num_random`` random
subnets on ``(1-β)·CE + β·T²·KL`` against the largest's logits, accumulating gradients, then takes
one SGD step. In int8 mode every subnet is the fully quantized network (see ``layers``).
``subnet`` trains one subnet alone instead, with the same recipe: the stand-alone baseline that
the supernet's ranking of subnets is measured against.

An int8 run is the paper's recipe in two phases of one run (QuantNAS §4.2): a float supernet for
``float_steps``, then the fully int8 supernet initialised from it (weights, BN, and the scale
predictor's theta from the float gamma and the batch sigma) for the rest of ``steps``. Each phase
has its own warm-up and cosine schedule and its own optimizer; the step count, the data order and
the checkpoints run through both. ``init`` (a float supernet from elsewhere) skips the float phase.

Determinism is by construction: the data order, the augmentation and the sampled subnets of a
step are pure functions of (seed, draw, rank), and the learning rate of the step within its phase,
so a resumed run replays exactly what an uninterrupted one would have done, across the phase
boundary too (the int8 phase's initialisation is a pure function of the float weights). The draw
is the step within its phase for a supernet (``draws="phase"``): the int8 phase retraces the float
phase's first batches and subnets, so a whole run is bit for bit its float phase then an ``init``
run of the int8 steps, and ranks subnets better than one that draws on (issue 31). A subnet alone
draws by the run's step (``draws="run"``), the recipe its committed stand-alone truth was trained with.

Step sizes take bounded steps (``optimizer_step``): a step size that SGD with momentum drives
through zero leaves its layer's weights all clipped to +-127 * 1e-8, i.e. a layer that outputs
its bias alone; that is how the int8-from-scratch runs collapsed to chance. See ``guard`` for the
check that stops a run that collapses anyway.

Multi-process (``torchrun``): gradients are averaged with one all-reduce per step (any backend,
gloo on CPU included); the same subnets are trained on every rank, each on its own data shard.
"""
from __future__ import annotations

from datetime import timedelta

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .calibrate import EVAL_IMAGES_HINT, calibrated_subnet, evaluate
from .checkpoint import atomic_write, save_weights
from .cost import arch_cost
from .data import Dataset, augment, calibration_indices, epoch_batches, load_dataset, to_input
from .errors import UserError, check_count
from .event_log import open_event_log
from .diagnostics import grad_norms, layer_diagnostics
from .guard import CollapseGuard, TrainingCollapsed, scales_finite
from .layers import QConvBN, QLinear, QuantInit, init_scales, keep_scales_positive
from .quant import QuantConfig
from .run_folder import (Interrupted, StopFlag, append_metrics, check_fresh, check_resumable, checkpoint_to_resume, ckpt_dir,
                         remove_temp_files, save_checkpoint, start_afresh, truncate_metrics)
from .sampling import Size, candidates, check_sampling
from .space import Arch, SearchSpace, load_arch, load_space, sample
from .supernet import Supernet, load_supernet

# The default supernet run, measured on Fashion-MNIST `small` (2 CPU cores; BENCHMARKS.md §1, "The
# float-heavy recipe becomes the default"): 2800 float steps then 700 int8 steps at batch 64 reach
# 90.5-90.7% / 88.2-88.8% int8 test top-1 (largest / smallest, three seeds) in 14-15 minutes alone.
# A float step costs half an int8 one here and the ranking error is made in the float phase, so at
# the same time as the earlier 1400 + 1400 it is more accurate (+0.28 / +0.22 pp, the same three
# seeds) and ranks subnets better (Kendall tau +0.10, paired 90% interval +0.01..+0.19; issue 31).
# Its int8 phase replays the float phase's first draws (draws="phase"): 90.5-90.7% / 88.5-88.9%, and
# tau +0.408 against +0.337 for the same phases drawing on (paired +0.070, +0.02..+0.12, three seeds).
DEFAULT_STEPS = 3500
FLOAT_SHARE = 0.8  # of --steps, the float phase's default length
# A subnet trained alone (--subnet) keeps the recipe the committed stand-alone truth was trained
# with (benchmarks/data/standalone_*.json records it, and reuse checks it): 1400 + 1400 steps.
SUBNET_STEPS = 2800
SUBNET_FLOAT_SHARE = 0.5
DRAWS = ("phase", "run")  # see TrainConfig.draws
SCALE_STEP_LIMIT = 2.0  # an optimizer step changes a step size by at most this factor (see optimizer_step)


@dataclass
class TrainConfig:
    space: str = "small"
    data: str = "fashion-mnist"
    out: str = "runs/default"
    quant: QuantConfig = field(default_factory=QuantConfig)
    epochs: int | None = None  # the run's length in passes over the training split (instead of steps)
    steps: int | None = None  # the run's length in steps, both phases together (default DEFAULT_STEPS; SUBNET_STEPS alone)
    float_steps: int | None = None  # int8 runs: float steps first (None: FLOAT_SHARE of the steps, SUBNET_FLOAT_SHARE
    # alone; 0: int8 from scratch)
    batch_size: int = 64  # per process
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5  # not applied to BN parameters, biases or scales
    label_smoothing: float = 0.1
    num_random: int = 1  # random subnets per step besides the largest and the smallest
    sampling: str = "uniform"  # how each random subnet is drawn: uniform | stratified | kernels | worst | best (see ``sampling``)
    sampling_k: int = 3  # worst / best: candidates scored per random subnet
    kernel_transform: bool = False  # smaller depthwise kernels through OFA's learned transforms (``layers.QConvBN``)
    separate_kernels: bool = False  # or each smaller depthwise kernel with weights of its own (``layers.QConvBN``)
    kd_ratio: float = 0.5  # β (0.9 lost 1.5 pp on the smallest subnet: a short run's largest is a weak teacher)
    kd_temperature: float = 1.0  # T
    warmup_steps: int = 20  # per phase
    clip_grad: float = 5.0
    seed: int = 0
    draws: str | None = None  # what indexes a step's batch, augmentation and subnets: its step within its phase
    # ("phase": the int8 phase replays the float phase's first draws) or in the run ("run"); None: phase
    # for a supernet, run for a subnet alone (the stand-alone truth's recipe)
    device: str = "auto"
    init: str | None = None  # float supernet to start an int8 run from
    subnet: str | None = None  # a subnet.json of the space: train that network alone (the stand-alone baseline)
    ckpt_every: int = 100  # steps
    eval_images: int | None = None  # limit the final test evaluation (None: whole test split)
    calib_images: int = 2000
    log_every: int = 10
    collapse_patience: int = 3  # logged steps at chance that make a collapse event
    collapse_give_up: int = 10  # logged steps at chance after which the run stops
    tensorboard: bool = True  # also write metrics.jsonl's rows as TensorBoard events in out (rank 0); not in RESUME_KEYS

    def __post_init__(self) -> None:
        if isinstance(self.quant, dict):
            self.quant = QuantConfig(**self.quant)
        for name in ("epochs", "batch_size", "ckpt_every", "log_every", "calib_images", "steps", "collapse_patience",
                     "collapse_give_up"):
            check_count(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.steps is not None and self.epochs is not None:
            raise UserError("--steps and --epochs both set the run's length: give one of them")
        if self.float_steps is not None:
            if isinstance(self.float_steps, bool) or not isinstance(self.float_steps, int) or self.float_steps < 0:
                raise UserError(f"--float-steps must be an integer >= 0, got {self.float_steps}")
            if self.float_steps and (self.init or not self.quant.quantized):
                raise UserError("--float-steps: " + ("--init already gives the float start; drop one of them" if self.init
                                                     else "--quant none trains float only; set its length with --steps"))
            if self.steps is not None and self.float_steps >= self.steps:
                raise UserError(f"--float-steps {self.float_steps} leaves no int8 steps of --steps {self.steps}")
        if self.num_random < 0 or self.warmup_steps < 0:
            raise UserError("--num-random and --warmup-steps must be >= 0")
        check_sampling(self.sampling, self.sampling_k)
        if self.kernel_transform and self.separate_kernels:
            raise UserError("--kernel-transform and --separate-kernels are two ways to make a smaller kernel: choose one")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        check_count("--eval-images", self.eval_images, EVAL_IMAGES_HINT)
        if not 0 <= self.seed < 2**32:  # seeds are mixed with step numbers into 64-bit generator seeds
            raise UserError(f"--seed must be an integer in [0, 2^32), got {self.seed}")
        if not 0 <= self.kd_ratio <= 1:
            raise UserError(f"--kd-ratio must lie in [0, 1], got {self.kd_ratio}")
        if self.init and not self.quant.quantized:
            raise UserError("--init loads a float supernet into an int8 run; it needs --quant int8 (or convs)")
        if self.draws is None:
            self.draws = "run" if self.subnet else "phase"
        if self.draws not in DRAWS:
            raise UserError(f"--draws must be one of {', '.join(DRAWS)}, got {self.draws!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Fields that must match for --resume to continue the same run.
    RESUME_KEYS = ("space", "data", "quant", "epochs", "steps", "float_steps", "batch_size", "lr", "momentum", "weight_decay",
                   "label_smoothing", "num_random", "sampling", "sampling_k", "kernel_transform", "separate_kernels", "kd_ratio", "kd_temperature",
                   "warmup_steps", "clip_grad", "seed", "draws", "init", "subnet")
    # The options the resolved phase plan stands for, where a checkpoint records one.
    LENGTH_KEYS = ("steps", "float_steps", "epochs")


@dataclass(frozen=True)
class Phase:
    """Steps ``[start, start + steps)`` of a run, trained with ``quant``."""

    name: str  # "float" | "int8"
    quant: QuantConfig
    start: int
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps


def plan_record(plan: list[Phase]) -> list[dict[str, Any]]:
    """A plan as checkpoints and supernet.json record it."""
    return [{"name": ph.name, "steps": ph.steps} for ph in plan]


def phase_plan(cfg: TrainConfig, steps_per_epoch: int) -> list[Phase]:
    """The phases of a run: float then int8 (the default), int8 alone (--init, --float-steps 0), or float alone."""
    alone = cfg.subnet is not None
    total = cfg.steps or (cfg.epochs * steps_per_epoch if cfg.epochs else SUBNET_STEPS if alone else DEFAULT_STEPS)
    if not cfg.quant.quantized:
        return [Phase("float", cfg.quant, 0, total)]
    share = SUBNET_FLOAT_SHARE if alone else FLOAT_SHARE
    n_float = 0 if cfg.init else (int(share * total) if cfg.float_steps is None else cfg.float_steps)
    if n_float >= total:
        raise UserError(f"--float-steps {n_float} leaves no int8 steps of the run's {total}")
    int8 = Phase("int8", cfg.quant, n_float, total - n_float)
    return [Phase("float", replace(cfg.quant, mode="none"), 0, n_float), int8] if n_float else [int8]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


LEAVE_TIMEOUT_S = 10  # how long a rank stopping on an error waits for the others before leaving


def leave_distributed(d: Dist, wait: bool = True) -> None:
    """Leave the process group, on every exit path. A rank that exits with its gloo group still
    open can abort at interpreter exit ("terminate called without an active exception") while
    another rank is still writing, which torchrun reports as a failed run (gloo's worker threads
    outlive the interpreter: pytorch/pytorch#190489, #179291). ``wait``: first wait for every rank
    (the normal end); False on an error path: wait at most ``LEAVE_TIMEOUT_S`` (a rank that died
    or stopped elsewhere would leave a plain barrier waiting forever)."""
    if d.world > 1 and dist.is_initialized():
        if wait:
            dist.barrier()
        else:  # ranks that stop together (a collapse all see, a signal) still meet, briefly: a rank that
            try:  # destroys its group while a peer is mid-collective aborts at exit all the same
                dist.monitored_barrier(timeout=timedelta(seconds=LEAVE_TIMEOUT_S))
            except Exception:  # noqa: BLE001 - a peer that died or never comes: leave anyway
                pass
        dist.destroy_process_group()


def resolve_device(device: str, d: Dist) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and d.world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', d.rank)) % max(torch.cuda.device_count(), 1)}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    return device


def epoch_steps(data: Dataset, cfg: TrainConfig, d: Dist) -> int:
    """Optimizer steps per pass over the training split (all ranks together); at least one."""
    steps = len(data.train) // (cfg.batch_size * d.world)
    if steps == 0:
        raise UserError(f"--batch-size {cfg.batch_size} x {d.world} processes exceeds the {len(data.train)} training images")
    return steps


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / total))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)


def step_sizes(model: nn.Module) -> list[nn.Parameter]:
    """The learned quantization scales: activation and weight step sizes, the scale predictor's theta."""
    return [p for m in model.modules() if isinstance(m, QuantInit) for p in m.scale_params()]


@torch.no_grad()
def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """``opt.step()``, with each step size moving by at most a factor SCALE_STEP_LIMIT.

    Why: a step size is a positive number of the order of its tensor's range / 127, often 1e-3,
    while SGD moves it by ``lr * grad`` plus momentum: from scratch, in the first hundred steps,
    that is as large as the step size itself, and momentum carries it through zero. Projected
    back to a 1e-8 floor, a weight scale makes every folded weight clip to +-127e-8 (the layer
    outputs its bias alone, a constant); and the momentum still points down, so it stays there
    for steps. On a layer every path goes through (the stem, a stage's first block, the head)
    the logits become constant and the loss is exactly ln(classes) until momentum turns.
    A multiplicative bound keeps every step size positive (and far from the floor within a few
    steps), and where the bound holds the parameter's momentum is dropped, so no stale velocity
    keeps pushing it. The 1e-8 floor stays for what the bound alone allows: a theta_i pushed down
    for hundreds of steps (a channel whose sigma_i is tiny) halves its way to a float underflow.
    """
    scales = [p for p in step_sizes(model) if p.grad is not None]  # a float supernet's are unused
    before = [p.detach().clone() for p in scales]
    opt.step()
    for p, old in zip(scales, before):
        lo, hi = old / SCALE_STEP_LIMIT, old * SCALE_STEP_LIMIT
        held = (p < lo) | (p > hi)
        p.copy_(torch.minimum(torch.maximum(p, lo), hi))
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            buf.masked_fill_(held, 0.0)
    keep_scales_positive(model)  # halving step after step still underflows: a theta_i of a channel with a tiny sigma_i reached 0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/FC weights only: not on BN, biases, LSQ scales or the scale predictor."""
    decay = [w for m in model.modules() if isinstance(m, QConvBN) for w in (m.weight, *m.own_kernels.values())]
    decay += [m.fc.weight for m in model.modules() if isinstance(m, QLinear)]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def sandwich(space: SearchSpace, seed: int, step: int, num_random: int, alone: Arch | None = None,
             sampling: str = "uniform", k: int = 3, size: Size | None = None) -> list[list[Arch]]:
    """The subnets of one step, each as its candidates: the largest, the smallest, ``num_random``
    random slots drawn by ``sampling`` (one candidate, or ``k`` for worst/best to choose from, by
    ``size`` in MFLOPs); or ``alone`` by itself (stand-alone training of one subnet: no sandwich,
    no distillation)."""
    if alone is not None:
        return [[alone]]
    rng = random.Random(seed * 1_000_003 + step)
    fixed = [[sample(space, "largest")], [sample(space, "smallest")]]
    return fixed + [candidates(space, rng, sampling, k, size) for _ in range(num_random)]


@torch.no_grad()
def pick_by_loss(model: Supernet, archs: list[Arch], x_u8: Tensor, data: Dataset, soft: Tensor, y: Tensor,
                 cfg: TrainConfig, device: str, d: Dist | None = None) -> Arch:
    """WorstUp / BestUp: the candidate with the highest / lowest training loss on this step's images
    (under torchrun, on all ranks' images: every rank trains the same subnet). The scoring passes
    leave BN's running statistics as they were (only trained subnets move them)."""
    if len(archs) == 1:
        return archs[0]
    with bn_statistics_kept(model):
        losses = torch.stack([distill_loss(model(to_input(x_u8, data, a.resolution).to(device), a), soft, y, cfg) for a in archs])
    if d is not None and d.world > 1:
        dist.all_reduce(losses)
    losses = losses.tolist()
    pick = max if cfg.sampling == "worst" else min
    return archs[pick(range(len(archs)), key=losses.__getitem__)]


def distill_loss(logits: Tensor, teacher: Tensor, labels: Tensor, cfg: TrainConfig) -> Tensor:
    t = cfg.kd_temperature
    kd = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    ce = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    return (1 - cfg.kd_ratio) * ce + cfg.kd_ratio * kd


def _allreduce_grads(model: nn.Module, d: Dist) -> None:
    """Average gradients over ranks in one call (parameters a rank did not use count as zero)."""
    if d.world == 1:
        return
    params = list(model.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= d.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[offset : offset + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def check_replicas(model: nn.Module, d: Dist) -> None:
    """Every rank ends with rank 0's parameters (same start, same averaged gradients, same steps).

    Checked once, by checksum, after training: a broken gradient all-reduce would otherwise let
    the ranks drift apart while rank 0 saves its own model as if nothing had happened.
    """
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    reference = sums.clone()
    dist.broadcast(reference, 0)
    differ = (sums != reference).sum().reshape(1).float()
    dist.all_reduce(differ)
    if differ.item():
        raise RuntimeError(f"the {d.world} training processes ended with different weights "
                           f"({int(differ.item())} parameter tensors differ from rank 0's): gradients were not averaged")


# ---- the loop ---------------------------------------------------------------------------------

StepCallback = Callable[[int, int, dict[str, float]], None]
Teacher = Callable[[Tensor], Tensor]  # a step's augmented uint8 images -> the logits to distill from (no gradient)


def train(cfg: TrainConfig, resume: bool = False, on_step: StepCallback | None = None,
          log: Callable[[str], None] = print, overwrite: bool = False) -> dict[str, Any]:
    """Train a supernet per ``cfg``; returns the summary also written to ``OUT/supernet.json``.

    ``on_step(step, total, metrics)`` after every step; ``metrics["phase"]`` names the phase.
    Raises ``Interrupted`` on SIGINT/SIGTERM (after a checkpoint) and ``TrainingCollapsed``.
    Every input is checked before the run folder is touched; an earlier run there, finished or
    not, is refused unless ``overwrite`` (``resume`` continues it instead). Under torchrun every
    exit, an error's too, leaves the process group (``leave_distributed``).
    """
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    space = load_space(cfg.space)
    alone = load_arch(Path(cfg.subnet), space) if cfg.subnet else None
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; the run folder must be a folder (or not exist yet)")
    d = setup_distributed(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        summary = _train(cfg, space, alone, out, d, resume, overwrite, on_step, log)
    except BaseException:
        leave_distributed(d, wait=False)
        raise
    leave_distributed(d)
    return summary


def _train(cfg: TrainConfig, space: SearchSpace, alone: Arch | None, out: Path, d: Dist, resume: bool, overwrite: bool,
           on_step: StepCallback | None, log: Callable[[str], None]) -> dict[str, Any]:
    anchor = alone or sample(space, "largest")  # the subnet trained on the labels: scales initialise on it, diagnostics run it
    device = resolve_device(cfg.device, d)
    data = load_dataset(cfg.data, load_size=max(space.resolutions))
    steps_per_epoch = epoch_steps(data, cfg, d)
    plan = phase_plan(cfg, steps_per_epoch)
    total = plan[-1].end
    guard = CollapseGuard(data.num_classes, cfg.collapse_patience, cfg.collapse_give_up)

    # Everything is checked before the folder is touched: a refused run changes nothing there.
    start, first = 0, 0  # the step and the phase (index in plan) to continue from
    if resume:
        payload, meta = checkpoint_to_resume(out, log)
        check_resumable(with_added_defaults(meta), cfg.to_dict(), TrainConfig.RESUME_KEYS, space, cfg.space, plan_record(plan),
                        length_keys=TrainConfig.LENGTH_KEYS)
        try:
            start = int(payload["step"])
            first = [ph.name for ph in plan].index(payload.get("phase", plan[-1].name))
            model = _new_model(space, data, plan[first], cfg, device)
            opt = make_optimizer(model, cfg)
            model.load_state_dict(payload["model"])
            opt.load_state_dict(payload["optimizer"])
            guard.load_state_dict(payload.get("guard"))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"--resume: {meta['weights']['file']} is not a checkpoint of this run: "
                            f"{str(e).splitlines()[0][:200]}") from None
    else:
        init = float_init(Path(cfg.init), space, data, cfg.kernel_transform, cfg.separate_kernels) if cfg.init else None
        check_fresh(out, overwrite)  # every rank, reading only: all refuse together
    if d.main:
        remove_temp_files(out)
        if not resume:
            start_afresh(out, log, overwrite)
    if resume:
        log(f"resuming from step {start} ({meta['weights']['file']})")
    else:
        model = _new_model(space, data, plan[0], cfg, device)
        if init is not None:
            _, unexpected = model.load_state_dict(init.state_dict(), strict=False)  # float_init checked that it fits
            assert not unexpected, unexpected  # a float supernet holds a subset of the int8 one's tensors
        if plan[0].quant.quantized:
            init_quant_scales(model, data, space, device, arch=anchor)
        opt = make_optimizer(model, cfg)
    _broadcast(model, d)
    if d.main and not resume:
        atomic_write(out / "metrics.jsonl", lambda f: None)
    elif d.main:
        truncate_metrics(out / "metrics.jsonl", start)
    if len(plan) > 1 and d.main and start == 0:
        log(f"float phase: steps 1-{plan[0].end}; then the int8 supernet initialised from it: steps {plan[1].start + 1}-{total}")
    # metrics.jsonl's rows again, for TensorBoard: a resumed run's writer purges what the
    # interrupted one logged past the checkpoint (the rows truncate_metrics dropped); a new run
    # removes an earlier run's event files.
    with open_event_log(cfg.tensorboard and d.main, out, purge_step=start + 1 if resume else None,
                        fresh=d.main and not resume) as events:
        return train_loop(cfg, space, alone, out, d, on_step, log, data, plan, guard, model, opt, start, first, anchor,
                          steps_per_epoch, device, events)


def train_loop(cfg, space, alone, out, d, on_step, log, data, plan, guard, model, opt, start, first, anchor,
               steps_per_epoch, device, events, teacher: Teacher | None = None,
               finish: Callable[[Supernet, torch.optim.Optimizer, int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """A run's steps from ``start`` (phase ``first``) to the end, then (rank 0) the final evaluation.

    ``teacher`` and ``finish`` are ``qnas finetune``'s hooks: the logits ``alone`` is distilled
    from (see ``train_step``), and what rank 0 does at the end instead of ``_finish`` (given the
    model, its optimizer and the last step; returns the summary, with ``metrics`` as ``_finish``'s)."""
    total = plan[-1].end
    t_last, seen = time.perf_counter(), 0
    with StopFlag() as stop:
        for i in range(first, len(plan)):
            ph = plan[i]
            if i > first:  # the phase boundary: the int8 supernet starts from the float one
                model = int8_from_float(model, ph.quant, data, space, device, anchor)
                _broadcast(model, d)
                opt = make_optimizer(model, cfg)
            model.train()
            cached_epoch, batches = -1, []  # each phase draws its own epochs under draws="phase"
            for step in range(max(start, ph.start), ph.end):
                draw = step - ph.start if cfg.draws == "phase" else step
                epoch, k = divmod(draw, steps_per_epoch)
                if epoch != cached_epoch:
                    batches, cached_epoch = epoch_batches(len(data.train), cfg.batch_size, cfg.seed, epoch, d.rank, d.world), epoch
                lr = lr_at(step - ph.start, ph.steps, cfg)
                metrics = train_step(model, opt, data, space, batches[k], draw, total, cfg, d, device, lr=lr, alone=alone,
                                     teacher=teacher)
                metrics["phase"] = ph.name
                seen += cfg.batch_size * d.world
                requested = _sync_flag(stop.requested, d)
                logged = (step + 1) % cfg.log_every == 0 or step + 1 == ph.end
                verdict = None
                if d.main and (logged or not math.isfinite(metrics["loss"])):
                    verdict = guard.check(metrics, scales_finite(model))
                if d.main and logged:
                    now = time.perf_counter()
                    metrics["img_per_s"] = seen / max(now - t_last, 1e-9)
                    t_last, seen = now, 0
                    append_metrics(out / "metrics.jsonl", {"step": step + 1, "epoch": epoch, **metrics})
                    events.scalars(ph.name, {**metrics, "sec_per_step": cfg.batch_size * d.world / metrics["img_per_s"]}, step + 1)
                if verdict:
                    _report_collapse(verdict, guard, model, data, anchor, batches[k], step + 1, metrics, out, device, log)
                collapsed = _sync_flag(verdict in ("stop", "non-finite"), d)
                if on_step and d.main:
                    on_step(step + 1, total, metrics)
                if collapsed:
                    raise TrainingCollapsed(step + 1, guard.describe(verdict, metrics) if d.main else "on rank 0", str(out))
                boundary = step + 1 == ph.end and i + 1 < len(plan)
                if d.main and (((step + 1) % cfg.ckpt_every == 0 and step + 1 < total) or requested or boundary):
                    save_checkpoint(out, model, opt, step + 1, cfg.to_dict(), guard, plan_record(plan))
                    events.flush()  # what a kill loses is past the checkpoint: purged on --resume anyway
                if d.main and boundary:
                    _save_float_supernet(model, data, space, cfg, out, step + 1)
                if requested:
                    if d.world > 1:
                        dist.barrier()  # every rank waits for rank 0's checkpoint
                    raise Interrupted(step + 1, ckpt_dir(out))

    if d.world > 1:
        check_replicas(model, d)
        if d.main:
            log(f"all {d.world} processes hold identical weights")
    summary: dict[str, Any] = {}
    if d.main:
        summary = (finish(model, opt, total) if finish else
                   _finish(model, opt, data, space, cfg, out, total, device, log, d.world, guard, alone))
        events.scalars("eval", {f"{how}_test_top1": r["test_top1"] for how, r in summary["metrics"].items()}, total)
    return summary


# Options added after runs could be checkpointed, with the value a run made before them ran under.
ADDED_OPTIONS = {"sampling": "uniform", "sampling_k": 3, "kernel_transform": False, "separate_kernels": False, "draws": "run"}


def with_added_defaults(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's meta with its quantization options (--weight-granularity) and ``ADDED_OPTIONS``
    completed by the values a run checkpointed before they existed ran under: it resumes."""
    config = meta.get("config", {})
    if not isinstance(config, dict):
        return meta
    config = {**ADDED_OPTIONS, **config}
    quant = config.get("quant")
    if isinstance(quant, dict):
        try:
            config["quant"] = asdict(QuantConfig(**quant))
        except (TypeError, UserError):
            pass  # unknown or bad fields: compared as they are, and refused
    return {**meta, "config": config}


def _new_model(space: SearchSpace, data: Dataset, phase: Phase, cfg: TrainConfig, device: str) -> Supernet:
    torch.manual_seed(cfg.seed)
    return Supernet(space, data.in_channels, data.num_classes, phase.quant, cfg.kernel_transform, cfg.separate_kernels).to(device)


def int8_from_float(float_net: Supernet, quant: QuantConfig, data: Dataset, space: SearchSpace, device: str,
                    arch: Arch | None = None) -> Supernet:
    """The int8 supernet that starts from ``float_net`` (QuantNAS §4.2): the same weights and BN,
    and scales from data: activation steps, and theta_i = s_init * sigma_i with s_init the
    MSE-optimal step of the weights folded with the float gamma and this batch's sigma (of ``arch``,
    default the largest subnet)."""
    net = Supernet(space, float_net.in_channels, float_net.num_classes, quant, float_net.kernel_transform,
                   float_net.separate_kernels).to(device)
    _, unexpected = net.load_state_dict(float_net.state_dict(), strict=False)
    assert not unexpected, unexpected  # a float supernet holds a subset of the int8 one's tensors
    init_quant_scales(net, data, space, device, arch=arch)
    return net


def _save_float_supernet(model: Supernet, data: Dataset, space: SearchSpace, cfg: TrainConfig, out: Path, steps: int) -> None:
    """The float phase's supernet, usable as another run's --init (not evaluated: it is a warm start)."""
    save_weights(out / "float_supernet.pt", supernet_payload(model), {
        "kind": "qnas.supernet", "space": space.to_dict(), "config": cfg.to_dict(), "data": data.describe(),
        "steps": steps, "phase": "float", "quant": asdict(model.cfg)})


def _report_collapse(verdict: str, guard: CollapseGuard, model: Supernet, data: Dataset, arch: Arch, idx: Tensor,
                     step: int, metrics: dict[str, Any], out: Path, device: str, log: Callable[[str], None]) -> None:
    """Say it, and write a metrics row ``{"event": verdict, ...}`` with the per-layer diagnostics."""
    row: dict[str, Any] = {"step": step, "event": verdict, "phase": metrics.get("phase"),
                           "loss_largest": metrics["loss_largest"], "acc_largest": metrics["acc_largest"]}
    if verdict == "recovered":
        log(f"step {step}: the largest subnet's loss left chance again ({metrics['loss_largest']:.3f}): recovered")
    else:
        x, _ = data.train.get(idx)
        row.update(grad_norms=grad_norms(model), layers=layer_diagnostics(model, to_input(x, data, arch.resolution).to(device), arch))
        log(f"warning: step {step}: collapse: {guard.describe(verdict, metrics)}; per-layer diagnostics in {out / 'metrics.jsonl'}")
    append_metrics(out / "metrics.jsonl", row)


def _sync_flag(flag: bool, d: Dist) -> bool:
    """Any rank's stop request stops every rank at the same step."""
    if d.world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return t.item() > 0


def train_step(model: Supernet, opt: torch.optim.Optimizer, data: Dataset, space: SearchSpace, idx: Tensor,
               step: int, total: int, cfg: TrainConfig, d: Dist, device: str, lr: float | None = None,
               alone: Arch | None = None, teacher: Teacher | None = None) -> dict[str, float]:
    """One sandwich step on the training images ``idx``: the loop's unit of work (and of the throughput benchmark).

    ``step``: the draw that seeds the step's augmentation and subnets (``TrainConfig.draws``).

    ``lr``: this step's learning rate (default: the schedule of a one-phase run of ``total`` steps).
    ``teacher``: with ``alone``, the logits it is distilled from (``distill_loss``) on this step's
    augmented images, instead of the labels alone (``qnas finetune``'s frozen teacher)."""
    lr = lr_at(step, total, cfg) if lr is None else lr
    for g in opt.param_groups:
        g["lr"] = lr
    x_u8, y = data.train.get(idx)
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1009 + d.rank)
    x_u8 = augment(x_u8, data.pad, data.flip, gen)
    y = y.to(device)
    opt.zero_grad(set_to_none=True)
    soft = None  # the largest subnet's logits, which the others are distilled from
    losses = []
    size = lambda a: arch_cost(space, a, data.in_channels, data.num_classes).mflops  # noqa: E731
    for i, archs in enumerate(sandwich(space, cfg.seed, step, cfg.num_random, alone, cfg.sampling, cfg.sampling_k, size)):
        arch = archs[0] if i == 0 else pick_by_loss(model, archs, x_u8, data, soft, y, cfg, device, d)
        logits = model(to_input(x_u8, data, arch.resolution).to(device), arch)
        if i == 0:
            loss = (distill_loss(logits, teacher(x_u8).to(device), y, cfg) if teacher is not None and alone is not None
                    else F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing))
            soft = logits.detach()
            acc = (logits.argmax(1) == y).float().mean().item()
        else:
            loss = distill_loss(logits, soft, y, cfg)
        loss.backward()
        losses.append(loss.item())
    _allreduce_grads(model, d)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or math.inf).item()
    optimizer_step(model, opt)
    metrics = {"lr": lr, "loss": sum(losses) / len(losses), "loss_largest": losses[0], "acc_largest": acc, "grad_norm": grad_norm}
    if len(losses) > 1:
        metrics["loss_smallest"] = losses[1]
    return metrics


def _broadcast(model: nn.Module, d: Dist) -> None:
    if d.world > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


def float_init(path: Path, space: SearchSpace, data: Dataset, kernel_transform: bool = False,
               separate_kernels: bool = False) -> Supernet:
    """The float supernet of ``--init``, once it fits this run: a float supernet (--quant none, or
    a run's float_supernet.pt) of the same space, for the same input channels and classes. A run
    with ``kernel_transform`` may start from one without (its transforms start at the identity,
    the plain crop that supernet was trained with); the reverse would drop what it learned.
    ``separate_kernels`` must match: the smaller kernels' own weights exist in both or in neither."""
    float_net, _ = load_supernet(path)
    if float_net.cfg.quantized:
        raise UserError(f"--init {path}: expected a float supernet (trained with --quant none, or a run's "
                        f"float_supernet.pt), got a {float_net.cfg.label} one")
    if float_net.kernel_transform and not kernel_transform:
        raise UserError(f"--init {path}: that supernet learned kernel transforms; this run needs --kernel-transform too")
    if float_net.separate_kernels != separate_kernels:
        how = {True: "with", False: "without"}
        raise UserError(f"--init {path}: that supernet was trained {how[float_net.separate_kernels]} --separate-kernels "
                        f"and this run is {how[separate_kernels]}: the two must match")
    if float_net.space.fingerprint != space.fingerprint:
        other = (f"{float_net.space.name!r}" if float_net.space.name != space.name
                 else f"another {space.name!r} (the two differ in their fields)")
        raise UserError(f"--init {path}: that supernet is of space {other}, not this run's --space {space.name!r}")
    differ = [f"{a} {what}" for what, a, b in (("input channels", float_net.in_channels, data.in_channels),
                                                 ("classes", float_net.num_classes, data.num_classes)) if a != b]
    if differ:
        raise UserError(f"--init {path}: that supernet is for {' and '.join(differ)}, but --data {data.spec} has "
                        f"{data.in_channels} input channels and {data.num_classes} classes")
    return float_net


@torch.no_grad()
def init_quant_scales(model: Supernet, data: Dataset, space: SearchSpace, device: str, images: int = 256,
                      arch: Arch | None = None) -> None:
    """Scales from data: activation steps and the scale predictor's s_init (``arch``, default the
    largest subnet, on a seeded batch)."""
    arch = arch or sample(space, "largest")
    x, _ = data.train.get(calibration_indices(data.train, images, seed=1))
    model.train()
    with init_scales(model), bn_statistics_kept(model):  # the init pass must not move BN statistics
        model(to_input(x, data, arch.resolution).to(device), arch)


@contextlib.contextmanager
def bn_statistics_kept(model: nn.Module) -> Iterator[None]:
    """BN's running statistics as they were before the block: for forward passes in train mode
    that only look (scale initialisation, scoring candidates) and must not move them."""
    state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    try:
        yield
    finally:
        model.load_state_dict(state, strict=False)  # in place, those buffers alone


def _finish(model: Supernet, opt, data: Dataset, space: SearchSpace, cfg: TrainConfig, out: Path, total: int,
            device: str, log: Callable[[str], None], world: int = 1, guard: CollapseGuard | None = None,
            alone: Arch | None = None) -> dict[str, Any]:
    """Final weights + sidecar, and the test accuracy of the largest and smallest calibrated subnets
    (of the subnet trained ``alone``)."""
    plan = phase_plan(cfg, len(data.train) // (cfg.batch_size * world))
    save_checkpoint(out, model, opt, total, cfg.to_dict(), guard, plan_record(plan))  # first: a kill during evaluation loses no training
    results = {}
    archs = {"subnet": alone} if alone else {how: sample(space, how) for how in ("largest", "smallest")}
    for how, arch in archs.items():
        sub = calibrated_subnet(model, arch, data, cfg.calib_images, device)
        results[how] = {"arch": arch.key, "test_top1": evaluate(sub, data.test, data, arch.resolution, device, cfg.eval_images)}
        log(f"{how} subnet {arch.key}: test top-1 {results[how]['test_top1']:.4f}")
    meta = save_weights(out / "supernet.pt", supernet_payload(model), {
        "kind": "qnas.supernet", "space": space.to_dict(), "config": cfg.to_dict(), "data": data.describe(),
        "steps": total, "world_size": world, "metrics": results, "quant": asdict(cfg.quant),
        "phases": plan_record(plan),
        "collapse_events": guard.events if guard else 0,
    })
    return meta


def supernet_payload(model: Supernet) -> dict[str, Any]:
    return {"model": model.state_dict(), "space": model.space.to_dict(), "in_channels": model.in_channels,
            "num_classes": model.num_classes, "quant": asdict(model.cfg), "kernel_transform": model.kernel_transform,
            "separate_kernels": model.separate_kernels}
