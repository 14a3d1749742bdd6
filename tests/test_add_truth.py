"""Growing the stand-alone truth (benchmarks.add_truth): which subnets are chosen, and a real
end-to-end run on `tiny` that trains them, appends them with their provenance, and resumes."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from benchmarks.add_truth import BAND, budget_subnets
from benchmarks.truth import FORMAT, load_truth, spread_entries, standalone_recipe
from qnas_cli.cost import arch_cost
from qnas_cli.data import load_dataset
from qnas_cli.export.latency_build import save_table
from qnas_cli.space import load_space, sample
from qnas_cli.train import TrainConfig
from tests.test_latency import synthetic_table


def _mflops(space):
    return lambda a: arch_cost(space, a, 1, 10).mflops


def test_subnets_compete_for_the_budgets_evenly_and_none_twice():
    space = load_space("small")
    cost = _mflops(space)
    budgets = [3.0, 5.0, 8.0]  # MFLOPs stand in for latency here (every band below the slowest subnet)
    exclude = {sample(space, "random", random.Random(0)).key}
    archs = budget_subnets(space, cost, cost, budgets, 7, exclude, seed=0, pool=1500)
    assert len(archs) == 7 and len({a.key for a in archs}) == 7 and not exclude & {a.key for a in archs}
    band_of = [next(k for k, b in enumerate(budgets) if BAND * b <= cost(a) <= b) for a in archs]
    assert band_of == [0, 1, 2, 0, 1, 2, 0]  # round-robin, lowest budget first: a partial run covers all three
    assert budget_subnets(space, cost, cost, budgets, 7, exclude, seed=0, pool=1500) == archs  # seeded
    assert budget_subnets(space, cost, cost, budgets, 7, exclude, seed=1, pool=1500) != archs


def test_a_short_band_gives_its_share_to_the_others():
    space = load_space("small")
    cost = _mflops(space)
    archs = budget_subnets(space, cost, cost, [0.001, 8.0], 6, set(), seed=0, pool=1500)  # no subnet under 0.001
    assert len(archs) == 6 and all(BAND * 8.0 <= cost(a) <= 8.0 for a in archs)


def test_a_budget_above_every_subnet_is_competed_for_by_the_slowest():
    space = load_space("small")
    cost = _mflops(space)
    rng = random.Random(0)
    slowest = max(cost(sample(space, "random", rng)) for _ in range(1500))  # the pool budget_subnets draws
    archs = budget_subnets(space, cost, cost, [1000.0], 3, set(), seed=0, pool=1500)
    assert len(archs) == 3 and all(BAND * slowest <= cost(a) <= slowest for a in archs)



def _tiny_truth(tmp_path):
    """A truth file of `tiny` with a 20-step recipe and one subnet (its values are the test's, not a result)."""
    space = load_space("tiny")
    data = load_dataset("fashion-mnist", load_size=max(space.resolutions))
    cfg = TrainConfig(space="tiny", subnet="subnet.json", steps=20, eval_images=300, calib_images=128)
    arch = sample(space, "largest")
    truth = {"format": FORMAT, "description": "test", "space": {"name": "tiny", "fingerprint": space.fingerprint},
             "data": data.describe(), "recipe": standalone_recipe(cfg),
             "evaluation": {"split": "test", "images": 300, "bn_calibration_images": 128},
             "command": "test", "commit": "test", "seeds": [0, 1],
             "subnets": [{"index": 0, "arch": arch.to_dict(space), "arch_key": arch.key,
                          "mflops": arch_cost(space, arch, 1, 10).mflops, "steps": 20, "top1": {"0": 0.5, "1": 0.5}}]}
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(truth))
    table = tmp_path / "table.json"
    save_table(synthetic_table(space), table)
    return path, table


def _add(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.add_truth", *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_added_subnets_are_trained_appended_with_provenance_and_a_rerun_trains_nothing(tmp_path):
    path, table = _tiny_truth(tmp_path)
    out = tmp_path / "out"
    run = _add("--subnets", 2, "--jobs", 1, "--truth", path, "--table", table, "--out", out)
    assert run.returncode == 0, run.stderr
    truth = load_truth(path)
    added = truth["subnets"][1:]
    assert len(truth["subnets"]) == 3 and spread_entries(truth) == truth["subnets"][:1]
    assert [e["index"] for e in truth["subnets"]] == [0, 1, 2] and all(e["addition"] == 0 for e in added)
    addition = truth["additions"][0]
    assert addition["command"].startswith("python -m benchmarks.add_truth --subnets 2")
    assert addition["plan"] == [e["arch_key"] for e in added] and len(addition["commit"]) == 40
    assert addition["selection"]["budgets_ms"] and addition["integer_contract_version"] >= 1
    for e in added:  # real runs: each seed's top-1 is a count of the 300 test images, and the seeds differ somewhere
        assert all(0 < v <= 1 and round(v * 300) == pytest.approx(v * 300) for v in e["top1"].values())
    assert len({v for e in added for v in e["top1"].values()}) > 1
    plan = json.loads((out / "plan.json").read_text())
    assert [a for a in plan["archs"]] == [e["arch"] for e in added]

    before = path.read_text()
    rerun = _add("--subnets", 2, "--jobs", 1, "--truth", path, "--table", table, "--out", out)
    assert rerun.returncode == 0 and "0 runs to train" in rerun.stdout and path.read_text() == before


def test_a_plan_of_another_truth_is_refused_in_one_line(tmp_path):
    path, table = _tiny_truth(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({"format": "qnas.truth_plan/1", "truth": {"space": "other"}, "archs": []}))
    before = path.read_text()
    run = _add("--subnets", 2, "--truth", path, "--table", table, "--out", out)
    assert run.returncode != 0 and run.stderr.strip().count("\n") == 0 and "plan of another truth" in run.stderr
    assert path.read_text() == before and sorted(p.name for p in out.iterdir()) == ["plan.json"]

