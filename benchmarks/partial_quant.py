"""Fully vs partially quantized deployment of the same subnet: ops and host latency (claim 5).

QuantNAS (Fig. 2, §1) quantizes the whole network, residual adds and pooling included, where
BatchQuant and OQA quantize only the convolutions; a partially quantized model ships with float
ops between DEQUANTIZE/QUANTIZE pairs, and the paper measures it 50.3% slower on a phone. Per
subnet (the same integer graph for every file; random integer weights, latency does not depend
on them):
- ``qnas``: `qnas export`'s path (IntegerGraph -> ONNX -> onnx2tf -> rewrite), fully int8;
- ``fp32``: the same float network through litert-torch (benchmarks/litert_route.py);
- ``partial``: that float file quantized by ai-edge-quantizer with the convolutions and FC
  layers int8 and everything else float (``conv_only_wi8_ai8``);
- ``aeq int8``: the same quantizer with every op it supports int8 (``static_wi8_ai8``), the
  control that separates "partial" from "another converter".
All files are timed in one interleaved session on XNNPACK and the built-in kernels (1 thread),
and their ops counted (float ops: ops whose input is float32; QUANTIZE / DEQUANTIZE).

    python -m benchmarks.partial_quant [--space small] [--subnets largest,smallest,random:1,random:2]
                                       [--rounds 30] [--out runs/bench/partial_quant]
    python -m benchmarks.partial_quant --quick     # tiny space, one subnet, 5 rounds (a few minutes)

Needs ``make baselines-venv`` (litert-torch and ai-edge-quantizer). About 2 minutes per subnet
on 2 cores (one onnx2tf and one litert-torch conversion each), plus the timing.
"""
from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import numpy as np

from qnas_cli.export.blocks import arch_graph
from qnas_cli.export.measure import measure_models, method
from qnas_cli.export.reference import dequantize
from qnas_cli.export.tflite import export_tflite
from qnas_cli.export.verify import float_ops, op_census
from qnas_cli.checkpoint import versions, write_json
from qnas_cli.latency import STATISTIC, host_device
from qnas_cli.space import load_space, sample

from benchmarks.litert_route import FLOAT_TFLITE, recipe_file, run_route
from benchmarks.plots import pyplot, save_png

RUNTIMES = ("xnnpack", "builtin")
FILES = {"qnas": None, "fp32": FLOAT_TFLITE, "partial": recipe_file("conv_only_wi8_ai8"), "aeq int8": recipe_file("static_wi8_ai8")}
CALIB = 32  # calibration images for the quantizers (random: latency does not depend on the values)


def files_for(space, spec: str, folder: Path, in_ch: int, classes: int) -> tuple[str, dict[str, Path]]:
    how, _, seed = spec.partition(":")
    arch = sample(space, how, random.Random(int(seed or 0)))
    graph = arch_graph(space, arch, in_ch, classes, seed=int(seed or 0))
    calib = np.random.default_rng(0).integers(-128, 128, size=(CALIB, *graph.input_shape[1:])).astype(np.int8)
    qnas = export_tflite(graph, calib, folder / "qnas", name="model").tflite
    route = folder / "litert_torch"
    run_route(graph, dequantize(calib, graph.qparams[graph.input]).astype(np.float32), route)
    return arch.key, {name: qnas if f is None else route / f for name, f in FILES.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny space, the largest subnet, 5 rounds")
    ap.add_argument("--space", default=None, help="default small (tiny with --quick)")
    ap.add_argument("--subnets", default=None, help="default largest,smallest,random:1,random:2 (largest with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 30; 5 with --quick)")
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/partial_quant"))
    args = ap.parse_args()
    space = load_space(args.space or ("tiny" if args.quick else "small"))
    specs = (args.subnets or ("largest" if args.quick else "largest,smallest,random:1,random:2")).split(",")
    rounds = args.rounds or (5 if args.quick else 30)

    subnets = {}
    for spec in specs:
        print(f"[{spec}] qnas export, litert-torch float, ai-edge-quantizer partial and full int8", flush=True)
        subnets[spec] = files_for(space, spec, args.out / spec.replace(":", ""), args.in_channels, args.classes)
    models = {(spec, name): path.read_bytes() for spec, (_, files) in subnets.items() for name, path in files.items()}
    keyed = {f"{spec}|{name}": data for (spec, name), data in models.items()}
    print(f"timing {len(keyed)} files on {', '.join(RUNTIMES)}, {rounds} interleaved rounds", flush=True)
    t = measure_models(keyed, RUNTIMES, rounds=rounds, round_ms=10.0)
    rows = []
    for spec, (arch, files) in subnets.items():
        for name, path in files.items():
            c, floats = op_census(path), float_ops(path)
            rows.append({"subnet": spec, "arch": arch, "file": name, "path": str(path), "ops": sum(c["ops"].values()),
                         "float_ops": sum(floats.values()), "float_op_kinds": floats,
                         "quantize": c["quantize_ops"], "dequantize": c["dequantize_ops"], "size_bytes": c["size_bytes"],
                         "latency_ms": {rt: t[(f"{spec}|{name}", rt)].ms(STATISTIC) for rt in RUNTIMES},
                         "spread": {rt: t[(f"{spec}|{name}", rt)].spread for rt in RUNTIMES}})
    ratios = {rt: [by["partial"]["latency_ms"][rt] / by["qnas"]["latency_ms"][rt]
                   for by in ({r["file"]: r for r in rows if r["subnet"] == s} for s in subnets)] for rt in RUNTIMES}
    summary = {rt: {"partial_over_qnas_median": statistics.median(v), "per_subnet": v,
                    "fully_int8_latency_reduction": 1 - 1 / statistics.median(v)} for rt, v in ratios.items()}
    write_json(args.out / "partial_quant.json", {"space": space.name, "rows": rows, "summary": summary,
                                                 "method": method(1, rounds, 10.0), "device": host_device(),
                                                 "paper": {"fully_int8_latency_reduction": 0.503, "device": "phone (Kirin 9000)"},
                                                 "versions": versions()})
    _plot(rows, list(subnets), args.out / "partial_quant.png")

    print(f"\n{space.name}, 1 thread, {STATISTIC} of {rounds} interleaved rounds (the latency tables' statistic)")
    print(f"{'subnet':<10}{'file':<10}{'ops':>5}{'float ops':>10}{'Q/DQ':>8}{'KB':>8}{'xnnpack ms':>12}{'builtin ms':>12}")
    for r in rows:
        print(f"{r['subnet']:<10}{r['file']:<10}{r['ops']:>5}{r['float_ops']:>10}{r['quantize']:>4}/{r['dequantize']:<3}"
              f"{r['size_bytes'] / 1024:>8.1f}{r['latency_ms']['xnnpack']:>12.4f}{r['latency_ms']['builtin']:>12.4f}")
    for rt, s in summary.items():
        cut = s["fully_int8_latency_reduction"]
        print(f"{rt}: partial / fully int8 (qnas) = {s['partial_over_qnas_median']:.2f}x (median over subnets), i.e. fully "
              f"int8 is {100 * abs(cut):.1f}% {'faster' if cut >= 0 else 'slower'} (paper, on a phone: 50.3% faster)")
    print(f"wrote {args.out / 'partial_quant.json'} and partial_quant.png")


def _plot(rows: list[dict], subnets: list[str], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(RUNTIMES), figsize=(5 * len(RUNTIMES), 4), squeeze=False)
    width = 0.8 / len(FILES)
    for ax, rt in zip(axes[0], RUNTIMES):
        for i, name in enumerate(FILES):
            ys = [next(r["latency_ms"][rt] for r in rows if r["subnet"] == s and r["file"] == name) for s in subnets]
            ax.bar(np.arange(len(subnets)) + i * width, ys, width, label=name)
        ax.set(xticks=np.arange(len(subnets)) + width * (len(FILES) - 1) / 2, xticklabels=subnets, yscale="log",
               ylabel="latency (ms, 1 thread)", title=rt)
        ax.legend(fontsize=8)
    fig.suptitle("the same subnet as fully int8 (qnas), partially int8, int8 by ai-edge-quantizer, and fp32", fontsize=10)
    save_png(fig, path)


if __name__ == "__main__":
    main()
