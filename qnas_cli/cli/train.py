"""``qnas train``: train a supernet (float then fully int8 by default, float only with --quant none)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..quant import QuantConfig
from ..guard import TrainingCollapsed
from ..run_folder import Interrupted
from ..train import DEFAULT_STEPS, FLOAT_SHARE, SUBNET_FLOAT_SHARE, SUBNET_STEPS, TrainConfig, train as run_train
from .common import EXIT_TRAINING_COLLAPSED, console, err_console, interactive, logger, print_json, say

D = TrainConfig()  # defaults shown in --help come from the library's config


def train(
    space: Annotated[str, typer.Option("--space", "-s", help="Search space: tiny, small, mbv3, or a .json/.toml file.")] = D.space,
    data: Annotated[str, typer.Option(help="fashion-mnist | fashion-mnist:DIR | cifar10:DIR | imagefolder:DIR (or imagefolder-rgb:DIR, imagefolder-gray:DIR to convert a mixed set)")] = D.data,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: supernet.pt/.json, metrics.jsonl, ckpt/.")] = Path(D.out),
    quant: Annotated[str, typer.Option(help="int8: the fully quantized supernet (after a float phase, see --float-steps); none: float only; convs: only convs and FCs quantized, BN, adds and pooling float (the partially quantized baseline of BatchQuant/OQA; needs --weight-scale shared; not exportable).")] = "int8",
    act_scheme: Annotated[str, typer.Option(help="symmetric (zero point 0, the paper's) | full-range (zero point -128 after ReLU).")] = "symmetric",
    bn_fold: Annotated[str, typer.Option(help="batch: fold batch statistics (paper §4.1) | moving: fold moving statistics (baseline).")] = "batch",
    weight_scale: Annotated[str, typer.Option(help="predictor: s = mean(theta/sigma) (paper §4.2) | shared: one LSQ scale per layer.")] = "predictor",
    weight_granularity: Annotated[str, typer.Option(help="per-tensor: one weight scale per conv (the paper's) | per-channel: one per output channel "
                                                         "(TFLite's per-axis convention; with the predictor, s_i = theta_i/sigma_i, so BN "
                                                         "calibration changes no integer weight).")] = "per-tensor",
    init: Annotated[Path, typer.Option(help="Start the int8 phase from this float supernet.pt (--quant none, or a run's float_supernet.pt) and skip the float phase.")] = None,
    subnet: Annotated[Path, typer.Option(help="Train this one subnet (a subnet.json of --space) alone, with the same options (default length: see --steps): the stand-alone baseline that supernet rankings are measured against.")] = None,
    steps: Annotated[int, typer.Option(help=f"Optimizer steps of the whole run, float and int8 phases together (default {DEFAULT_STEPS}: "
                                            "about 14 min on 2 CPU cores for 90.6% / 88.5% int8 test top-1 on Fashion-MNIST, small; "
                                            f"{SUBNET_STEPS} with --subnet).")] = None,
    float_steps: Annotated[int, typer.Option(help=f"Of --steps, how many train the float supernet that the int8 one starts from (QuantNAS §4.2) "
                                                  f"(default {FLOAT_SHARE:.0%} of --steps, {SUBNET_FLOAT_SHARE:.0%} with --subnet). 0: int8 from scratch (stable, a little less accurate).")] = None,
    epochs: Annotated[int, typer.Option(help="The run's length in passes over the training split, instead of --steps.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step per process.")] = D.batch_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate (SGD, momentum 0.9, warm-up then cosine, in each phase).")] = D.lr,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warm-up at the start of each phase, in steps.")] = D.warmup_steps,
    num_random: Annotated[int, typer.Option(help="Random subnets per step besides the largest and smallest (sandwich rule).")] = D.num_random,
    sampling: Annotated[str, typer.Option(help="How each random subnet is drawn: uniform (each choice at random) | stratified (uniform over MFLOPs "
                                               "between the smallest and the largest: more of the larger subnets) | kernels (half of them the largest with a random "
                                               "kernel per block, OFA's elastic-kernel stage; runs take 10-20% longer) | small-kernels (half of them the largest's widths, "
                                               "depths and expands with the smallest kernel everywhere, at a random resolution) | worst / best (AttentiveNAS's WorstUp / BestUp: of "
                                               "--sampling-k candidates of one size, the one with the highest / lowest loss on the step's "
                                               "images; k extra forward passes per random subnet).")] = D.sampling,
    sampling_k: Annotated[int, typer.Option(help="worst / best: candidates scored per random subnet.")] = D.sampling_k,
    kernel_transform: Annotated[bool, typer.Option(help="Smaller depthwise kernels through learned transforms of the larger one's "
                                                        "centre (OFA's elastic kernel) instead of the plain centre crop. Exported "
                                                        "subnets hold the transformed kernels: nothing changes downstream.")] = D.kernel_transform,
    separate_kernels: Annotated[bool, typer.Option(help="Each smaller depthwise kernel choice gets weights of its own (shared across widths), "
                                                        "instead of the centre of the larger kernel. Exported subnets hold their own "
                                                        "kernels: nothing changes downstream. Measured: subnets inherit less and rank "
                                                        "worse (BENCHMARKS.md §1).")] = D.separate_kernels,
    kd_ratio: Annotated[float, typer.Option(help="In-place distillation weight beta in (1-beta)*CE + beta*KL(largest || subnet), for all but the largest. "
                                                 "Lower it for short runs, where the largest is still a weak teacher.")] = D.kd_ratio,
    seed: Annotated[int, typer.Option(help="Seed: model init, data order, augmentation, sampled subnets.")] = D.seed,
    draws: Annotated[str, typer.Option(help="What seeds each step's batch, augmentation and subnets: phase (the step within its phase: the "
                                            "int8 phase replays the float phase's first draws, so a run equals its float phase then an --init "
                                            "run; ranks subnets better, BENCHMARKS.md §1) | run (the step in the run). Default: phase for a "
                                            "supernet, run with --subnet (the recipe of the committed stand-alone truth).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = D.device,
    ckpt_every: Annotated[int, typer.Option(help="Checkpoint every N steps (atomic; the last 2 are kept).")] = D.ckpt_every,
    eval_images: Annotated[int, typer.Option(help="Test images for the final evaluation: a seeded, class-stratified subset (default: all).")] = None,
    calib_images: Annotated[int, typer.Option(help="Training images (seeded, class-stratified) for BN calibration before the final evaluation.")] = D.calib_images,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in --out, finished or not: its checkpoints, "
                                                                "supernet.pt and float_supernet.pt are deleted once every option has been "
                                                                "checked. Without it, a used --out is refused.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard", help="Also write TensorBoard event files into --out "
                                                                                "(losses, accuracies, learning rate, step time, per phase; "
                                                                                "metrics.jsonl stays the record): tensorboard --logdir runs/")] = D.tensorboard,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final summary as JSON.")] = False,
) -> None:
    """Train a weight-sharing supernet with the sandwich rule and in-place distillation.

    An int8 run trains a float supernet first, then the fully int8 supernet initialised from it (the paper's recipe), in one run folder; --init or --float-steps 0 skip the float phase.

    A collapse (the largest subnet's loss back at chance, or a NaN) is logged with per-layer diagnostics in metrics.jsonl; a run that does not recover stops with exit code 4.

    Under torchrun every process trains its shard: torchrun --nproc_per_node 2 -m qnas_cli train ...
    Ctrl-C saves a checkpoint; --resume continues exactly where it stopped (across phases too).
    A used --out (a finished run, or an unfinished one) is refused unless --overwrite replaces it.
    """
    cfg = TrainConfig(space=space, data=data, out=str(out),
                      quant=QuantConfig(mode=quant, act_scheme=act_scheme, bn_fold=bn_fold, weight_scale=weight_scale,
                                       weight_granularity=weight_granularity),
                      epochs=epochs, steps=steps, float_steps=float_steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, num_random=num_random,
                      sampling=sampling, sampling_k=sampling_k, kernel_transform=kernel_transform,
                      separate_kernels=separate_kernels, kd_ratio=kd_ratio, seed=seed, draws=draws,
                      device=device, init=str(init) if init else None, subnet=str(subnet) if subnet else None, ckpt_every=ckpt_every, eval_images=eval_images,
                      calib_images=calib_images, tensorboard=tensorboard)
    summary = run_loop("train", lambda on_step, log: run_train(cfg, resume, on_step=on_step, log=log, overwrite=overwrite),
                       json_out)
    if summary is None:
        return
    t = Table(title=escape(f"supernet {out / 'supernet.pt'}"))
    t.add_column("subnet")
    t.add_column("architecture", overflow="fold")  # a key is never cut off (Rich assumes 80 columns off a terminal)
    t.add_column("test top-1", no_wrap=True)
    for how, r in summary["metrics"].items():
        t.add_row(how, r["arch"], f"{100 * r['test_top1']:.2f}%")
    console.print(t)


def run_loop(label: str, run, json_out: bool) -> dict | None:
    """A training command's loop, ``run(on_step, log)`` (train, finetune): a progress bar on a
    terminal, plain lines off one; Ctrl-C is exit 130, a collapse exit 4; with ``--json`` the
    summary is printed. Returns the summary still to be shown as a table, else None (``--json``,
    or a non-zero rank under torchrun)."""
    log = logger(err_console if json_out else console)
    try:
        summary = with_progress(label, run) if interactive() and not json_out else run(plain_logger(log), log)
    except Interrupted as e:
        say(err_console, str(e))
        raise typer.Exit(130) from None
    except TrainingCollapsed as e:
        say(err_console, f"error: {e}")
        raise typer.Exit(EXIT_TRAINING_COLLAPSED) from None
    if summary and json_out:
        print_json(summary)
    return summary if summary and not json_out else None


def with_progress(label: str, run) -> dict:
    """``run(on_step, log)`` (a training loop: train, finetune) under a progress bar on the console."""
    cols = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=console, transient=False) as bar:
        task = bar.add_task(label, total=None, info="")

        def on_step(step: int, total: int, m: dict) -> None:
            info = f"{m['phase']} loss {m['loss']:.3f} acc {100 * m['acc_largest']:.1f}% lr {m['lr']:.4f}"
            if "img_per_s" in m:
                on_step.speed = m["img_per_s"]
            bar.update(task, completed=step, total=total, info=info + f" {getattr(on_step, 'speed', 0):.0f} img/s")

        return run(on_step, logger(bar.console))


def plain_logger(log):
    """Off a terminal: one line per logged step (CI logs)."""
    def on_step(step: int, total: int, m: dict) -> None:
        if "img_per_s" in m:
            log(f"step {step}/{total} {m['phase']} loss {m['loss']:.4f} acc_largest {m['acc_largest']:.3f} "
                f"lr {m['lr']:.5f} {m['img_per_s']:.0f} img/s", highlight=False)
    return on_step
