"""``qnas finetune``: train one searched subnet on from its inherited weights, in the int8 contract."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..finetune import DEFAULT_FINETUNE_STEPS, TEACHERS, FinetuneConfig, finetune as run_finetune
from .calibrate import DataOpt, SupernetOpt
from .common import console, say
from .train import run_loop

D = FinetuneConfig(subnet="-")  # defaults shown in --help come from the library's config


def finetune(
    subnet: Annotated[Path, typer.Argument(help="subnet.json (from `qnas search` or `qnas space sample`).", show_default=False)],
    supernet: SupernetOpt = None,
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (default: beside SUBNET, <name>_finetuned/): "
                                                          "supernet.pt/.json, subnet.json, metrics.jsonl, ckpt/.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps (default measured on the default `small` supernet: "
                                            "BENCHMARKS.md, Fine-tuning).")] = DEFAULT_FINETUNE_STEPS,
    teacher: Annotated[str, typer.Option(help=f"{' | '.join(TEACHERS)}: distil from the supernet's largest subnet, frozen "
                                              "(its original weights, BN calibrated, never updated), or train on the labels alone.")] = D.teacher,
    lr: Annotated[float, typer.Option(help="Peak learning rate (SGD, momentum 0.9, warm-up then cosine decay to 0; "
                                           "no weight decay: only the subnet's own weight slices move).")] = D.lr,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warm-up, in steps.")] = D.warmup_steps,
    kd_ratio: Annotated[float, typer.Option(help="Distillation weight beta in (1-beta)*CE + beta*KL(teacher || subnet) (with --teacher largest).")] = D.kd_ratio,
    batch_size: Annotated[int, typer.Option(help="Images per step per process.")] = D.batch_size,
    seed: Annotated[int, typer.Option(help="Seed: data order, augmentation.")] = D.seed,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = D.device,
    ckpt_every: Annotated[int, typer.Option(help="Checkpoint every N steps (atomic; the last 2 are kept).")] = D.ckpt_every,
    eval_images: Annotated[int, typer.Option(help="Test images for the final evaluation (inherited and fine-tuned): a seeded, class-stratified subset (default: all).")] = None,
    calib_images: Annotated[int, typer.Option(help="Training images (seeded, class-stratified) for BN calibration of the teacher and of the evaluated subnets.")] = D.calib_images,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the fine-tune in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in --out (finished or not). Without it, a used --out is refused.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard", help="Also write TensorBoard event files into --out (metrics.jsonl stays the record).")] = D.tensorboard,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final summary as JSON.")] = False,
) -> None:
    """Fine-tune one subnet from its inherited supernet weights, fully int8 as the supernet was trained.

    Writes into --out a supernet.pt (the original with this subnet's weight slices fine-tuned;
    usable for this subnet only: search and other subnets are refused) and a subnet.json naming
    it, with its lineage (original supernet and sha256, steps, teacher, data). Then:
    qnas export OUT/subnet.json

    Ctrl-C saves a checkpoint; --resume continues exactly where it stopped.
    Under torchrun every process trains its shard: torchrun --nproc_per_node 2 -m qnas_cli finetune ...
    """
    cfg = FinetuneConfig(subnet=str(subnet), supernet=str(supernet) if supernet else None, data=data,
                         out=str(out) if out else None, steps=steps, teacher=teacher, lr=lr, warmup_steps=warmup_steps,
                         kd_ratio=kd_ratio, batch_size=batch_size, seed=seed, device=device, ckpt_every=ckpt_every,
                         eval_images=eval_images, calib_images=calib_images, tensorboard=tensorboard)
    summary = run_loop("finetune", lambda on_step, log: run_finetune(cfg, resume, on_step=on_step, log=log,
                                                                      overwrite=overwrite), json_out)
    if summary is None:
        return
    m = summary["metrics"]
    t = Table(title=escape(f"fine-tuned {summary['subnet']}"))
    t.add_column("architecture", overflow="fold")
    t.add_column("split")
    t.add_column("inherited top-1", no_wrap=True)
    t.add_column("fine-tuned top-1", no_wrap=True)
    for split, key in (("test", "test_top1"), ("search (held out)", "search_top1")):
        t.add_row(m["finetuned"]["arch"] if key == "test_top1" else "", split,
                  f"{100 * m['inherited'][key]:.2f}%", f"{100 * m['finetuned'][key]:.2f}%")
    console.print(t)
    say(console, f"next: qnas export {summary['subnet']}")
