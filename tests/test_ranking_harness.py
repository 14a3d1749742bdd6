"""benchmarks/ranking.py's figures: rank correlation, its interval, regret under a budget; and
its --quick mode end to end on `tiny`."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from benchmarks.ranking import (CHOICES, arm_taus, bootstrap_tau, choice_worth, finetuned_ranking, finetuned_scores,
                                kernel_bias, mean_kernel, paired_delta, regret, rescored_regret, seed_agreement, spearman,
                                top_candidates)
from benchmarks.truth import load_truth
from qnas_cli.export.latency_build import save_table
from qnas_cli.ranking import kendall_tau
from qnas_cli.space import load_space, sample
from tests.test_latency import synthetic_table


def test_spearman_is_the_correlation_of_ranks_with_ties_averaged():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr


def test_the_bootstrap_interval_holds_the_estimate_and_is_seeded():
    x = [0.1, 0.4, 0.2, 0.8, 0.5, 0.9, 0.3, 0.7, 0.6, 1.0]
    y = [0.2, 0.3, 0.1, 0.9, 0.4, 0.8, 0.5, 0.6, 0.7, 1.0]
    lo, hi = bootstrap_tau(x, y, seed=3, n=500)
    assert lo <= kendall_tau(x, y) <= hi and -1 <= lo < hi <= 1
    assert bootstrap_tau(x, y, seed=3, n=500) == (lo, hi)


def test_regret_is_the_truth_lost_by_the_pick_under_the_budget():
    truth = [0.90, 0.88, 0.91, 0.95]
    score = [0.80, 0.85, 0.82, 0.99]
    latency = [1.0, 2.0, 3.0, 9.0]  # the best (0.95) does not fit 3 ms
    r = regret(truth, score, latency, 3.0)
    assert (r["fits"], r["best"], r["pick"]) == (3, 2, 1) and r["regret_pp"] == pytest.approx(3.0)
    assert regret(truth, truth, latency, 3.0)["regret_pp"] == 0 and regret(truth, score, latency, 0.5) == {"fits": 0}


def test_refit_act_ranges_gives_the_subnet_its_own_steps_and_leaves_the_supernet_alone(fmnist):
    """--act-ranges subnet: the subnet's activation steps are refitted to its own activations (so
    they move), deterministically, on a copy: the supernet's shared steps stay as they were."""
    import torch

    from benchmarks.ranking import refit_act_ranges
    from qnas_cli.calibrate import calibrated_subnet, evaluate
    from qnas_cli.layers import ActQuant
    from qnas_cli.space import sample
    from tests.conftest import make_supernet

    net = make_supernet()
    shared = {k: v.clone() for k, v in net.state_dict().items()}
    arch = sample(net.space, "random", __import__("random").Random(4))
    steps = lambda m: [a.scale.item() for a in m.modules() if isinstance(a, ActQuant)]  # noqa: E731
    subs = []
    for _ in range(2):
        sub = calibrated_subnet(net, arch, fmnist, 300)
        before = steps(sub)
        refit_act_ranges(sub, fmnist, arch.resolution, 300)
        subs.append(sub)
    assert steps(subs[0]) == steps(subs[1]) and steps(subs[0]) != before
    assert all(torch.equal(v, shared[k]) for k, v in net.state_dict().items())
    assert not subs[0].training and 0.0 <= evaluate(subs[0], fmnist.test, fmnist, arch.resolution, limit=200) <= 1.0


def test_collect_keeps_lever_rows_by_name_and_draws_them(tmp_path):
    import json

    from benchmarks.ranking import collect

    def result(tau: float) -> dict:
        return {"command": "python -m benchmarks.ranking", "commit": "abc", "supernet": {"sha256": "s"}, "kendall_tau": tau,
                "kendall_tau_90": [tau - 0.2, tau + 0.2], "spearman_rho": tau, "mflops_tau": 0.5, "mflops_tau_90": [0.3, 0.7],
                "mean_gap_pp": -2.0, "regret": {}, "calib_images": 2000, "act_ranges": "learned",
                "subnets": [{"index": i, "truth": 0.88 + i / 100, "inherited": 0.86 + i / 90, "mflops": i, "arch": "x"} for i in range(5)]}

    for name, tau in (("a", 0.2), ("b", 0.3), ("b2", 0.4)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result(tau)))
    levers, png = tmp_path / "levers.json", tmp_path / "levers.png"
    collect([f"base={tmp_path / 'a.json'}", f"worst={tmp_path / 'b.json'}"], levers, png)
    collect([f"worst={tmp_path / 'b2.json'}"], levers, png)  # a rerun replaces its row
    doc = json.loads(levers.read_text())
    assert list(doc["levers"]) == ["base", "worst"] and doc["levers"]["worst"]["kendall_tau"] == 0.4
    assert doc["levers"]["base"]["subnets"][4] == {"index": 4, "truth": 0.92, "inherited": 0.86 + 4 / 90, "mflops": 4}
    assert png.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        collect([str(tmp_path / "a.json")], levers, png)


@pytest.mark.slow
def test_quick_mode_trains_its_own_tiny_truth_and_scores_a_supernet_against_it(tmp_path):
    """The harness end to end on `tiny`: a supernet and a 6-subnet truth (two seeds) trained by the
    harness itself, every figure computed from them, and a rerun reuses all of it."""
    table = tmp_path / "table.json"
    save_table(synthetic_table(load_space("tiny")), table)
    out = tmp_path / "ranking"
    command = [sys.executable, "-m", "benchmarks.ranking", "--quick", "--table", str(table), "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    truth, result = load_truth(out / "truth.json"), json.loads((out / "ranking.json").read_text())
    assert truth["space"]["name"] == "tiny" and len(truth["subnets"]) == 6 and truth["recipe"]["steps"] == 30
    assert all(set(e["top1"]) == {"0", "1"} and 0 < min(e["top1"].values()) for e in truth["subnets"])
    assert result["truth"]["subnets"] == 6 and -1 <= result["kendall_tau"] <= 1 and len(result["regret"]) == 3
    assert [s["truth"] for s in result["subnets"]] == [statistics.mean(e["top1"].values()) for e in truth["subnets"]]
    assert result["kendall_tau"] == kendall_tau([s["inherited"] for s in result["subnets"]], [s["truth"] for s in result["subnets"]])
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0 and "--quick: 0 training runs" in rerun.stdout and "subnet  0: inherited" not in rerun.stdout


def test_rows_named_arm_slash_seed_are_one_arms_seeds():
    row = lambda tau, n: {"kendall_tau": tau, "subnets": [{}] * n}  # noqa: E731
    levers = {"default/s0": row(0.3, 41), "default/s1": row(0.5, 41), "strong/s0": row(0.6, 41), "control": row(0.4, 20)}
    assert arm_taus(levers) == {"default": [0.3, 0.5]}


def test_seed_agreement_tells_a_shared_error_from_training_noise():
    truth = [0.88, 0.89, 0.90, 0.91]
    bias = [0.01, -0.01, 0.02, -0.02]  # the recipe's: both seeds carry it
    rows = lambda noise: [{"truth": t, "inherited": t - 0.02 + b + n} for t, b, n in zip(truth, bias, noise)]  # noqa: E731
    levers = {"arm/s0": {"subnets": rows([0.0, 0.001, 0.0, -0.001])}, "arm/s1": {"subnets": rows([0.001, 0.0, -0.001, 0.0])},
              "alone": {"subnets": rows([0.0] * 4)}}
    a = seed_agreement(levers)
    assert set(a) == {"arm"} and a["arm"]["residual_corr"] > 0.9 and a["arm"]["inherited_tau"] == pytest.approx(1.0)


def test_kernel_bias_is_how_the_error_follows_the_mean_kernel_size():
    space = load_space("small")
    smallest, largest = sample(space, "smallest"), sample(space, "largest")
    assert (mean_kernel(smallest), mean_kernel(largest)) == (3, 7)
    rows = [{"truth": 0.9, "inherited": 0.88 + 0.002 * k, "mean_kernel": k} for k in (3, 4, 5, 6, 7)]
    assert kernel_bias(rows) == pytest.approx(1.0)
    flipped = [{**r, "inherited": 0.9 - 0.002 * r["mean_kernel"]} for r in rows]
    assert kernel_bias(flipped) == pytest.approx(-1.0)
    assert kernel_bias([{"truth": 0.9, "inherited": 0.8}]) is None  # a row from before it was recorded


def test_choice_worth_is_each_dimensions_slope_at_equal_others():
    """Accuracy made of 1 pp per sd of the mean kernel and -0.5 pp per sd of depth: the fit gives
    those back and 0 to the rest; too few subnets (or a constant dimension) give None."""
    import random

    import numpy as np

    space = load_space("small")
    rng = random.Random(0)
    archs = [sample(space, "random", rng) for _ in range(40)]
    x = {name: np.array([f(a) for a in archs], dtype=float) for name, f in CHOICES.items()}
    z = {name: (v - v.mean()) / v.std() for name, v in x.items()}
    accuracy = 0.88 + 0.01 * z["kernel"] - 0.005 * z["depth"]
    worth = choice_worth(archs, list(accuracy))
    assert worth == pytest.approx({"resolution": 0, "depth": -0.5, "expand": 0, "kernel": 1.0, "width": 0}, abs=1e-9)
    assert choice_worth(archs[:10], list(accuracy[:10])) is None
    assert choice_worth([archs[0]] * 40, [0.9] * 40) is None


def test_paired_delta_is_the_arms_tau_minus_the_controls_seed_by_seed():
    truth = [0.86, 0.87, 0.88, 0.89, 0.90, 0.91]
    row = lambda scores: {"subnets": [{"index": i, "truth": t, "inherited": x}  # noqa: E731
                                      for i, (t, x) in enumerate(zip(truth, scores))]}
    perfect, swapped = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.2, 0.1, 0.3, 0.4, 0.6, 0.5]
    levers = {"ctrl/s0": row(swapped), "ctrl/s1": row(swapped), "arm/s0": row(perfect), "arm/s1": row(swapped),
              "lone/s2": row(perfect), "lone/s3": row(perfect)}
    p = paired_delta(levers, "arm", "ctrl")
    want = (kendall_tau(perfect, truth) - kendall_tau(swapped, truth)) / 2  # one seed gains, one ties
    assert p["seeds"] == 2 and p["delta"] == pytest.approx(want) and p["interval"][0] <= p["interval"][1]
    assert paired_delta(levers, "lone", "ctrl") is None  # no training seed in common


def test_rescoring_by_finetune_picks_the_best_finetuned_of_the_shortlist(tmp_path):
    truth = [0.90, 0.88, 0.91, 0.95, 0.89]
    inherited = [0.86, 0.87, 0.85, 0.84, 0.88]
    latency = [1.0, 2.0, 2.5, 9.0, 2.9]
    assert top_candidates(inherited, latency, 3.0, 2) == [4, 1] and top_candidates(inherited, latency, 0.5, 2) == []
    finetuned = {4: 0.895, 1: 0.905}
    r = rescored_regret(truth, inherited, finetuned, latency, 3.0, 2)
    assert (r["best"], r["pick"]) == (2, 1) and r["regret_pp"] == pytest.approx(3.0)
    assert r["shipped_vs_best_standalone_pp"] == pytest.approx(-0.5)
    assert r["chosen_by"] == "test"
    assert rescored_regret(truth, inherited, finetuned, latency, 0.5, 2) == {"fits": 0}
    # chosen on the held-out search split, as a user chooses: #4 wins there; its test score ships
    r = rescored_regret(truth, inherited, finetuned, latency, 3.0, 2, choose_by={4: 0.93, 1: 0.92})
    assert (r["pick"], r["chosen_by"]) == (4, "search") and r["regret_pp"] == pytest.approx(2.0)
    assert r["shipped_vs_best_standalone_pp"] == pytest.approx(-1.5)
    path = tmp_path / "finetune.json"
    path.write_text(json.dumps({"config": {"supernet_sha256": "ab" * 32},
                                "truth_subnets": [{"index": 4, "finetuned": 0.895}]}))
    assert finetuned_scores(path, "ab" * 32) == ({4: 0.895}, None)
    path.write_text(json.dumps({"config": {"supernet_sha256": "ab" * 32},
                                "truth_subnets": [{"index": 4, "finetuned": 0.895, "finetuned_search": 0.9}]}))
    assert finetuned_scores(path, "ab" * 32) == ({4: 0.895}, {4: 0.9})
    with pytest.raises(SystemExit, match="fine-tuned from another supernet"):
        finetuned_scores(path, "cd" * 32)


def test_finetuned_ranking_scores_the_finetune_as_a_ranker_paired_with_the_inherited_scores():
    truth = [0.86, 0.87, 0.88, 0.89, 0.90, 0.91]
    inherited = [0.2, 0.1, 0.3, 0.4, 0.6, 0.5]  # two pairs swapped
    test = dict(enumerate([0.80, 0.81, 0.82, 0.83, 0.84, 0.85]))  # the truth's order
    search = dict(enumerate([0.81, 0.80, 0.82, 0.83, 0.84, 0.85]))  # one pair swapped
    r = finetuned_ranking(truth, inherited, test, search)
    assert r["test"]["kendall_tau"] == pytest.approx(1.0) and r["search"]["kendall_tau"] < 1.0
    for name, scores in (("test", test), ("search", search)):
        want = kendall_tau(list(scores.values()), truth) - kendall_tau(inherited, truth)
        assert r[name]["delta_vs_inherited"] == pytest.approx(want) and want > 0
        lo, hi = r[name]["delta_90"]
        assert lo <= hi and r[name]["kendall_tau_90"][0] <= r[name]["kendall_tau_90"][1]
    assert set(finetuned_ranking(truth, inherited, test, None)) == {"test"}  # a file without search scores
