"""The committed stand-alone ground truth (benchmarks/data): it loads, it is what BENCHMARKS.md §1
reports, its architectures are scale_ranking's seeded spread, and a truth of other runs or a
malformed file is refused in one line naming the field."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from benchmarks.scale_ranking import spread_subnets
from benchmarks.truth import (DEFAULT_TRUTH, check_truth_matches, load_truth, seed_taus, spread_entries, standalone_recipe,
                              truth_archs, truth_difference, truth_mean)
from qnas_cli.space import load_space, sample
from qnas_cli.train import TrainConfig


@pytest.fixture(scope="module")
def truth():
    return load_truth()


def default_recipe(**options) -> dict:
    """The recipe of scale_ranking's default stand-alone runs (steps left at qnas train's default)."""
    return standalone_recipe(TrainConfig(space="small", subnet="subnet.json", eval_images=None, calib_images=2000, **options))


def test_the_committed_truth_loads_with_its_identity(truth):
    assert truth["space"] == {"name": "small", "fingerprint": load_space("small").fingerprint}
    assert truth["data"]["spec"] == "fashion-mnist" and truth["data"]["test"] == truth["evaluation"]["images"] == 10000
    assert truth["recipe"]["steps"] == 2800 and truth["recipe"]["phases"] == [{"name": "float", "steps": 1400},
                                                                               {"name": "int8", "steps": 1400}]
    assert truth["seeds"] == [0, 1] and len(spread_entries(truth)) == 20 == truth["subnets"].index(spread_entries(truth)[-1]) + 1
    assert truth["commit"].startswith("218eb7f") and "provenance" in truth
    for e in truth["subnets"]:
        assert set(e["top1"]) == {"0", "1"} and all(round(v * 10000) == pytest.approx(v * 10000) for v in e["top1"].values())
    first, last = truth["subnets"][0], spread_entries(truth)[-1]
    assert first["top1"] == {"0": 0.8898, "1": 0.8989} and first["top1_mean_1400"] == 0.8747
    assert last["top1"] == {"0": 0.8984, "1": 0.9032} and f"{last['mflops']:.2f}" == "11.43"


def test_its_archs_are_scale_rankings_seeded_spread(truth):
    """20 subnets, seed 0, at evenly spaced MAC ranks: exactly the file's first 20, in its order."""
    space = load_space("small")
    archs = spread_subnets(space, 20, 0, truth["data"]["in_channels"], truth["data"]["num_classes"])
    assert [a.to_dict(space) for a in archs] == [e["arch"] for e in spread_entries(truth)]
    assert [a.key for a in archs] == [e["arch_key"] for e in spread_entries(truth)] == [a.key for a in truth_archs(truth)][:20]
    assert [e["index"] for e in truth["subnets"]] == list(range(len(truth["subnets"])))


def test_seed_tau_and_means_are_benchmarks_md(truth):
    """BENCHMARKS.md §1: the seeds agree at tau +0.759; the truth column is their mean."""
    assert f"{seed_taus({**truth, 'subnets': spread_entries(truth)})['0/1']:+.3f}" == "+0.759"
    means = [truth_mean(e) for e in spread_entries(truth)]
    assert f"{100 * means[0]:.2f}" == "89.44" and f"{100 * means[19]:.2f}" == "90.08"
    assert f"{100 * min(means):.2f}" == "88.39" and f"{100 * max(means):.2f}" == "90.47"
    assert means[5] == statistics.mean([0.8999, 0.9008])


def test_the_default_stand_alone_recipe_matches_and_another_is_refused(truth):
    space, data = load_space("small"), truth["data"]
    assert truth_difference(truth, space, data, default_recipe()) is None
    assert truth_difference(truth, space, data, default_recipe(steps=2800)) is None  # the default, given explicitly
    check_truth_matches(truth, space, data, default_recipe())
    for recipe, field in [(default_recipe(steps=1400), "recipe.steps"), (default_recipe(lr=0.1), "recipe.lr"),
                          (default_recipe(float_steps=0), "recipe.float_steps"),
                          # the truth predates --weight-granularity: it reads as per-tensor, and only that
                          (default_recipe(quant={"weight_granularity": "per-channel"}), "recipe.quant")]:
        with pytest.raises(SystemExit, match=field):
            check_truth_matches(truth, space, data, recipe)
    with pytest.raises(SystemExit, match="space.name is 'small' there, 'tiny' now"):
        check_truth_matches(truth, load_space("tiny"), data, default_recipe())
    with pytest.raises(SystemExit, match="data.test is 10000 there, 500 now"):
        check_truth_matches(truth, space, {**data, "test": 500}, default_recipe())


@pytest.mark.parametrize("corrupt, field", [
    (lambda t: t.update(format="qnas.other/1"), "format"),
    (lambda t: t["space"].update(fingerprint="0000"), "space.fingerprint"),
    (lambda t: t["subnets"][3]["top1"].pop("1"), r"subnets\[3\].top1"),
    (lambda t: t["subnets"][4]["top1"].update({"0": 88.98}), r"subnets\[4\].top1.0"),
    (lambda t: t["subnets"][5]["arch"]["stages"][0].update(width=17), r"subnets\[5\].arch"),
    (lambda t: t["subnets"][6].update(arch_key="r28"), r"subnets\[6\].arch_key"),
    (lambda t: t["subnets"][7].update(steps=1400), r"subnets\[7\].steps"),
    (lambda t: t.pop("recipe"), "recipe"),
    (lambda t: t["subnets"][8].update(addition=len(t.get("additions", []))), r"subnets\[8\].addition"),
    (lambda t: t.update(additions=[{"command": "x"}]), "additions"),
])
def test_a_malformed_file_is_one_line_naming_the_field(tmp_path, corrupt, field):
    truth = json.loads(DEFAULT_TRUTH.read_text())
    corrupt(truth)
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(truth))
    with pytest.raises(SystemExit, match=f"^error: stand-alone truth {path}: {field}") as e:
        load_truth(path)
    assert "\n" not in str(e.value)


def test_an_unreadable_file_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    for path, text in [(tmp_path / "bad.json", "not readable JSON"), (tmp_path / "none.json", "does not exist")]:
        with pytest.raises(SystemExit, match=text) as e:
            load_truth(path)
        assert "\n" not in str(e.value)


def test_rewriting_from_benchmarks_md_keeps_the_subnets_added_since(tmp_path):
    """--write-from-benchmarks-md rebuilds the first 20 from the table; the added ones follow."""
    truth = json.loads(DEFAULT_TRUTH.read_text())
    space = load_space("small")
    extra = sample(space, "largest")
    truth["additions"] = [{"command": "python -m benchmarks.add_truth", "commit": "c" * 40}]
    truth["subnets"] = spread_entries(truth) + [{**truth["subnets"][0], "index": 20, "addition": 0,
                                                 "arch": extra.to_dict(space), "arch_key": extra.key}]
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(truth))
    run = subprocess.run([sys.executable, "-m", "benchmarks.truth", "--write-from-benchmarks-md", "--out", str(path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rewritten = load_truth(path)
    assert rewritten["additions"] == truth["additions"] and rewritten["subnets"][20:] == truth["subnets"][20:]
    assert spread_entries(rewritten) == spread_entries(load_truth()) and len(rewritten["subnets"]) == 21
