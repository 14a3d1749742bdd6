"""``qnas calibrate``: BN calibration + predicted scales -> a static int8 subnet (subnet.qnas.pt)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..calibrate import CALIB_IMAGES, calibrate_file, default_output
from ..kernels import TARGET_HELP
from .common import console, print_json, say

SubnetArg = Annotated[Path, typer.Argument(help="subnet.json (from `qnas space sample`).")]
SupernetOpt = Annotated[Path, typer.Option(help="supernet.pt (default: the one named in the subnet file).")]
DataOpt = Annotated[str, typer.Option(help="Dataset spec (default: the one the supernet was trained on).")]
CalibOpt = Annotated[int, typer.Option(help="Training images for BN re-estimation: a fixed, seeded, class-stratified set.")]
RuntimeOpt = Annotated[str, typer.Option(help=f"Target runtime: the int8 arithmetic the reported accuracy (and export's bit-exact gate) is for. {TARGET_HELP}.")]


def calibrate(
    subnet: SubnetArg,
    supernet: SupernetOpt = None,
    data: DataOpt = None,
    calib_images: CalibOpt = CALIB_IMAGES,
    eval_images: Annotated[int, typer.Option(help="Limit the accuracy evaluation to N images per split: a seeded, class-stratified subset, the same every run (default: all).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output weights (default: SUBNET with .qnas.pt; JSON beside).")] = None,
    runtime: RuntimeOpt = "xnnpack",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Extract a subnet, re-estimate its BN statistics, predict its weight scales, and save the int8 subnet.

    Prints its top-1 on the test split and on the held-out search split, computed by the exact
    integer forward of the target runtime: the accuracy the exported .tflite has there.
    """
    _, meta, _ = calibrate_file(subnet, supernet, data, calib_images, out, eval_images=eval_images, runtime=runtime)
    if json_out:
        print_json(meta)
        return
    acc = meta["accuracy"]
    say(console, f"calibrated {meta['arch_key']}")
    t = Table()
    t.add_column("split")
    t.add_column(f"{acc['kind']} top-1")
    t.add_row("test", f"{100 * acc['test_top1']:.2f}%")
    t.add_row("search (held-out train)", f"{100 * acc['search_top1']:.2f}%")
    console.print(t)
    say(console, f"wrote {out or default_output(subnet)} (+ .json)")
