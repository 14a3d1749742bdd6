"""Per-tensor vs per-channel conv weight scales, same recipe and seed (issue 30).

Arms: ``--weight-granularity per-tensor|per-channel`` with ``--weight-scale predictor``, per-tensor with
``--weight-scale shared`` (the paper's baseline), and per-channel
steps *learned* by LSQ (both scale modes, trained at commit 3da7750, before per-channel steps were
held: the measurement that made them held). Each arm is a run folder made by the same command from
the same float supernet (the float phase does not
depend on how the int8 phase scales its weights, so it is trained once and shared):

    qnas train --space small --weight-granularity G --weight-scale S \\
        --init runs/bench/supernet_accuracy/default/float_supernet.pt --steps 1400 \\
        --out runs/bench/granularity/G_S

(the default recipe's int8 phase: 1,400 of its 2,800 steps, from its float phase). For each arm
that has a supernet.pt, the largest, the smallest and 3 seeded random subnets are exported with
``qnas export`` (the default file, uint8 ends, whole test split, gate on 2,000 images): int8 test
top-1 of the exported file (= the exact forward's: the gate), gate verdict, file size and host
latency on XNNPACK and the built-in kernels (p10, 1 thread). With ``--ranking``, each arm is also
scored by the ranking harness (benchmarks/ranking.py) against the committed stand-alone truth:
Kendall tau with its 90% interval, MFLOPs' tau, regret.

    python -m benchmarks.granularity [--arms ARM,...] [--ranking] [--out runs/bench/granularity]

Writes OUT/granularity.json and benchmarks/data/granularity_small_fashion-mnist.json (the
summary, with the commands and the commit), and docs/bench/granularity.png.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

from qnas_cli.checkpoint import sha256_file, versions, write_json
from qnas_cli.space import sample
from qnas_cli.supernet import load_supernet

from benchmarks.plots import pyplot, save_png

ARMS = ("per-tensor_predictor", "per-channel_predictor", "per-tensor_shared", "per-channel-learned_predictor",
        "per-channel-learned_shared")
# per-channel steps learned by LSQ, as commit 3da7750 trained them (before they were held): kept as the
# measurement that made them held
LEARNED_COMMIT = "3da7750"
FLOAT_INIT = Path("runs/bench/supernet_accuracy/default/float_supernet.pt")
SUMMARY = Path("benchmarks/data/granularity_small_fashion-mnist.json")
RANDOM_SEEDS = (0, 1, 2)


def train_command(arm: str, out: Path) -> str:
    granularity, scale = arm.split("_")
    learned = granularity.endswith("-learned")
    command = (f"qnas train --space small --weight-granularity {granularity.removesuffix('-learned')} --weight-scale {scale} "
               f"--init {FLOAT_INIT} --steps 1400 --out {out / arm}")
    return f"{command} (at commit {LEARNED_COMMIT}: per-channel steps learned by LSQ)" if learned else command


def subnets(space) -> dict[str, object]:
    picks = {"largest": sample(space, "largest"), "smallest": sample(space, "smallest")}
    for seed in RANDOM_SEEDS:
        picks[f"random{seed}"] = sample(space, "random", random.Random(seed))
    return picks


def qnas(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qnas_cli", *args], capture_output=True, text=True)


def export_one(supernet: Path, space, name: str, arch, folder: Path) -> dict:
    """Export one subnet (reusing a finished export of the same supernet and architecture)."""
    report = folder / "export_report.json"
    sha = sha256_file(supernet)
    if report.is_file():
        r = json.loads(report.read_text())
        if r.get("arch_key") == arch.key and r.get("source", {}).get("supernet", {}).get("sha256") == sha:
            return _row(name, r)
    folder.mkdir(parents=True, exist_ok=True)
    subnet = folder / "subnet.json"
    subnet.write_text(json.dumps(arch.to_dict(space), indent=2))
    p = qnas("export", str(subnet), "--supernet", str(supernet), "--out", str(folder), "--verify-images", "2000", "--json")
    if p.returncode not in (0, 3):
        raise SystemExit(f"qnas export {subnet} failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    return _row(name, json.loads(report.read_text()))


def _row(name: str, r: dict) -> dict:
    return {"subnet": name, "arch": r["arch_key"], "top1": r["accuracy"]["tflite_top1"] if r["accuracy"].get("tflite_images") == r["accuracy"]["n_images"] else r["accuracy"]["top1"],
            "exact_top1": r["accuracy"]["top1"], "passed": r["passed"], "size_bytes": r["size_bytes"],
            "latency_ms": {"xnnpack": r["latency_ms"]["xnnpack"], "builtin": r["latency_ms"]["builtin"]}}


def ranking(supernet: Path, out: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "benchmarks.ranking", "--supernet", str(supernet), "--out", str(out)],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"benchmarks.ranking on {supernet} failed: {p.stderr.strip().splitlines()[-1:]}")
    r = json.loads((out / "ranking.json").read_text())
    return {k: r[k] for k in ("kendall_tau", "kendall_tau_90", "spearman_rho", "mflops_tau", "mflops_tau_90", "mean_gap_pp", "regret")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--ranking", action="store_true", help="also score each arm with benchmarks.ranking (10-15 min each)")
    ap.add_argument("--latency-rounds", type=int, default=0,
                    help="time every arm's exported files again, interleaved in one process (the export reports "
                         "time each file alone, whatever else the machine runs); 0: keep the reports' figures")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/granularity"))
    args = ap.parse_args()
    result: dict = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
                    "command": "python -m benchmarks.granularity " + " ".join(sys.argv[1:]), "versions": versions(),
                    "float_init": {"path": str(FLOAT_INIT), "sha256": sha256_file(FLOAT_INIT)}, "arms": {}}
    for arm in args.arms.split(","):
        supernet = args.out / arm / "supernet.pt"
        if not supernet.is_file():
            print(f"{arm}: no {supernet}; train it: {train_command(arm, args.out)}")
            continue
        net, meta = load_supernet(supernet)
        print(f"{arm}: {supernet} ({meta['quant']})", flush=True)
        rows = []
        for name, arch in subnets(net.space).items():
            rows.append(export_one(supernet, net.space, name, arch, args.out / arm / "export" / name))
            r = rows[-1]
            print(f"  {name:9s} top-1 {100 * r['top1']:.2f}%  gate {'PASS' if r['passed'] else 'FAIL'}  "
                  f"xnnpack {r['latency_ms']['xnnpack']:.3f} ms  builtin {r['latency_ms']['builtin']:.3f} ms  "
                  f"{r['size_bytes']} B", flush=True)
        entry = {"train_command": train_command(arm, args.out), "supernet_sha256": sha256_file(supernet),
                 "train_metrics": meta.get("metrics"), "subnets": rows,
                 "mean_top1": statistics.mean(r["top1"] for r in rows), "all_passed": all(r["passed"] for r in rows)}
        if args.ranking:
            entry["ranking"] = ranking(supernet, args.out / arm / "ranking")
            print(f"  Kendall tau {entry['ranking']['kendall_tau']:+.3f} {entry['ranking']['kendall_tau_90']}", flush=True)
        result["arms"][arm] = entry
    if args.latency_rounds:
        interleaved_latency(result, args.out, args.latency_rounds)
    write_json(args.out / "granularity.json", result)
    write_json(SUMMARY, result)
    _plot(result, Path("docs/bench/granularity.png"))
    print(f"wrote {args.out / 'granularity.json'}, {SUMMARY} and docs/bench/granularity.png")


def interleaved_latency(result: dict, out: Path, rounds: int) -> None:
    """Every exported file on XNNPACK and the built-in kernels (1 thread, p10), timed interleaved:
    per-tensor and per-channel files of one subnet side by side, so host drift cancels."""
    from qnas_cli.export.measure import measure_models

    files = {(arm, r["subnet"]): out / arm / "export" / r["subnet"] / "model_int8.tflite"
             for arm, e in result["arms"].items() for r in e["subnets"]}
    timings = measure_models({f"{a}/{n}": p for (a, n), p in files.items()}, ("xnnpack", "builtin"), threads=1,
                             rounds=rounds, round_ms=10.0)
    for arm, e in result["arms"].items():
        for r in e["subnets"]:
            r["latency_ms"] = {rt: timings[(f"{arm}/{r['subnet']}", rt)].p10_ms for rt in ("xnnpack", "builtin")}
            r["latency_ms"].update(statistic="p10", threads=1, rounds=rounds, interleaved=True)
    print(f"latency: {len(files)} files x 2 runtimes, {rounds} interleaved rounds")


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    arms = list(result["arms"])
    names = [r["subnet"] for r in next(iter(result["arms"].values()))["subnets"]] if arms else []
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        rows = result["arms"][arm]["subnets"]
        xs = [j + i * width for j in range(len(rows))]
        ax[0].bar(xs, [100 * r["top1"] for r in rows], width, label=arm)
        ax[1].bar(xs, [r["latency_ms"]["xnnpack"] for r in rows], width, label=arm)
    for a, title in zip(ax, ("int8 test top-1 of the exported file (%)", "XNNPACK latency, p10, 1 thread (ms)")):
        a.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        a.set_title(title)
    tops = [100 * r["top1"] for e in result["arms"].values() for r in e["subnets"]] or [80.0]
    ax[0].set_ylim(min(tops) - 1, max(tops) + 0.7)
    ax[0].legend(fontsize=8)
    save_png(fig, path)


if __name__ == "__main__":
    main()
