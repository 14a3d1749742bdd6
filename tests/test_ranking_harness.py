"""benchmarks/ranking.py's figures: rank correlation, its interval, regret under a budget."""
from __future__ import annotations

import pytest

from benchmarks.ranking import bootstrap_tau, regret, spearman
from qnas_cli.ranking import kendall_tau


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
