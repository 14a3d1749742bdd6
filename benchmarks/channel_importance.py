"""Are a supernet's extra mid channels weaker than the ones every subnet uses? And OFA's answer if
they are not: sort them by importance (issue 31, "expand's price").

A block with expand e uses the first ``mid_channels(in, e)`` of its expanded channels, so the
channels beyond the smallest expand are used only by subnets with a larger one. OFA (Cai et al.
2020, §3.3, "elastic width") sorts a block's mid channels by importance, the L1 norm of each
channel's weights in the projection that reads it, before it trains smaller expands, so that the
prefix every subnet keeps holds the most important ones. Per block this reports that importance by
segment (the prefix of the smallest expand, then each larger expand's extra channels) and the share
of the smallest expand's most important channels already in its prefix (1: sorted; about the
prefix's share of the block: no order). ``--sort OUT`` writes the supernet with every block's mid
channels so sorted (the same function: the largest subnet's output is unchanged, checked before
writing), which `qnas train --init OUT` trains on and `benchmarks.ranking --supernet OUT` scores.

    python -m benchmarks.channel_importance SUPERNET [SUPERNET ...] [--sort OUT] [--json OUT.json]

Seconds on one core; trains nothing.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from qnas_cli.checkpoint import save_weights, write_json
from qnas_cli.supernet import MBBlock, Supernet, load_supernet, mid_channels
from qnas_cli.train import supernet_payload

# a Conv-BN's per-output-channel tensors (``theta``/``w_scale`` only when per channel or predicted)
PER_CHANNEL = ("weight", "bn_weight", "bn_bias", "running_mean", "running_var", "theta", "w_scale")


def expanding_blocks(net: Supernet) -> list[tuple[str, MBBlock, list[int]]]:
    """(name, block, mid channel count per expand choice, ascending) for every block with an expand conv."""
    out = []
    for s, (stage, spec) in enumerate(zip(net.stages, net.space.stages)):
        expands = sorted(e for e in spec.expands if e > 1)
        for b, block in enumerate(stage):
            if block.expand is not None:
                in_max = block.expand.weight.shape[1]
                out.append((f"stages.{s}.{b}", block, [mid_channels(in_max, e) for e in expands]))
    return out


def importance(block: MBBlock) -> torch.Tensor:
    """OFA's importance of each mid channel: the L1 norm of the projection weights that read it."""
    return block.project.weight.detach().abs().sum(dim=(0, 2, 3))


def block_report(name: str, block: MBBlock, mids: list[int]) -> dict:
    imp = importance(block)
    bounds = [0, *mids]
    segments = [imp[a:b].mean().item() for a, b in zip(bounds, bounds[1:]) if b > a]
    smallest = mids[0]
    top = torch.argsort(imp, descending=True)[:smallest]
    return {"block": name, "mid": mids[-1], "segment_ends": mids, "importance_by_segment": segments,
            "top_in_prefix": (top < smallest).float().mean().item(), "prefix_share": smallest / mids[-1]}


def report(net: Supernet) -> list[dict]:
    return [block_report(name, block, mids) for name, block, mids in expanding_blocks(net)]


@torch.no_grad()
def sort_mid_channels(net: Supernet) -> None:
    """Reorder every block's mid channels by importance, most important first (in place). A
    permutation of the expand conv's outputs, the depthwise conv's channels and the projection's
    inputs: the largest subnet computes the same function; smaller expands keep other channels."""
    for _, block, _ in expanding_blocks(net):
        perm = torch.argsort(importance(block), descending=True)
        for conv in (block.expand, block.depthwise):
            for attr in PER_CHANNEL:
                t = getattr(conv, attr, None)
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == perm.numel():
                    t.copy_(t[perm])
            for own in conv.own_kernels.values():
                own.copy_(own[perm])
        block.project.weight.copy_(block.project.weight[:, perm])


@torch.no_grad()
def largest_output(net: Supernet) -> torch.Tensor:
    arch = net.sample("largest")
    x = torch.randn(8, net.in_channels, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(0))
    return net.eval()(x, arch)


def write_sorted(net: Supernet, meta: dict, source: Path, out: Path) -> dict:
    """Sort ``net`` (loaded from ``source``, with its verified sidecar ``meta``) and save it to ``out``."""
    before = largest_output(net)
    sort_mid_channels(net)
    after = largest_output(net)
    if not torch.allclose(before, after, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"error: sorting changed the largest subnet's output (max diff {(before - after).abs().max():.2e})")
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = {k: meta[k] for k in ("kind", "space", "config", "data", "steps", "world_size", "quant", "phases") if k in meta}
    return save_weights(out, supernet_payload(net), {
        **keep, "channels_sorted": {"from": str(source), "sha256": meta["weights"]["sha256"],
                                    "by": "L1 norm of the projection weights per mid channel (OFA)"}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("supernets", nargs="+", type=Path)
    ap.add_argument("--sort", type=Path, default=None, metavar="OUT",
                    help="write the (one) supernet with its mid channels sorted by importance to OUT")
    ap.add_argument("--json", type=Path, default=None, help="write the per-block report here")
    args = ap.parse_args()
    if args.sort and len(args.supernets) != 1:
        ap.error("--sort takes one supernet")
    docs = {}
    for path in args.supernets:
        net, meta = load_supernet(path)
        rows = report(net)
        docs[str(path)] = rows
        print(f"{path}: importance of the mid channels, by segment (the smallest expand's prefix first)")
        for r in rows:
            seg = " / ".join(f"{v:.2f}" for v in r["importance_by_segment"])
            print(f"  {r['block']:12s} mid {r['mid']:3d}  {seg:24s} top in prefix {r['top_in_prefix']:.2f} "
                  f"(no order: {r['prefix_share']:.2f})")
        ratio = statistics.mean(r["importance_by_segment"][-1] / r["importance_by_segment"][0] for r in rows)
        print(f"  mean: last segment / prefix {ratio:.3f}; top in prefix "
              f"{statistics.mean(r['top_in_prefix'] for r in rows):.2f} (no order: "
              f"{statistics.mean(r['prefix_share'] for r in rows):.2f})")
    if args.json:
        write_json(args.json, docs)
    if args.sort:
        written = write_sorted(net, meta, args.supernets[0], args.sort)  # the one supernet, loaded and verified above
        print(f"wrote {args.sort} (sha256 {written['weights']['sha256'][:12]}…), mid channels sorted by importance")


if __name__ == "__main__":
    main()
