"""What the whole method costs on this CPU (claim 7; QuantNAS Table 2 lists 1,728 GPU-hours on ImageNet).

One table from the results the other benchmarks wrote under ``runs/bench`` (each figure was
timed by its own script, alone on the machine, and this script names which):
- one supernet epoch, float and int8 (sandwich rule: largest, smallest, one random subnet,
  in-place distillation), from the phase timings of ``supernet_accuracy`` (a real training run),
  and the int8 / float step ratio measured interleaved by ``train_throughput`` when it ran;
- one paper-sized search (population 512 x 20 generations, one budget), ``search_cost``;
- one export of the largest subnet with its parity gate, ``export_parity``;
- one latency table (both runtimes, cold), ``latency_model``.
A missing source is listed with the command that produces it; nothing is estimated in its place.

    python -m benchmarks.cost [--bench runs/bench] [--out runs/bench/cost.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qnas_cli.checkpoint import versions, write_json
from qnas_cli.data import load_dataset
from qnas_cli.train import TrainConfig

from benchmarks.supernet_accuracy import RECIPES

SOURCES = {
    "supernet_accuracy": ("supernet_accuracy/supernet_accuracy.json", "python -m benchmarks.supernet_accuracy --recipe both"),
    "train_throughput": ("train_throughput.json", "python -m benchmarks.train_throughput"),
    "search_cost": ("search_cost/search_cost.json", "python -m benchmarks.search_cost --supernet S"),
    "export_parity": ("export_parity/export_parity.json", "python -m benchmarks.export_parity --supernet S"),
    "latency_model": ("latency_model/latency_model.json", "python -m benchmarks.latency_model"),
}


def read(bench: Path, name: str) -> dict | None:
    path = bench / SOURCES[name][0]
    return json.loads(path.read_text()) if path.is_file() else None


def epoch_rows(acc: dict, train_images: int) -> list[dict]:
    """Minutes per epoch of each phase, from the longest training run recorded."""
    runs = [(name, r) for name, r in acc.get("recipes", {}).items() if "float" in r.get("phase_end_minutes", {})]
    if not runs:
        return []
    name, r = max(runs, key=lambda nr: nr[1]["minutes"])
    steps = r.get("steps") or {"total": RECIPES[name]["options"]["steps"], "float": RECIPES[name]["options"]["float_steps"]}
    ends = r["phase_end_minutes"]
    batch = TrainConfig().batch_size
    per_epoch = train_images // batch
    s_float = 60 * ends["float"] / steps["float"]
    s_int8 = 60 * (ends["int8"] - ends["float"]) / (steps["total"] - steps["float"])
    source = f"{r['command']} ({steps['float']} float + {steps['total'] - steps['float']} int8 steps, batch {batch})"
    return [{"item": f"one supernet epoch, float ({per_epoch} steps)", "minutes": s_float * per_epoch / 60,
             "detail": f"{s_float:.3f} s/step", "source": source},
            {"item": f"one supernet epoch, int8 ({per_epoch} steps)", "minutes": s_int8 * per_epoch / 60,
             "detail": f"{s_int8:.3f} s/step, {s_int8 / s_float:.2f}x float", "source": source}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, default=Path("runs/bench"), help="where the other benchmarks wrote their JSON")
    ap.add_argument("--out", type=Path, default=None, help="default: BENCH/cost.json")
    args = ap.parse_args()
    out = args.out or args.bench / "cost.json"
    rows, missing = [], []
    src = {name: read(args.bench, name) for name in SOURCES}
    if src["supernet_accuracy"]:
        rows += epoch_rows(src["supernet_accuracy"], len(load_dataset("fashion-mnist").train))
    if tp := src["train_throughput"]:
        rows.append({"item": "int8 / float sandwich step, interleaved", "minutes": None,
                     "detail": f"{tp['int8_over_float_sandwich']:.2f}x (batch {tp['batch_size']}, "
                               f"{tp['sandwich_step_s']['none']:.3f} vs {tp['sandwich_step_s']['int8']:.3f} s)",
                     "source": SOURCES["train_throughput"][1]})
    if (sc := src["search_cost"]) and "search" in sc:
        s = sc["search"]
        rows.append({"item": "one search, population 512 x 20 generations, one budget", "minutes": s["seconds"]["wall"] / 60,
                     "detail": f"{s['evaluations']['new']} evaluations on {s['processes']} process(es); calibration "
                               f"{s['seconds']['calibrate'] / 60:.1f} + scoring {s['seconds']['score'] / 60:.1f} process-min",
                     "source": s["command"]})
    if ep := src["export_parity"]:
        for r in ep["results"]:
            if r["subnet"] == "largest" and "wall_seconds" in r.get("qnas", {}):
                rows.append({"item": "one export (largest subnet, parity gate)", "minutes": r["qnas"]["wall_seconds"] / 60,
                             "detail": "qnas export as a user runs it", "source": SOURCES["export_parity"][1]})
    if (lm := src["latency_model"]) and lm.get("table_build_s"):
        rows.append({"item": f"one latency table ({lm['space']}, XNNPACK + built-in, cold)", "minutes": lm["table_build_s"] / 60,
                     "detail": "onnx2tf conversions + interleaved timing", "source": SOURCES["latency_model"][1]})
    have = {"supernet_accuracy": any("epoch" in r["item"] for r in rows), "train_throughput": bool(src["train_throughput"]),
            "search_cost": any("search" in r["item"] for r in rows), "export_parity": any("export" in r["item"] for r in rows),
            "latency_model": any("latency table" in r["item"] for r in rows)}
    missing = [{"source": name, "command": SOURCES[name][1]} for name, ok in have.items() if not ok]
    write_json(out, {"rows": rows, "missing": missing, "bench": str(args.bench), "versions": versions()})

    print(f"{'what':<58}{'minutes':>9}  detail")
    for r in rows:
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
        print(f"{r['item']:<58}{minutes:>9}  {r['detail']}")
    for m in missing:
        print(f"not measured yet: {m['source']} (run: {m['command']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
