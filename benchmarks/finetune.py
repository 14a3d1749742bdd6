"""Issue 29: does a short `qnas finetune` make an inherited subnet as accurate as the same network trained alone?

On the default `small` supernet (plain `qnas train`; measured when its default was 2,800 steps, half
float), for ``--subnets`` of the 20
stand-alone truth subnets (benchmarks/data/standalone_small_fashion-mnist.json, spread over
MFLOPs) and the winners of a 3-budget search on that supernet:

- inherited, fine-tuned (``--steps``, teacher largest) and stand-alone (truth: mean of two seeds,
  2,800 steps alone) int8 test top-1, whole test split, exact XNNPACK forward after BN
  calibration (as `qnas calibrate` / `qnas export` report it); the fine-tune's wall time;
- a curve of test top-1 against fine-tune steps for two subnets (the smallest and the largest
  picked), with and without the teacher: the states of one run at ``--curve`` steps (its
  checkpoints), so the points before the last are mid-schedule (learning rate not yet decayed);
- every distinct search winner fine-tuned and exported (`qnas export`): the gate must pass, and
  the exported file's top-1 (run on every test image) must equal the exact forward's.

Target: the fine-tuned mean >= the stand-alone mean, with at most a quarter of the stand-alone
run's 2,800 steps. Writes runs/bench/finetune/finetune.json after every subnet (a partial result
survives a kill), a table, and docs/bench/finetune.png.

    python -m benchmarks.finetune                       # ~60 min on 2 cores (one thread: set by --threads)
    python -m benchmarks.finetune --quick --out runs/bench-quick/finetune   # tiny space, minutes
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qnas_cli.calibrate import calibrated_subnet, evaluate, subnet_document
from qnas_cli.checkpoint import load_weights, sha256_file, versions, write_json
from qnas_cli.cost import arch_cost
from qnas_cli.data import load_dataset
from qnas_cli.finetune import FinetuneConfig, finetune
from qnas_cli.run_folder import ckpt_dir
from qnas_cli.space import PRESETS, Arch, sample
from qnas_cli.supernet import Supernet, load_supernet
from qnas_cli.train import TrainConfig, train

DEFAULT_SUPERNET = Path("runs/bench/supernet_accuracy/default/supernet.pt")
STANDALONE_STEPS = 2800  # the truth's recipe: qnas train --subnet, the default length
QUIET = lambda *a, **k: None  # noqa: E731


def spread(n: int, k: int) -> list[int]:
    """``k`` indices evenly over ``n`` items (the truth is in MFLOPs order): both ends included."""
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, k))}) if k > 0 else []


def teacher_for(arch_key: str, largest_key: str, teacher: str) -> str:
    """The supernet's largest subnet has no teacher but itself (`qnas finetune` refuses it): ``none``."""
    return "none" if arch_key == largest_key else teacher


def write_subnet(path: Path, arch: Arch, space, supernet: Path) -> Path:
    write_json(path, subnet_document(arch, space, str(supernet.resolve()), sha256_file(supernet)))
    return path


def test_top1(net: Supernet, arch: Arch, data, eval_images: int | None) -> float:
    sub = calibrated_subnet(net, arch, data)
    return evaluate(sub, data.test, data, arch.resolution, limit=eval_images)


def run_finetune(subnet: Path, out: Path, steps: int, teacher: str, args, curve: list[int] | None = None,
                 data=None) -> dict[str, Any]:
    """One `qnas finetune` (library call, the same as the command); with ``curve``, the test top-1 of
    the run's checkpoints at those steps too (evaluation time is not counted as fine-tune time)."""
    points: dict[int, float] = {}
    spent = {"eval": 0.0}
    ckpt_every = min(np.gcd.reduce(curve), 100) if curve else 100
    space_net = {}

    def on_step(step: int, total: int, metrics: dict) -> None:
        spent.setdefault("first", time.perf_counter())
        spent["last"] = time.perf_counter()
        if curve and step - 1 in curve and step - 1 < total:
            t = time.perf_counter()
            payload, _ = load_weights(ckpt_dir(out) / f"step_{step - 1:08d}.pt")
            net = space_net["net"]
            net.load_state_dict(payload["model"])
            points[step - 1] = test_top1(net, space_net["arch"], data, args.curve_eval_images)
            spent["eval"] += time.perf_counter() - t
            print(f"    step {step - 1}: test top-1 {100 * points[step - 1]:.2f}%", flush=True)

    if curve:
        raw = json.loads(subnet.read_text())
        net, _ = load_supernet(Path(raw["supernet"]["path"]))
        space_net.update(net=net, arch=Arch.from_dict(raw, net.space))
    t = time.perf_counter()
    summary = finetune(FinetuneConfig(subnet=str(subnet), out=str(out), steps=steps, teacher=teacher, lr=args.lr,
                                      kd_ratio=args.kd_ratio, warmup_steps=args.warmup_steps, ckpt_every=int(ckpt_every), eval_images=args.eval_images,
                                      tensorboard=False), on_step=on_step, log=QUIET, overwrite=True)
    seconds = time.perf_counter() - t - spent["eval"]
    # the steps alone (the first step's start is not seen: one step's time added back)
    steps_s = (spent["last"] - spent["first"] - spent["eval"]) * steps / max(steps - 1, 1)
    m = summary["metrics"]
    if curve:
        points[steps] = m["finetuned"]["test_top1"]
        points[0] = m["inherited"]["test_top1"]
    return {"inherited": m["inherited"]["test_top1"], "finetuned": m["finetuned"]["test_top1"],
            "inherited_search": m["inherited"]["search_top1"], "finetuned_search": m["finetuned"]["search_top1"],
            "seconds": round(seconds, 1), "train_seconds": round(steps_s, 1), "subnet": summary["subnet"],
            **({"curve": {str(k): points[k] for k in sorted(points)}} if curve else {})}


def quick_setup(out: Path) -> tuple[Path, list[dict[str, Any]]]:
    """--quick: a tiny supernet and two random subnets with a stand-in truth (each trained alone, briefly)."""
    common = dict(space="tiny", batch_size=32, eval_images=200, calib_images=128, warmup_steps=5, tensorboard=False)
    train(TrainConfig(out=str(out / "supernet"), steps=60, lr=0.1, **common), log=QUIET, overwrite=True)
    space, entries = PRESETS["tiny"], []
    for i, seed in enumerate((1, 2)):
        arch = sample(space, "random", random.Random(seed))
        f = write_subnet(out / "subnets" / f"alone_{i}.json", arch, space, out / "supernet" / "supernet.pt")
        s = train(TrainConfig(out=str(out / "alone" / str(i)), steps=60, lr=0.1, subnet=str(f), **common), log=QUIET, overwrite=True)
        entries.append({"index": i, "arch": arch.to_dict(space), "arch_key": arch.key, "mflops": arch_cost(space, arch, 1, 10).mflops,
                        "top1": {"0": s["metrics"]["subnet"]["test_top1"]}})
    return out / "supernet" / "supernet.pt", entries


def search_winners(supernet: Path, out: Path, args) -> list[dict[str, Any]]:
    """The demo's search (its budgets across the host table's range), on this supernet."""
    from dataclasses import replace

    from qnas_cli.demo import budgets_for
    from qnas_cli.export.latency_build import resolve_table
    from qnas_cli.latency import Predictor
    from qnas_cli.search_job import SearchConfig, prepare_search, run_search

    cfg = SearchConfig(supernet=str(supernet), budgets_ms=[1.0], population=args.population, generations=args.generations,
                       out=str(out / "search"), resume=(out / "search" / "evaluations.jsonl").is_file(), tensorboard=False)
    setup = prepare_search(cfg)
    table, table_path = resolve_table(None, setup.net.space, setup.net.in_channels, setup.net.num_classes, log=print)
    budgets = budgets_for(Predictor(table, setup.net.space), setup.net.space)
    print(f"search: budgets {budgets} ms, population {args.population} x {args.generations}", flush=True)
    result = run_search(replace(cfg, budgets_ms=budgets, table=str(table_path)), QUIET, None,
                        table=(table, table_path), setup=setup)
    return [{"budget_ms": c["budget_ms"], "arch": c["arch"], "file": str(out / "search" / c["file"]),
             "mflops": c["mflops"], "search_top1": c["search_top1"]} for c in result["chosen"]]


def export_checked(subnet: Path, folder: Path) -> dict[str, Any]:
    """`qnas export` of a fine-tuned subnet, its file run on every test image."""
    from qnas_cli.export.pipeline import export_subnet

    t = time.perf_counter()
    r = export_subnet(subnet, folder, verify_images=None, log=QUIET)
    a, p = r["accuracy"], r["parity"][r["target"]]
    return {"passed": r["passed"], "exact": p["exact"], "max_abs_lsb": p["max_abs_lsb"], "exact_forward_top1": a["top1"],
            "tflite_top1": a["tflite_top1"], "tflite_images": a["tflite_images"],
            "file_equals_exact_forward": a["tflite_top1"] == a["top1"] and a["tflite_images"] == a["n_images"],
            "seconds": round(time.perf_counter() - t, 1)}


def plot(result: dict[str, Any], path: Path) -> None:
    from benchmarks.plots import pyplot, save_png

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = result["truth_subnets"]
    x = [r["mflops"] for r in rows]
    for key, label, mark in (("inherited", "inherited", "o"), ("finetuned", f"fine-tuned ({result['config']['steps']} steps, lr {result['config']['lr']:g})", "s"),
                             ("standalone", f"stand-alone ({STANDALONE_STEPS} steps, mean of seeds)", "^")):
        ax.plot(x, [100 * r[key] for r in rows], mark, label=label)
    for w in result.get("winners", []):
        if "finetuned" in w:
            ax.plot([w["mflops"]] * 2, [100 * w["inherited"], 100 * w["finetuned"]], "k:", lw=1)
            ax.plot(w["mflops"], 100 * w["finetuned"], "k*", ms=9)
    ax.plot([], [], "k*", label="search winner, fine-tuned (dotted: from inherited)")
    ax.set(xlabel="MFLOPs", ylabel="int8 test top-1 (%)", title=f"{result['config']['space']}: per subnet")
    ax.legend(fontsize=8)
    for n, c in enumerate(result.get("curves", [])):  # one colour per subnet; the line style tells the teacher
        for teacher, style in (("largest", "-o"), ("none", "--s")):
            if teacher in c:
                pts = c[teacher]["curve"]
                bx.plot([int(k) for k in pts], [100 * v for v in pts.values()], style, color=f"C{n}",
                        label=f"#{c['index']} ({c['mflops']:.1f} MFLOPs), teacher {teacher}, lr {c.get('lr', result['config']['lr']):g}")
        bx.axhline(100 * c["standalone"], color=f"C{n}", lw=0.8, ls=":")
    bx.set(xlabel="fine-tune steps (states of one run; dotted: stand-alone)", ylabel="int8 test top-1 (%)",
           title="test top-1 vs fine-tune steps")
    bx.legend(fontsize=8)
    save_png(fig, path)
    plt.close(fig)


def summarize(result: dict[str, Any]) -> None:
    rows = result["truth_subnets"]
    if not rows:
        return
    mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
    result["means"] = {k: mean(k) for k in ("inherited", "finetuned", "standalone")}
    result["means"]["finetune_seconds"] = mean("seconds")
    result["means"]["train_seconds"] = mean("train_seconds")
    result["target_met"] = result["means"]["finetuned"] >= result["means"]["standalone"] and \
        result["config"]["steps"] <= STANDALONE_STEPS // 4
    result["short_of_standalone"] = [r["index"] for r in rows if r["finetuned"] < r["standalone"]]


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'#':>3}{'MFLOPs':>8}{'inherited':>11}{'fine-tuned':>12}{'stand-alone':>13}{'Δ vs alone':>12}{'seconds':>9}"
          f"{'steps s':>9}")
    for r in result["truth_subnets"]:
        print(f"{r['index']:>3}{r['mflops']:>8.2f}{100 * r['inherited']:>10.2f}%{100 * r['finetuned']:>11.2f}%"
              f"{100 * r['standalone']:>12.2f}%{100 * (r['finetuned'] - r['standalone']):>+11.2f}pp{r['seconds']:>9.0f}"
              f"{r['train_seconds']:>9.0f}")
    if "means" in result:
        m = result["means"]
        print(f"{'mean':>11}{100 * m['inherited']:>10.2f}%{100 * m['finetuned']:>11.2f}%{100 * m['standalone']:>12.2f}%"
              f"{100 * (m['finetuned'] - m['standalone']):>+11.2f}pp{m['finetune_seconds']:>9.0f}")
        print(f"target (fine-tuned mean >= stand-alone mean, <= {STANDALONE_STEPS // 4} steps): "
              f"{'met' if result['target_met'] else 'NOT met'}; short of stand-alone: {result['short_of_standalone'] or 'none'}")
    for w in result.get("winners", []):
        e = w.get("export", {})
        print(f"winner {w['budget_ms']:g} ms {w['arch']}: inherited {100 * w.get('inherited', float('nan')):.2f}% -> "
              f"fine-tuned {100 * w.get('finetuned', float('nan')):.2f}%; export gate {'PASS' if e.get('passed') else 'FAIL'}, "
              f"file top-1 {100 * e.get('tflite_top1', float('nan')):.2f}% == exact forward {100 * e.get('exact_forward_top1', float('nan')):.2f}%: "
              f"{e.get('file_equals_exact_forward')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--supernet", type=Path, default=DEFAULT_SUPERNET)
    ap.add_argument("--subnets", type=int, default=8, help="truth subnets, spread over MFLOPs")
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps (default: qnas finetune's)")
    ap.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    ap.add_argument("--kd-ratio", type=float, default=FinetuneConfig.kd_ratio)
    ap.add_argument("--warmup-steps", type=int, default=FinetuneConfig.warmup_steps)
    ap.add_argument("--curve", default="100,200,300,400,500,700", help="steps of the curve (its last: the curve runs' length)")
    ap.add_argument("--curve-eval-images", type=int, default=5000, help="test images per curve point (seeded, class-stratified; the last point: the table's)")
    ap.add_argument("--eval-images", type=int, default=None, help="test images of the table (default: all)")
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--no-search", action="store_true")
    ap.add_argument("--no-curves", action="store_true")
    ap.add_argument("--no-teacher-off", action="store_true", help="skip the teacher-off curves (run beside, --teacher none)")
    ap.add_argument("--merge-tables", type=Path, nargs="*", default=[],
                    help="with --merge-winners: the truth rows (and teacher-on curves) of runs on other cores (--indices)")
    ap.add_argument("--teacher", default="largest", choices=("largest", "none"),
                    help="the table's teacher (none: the table's curves are the teacher-off ones; no second pass)")
    ap.add_argument("--indices", default=None, help="truth subnets by index (comma-separated) instead of --subnets' spread")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a shared 2-core host)")
    ap.add_argument("--quick", action="store_true", help="tiny space, a few steps: a smoke run")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/finetune"))
    ap.add_argument("--png", type=Path, default=None, help="default: docs/bench/finetune.png (--quick: OUT/finetune.png)")
    ap.add_argument("--merge-winners", type=Path, default=None,
                    help="only merge the winners of another run's finetune.json (e.g. one with --subnets 0, run beside "
                         "this one on the other core) into OUT/finetune.json, then plot and print")
    ap.add_argument("--merge-curves", type=Path, default=None,
                    help="with --merge-winners: also the teacher-off curves of another run's finetune.json (--teacher none)")
    args = ap.parse_args()
    if args.merge_winners:
        result = json.loads((args.out / "finetune.json").read_text())
        result["winners"] = json.loads(args.merge_winners.read_text())["winners"]
        result["merged_winners_from"] = str(args.merge_winners)
        for path in args.merge_tables:
            other = json.loads(path.read_text())
            have = {r["index"] for r in result["truth_subnets"]}
            result["truth_subnets"] = sorted(result["truth_subnets"] + [r for r in other["truth_subnets"] if r["index"] not in have],
                                             key=lambda r: r["index"])
            have = {c["index"] for c in result["curves"]}
            imported = [{**c, "lr": c.get("lr", other["config"]["lr"])} for c in other["curves"] if c["index"] not in have]
            result["curves"] = sorted(result["curves"] + imported, key=lambda c: c["index"])
            result.setdefault("merged_tables_from", []).append(str(path))
        if args.merge_curves:
            other = {c["index"]: c for c in json.loads(args.merge_curves.read_text())["curves"]}
            for c in result["curves"]:
                if c["index"] in other and "none" in other[c["index"]]:
                    c["none"] = other[c["index"]]["none"]
            result["merged_curves_from"] = str(args.merge_curves)
        summarize(result)
        png = args.png or Path("docs/bench/finetune.png")
        write_json(args.out / "finetune.json", result)
        plot(result, png)
        print_table(result)
        return
    torch.set_num_threads(args.threads)
    steps = args.steps or FinetuneConfig.steps
    curve = [int(s) for s in args.curve.split(",")]
    if args.quick:
        steps, curve, args.subnets, args.eval_images, args.curve_eval_images = 10, [5, 10], 2, 300, 300
    png = args.png or (args.out / "finetune.png" if args.quick else Path("docs/bench/finetune.png"))
    t0 = time.perf_counter()
    if args.quick:
        supernet, entries = quick_setup(args.out / "quick")
        spread_over = len(entries)
    else:
        from benchmarks.truth import load_truth, spread_entries

        truth = load_truth()
        supernet, entries = args.supernet, truth["subnets"]
        spread_over = len(spread_entries(truth))  # --subnets spreads over the first 20; --indices may name any added since
    net, meta = load_supernet(supernet)
    data = load_dataset(meta.get("config", {}).get("data", "fashion-mnist"), load_size=max(net.space.resolutions))
    picked = [entries[i] for i in ([int(i) for i in args.indices.split(",")] if args.indices else spread(spread_over, args.subnets))]
    result: dict[str, Any] = {"config": {"space": net.space.name, "supernet": str(supernet), "supernet_sha256": meta["weights"]["sha256"], "steps": steps,
                                         "lr": args.lr, "kd_ratio": args.kd_ratio, "warmup_steps": args.warmup_steps, "curve": curve, "quick": args.quick,
                                         "eval_images": args.eval_images, "curve_eval_images": args.curve_eval_images,
                                         "threads": args.threads, "population": args.population,
                                         "generations": args.generations},
                              "truth_subnets": [], "curves": [], "winners": [], "versions": versions()}

    def save() -> None:
        summarize(result)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(args.out / "finetune.json", result)
        if result["truth_subnets"] or result["winners"]:
            plot(result, png)

    largest = sample(net.space, "largest").key
    teachable = [e for e in picked if e["arch_key"] != largest]  # the curves compare the teacher on and off
    curve_idx = {teachable[0]["index"], teachable[-1]["index"]} if teachable and not args.no_curves else set()
    for e in picked:
        arch = Arch.from_dict(e["arch"], net.space)
        f = write_subnet(args.out / "subnets" / f"truth_{e['index']}.json", arch, net.space, supernet)
        alone = statistics.mean(e["top1"].values())
        print(f"truth #{e['index']} ({e['mflops']:.2f} MFLOPs) {arch.key}: stand-alone {100 * alone:.2f}%", flush=True)
        teacher = teacher_for(arch.key, largest, args.teacher)
        r = run_finetune(f, args.out / "runs" / f"truth_{e['index']}", steps, teacher, args,
                         curve if e["index"] in curve_idx and max(curve) == steps else None, data)
        print(f"  inherited {100 * r['inherited']:.2f}% -> fine-tuned {100 * r['finetuned']:.2f}% in {r['seconds']:.0f} s", flush=True)
        result["truth_subnets"].append({"index": e["index"], "arch": arch.key, "mflops": e["mflops"], "standalone": alone,
                                        "teacher": teacher,
                                        **{k: v for k, v in r.items() if k != "curve"}})
        if "curve" in r:
            result["curves"].append({"index": e["index"], "mflops": e["mflops"], "standalone": alone,
                                     args.teacher: {"curve": r["curve"], "seconds": r["seconds"]}})
        save()
    if args.quick:
        winners = [{"budget_ms": 0.0, "arch": picked[0]["arch_key"], "file": str(args.out / "subnets" / f"truth_{picked[0]['index']}.json"),
                    "mflops": picked[0]["mflops"]}]
    elif args.no_search:
        winners = []
    else:
        winners = search_winners(supernet, args.out, args)
    done: dict[str, dict[str, Any]] = {}
    for w in winners:
        if w["arch"] not in done:
            print(f"winner {w['budget_ms']:g} ms {w['arch']}", flush=True)
            r = run_finetune(Path(w["file"]), args.out / "runs" / f"winner_{w['budget_ms']:g}ms", steps,
                             teacher_for(w["arch"], largest, args.teacher), args)
            try:
                r["export"] = export_checked(Path(r["subnet"]), args.out / "export" / f"winner_{w['budget_ms']:g}ms")
            except Exception as e:  # noqa: BLE001 - recorded, and the benchmark goes on: the table is the main result
                r["export"] = {"passed": False, "error": f"{type(e).__name__}: {e}"}
            print(f"  inherited {100 * r['inherited']:.2f}% -> fine-tuned {100 * r['finetuned']:.2f}%; export "
                  f"{'PASS' if r['export']['passed'] else 'FAIL'}", flush=True)
            done[w["arch"]] = r
        result["winners"].append({**w, **done[w["arch"]]})
        save()
    for c in result["curves"] if args.teacher == "largest" and not args.no_teacher_off else []:  # the same subnets without the teacher
        f = args.out / "subnets" / f"truth_{c['index']}.json"
        print(f"curve #{c['index']}, teacher none", flush=True)
        r = run_finetune(f, args.out / "runs" / f"truth_{c['index']}_noteacher", max(curve), "none", args, curve, data)
        c["none"] = {"curve": r["curve"], "seconds": r["seconds"]}
        save()
    save()
    plot(result, png)
    print_table(result)
    print(f"wrote {args.out / 'finetune.json'} and {png} ({result['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
