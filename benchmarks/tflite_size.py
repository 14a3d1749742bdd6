"""The int8 .tflite size model of ``qnas_cli/cost.py``, fitted and rechecked on real exports.

``Cost.tflite_kb`` (what ``qnas search --size-kb`` constrains) predicts the size of the file
``qnas export`` writes from the subnet's shapes alone:

    bytes = weight bytes (int8 weights + int32 biases) + TFLITE_BYTES_PER_OP * ops + TFLITE_BYTES_FIXED

This script exports subnets of several spaces through the export's own conversion
(``arch_graph`` -> ``export_tflite``: IntegerGraph -> ONNX -> onnx2tf -> qnas rewrite, as
``benchmarks/latency_model.py`` does; random integer weights, since a flatbuffer stores the same
bytes whatever their values), fits the two constants by least squares in relative error, and
reports every file's error under the fit and under the constants cost.py ships. Exports of the same architectures from an earlier run in OUT are reused.

    python -m benchmarks.tflite_size [--quick] [--spaces tiny,small,mbv3] [--subnets 3] [--out runs/bench/tflite_size]

Writes OUT/tflite_size.json (the fit, each file's error, the command and the commit) and prints a
table. ``--quick``: three `tiny` subnets (about a minute), to check the script runs.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qnas_cli.checkpoint import versions, write_json
from qnas_cli.cost import TFLITE_BYTES_FIXED, TFLITE_BYTES_PER_OP, arch_cost
from qnas_cli.space import load_space, sample

from benchmarks.latency_model import export_all


def fit_size_model(rows) -> tuple[float, float]:
    """Least squares, in *relative* error, of ``file ~ weight_bytes + per_op * ops + fixed``;
    rows: (weight_bytes, ops, file_bytes).

    Relative, because what the model promises (and ``qnas search --size-kb`` relies on) is a
    percentage, from 10 KB files to 4 MB ones; an absolute fit lets the large files' few hundred
    bytes of flatbuffer padding decide the constants and leaves the small files off by more.
    Needs two files with different op counts.
    """
    data = np.asarray(list(rows), np.float64).reshape(-1, 3)
    w, ops, size = data[:, 0], data[:, 1], data[:, 2]
    if len(np.unique(ops)) < 2:
        raise ValueError("fitting bytes per op and fixed bytes needs files with at least two different op counts")
    design = np.stack([ops, np.ones_like(ops)], axis=1) / size[:, None]
    (per_op, fixed), *_ = np.linalg.lstsq(design, (size - w) / size, rcond=None)
    return float(per_op), float(fixed)


def predict_bytes(weight_bytes: int, ops: int, per_op: float, fixed: float) -> float:
    return weight_bytes + per_op * ops + fixed


def commit() -> str:
    """The checkout's commit, with "+dirty" when the code this measures has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "qnas_cli", "benchmarks"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def subnets(space, n_random: int, seed: int) -> list:
    """The largest, the smallest and ``n_random`` seeded random subnets of ``space``, distinct."""
    rng = random.Random(seed)
    archs = {a.key: a for a in (sample(space, "largest"), sample(space, "smallest"))}
    for _ in range(100 * (n_random + 1)):
        if len(archs) >= n_random + 2:
            break
        a = sample(space, "random", rng)
        archs.setdefault(a.key, a)
    return list(archs.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spaces", default="tiny,small,mbv3", help="comma-separated presets or space files")
    ap.add_argument("--subnets", type=int, default=3, help="random subnets per space (plus its largest and smallest)")
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="three `tiny` subnets: checks the script runs")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/tflite_size"))
    args = ap.parse_args()
    if args.quick:
        args.spaces, args.subnets = "tiny", 1
    if args.subnets < 0:
        ap.error("--subnets must be >= 0")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    files = []
    for name in args.spaces.split(","):
        space = load_space(name.strip())
        archs = subnets(space, args.subnets, args.seed)
        models = export_all(space, archs, args.in_channels, args.classes, out / "exports" / space.name)
        for arch in archs:
            c = arch_cost(space, arch, args.in_channels, args.classes)
            files.append({"space": space.name, "arch": arch.key, "weight_bytes": c.weight_bytes, "ops": c.ops,
                          "file_bytes": len(models[arch.key])})
    export_s = time.perf_counter() - t0

    per_op, fixed = fit_size_model((f["weight_bytes"], f["ops"], f["file_bytes"]) for f in files)
    shipped = {"per_op": TFLITE_BYTES_PER_OP, "fixed": TFLITE_BYTES_FIXED}
    fitted = {"per_op": round(per_op), "fixed": round(fixed)}
    for f in files:
        for label, k in (("fit", fitted), ("shipped", shipped)):
            f[f"predicted_{label}"] = predict_bytes(f["weight_bytes"], f["ops"], k["per_op"], k["fixed"])
            f[f"error_{label}"] = f[f"predicted_{label}"] / f["file_bytes"] - 1
    worst = {label: max(abs(f[f"error_{label}"]) for f in files) for label in ("fit", "shipped")}
    result = {"command": " ".join(["python -m benchmarks.tflite_size", *sys.argv[1:]]), "commit": commit(),
              "versions": versions("onnx2tf", "tensorflow", "ai-edge-litert"),
              "model": "file bytes = weight bytes + per_op * ops + fixed (least squares in relative error)",
              "fit": {"per_op": per_op, "fixed": fixed, "rounded": fitted, "max_abs_error": worst["fit"]},
              "shipped": {**shipped, "max_abs_error": worst["shipped"]},
              "export_s": round(export_s, 1), "files": files}
    write_json(out / "tflite_size.json", result)

    print(f"\nint8 .tflite size model on {len(files)} exports ({args.spaces}; exports {export_s:.0f} s)")
    print(f"{'space':<8}{'ops':>5}{'weight B':>10}{'file B':>10}{'fit err':>9}{'shipped err':>13}  arch")
    for f in files:
        print(f"{f['space']:<8}{f['ops']:>5}{f['weight_bytes']:>10}{f['file_bytes']:>10}{100 * f['error_fit']:>8.3f}%"
              f"{100 * f['error_shipped']:>12.3f}%  {f['arch']}")
    print(f"fit:     {per_op:.1f} bytes per op + {fixed:.1f} bytes  (worst file {100 * worst['fit']:.3f}%)")
    print(f"shipped: {TFLITE_BYTES_PER_OP} bytes per op + {TFLITE_BYTES_FIXED} bytes  "
          f"(qnas_cli/cost.py; worst file {100 * worst['shipped']:.3f}%)")
    print(f"wrote {out / 'tflite_size.json'}")


if __name__ == "__main__":
    main()
