"""`qnas search` end to end on a briefly trained `tiny` supernet and a synthetic latency table:
budgets met by prediction, the infeasible budget refused, outputs and --resume."""
from __future__ import annotations

import json
import random

import pytest

from qnas_cli.cli import app
from qnas_cli.event_log import EVENT_FILES, image_tags, read_scalars
from qnas_cli.latency import Predictor, table_space, table_statistic
from qnas_cli.space import PRESETS, load_arch, sample
from qnas_cli.train import TrainConfig, train
from tests.test_latency import synthetic_table

SPACE = PRESETS["tiny"]
# The last stage (re-scoring, tests/test_rescore.py) off: these tests are about the evolution's own winners.
SMALL_SEARCH = ["--population", "8", "--generations", "2", "--calib-images", "64", "--eval-images", "200", "--rescore-top", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    cfg = TrainConfig(space="tiny", out=str(root / "run"), steps=4, batch_size=16, warmup_steps=1, eval_images=50,
                      calib_images=32, ckpt_every=1000)
    train(cfg, log=lambda *a, **k: None)
    table = synthetic_table(SPACE, fit=(1.0, 0.0))
    (root / "table.json").write_text(json.dumps(table.to_dict()))
    return root, table


def _budgets(table):
    """Three budgets across the table's range (smallest ... largest subnet)."""
    pred = Predictor(table, table_space(table))
    lo, hi = pred.predict(sample(SPACE, "smallest")), pred.predict(sample(SPACE, "largest"))
    return [lo + f * (hi - lo) for f in (0.2, 0.5, 0.9)], pred


def test_search_meets_every_budget_and_writes_its_outputs(setup, runner):
    root, table = setup
    budgets, pred = _budgets(table)
    out = root / "s1"
    r = runner.invoke(app, ["search", "--supernet", str(root / "run" / "supernet.pt"), "--table", str(root / "table.json"),
                            "--latency-ms", ",".join(f"{b:.6f}" for b in budgets), "--out", str(out), "--json",
                            *SMALL_SEARCH])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "pareto.json").read_text())
    assert doc["format"] == "qnas.search/1" and doc["supernet"]["sha256"] and doc["table"]["sha256"]
    assert {"arch", "latency_ms", "mflops", "params_k", "search_top1"} <= set(doc["subnets"][0])
    assert any(s.get("pareto") for s in doc["subnets"]) and (out / "pareto.png").stat().st_size > 0
    for c in doc["chosen"]:
        arch = load_arch(out / c["file"], SPACE)
        assert pred.predict(arch) <= c["budget_ms"] + 1e-9 and c["latency_ms"] == pytest.approx(pred.predict(arch))
        sub = json.loads((out / c["file"]).read_text())
        assert sub["supernet"]["sha256"] == doc["supernet"]["sha256"]  # ready for `qnas export`
        assert sub["search"]["latency_statistic"] == doc["table"]["statistic"] == table_statistic(table.header)
    _check_events(out, doc)


def _check_events(out, doc):
    """TensorBoard: per budget one point per generation of pareto.json's history; the Pareto front's figure."""
    scalars = read_scalars(out)
    for budget, history in doc["generations"].items():
        for tag, key in (("best_top1", "best_top1"), ("evaluations", "evaluated"), ("cache_hits", "cache_hits")):
            points = scalars[f"search/{budget}ms/{tag}"]
            assert [s for s, _ in points] == [g["generation"] for g in history] == [1, 2], tag
            assert [v for _, v in points] == pytest.approx([g[key] for g in history], rel=1e-6), tag
    assert image_tags(out) == ["search/pareto"]


def test_an_infeasible_budget_exits_2_naming_the_fastest(setup, runner):
    root, table = setup
    pred = Predictor(table, table_space(table))
    fastest = min(pred.predict(sample(SPACE, "random", random.Random(s))) for s in range(200))
    r = runner.invoke(app, ["search", "--supernet", str(root / "run" / "supernet.pt"), "--table", str(root / "table.json"),
                            "--latency-ms", f"{fastest / 10:.6f}", "--out", str(root / "s2"), *SMALL_SEARCH])
    assert r.exit_code == 2 and "fastest takes about" in r.output, r.output
    assert not (root / "s2").exists()


def test_resume_of_an_interrupted_search_gives_the_same_result(setup, runner):
    root, table = setup
    budgets, _ = _budgets(table)
    args = ["search", "--supernet", str(root / "run" / "supernet.pt"), "--table", str(root / "table.json"),
            "--latency-ms", f"{budgets[1]:.6f}", *SMALL_SEARCH, "--json"]
    full, cut = root / "full", root / "cut"
    assert runner.invoke(app, [*args, "--out", str(full), "--no-tensorboard"]).exit_code == 0
    assert list(full.glob(EVENT_FILES)) == []
    assert runner.invoke(app, [*args, "--out", str(cut)]).exit_code == 0
    lines = (cut / "evaluations.jsonl").read_text().splitlines()
    kept = len(lines) // 2
    (cut / "evaluations.jsonl").write_text("\n".join(lines[:kept]) + "\n" + lines[kept][: len(lines[kept]) // 2])
    r = runner.invoke(app, [*args, "--out", str(cut)])
    assert r.exit_code == 2 and "--resume" in r.output, r.output  # never overwrites an earlier search silently
    r = runner.invoke(app, [*args, "--out", str(cut), "--resume"])
    assert r.exit_code == 0, r.output
    a, b = json.loads((full / "pareto.json").read_text()), json.loads((cut / "pareto.json").read_text())
    assert a["chosen"] == b["chosen"]
    assert b["evaluations"]["new"] == a["evaluations"]["count"] - (kept - 1)  # only the lost ones again
    assert len(list(cut.glob(EVENT_FILES))) == 1  # the resumed search's events replace the earlier ones
    _check_events(cut, b)


@pytest.mark.slow
def test_a_two_process_torchrun_search_equals_a_one_process_search(setup):
    """Each rank evaluates its share of every generation and of the last stage's re-scores; the
    result must not depend on how many, nor on threads: one process on 2 threads scores every
    subnet as 2 ranks of 1 thread each do (calibration is exact, batch_stats; before, 318 of 353
    scores differed, by up to 0.45 pp)."""
    import os
    import subprocess
    import sys

    root, table = setup
    budgets, _ = _budgets(table)
    args = ["-m", "qnas_cli", "search", "--supernet", str(root / "run" / "supernet.pt"), "--table",
            str(root / "table.json"), "--latency-ms", f"{budgets[0]:.6f},{budgets[2]:.6f}", *SMALL_SEARCH, "--json",
            "--rescore-top", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(root / "one")], capture_output=True, text=True,
                         timeout=600, env={**env, "OMP_NUM_THREADS": "2"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                          *args, "--out", str(root / "two")], capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a, b = (json.loads((root / n / "pareto.json").read_text()) for n in ("one", "two"))
    assert a["chosen"] == b["chosen"]
    assert [(s["arch"], s["search_top1"]) for s in a["subnets"]] == [(s["arch"], s["search_top1"]) for s in b["subnets"]]
    rows = (root / "two" / "evaluations.jsonl").read_text().splitlines()
    assert len(rows) == 1 + a["evaluations"]["count"]  # one writer, every evaluation once
    assert a["rescore"]["budgets"] == b["rescore"]["budgets"] and a["rescore"]["rescored"] > 0
    assert len((root / "two" / "rescores.jsonl").read_text().splitlines()) == 1 + b["rescore"]["rescored"]


def test_a_looser_budget_never_gets_a_worse_winner(setup, runner):
    root, table = setup
    budgets, _ = _budgets(table)
    out = root / "monotone"
    r = runner.invoke(app, ["search", "--supernet", str(root / "run" / "supernet.pt"), "--table", str(root / "table.json"),
                            "--latency-ms", ",".join(f"{b:.6f}" for b in budgets), "--out", str(out), *SMALL_SEARCH])
    assert r.exit_code == 0, r.output
    chosen = json.loads((out / "pareto.json").read_text())["chosen"]
    scores = [c["search_top1"] for c in sorted(chosen, key=lambda c: c["budget_ms"])]
    assert scores == sorted(scores)


@pytest.mark.slow
def test_a_winner_exports_with_its_gate_passing_and_calibrate_reproduces_its_fitness(setup, runner):
    """The search's subnet file goes straight to `qnas export`; its search top-1 is exactly what
    `qnas calibrate` gives with the same calibration and scoring sizes (the same procedure)."""
    from qnas_cli.calibrate import calibrate_file

    root, table = setup
    budgets, _ = _budgets(table)
    out = root / "winner"
    r = runner.invoke(app, ["search", "--supernet", str(root / "run" / "supernet.pt"), "--table", str(root / "table.json"),
                            "--latency-ms", f"{budgets[1]:.6f}", "--out", str(out), *SMALL_SEARCH])
    assert r.exit_code == 0, r.output
    chosen = json.loads((out / "pareto.json").read_text())["chosen"][0]
    subnet = out / chosen["file"]
    _, meta, _ = calibrate_file(subnet, calib_images=64, eval_images=200, out=out / "check.qnas.pt")
    assert meta["accuracy"]["search_top1"] == chosen["search_top1"]
    r = runner.invoke(app, ["export", str(subnet), "--out", str(out / "export"), "--eval-images", "200", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "export" / "export_report.json").read_text())
    assert report["passed"] and report["arch_key"] == chosen["arch"]
    assert report["size_bytes"] / 1024 == pytest.approx(chosen["tflite_kb"], rel=0.01)  # what --size-kb constrains


def test_size_kb_constrains_the_predicted_file_size_and_an_impossible_one_exits_2(setup, runner):
    from qnas_cli.cost import arch_cost

    root, table = setup
    budgets, _ = _budgets(table)
    sizes = sorted(arch_cost(SPACE, sample(SPACE, "random", random.Random(s)), 1, 10).tflite_kb for s in range(50))
    limit = sizes[len(sizes) // 4]  # a quarter of random subnets fit
    base = ["search", "--supernet", str(root / "run" / "supernet.pt"), "--table", str(root / "table.json"),
            "--latency-ms", f"{budgets[2]:.6f}", *SMALL_SEARCH]
    r = runner.invoke(app, [*base, "--size-kb", f"{limit:.3f}", "--out", str(root / "size")])
    assert r.exit_code == 0, r.output
    doc = json.loads((root / "size" / "pareto.json").read_text())
    assert all(s["tflite_kb"] <= limit for s in doc["subnets"]) and doc["chosen"][0]["tflite_kb"] <= limit
    r = runner.invoke(app, [*base, "--size-kb", "1", "--out", str(root / "size2")])
    assert r.exit_code == 2 and "KiB" in r.output and "--size-kb" in r.output, r.output


def _args(root, *extra):
    return ["search", "--supernet", str(root / "run" / "supernet.pt"), *extra]


def _one_line_error(r) -> str:
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.mark.parametrize("bad, says", [
    (["--mutate-prob", "1.5"], "--mutate-prob"),
    (["--crossover-prob", "-0.1"], "--crossover-prob"),
    (["--runtime", "typo"], "--runtime"),
    (["--table-runtime", "reference"], "--table-runtime"),  # reference and micro are not timed
    (["--population", "0"], "--population"),
    (["--population", "1"], "--population"),
    (["--seed", "-1"], "--seed"),  # found by fault_injection: a "search" of one random subnet
    (["--latency-ms", "1,,2"], "--latency-ms"),  # an empty entry was skipped: the search ran on 1 and 2
    (["--latency-ms", "inf"], "--latency-ms"),
    (["--resume"], "holds no earlier search"),
])
def test_every_option_is_checked_before_anything_is_written(setup, runner, bad, says):
    """A refused option leaves no evaluations.jsonl behind, so the corrected command runs without --resume."""
    root, table = setup
    budgets, _ = _budgets(table)
    out = root / f"refused{bad[0]}"
    r = runner.invoke(app, _args(root, "--table", str(root / "table.json"), "--latency-ms", f"{budgets[1]:.6f}",
                                 "--out", str(out), *SMALL_SEARCH, *bad))
    assert says in _one_line_error(r)
    assert not out.exists()


def test_an_out_that_is_a_file_exits_2(setup, runner):
    root, table = setup
    budgets, _ = _budgets(table)
    taken = root / "taken.txt"
    taken.write_text("mine")
    for out in (taken, taken / "search"):
        r = runner.invoke(app, _args(root, "--table", str(root / "table.json"), "--latency-ms", f"{budgets[1]:.6f}",
                                     "--out", str(out), *SMALL_SEARCH))
        assert "is a file" in _one_line_error(r)
    assert taken.read_text() == "mine"


def test_torchrun_without_a_table_is_refused_before_any_work(setup, runner, tmp_path):
    root, table = setup
    budgets, _ = _budgets(table)
    r = runner.invoke(app, _args(root, "--latency-ms", f"{budgets[1]:.6f}", "--out", str(tmp_path / "s")),
                      env={"WORLD_SIZE": "2", "QNAS_CACHE": str(tmp_path / "cache")})
    assert "pass --table" in _one_line_error(r)
    assert not (tmp_path / "s").exists() and not (tmp_path / "cache").exists()


def _images(folder, mode: str, classes: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for c in range(classes):
            (folder / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                shape = (24, 24) + ((3,) if mode == "RGB" else ())
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / split / f"c{c}" / f"{i}.png")
    return f"imagefolder:{folder}"


@pytest.mark.parametrize("mode, classes, says", [("RGB", 10, "3 channels"), ("L", 12, "12 classes")])
def test_data_the_supernet_was_not_trained_for_exits_2(setup, runner, tmp_path, mode, classes, says):
    """Other channels failed deep in a conv (exit 1); more classes scored silently wrong."""
    root, table = setup
    budgets, _ = _budgets(table)
    spec = _images(tmp_path / "images", mode, classes)
    r = runner.invoke(app, _args(root, "--table", str(root / "table.json"), "--latency-ms", f"{budgets[1]:.6f}",
                                 "--data", spec, "--out", str(tmp_path / "s"), *SMALL_SEARCH))
    assert says in _one_line_error(r) and "trained for 1 / 10" in r.output
    assert not (tmp_path / "s").exists()


def test_fitness_is_the_exact_forward_of_runtime_and_the_cache_knows_it(setup, runner, tmp_path, monkeypatch):
    """--runtime micro: scored with TFLite Micro's arithmetic, exactly as `qnas calibrate --runtime
    micro` scores; latency from this host's XNNPACK table (micro is not timed), found in the
    cache and not rebuilt. --resume refuses a cache scored with another arithmetic or made under
    another integer contract (as a reused .qnas.pt is refused)."""
    from qnas_cli.calibrate import calibrate_file
    from qnas_cli.latency import STATISTIC, host_table_path

    root, table = setup
    budgets, _ = _budgets(table)
    monkeypatch.setenv("QNAS_CACHE", str(tmp_path / "cache"))
    host = host_table_path(SPACE, 1, 10, "xnnpack", 1)
    host.parent.mkdir(parents=True)
    cached = table.to_dict()
    cached["header"]["method"] = {"statistic_name": STATISTIC}
    host.write_text(json.dumps(cached))
    out = tmp_path / "micro"
    args = _args(root, "--latency-ms", f"{budgets[1]:.6f}", "--runtime", "micro", "--out", str(out), *SMALL_SEARCH)
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "building" not in r.output, r.output
    doc = json.loads((out / "pareto.json").read_text())
    assert doc["fitness_arithmetic"] == "micro" and doc["table"]["path"] == str(host.resolve())
    assert doc["table"]["runtime"] == "xnnpack"
    header = json.loads((out / "evaluations.jsonl").read_text().splitlines()[0])
    assert header["fitness_arithmetic"] == "micro" and header["eval_images"] == 200 and "integer_contract" in header
    chosen = doc["chosen"][0]
    _, meta, _ = calibrate_file(out / chosen["file"], calib_images=64, eval_images=200, runtime="micro",
                                out=tmp_path / "check.qnas.pt")
    assert meta["accuracy"]["search_top1"] == chosen["search_top1"]

    r = runner.invoke(app, [*args, "--resume", "--runtime", "reference"])
    assert "fitness_arithmetic" in _one_line_error(r)
    monkeypatch.setattr("qnas_cli.calibrate.INTEGER_CONTRACT_VERSION", "a later contract")
    r = runner.invoke(app, [*args, "--resume"])
    assert "integer_contract" in _one_line_error(r)


def test_a_host_table_is_only_built_for_a_timed_runtime(tmp_path, monkeypatch):
    """A reference or micro host table was timed, refused on load (tables hold xnnpack or builtin)
    and rebuilt on every search: refused before any conversion instead."""
    from qnas_cli.errors import UserError
    from qnas_cli.export.latency_build import resolve_table

    monkeypatch.setenv("QNAS_CACHE", str(tmp_path))
    for runtime in ("reference", "micro"):
        with pytest.raises(UserError, match="--table-runtime"):
            resolve_table(None, SPACE, 1, 10, runtime, 1, log=lambda m: None)
    assert not any(tmp_path.iterdir())
