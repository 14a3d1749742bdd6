"""Stand-alone ground truth as data: subnets trained alone, their int8 test top-1 per seed, and
what they were trained and scored under, so that a benchmark reads them instead of retraining.

A truth file (``qnas.standalone_truth/1``) holds the space (name, fingerprint), the data
(``Dataset.describe()``), the stand-alone recipe (``standalone_recipe``: the `qnas train --subnet`
options a result depends on, its length resolved), how the runs were scored, the command and
commit that produced them, and per subnet its ``index``, ``arch`` (``Arch.to_dict``),
``arch_key``, ``mflops``, ``steps`` and ``top1`` per seed (``{"0": 0.8898, ...}``, fractions of
the whole test split). A benchmark uses it only for what it would train itself
(``truth_difference``: same space, data and recipe; then the same architecture and seed).
Subnets trained later by ``benchmarks.add_truth`` follow, each naming (``addition``) its entry of
``additions``: the command, commit, date, host and selection that produced it. The first ones,
without ``addition``, are the MFLOPs spread (``spread_entries``).

The committed file is written from BENCHMARKS.md §1's table (the runs themselves are gone), its
architectures regenerated from scale_ranking's seeded spread and checked against the table's
MFLOPs:

    python -m benchmarks.truth --write-from-benchmarks-md     # rewrites DEFAULT_TRUTH
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from qnas_cli.checkpoint import write_json
from qnas_cli.errors import UserError
from qnas_cli.ranking import kendall_tau
from qnas_cli.space import Arch, SearchSpace, load_space
from qnas_cli.train import TrainConfig, phase_plan, plan_record, with_added_defaults

FORMAT = "qnas.standalone_truth/1"
DEFAULT_TRUTH = Path(__file__).parent / "data" / "standalone_small_fashion-mnist.json"
# The options a stand-alone result depends on, besides what is recorded apart (space, data) or
# per result (seed, subnet): what --resume compares, and how the final test top-1 is measured.
RECIPE_KEYS = tuple(k for k in (*TrainConfig.RESUME_KEYS, "eval_images", "calib_images")
                    if k not in ("space", "data", "seed", "subnet"))


def standalone_recipe(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg``'s recipe as a truth file records it: RECIPE_KEYS, with the length resolved (``steps``
    and ``float_steps`` as the phase plan has them, plus the plan), so that a run given the default
    length and one given it explicitly are the same recipe, and one under another default is not."""
    plan = plan_record(phase_plan(cfg, steps_per_epoch=0))  # benchmarks give --steps or its default, never --epochs
    options = cfg.to_dict()
    recipe = {k: options[k] for k in RECIPE_KEYS}
    recipe["steps"] = sum(p["steps"] for p in plan)
    recipe["float_steps"] = sum(p["steps"] for p in plan if p["name"] == "float")
    recipe["phases"] = plan
    return json.loads(json.dumps(recipe))  # as the file holds it (lists, not tuples)


def load_truth(path: Path | str = DEFAULT_TRUTH) -> dict[str, Any]:
    """The truth file at ``path``, validated (its architectures parse in its space, every top-1 is
    a fraction, one per seed); a bad file is one line naming the field."""
    path = Path(path)
    try:
        truth = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: stand-alone truth {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: stand-alone truth {path} is not readable JSON: {e}") from None
    why = _schema_problem(truth)
    if why:
        raise SystemExit(f"error: stand-alone truth {path}: {why}")
    return truth


def _schema_problem(truth: Any) -> str | None:
    if not isinstance(truth, dict):
        return f"expected a JSON object, got {type(truth).__name__}"
    if truth.get("format") != FORMAT:
        return f"format is {truth.get('format')!r}, expected {FORMAT!r}"
    for key, kind in (("space", dict), ("data", dict), ("recipe", dict), ("evaluation", dict), ("command", str),
                      ("commit", str), ("seeds", list), ("subnets", list)):
        if not isinstance(truth.get(key), kind):
            return f"{key}: expected a {'JSON object' if kind is dict else kind.__name__}, got {truth.get(key)!r:.60}"
    space_name, fingerprint = truth["space"].get("name"), truth["space"].get("fingerprint")
    try:
        space = load_space(space_name) if isinstance(space_name, str) else None
    except UserError:
        space = None
    if space is None:
        return f"space.name: {space_name!r} is not a preset space"
    if fingerprint != space.fingerprint:
        return f"space.fingerprint: {fingerprint!r}, but {space_name} is {space.fingerprint} here (another space)"
    seeds = truth["seeds"]
    if not seeds or not all(_is_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
        return f"seeds: expected distinct integers, got {seeds!r}"
    if not _is_int(truth["recipe"].get("steps")):
        return f"recipe.steps: expected an integer, got {truth['recipe'].get('steps')!r}"
    if not truth["subnets"]:
        return "subnets: empty"
    additions = truth.get("additions", [])
    if not isinstance(additions, list) or not all(isinstance(a, dict) and isinstance(a.get("command"), str)
                                                   and isinstance(a.get("commit"), str) for a in additions):
        return f"additions: expected a list of objects with a command and a commit, got {additions!r:.60}"
    keys = set()
    for i, entry in enumerate(truth["subnets"]):
        why = _entry_problem(entry, i, space, [str(s) for s in seeds], truth["recipe"]["steps"])
        if not why and "addition" in entry and not (_is_int(entry["addition"]) and 0 <= entry["addition"] < len(additions)):
            why = f".addition: {entry['addition']!r} names no entry of additions ({len(additions)})"
        if why:
            return f"subnets[{i}]{why}"
        if entry["arch_key"] in keys:
            return f"subnets[{i}].arch_key: {entry['arch_key']} appears twice"
        keys.add(entry["arch_key"])
    return None


def _entry_problem(entry: Any, i: int, space: SearchSpace, seeds: list[str], steps: int) -> str | None:
    if not isinstance(entry, dict):
        return f": expected a JSON object, got {entry!r:.60}"
    if entry.get("index") != i:
        return f".index: {entry.get('index')!r}, expected {i} (its position)"
    try:
        arch = Arch.from_dict(entry.get("arch"), space)
    except UserError as e:
        return f".arch: {e}"
    if entry.get("arch_key") != arch.key:
        return f".arch_key: {entry.get('arch_key')!r}, but its arch is {arch.key}"
    if not _is_number(entry.get("mflops")) or entry["mflops"] <= 0:
        return f".mflops: expected a positive number, got {entry.get('mflops')!r}"
    if entry.get("steps") != steps:
        return f".steps: {entry.get('steps')!r}, but recipe.steps is {steps}"
    top1 = entry.get("top1")
    if not isinstance(top1, dict) or sorted(top1) != sorted(seeds):
        return f".top1: expected one value per seed ({', '.join(seeds)}), got {top1!r:.80}"
    for key, value in [*((f"top1.{s}", top1[s]) for s in seeds), ("top1_mean_1400", entry.get("top1_mean_1400", 0.5))]:
        if not _is_number(value) or not 0 <= value <= 1:
            return f".{key}: expected a fraction in [0, 1], got {value!r}"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def truth_difference(truth: dict[str, Any], space: SearchSpace, data_description: dict[str, Any],
                     recipe: dict[str, Any]) -> str | None:
    """Why ``truth`` is not the ground truth of runs in ``space`` on ``data_description`` (a
    ``Dataset.describe()``) under ``recipe`` (``standalone_recipe``), naming the first field that
    differs; None when it is."""
    for field, there, now in (("space.name", truth["space"]["name"], space.name),
                              ("space.fingerprint", truth["space"]["fingerprint"], space.fingerprint)):
        if there != now:
            return f"{field} is {there!r} there, {now!r} now"
    data_description = json.loads(json.dumps(data_description))
    for key in _keys(truth["data"], data_description):
        if truth["data"].get(key) != data_description.get(key):
            return f"data.{key} is {truth['data'].get(key)!r} there, {data_description.get(key)!r} now"
    # a recipe recorded before an option existed (--weight-granularity, --sampling) ran under its default: both sides read so
    recipe = with_added_defaults({"config": json.loads(json.dumps(recipe))})["config"]
    there = with_added_defaults({"config": truth["recipe"]})["config"]
    for key in _keys(there, recipe):
        if there.get(key) != recipe.get(key):
            return f"recipe.{key} is {there.get(key)!r} there, {recipe.get(key)!r} now"
    return None


def _keys(there: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Both dicts' keys, the file's order first (its recipe names the length before its split)."""
    return [*there, *(k for k in now if k not in there)]


def check_truth_matches(truth: dict[str, Any], space: SearchSpace, data_description: dict[str, Any],
                        recipe: dict[str, Any]) -> None:
    """Refuse (one line, naming the field) a truth of another space, data or recipe."""
    why = truth_difference(truth, space, data_description, recipe)
    if why:
        raise SystemExit(f"error: the stand-alone truth (commit {truth['commit'][:10]}) is not of these runs: {why}")


def truth_mean(entry: dict[str, Any]) -> float:
    """A subnet's ground truth: its int8 test top-1, averaged over the seeds."""
    return statistics.mean(entry["top1"].values())


def spread_entries(truth: dict[str, Any]) -> list[dict[str, Any]]:
    """The subnets of BENCHMARKS.md §1's table (scale_ranking's MFLOPs spread), without those added since."""
    return [e for e in truth["subnets"] if "addition" not in e]


def truth_archs(truth: dict[str, Any]) -> list[Arch]:
    """Each subnet's architecture, in the file's order."""
    space = load_space(truth["space"]["name"])
    return [Arch.from_dict(entry["arch"], space) for entry in truth["subnets"]]


def seed_top1(truth: dict[str, Any]) -> dict[tuple[str, int], float]:
    """Every result by (architecture key, seed)."""
    return {(e["arch_key"], int(s)): v for e in truth["subnets"] for s, v in e["top1"].items()}


def seed_taus(truth: dict[str, Any]) -> dict[str, float]:
    """Kendall tau between each pair of seeds' rankings (``"0/1"``): how reproducible the truth is."""
    seeds = [str(s) for s in truth["seeds"]]
    return {f"{a}/{b}": kendall_tau([e["top1"][a] for e in truth["subnets"]], [e["top1"][b] for e in truth["subnets"]])
            for a, b in itertools.combinations(seeds, 2)}


# ---- writing the committed file from BENCHMARKS.md §1 --------------------------------------------

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
TABLE_HEADER = "| # | MFLOPs | stand-alone 2,800 steps, seed 0 / 1 |"
COMMIT = "218eb7f26a137d39b7816e92b7252535e17c7f7b"  # added the 2,800-step table to BENCHMARKS.md
RUNS_COMMIT = "ea70f28"  # its parent: scale_ranking with --standalone-seeds, the code the runs used
STEPS, SEEDS, SUBNETS = 2800, (0, 1), 20


def benchmarks_md_rows(text: str) -> list[dict[str, float]]:
    """§1's per-subnet table: index, MFLOPs, per-seed and mean top-1 (fractions), the 1,400-step mean."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER)), None)
    if start is None:
        raise SystemExit(f"error: BENCHMARKS.md has no table starting {TABLE_HEADER!r}")
    rows = []
    for line in itertools.takewhile(lambda x: x.startswith("|"), lines[start + 2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        seeds = re.fullmatch(r"([\d.]+)% / ([\d.]+)%", cells[2])
        rows.append({"index": int(cells[0]), "mflops": float(cells[1]), "seed0": _fraction(seeds[1]),
                     "seed1": _fraction(seeds[2]), "mean": float(cells[3].rstrip("%")),
                     "mean_1400": float(cells[7].rstrip("%"))})
    return rows


def _fraction(percent: str) -> float:
    """A two-decimal percentage of the 10,000 test images as the exact fraction it stands for."""
    return round(float(percent) * 100) / 10000


def truth_from_benchmarks_md(text: str) -> dict[str, Any]:
    """The committed truth: §1's numbers, archs from scale_ranking's seeded spread, each checked
    against the table's MFLOPs and mean column (anything off stops the writing)."""
    from benchmarks.scale_ranking import spread_subnets  # here, not above: scale_ranking imports this module
    from qnas_cli.cost import arch_cost
    from qnas_cli.data import load_dataset

    space = load_space("small")
    data = load_dataset("fashion-mnist", load_size=max(space.resolutions))  # as scale_ranking loads it
    archs = spread_subnets(space, SUBNETS, 0, data.in_channels, data.num_classes)
    rows = benchmarks_md_rows(text)
    if [r["index"] for r in rows] != list(range(len(archs))):
        raise SystemExit(f"error: BENCHMARKS.md's table has subnets {[r['index'] for r in rows]}, "
                         f"expected 0..{len(archs) - 1}")
    subnets = []
    for arch, row in zip(archs, rows):
        mflops = arch_cost(space, arch, data.in_channels, data.num_classes).mflops
        entry = {"index": row["index"], "arch": arch.to_dict(space), "arch_key": arch.key, "mflops": mflops,
                 "steps": STEPS, "top1": {str(s): row[f"seed{s}"] for s in SEEDS},
                 "top1_mean_1400": round(row["mean_1400"] / 100, 4)}
        if f"{mflops:.2f}" != f"{row['mflops']:.2f}" or f"{100 * truth_mean(entry):.2f}" != f"{row['mean']:.2f}":
            raise SystemExit(f"error: subnet {row['index']}: the spread gives {arch.key}, {mflops:.2f} MFLOPs, mean "
                             f"{100 * truth_mean(entry):.2f}%; the table says {row['mflops']:.2f} MFLOPs, {row['mean']:.2f}%")
        subnets.append(entry)
    cfg = TrainConfig(space="small", subnet="subnet.json", steps=STEPS, eval_images=None, calib_images=2000)
    doc = truth_document(
        space, data.describe(), cfg, list(SEEDS), subnets,
        description="Stand-alone int8 test top-1 of `small` subnets, each trained alone from scratch by the "
                    "default `qnas train --subnet` recipe, seeds 0 and 1: the ground truth of BENCHMARKS.md claim 1 "
                    "(the first 20: its MFLOPs spread; then those of `additions`)",
        command="python -m benchmarks.scale_ranking --jobs 2 --out runs/bench/scale_ranking_2800 "
                "--predictor runs/bench/scale_ranking/supernet_predictor/supernet.pt "
                "--shared runs/bench/scale_ranking/supernet_shared/supernet.pt "
                "--convs runs/bench/scale_ranking/supernet_convs/supernet.pt",
        commit=COMMIT, integer_contract_version=1)
    doc["provenance"] = (
        f"Run 2026-12-05/06 on an AVX512-VNNI host (BENCHMARKS.md section 1); the runs are gone, so the numbers "
        f"are BENCHMARKS.md's table, written here by `python -m benchmarks.truth --write-from-benchmarks-md`. "
        f"`commit` is the one that added that table; the code that trained them is its parent {RUNS_COMMIT} "
        f"(scale_ranking with --standalone-seeds). The architectures are not in BENCHMARKS.md: they are "
        f"regenerated from scale_ranking.spread_subnets (20 subnets, seed 0, 2,000 random subnets at evenly "
        f"spaced MAC ranks), every one matching the table's MFLOPs and mean column. The supernet paths in "
        f"`command` follow scale_ranking's naming (BENCHMARKS.md says `--predictor/--shared/--convs` the same "
        f"supernets); they do not affect the stand-alone runs. top1_mean_1400 is the table's 1,400-step mean of "
        f"seeds 0 and 1 (`--standalone-steps 1400`, out runs/bench/scale_ranking), rounded to 0.01 pp; its "
        f"per-seed values were not recorded. Since then BN calibration became exact and thread-independent "
        f"(integer contract 2, commit a69de6b): a retrain today may differ in a few test images.")
    doc["seeds"], doc["subnets"] = doc.pop("seeds"), doc.pop("subnets")  # the file's order: provenance before them
    return doc


def truth_document(space: SearchSpace, data_description: dict[str, Any], cfg: TrainConfig, seeds: list[int],
                   subnets: list[dict[str, Any]], description: str, command: str, commit: str,
                   integer_contract_version: int) -> dict[str, Any]:
    """A truth file of ``subnets`` (entries as ``load_truth`` checks them), trained alone by ``cfg``'s
    recipe on the data ``data_description`` describes, scored as `qnas train --subnet` scores them."""
    images = data_description["test"] if cfg.eval_images is None else min(cfg.eval_images, data_description["test"])
    return {
        "format": FORMAT, "description": description,
        "space": {"name": space.name, "fingerprint": space.fingerprint},
        "data": data_description,
        "recipe": standalone_recipe(cfg),
        "evaluation": {
            "split": "test", "images": images, "arithmetic": "int8, exact integer (qnas_cli.calibrate.evaluate)",
            "bn_calibration_images": cfg.calib_images, "integer_contract_version": integer_contract_version,
            "how": f"qnas train --subnet's final evaluation, which scale_ranking reads from each run's supernet.json "
                   f"(metrics.subnet.test_top1): the trained subnet extracted, BN statistics calibrated on "
                   f"{cfg.calib_images:,} seeded training images, int8 top-1 on "
                   + (f"the whole test split ({images:,} images, so 2-decimal percentages are exact)"
                      if images == data_description["test"] else f"the first {images:,} test images"),
        },
        "command": command, "commit": commit, "seeds": seeds, "subnets": subnets,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-from-benchmarks-md", action="store_true",
                    help=f"write {DEFAULT_TRUTH.name} from BENCHMARKS.md section 1 (else: print the file's summary)")
    ap.add_argument("--benchmarks-md", type=Path, default=BENCHMARKS_MD)
    ap.add_argument("--out", type=Path, default=DEFAULT_TRUTH)
    args = ap.parse_args()
    if args.write_from_benchmarks_md:
        truth = truth_from_benchmarks_md(args.benchmarks_md.read_text())
        if args.out.is_file():  # the subnets added since are kept, after the table's
            old = load_truth(args.out)
            truth["additions"] = old.get("additions", [])
            added = [e for e in old["subnets"] if "addition" in e]
            truth["subnets"] += [{**e, "index": len(truth["subnets"]) + k} for k, e in enumerate(added)]
        write_json(args.out, truth)
        print(f"wrote {args.out}")
    truth = load_truth(args.out)
    means = [truth_mean(e) for e in truth["subnets"]]
    print(f"{len(truth['subnets'])} subnets ({len(spread_entries(truth))} of the MFLOPs spread) of "
          f"{truth['space']['name']}, {truth['recipe']['steps']} steps, seeds "
          f"{', '.join(map(str, truth['seeds']))}: mean top-1 {100 * min(means):.2f}-{100 * max(means):.2f}%; "
          + ", ".join(f"seeds {pair} tau {t:+.3f}" for pair, t in seed_taus(truth).items()))


if __name__ == "__main__":
    main()
