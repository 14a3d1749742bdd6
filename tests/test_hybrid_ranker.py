"""benchmarks/hybrid_ranker.py: its leave-one-out fits recover a real signal and do not leak the
held-out truth (synthetic truths on the committed truth file's 20 architectures)."""
from __future__ import annotations

import json
import math
import random
import sys

import numpy as np
import pytest

from benchmarks import hybrid_ranker as hr
from benchmarks.truth import DEFAULT_TRUTH, load_truth, spread_entries
from qnas_cli.ranking import kendall_tau


@pytest.fixture(scope="module")
def archs():
    """The committed truth's first 20 subnets (keys, MFLOPs; its MFLOPs spread) and their parameters,
    as the module computes them."""
    spread = spread_entries(load_truth(DEFAULT_TRUTH))
    keys = [e["arch_key"] for e in spread]
    mflops = [e["mflops"] for e in spread]
    params = hr.subnet_params({"truth": {"path": str(DEFAULT_TRUTH)}, "subnets": [{"arch": k} for k in keys]})
    return keys, mflops, params


def synthetic(archs, seed: int, noise_features: int = 0) -> dict[str, list[float]]:
    """Truth a monotone function of MFLOPs plus noise; the supernet's score pure noise."""
    keys, mflops, params = archs
    rng = random.Random(seed)
    cols = {"truth": [0.85 + 0.02 * math.log(m) + rng.gauss(0, 0.004) for m in mflops],
            "inherited": [rng.gauss(0.87, 0.005) for _ in mflops], "mflops": list(mflops),
            "params": [float(p) for p in params], "latency_ms": [0.1 * m * math.exp(rng.gauss(0, 0.5)) for m in mflops],
            "index": list(range(len(mflops)))}
    for j in range(noise_features):
        cols[f"noise{j}"] = [rng.gauss(0, 1) for _ in mflops]
    return cols


def loo_tau(ranker: hr.Ranker, cols, alphas=hr.ALPHAS) -> float:
    scores, _ = hr.loo_scores(ranker, hr.design(cols, ranker.features), np.array(cols["truth"]), alphas)
    return kendall_tau(scores.tolist(), cols["truth"])


def test_the_hybrid_recovers_what_mflops_know_when_the_supernet_is_noise(archs):
    hybrid = next(r for r in hr.RANKERS if r.name == hr.CANDIDATE)
    for seed in range(3):
        cols = synthetic(archs, seed)
        mflops_tau = kendall_tau(cols["mflops"], cols["truth"])
        assert loo_tau(hybrid, cols) > mflops_tau - 0.2 and loo_tau(hybrid, cols) > 0.4
        assert abs(kendall_tau(cols["inherited"], cols["truth"])) < 0.5


def test_leave_one_out_does_not_leak_the_held_out_truth(archs):
    """Eight pure-noise features, almost unpenalised: fitted on all subnets they 'rank' well (overfit);
    held out they must not, and a single noise feature with the inner penalty choice neither."""
    many = hr.Ranker("noise8", tuple(f"noise{j}" for j in range(8)), "ridge", "")
    one = hr.Ranker("noise1", ("noise0",), "ridge", "")
    loo_many, in_sample, loo_one = [], [], []
    for seed in range(10):
        cols = synthetic(archs, 100 + seed, noise_features=8)
        x, y = hr.design(cols, many.features), np.array(cols["truth"])
        every = np.arange(len(y))
        fitted, _ = hr.fold_scores(many, x, y, every, every, (1e-4,))
        in_sample.append(kendall_tau(fitted.tolist(), cols["truth"]))
        loo_many.append(loo_tau(many, cols, (1e-4,)))
        loo_one.append(loo_tau(one, cols))
    assert np.mean(in_sample) > 0.3  # the overfit LOO has to undo
    assert -0.25 < np.mean(loo_many) < 0.15 and -0.25 < np.mean(loo_one) < 0.15


def test_the_penalty_is_chosen_without_the_test_subnet(archs):
    """Changing only the held-out subnet's truth changes neither its score nor the penalty chosen."""
    cols = synthetic(archs, 7)
    hybrid = next(r for r in hr.RANKERS if r.name == hr.CANDIDATE)
    x, y = hr.design(cols, hybrid.features), np.array(cols["truth"])
    train, test = np.arange(1, 20), np.array([0])
    before = hr.fold_scores(hybrid, x, y, train, test)
    y[0] += 0.5
    assert hr.fold_scores(hybrid, x, y, train, test) == before


def test_the_command_writes_its_verdict_and_refuses_a_missing_ranking(archs, tmp_path, monkeypatch, capsys):
    """Here the hybrid must be adopted: the supernet score is noise, the cost features are not."""
    cols = synthetic(archs, 1)
    keys = archs[0]
    ranking = {"truth": {"path": str(DEFAULT_TRUTH)}, "kendall_tau": 0.0, "mflops_tau": 0.5,
               "regret": {"0.3": {}, "0.8": {}},
               "subnets": [{"index": i, "arch": keys[i], "mflops": cols["mflops"][i], "latency_ms": cols["latency_ms"][i],
                            "truth": cols["truth"][i], "inherited": cols["inherited"][i]} for i in range(20)]}
    path = tmp_path / "ranking.json"
    path.write_text(json.dumps(ranking))
    monkeypatch.setattr(sys, "argv", ["hybrid_ranker", "--ranking", str(path), "--out", str(tmp_path / "out"),
                                      "--png", str(tmp_path / "h.png"), "--bootstrap", "100", "--cv-repeats", "3"])
    hr.main()
    doc = json.loads((tmp_path / "out" / "hybrid_ranker.json").read_text())
    assert set(doc["rankers"]) == {r.name for r in hr.RANKERS} and (tmp_path / "h.png").is_file()
    assert doc["rankers"]["inherited"]["loo_tau"] == pytest.approx(kendall_tau(cols["inherited"], cols["truth"]))
    assert set(doc["rankers"]["ridge_all"]["regret"]) == {"0.3", "0.8"}
    assert doc["adopt"] and ": ADOPT" in capsys.readouterr().out  # MFLOPs carry the truth, the supernet is noise
    monkeypatch.setattr(sys, "argv", ["hybrid_ranker", "--ranking", str(tmp_path / "none.json")])
    with pytest.raises(SystemExit, match="python -m benchmarks.ranking"):
        hr.main()
