"""`qnas search`'s last stage (qnas_cli/rescore.py): each budget's top K candidates by fitness
re-scored as export calibrates them, on the whole search split; the winner is the best re-scored."""
from __future__ import annotations

import json

import pytest

from qnas_cli.cli import app
from qnas_cli.latency import Predictor, table_space
from qnas_cli.space import PRESETS, sample
from qnas_cli.train import TrainConfig, train
from tests.test_latency import synthetic_table

SPACE = PRESETS["tiny"]
SMALL_SEARCH = ["--population", "8", "--generations", "2", "--calib-images", "64", "--eval-images", "200", "--no-tensorboard"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rescore")
    train(TrainConfig(space="tiny", out=str(root / "run"), steps=4, batch_size=16, warmup_steps=1, eval_images=50,
                      calib_images=32, ckpt_every=1000), log=lambda *a, **k: None)
    table = synthetic_table(SPACE, fit=(1.0, 0.0))
    (root / "table.json").write_text(json.dumps(table.to_dict()))
    pred = Predictor(table, table_space(table))
    lo, hi = pred.predict(sample(SPACE, "smallest")), pred.predict(sample(SPACE, "largest"))
    budgets = [lo + f * (hi - lo) for f in (0.3, 0.8)]
    return root, budgets


def _search(root, budgets, out, *extra):
    return ["search", "--supernet", str(root / "run" / "supernet.pt"), "--table", str(root / "table.json"),
            "--latency-ms", ",".join(f"{b:.6f}" for b in budgets), "--out", str(out), *SMALL_SEARCH, *extra]


def _one_line_error(r) -> str:
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.fixture(scope="module")
def rescored(setup):
    """A search with --rescore-top 3 and the same search with the stage off."""
    from typer.testing import CliRunner

    root, budgets = setup
    runner = CliRunner()
    for k in ("3", "0"):
        r = runner.invoke(app, _search(root, budgets, root / f"k{k}", "--rescore-top", k))
        assert r.exit_code == 0, r.output
    return [json.loads((root / f"k{k}" / "pareto.json").read_text()) for k in ("3", "0")]


def test_the_winner_is_the_best_rescored_of_each_budgets_top_k(setup, rescored):
    root, budgets = setup
    doc, _ = rescored
    stage = doc["rescore"]
    assert stage["top"] == 3 and stage["calib_images"] == 2000 and stage["eval_images"] == 5000 and stage["seconds"] > 0
    assert "highest re-scored top-1" in stage["rule"] and doc["seconds"]["rescore"] >= 0
    scores = {s["arch"]: s for s in doc["subnets"]}
    for c in doc["chosen"]:
        b = stage["budgets"][f"{c['budget_ms']:g}"]
        fits = [s for s in doc["subnets"] if s["latency_ms"] <= c["budget_ms"]]
        top = sorted(fits, key=lambda s: (-s["search_top1"], s["latency_ms"], s["arch"]))[:3]
        shortlist = [x["arch"] for x in b["candidates"] if x["shortlist"]]
        assert shortlist == [s["arch"] for s in top]  # the top 3 by fitness, best first
        assert all(x["latency_ms"] <= c["budget_ms"] for x in b["candidates"])
        best = max(b["candidates"], key=lambda x: (x["rescore_top1"], x["search_top1"], -x["latency_ms"]))
        assert c["arch"] == b["winner"] == best["arch"]
        assert c["rescore_top1"] == best["rescore_top1"] == scores[c["arch"]]["rescore_top1"]
        assert b["proxy_winner"] == top[0]["arch"]
        sub = json.loads((root / "k3" / c["file"]).read_text())
        assert sub["search"]["rescore_top1"] == c["rescore_top1"]
    ranked = [c["rescore_top1"] for c in sorted(doc["chosen"], key=lambda c: c["budget_ms"])]
    assert ranked == sorted(ranked)  # a looser budget never gets a worse winner
    header = json.loads((root / "k3" / "rescores.jsonl").read_text().splitlines()[0])
    assert header["calib_images"] == 2000 and header["eval_images"] is None and "integer_contract" in header


@pytest.mark.slow
def test_a_rescore_is_what_qnas_calibrate_gives_with_its_defaults(setup, rescored):
    """The re-scored top-1 is the search-split top-1 `qnas calibrate` reports with its default
    calibration on the whole split: the subnet `qnas export` ships."""
    from qnas_cli.calibrate import calibrate_file

    root, _ = setup
    c = rescored[0]["chosen"][0]
    _, meta, _ = calibrate_file(root / "k3" / c["file"], out=root / "check.qnas.pt")
    assert meta["accuracy"]["search_top1"] == c["rescore_top1"]


def test_k0_keeps_the_fitness_winners_and_writes_no_rescores(setup, rescored):
    root, _ = setup
    on, off = rescored
    assert off["rescore"] == {"top": 0} and not (root / "k0" / "rescores.jsonl").exists()
    assert [s["arch"] for s in off["subnets"]] == [s["arch"] for s in on["subnets"]]  # the same evolution
    for c in off["chosen"]:
        fits = [s for s in off["subnets"] if s["latency_ms"] <= c["budget_ms"]]
        assert c["search_top1"] == max(s["search_top1"] for s in fits) and "rescore_top1" not in c
        assert c["arch"] == on["rescore"]["budgets"][f"{c['budget_ms']:g}"]["proxy_winner"]


def test_resume_reuses_rescores_and_refuses_a_cache_with_other_calibration_inputs(setup, rescored, runner, monkeypatch):
    root, budgets = setup
    out = root / "k3"
    cache = (out / "rescores.jsonl").read_text()
    r = runner.invoke(app, _search(root, budgets, out, "--rescore-top", "3", "--resume", "--json"))
    assert r.exit_code == 0, r.output
    again = json.loads((out / "pareto.json").read_text())
    assert again["chosen"] == rescored[0]["chosen"] and again["rescore"]["new"] == 0
    assert (out / "rescores.jsonl").read_text() == cache
    monkeypatch.setattr("qnas_cli.calibrate.CALIB_IMAGES", 500)  # export's calibration changed: no cached re-score holds
    r = runner.invoke(app, _search(root, budgets, out, "--rescore-top", "3", "--resume"))
    assert "calib_images" in _one_line_error(r) and "rescores.jsonl" in r.output
    assert (out / "rescores.jsonl").read_text() == cache
    fresh = root / "k3_500"
    r = runner.invoke(app, _search(root, budgets, fresh, "--rescore-top", "3"))
    assert r.exit_code == 0, r.output
    assert json.loads((fresh / "pareto.json").read_text())["rescore"]["calib_images"] == 500


@pytest.mark.parametrize("bad", ["-1", "2.5", "three"])
def test_a_bad_rescore_top_exits_2_before_anything_is_written(setup, runner, bad):
    root, budgets = setup
    out = root / f"bad{bad}"
    r = runner.invoke(app, _search(root, budgets, out, "--rescore-top", bad))
    assert "--rescore-top" in _one_line_error(r)
    assert not out.exists()


@pytest.mark.slow
def test_the_regret_benchmark_runs_in_quick_mode(setup, tmp_path):
    import subprocess
    import sys

    root, _ = setup
    r = subprocess.run([sys.executable, "-m", "benchmarks.search_regret", "--quick", "--table", str(root / "table.json"),
                        "--out", str(tmp_path / "bench")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "bench" / "search_regret.json").read_text())
    assert doc["budgets"] and all("regret_pp" in row for row in doc["rows"])
    # every subnet with a truth also has its re-score, so the best any search-split pick could do is reported
    assert list(doc["sizes"]) == ["quick"] and all("rescore_optimum_regret_pp" in row for row in doc["rows"])
