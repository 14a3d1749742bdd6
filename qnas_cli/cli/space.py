"""``qnas space``: inspect search spaces and write subnets."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..checkpoint import write_json
from ..errors import UserError
from ..space import PRESETS, load_space, sample
from ..supernet import load_supernet
from .common import console, print_json, say

app = typer.Typer(help="Inspect search spaces and write subnet files.", no_args_is_help=True)

SpaceOpt = Annotated[str, typer.Option("--space", "-s", help=f"Preset ({', '.join(PRESETS)}) or a .json/.toml space file.")]


@app.command("show")
def show(space: SpaceOpt = "small",
         json_out: Annotated[bool, typer.Option("--json", help="Print the space as JSON.")] = False) -> None:
    """Print a search space: resolutions, and per stage widths, depths, kernels, expand ratios."""
    sp = load_space(space)
    if json_out:
        print_json({**sp.to_dict(), "fingerprint": sp.fingerprint})
        return
    t = Table(title=escape(f"space {sp.name} ({sp.fingerprint})"))
    for col in ("stage", "widths", "depths", "kernels", "expands", "stride"):
        t.add_column(col)
    t.add_row("stem", str(sp.stem_channels), "1", "3", "-", str(sp.stem_stride))
    for i, st in enumerate(sp.stages):
        t.add_row(str(i), *(", ".join(map(str, v)) for v in (st.widths, st.depths, st.kernels, st.expands)), str(st.stride))
    t.add_row("head", str(sp.head_channels) + (f" -> fc {sp.feature_channels}" if sp.feature_channels else ""), "1", "1", "-", "1")
    console.print(t)
    console.print(f"resolutions: {', '.join(map(str, sp.resolutions))} px")


@app.command("sample")
def sample_cmd(
    space: SpaceOpt = "small",
    largest: Annotated[bool, typer.Option("--largest", help="The largest subnet.")] = False,
    smallest: Annotated[bool, typer.Option("--smallest", help="The smallest subnet.")] = False,
    random_: Annotated[bool, typer.Option("--random", help="A uniformly random subnet (the default).")] = False,
    seed: Annotated[int, typer.Option(help="Seed for --random.")] = 0,
    supernet: Annotated[Path, typer.Option(help="Take the space from this supernet.pt and record it (path + sha256) in the subnet.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Write subnet.json here (default: print it).")] = None,
) -> None:
    """Write a subnet of the space as subnet.json (the hand-off file between commands)."""
    if largest + smallest + random_ > 1:
        raise UserError("choose one of --largest, --smallest, --random")
    how = "largest" if largest else "smallest" if smallest else "random"
    extra = {}
    if supernet is not None:
        net, meta = load_supernet(supernet)
        sp = net.space
        where = os.path.relpath(supernet, out.parent) if out is not None else str(supernet)
        extra = {"supernet": {"path": where, "sha256": meta["weights"]["sha256"]}}
    else:
        sp = load_space(space)
    arch = sample(sp, how, random.Random(seed))
    doc = {**arch.to_dict(sp), **extra}
    if out is None:
        print_json(doc)
    else:
        write_json(out, doc)
        say(console, f"wrote {out} ({arch.key})")
