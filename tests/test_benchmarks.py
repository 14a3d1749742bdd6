"""The paper-claim benchmarks at tiny sizes, so their scripts cannot rot (each as a user runs it)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qnas_cli.train import TrainConfig, train


@pytest.fixture(scope="module")
def int8_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8_tiny")
    train(TrainConfig(space="tiny", out=str(out), steps=8, float_steps=4, batch_size=32, eval_images=100, calib_images=64,
                      warmup_steps=2), log=lambda *a, **k: None)
    return out / "supernet.pt"


def run_benchmark(module: str, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_scale_finetune_moves_scales_only_when_it_trains(int8_tiny, tmp_path):
    """0 fine-tuning steps leave every scale at its prediction (error exactly 0); 10 steps move them."""
    run_benchmark("scale_finetune", "--supernet", str(int8_tiny), "--subnets", "2", "--steps", "0", "--quick",
                  "--out", str(tmp_path / "zero"))
    zero = json.loads((tmp_path / "zero" / "scale_finetune.json").read_text())
    assert zero["summary"]["mean_rel_error"] == 0.0
    assert zero["summary"]["layers_compared"] == sum(r["layers"] for r in zero["subnets"]) > 0

    out = run_benchmark("scale_finetune", "--supernet", str(int8_tiny), "--subnets", "2", "--steps", "10", "--lr", "0.05",
                        "--quick", "--out", str(tmp_path / "ten"))
    ten = json.loads((tmp_path / "ten" / "scale_finetune.json").read_text())
    assert ten["summary"]["mean_rel_error"] > 0
    assert all(p["finetuned"] > 0 for ps in ten["layers"].values() for p in ps)
    assert "paper 6.97%" in out and (tmp_path / "ten" / "scale_finetune.png").stat().st_size > 0


@pytest.mark.slow
def test_scale_ranking_quick(tmp_path):
    """Every arm trained with its own quantization, the stand-alone runs trained alone; the truth is
    the mean of what the stand-alone runs wrote, every tau is the one of the JSON's own lists, the
    printed table is the JSON's. A second invocation reuses every finished run instead of training
    it again, and refuses (one line, nothing rewritten) a finished folder whose recorded subnet is
    not the one at its index."""
    from qnas_cli.ranking import kendall_tau

    args = ["--quick", "--subnets", "3", "--supernet-steps", "8", "--standalone-steps", "6", "--out", str(tmp_path)]
    out = run_benchmark("scale_ranking", *args)
    result = json.loads((tmp_path / "scale_ranking.json").read_text())
    rows = result["subnets"]
    for arm, (mode, scale) in {"predictor": ("int8", "predictor"), "shared": ("int8", "shared"),
                               "convs": ("convs", "shared")}.items():
        meta = json.loads((tmp_path / f"supernet_{arm}" / "supernet.json").read_text())
        assert (meta["quant"]["mode"], meta["quant"]["weight_scale"]) == (mode, scale)
        inherited = [r[arm] for r in rows]
        assert all(0 < v <= 1 and round(v * 500) == pytest.approx(v * 500) for v in inherited)  # top-1 of 500 images
        assert result["kendall_tau"][arm] == kendall_tau(inherited, [r["standalone"] for r in rows])
        assert result["kendall_tau_per_seed"][arm] == {
            s: kendall_tau(inherited, [r["standalone_per_seed"][s] for r in rows]) for s in ("0", "1")}
        assert f"supernet vs stand-alone: {result['kendall_tau'][arm]:+.3f}" in out
    assert len(rows) == 3 and len({r["arch"] for r in rows}) == 3
    for i, r in enumerate(rows):  # two seeds each (the default): the truth is their mean
        top1 = {}
        for seed, run in (("0", "run"), ("1", "run_seed1")):
            meta = json.loads((tmp_path / "standalone" / f"{i:02d}" / run / "supernet.json").read_text())
            assert meta["metrics"]["subnet"]["arch"] == r["arch"] and meta["config"]["seed"] == int(seed)
            top1[seed] = meta["metrics"]["subnet"]["test_top1"]
        assert r["standalone_per_seed"] == top1 and r["standalone"] == pytest.approx((top1["0"] + top1["1"]) / 2)
        line = next(x.split() for x in out.splitlines() if x.endswith(f"  {r['arch']}"))
        assert line[:5] == [str(i), f"{r['mflops']:.2f}", *(f"{100 * v:.2f}%" for v in (r["standalone"], top1["0"], top1["1"]))]
    assert result["standalone_replica_tau"] == [kendall_tau(*([r["standalone_per_seed"][s] for r in rows] for s in ("0", "1")))]
    assert "Kendall tau between stand-alone seeds" in out
    again = run_benchmark("scale_ranking", *args, "--arms", "convs")
    assert "9 training runs" in out and "0 training runs" in again and "(7 finished ones reused)" in again
    assert json.loads((tmp_path / "scale_ranking.json").read_text())["kendall_tau"] == {"convs": result["kendall_tau"]["convs"]}

    # subnet 1's finished run recorded as another subnet's (an earlier invocation's subnet at that index)
    meta_path = tmp_path / "standalone" / "01" / "run" / "supernet.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"]["subnet"]["arch"] = rows[2]["arch"]
    meta_path.write_text(json.dumps(meta))
    subnet = (tmp_path / "standalone" / "01" / "subnet.json").read_text()
    r = subprocess.run([sys.executable, "-m", "benchmarks.scale_ranking", *args, "--arms", "convs"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0 and "0 training runs" not in r.stdout
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "holds a finished stand-alone run that is not subnet 1" in r.stderr
    assert f"subnet {rows[2]['arch']} there, {rows[1]['arch']} now" in r.stderr
    assert (tmp_path / "standalone" / "01" / "subnet.json").read_text() == subnet


def test_a_finished_arm_is_reused_only_under_the_same_resolved_plan(tmp_path, monkeypatch):
    """scale_ranking/scale_pareto reuse a finished supernet of the same recipe; one trained when
    the default float share was another (same options, another plan) is trained again."""
    import qnas_cli.train as train_module
    from benchmarks.scale_ranking import supernet_runs

    common = dict(space="tiny", seed=0, steps=4, batch_size=32, eval_images=100, calib_images=64, warmup_steps=1,
                  ckpt_every=10**9)
    monkeypatch.setattr(train_module, "FLOAT_SHARE", 0.25)  # 1 float step of 4
    _, runs = supernet_runs(tmp_path, {"shared": None}, **common)
    train(runs[0][1], log=lambda *a, **k: None)
    assert supernet_runs(tmp_path, {"shared": None}, **common)[1] == []
    monkeypatch.setattr(train_module, "FLOAT_SHARE", 0.5)  # 2 float steps of 4: another plan
    assert [name for name, _ in supernet_runs(tmp_path, {"shared": None}, **common)[1]] == ["shared"]


def finished_meta(cfg: TrainConfig, **extra) -> dict:
    """What a finished run records about itself (supernet.json's identity keys), without training it."""
    from qnas_cli.space import load_space
    from qnas_cli.train import phase_plan, plan_record

    return {"config": cfg.to_dict(), "space": load_space(cfg.space).to_dict(),
            "phases": plan_record(phase_plan(cfg, steps_per_epoch=0)), **extra}


def test_a_standalone_run_is_reused_only_for_the_same_architecture_and_recipe(tmp_path):
    """A finished stand-alone folder is reused for the subnet it trained (its recorded architecture,
    not its subnet.json path); at the same index a run of another subnet, of another
    --standalone-steps or --eval-images, or on other data is refused before anything is written."""
    from benchmarks.scale_ranking import spread_subnets, standalone_runs
    from qnas_cli.space import PRESETS

    space, data = PRESETS["tiny"], {"spec": "fashion-mnist", "test": 10000}
    a, b, c = spread_subnets(space, 3, 0, 1, 10)
    common = dict(space="tiny", steps=6, eval_images=100, calib_images=64, ckpt_every=10**9, seed=0)
    done, runs = standalone_runs(tmp_path, [a], [0], data, **common)
    assert done == {} and [name for name, _ in runs] == ["standalone 0 seed 0"]
    run = Path(runs[0][1].out)
    run.mkdir()
    (run / "supernet.pt").write_bytes(b"weights")
    (run / "supernet.json").write_text(json.dumps(finished_meta(runs[0][1], data=data, metrics={
        "subnet": {"arch": a.key, "test_top1": 0.625}})))
    assert standalone_runs(tmp_path, [a], [0], data, **common) == ({(0, 0): 0.625}, [])
    subnet = (tmp_path / "standalone" / "00" / "subnet.json").read_text()
    for archs, options, text in [([b], common, f"subnet {a.key} there, {b.key} now"),
                                 ([a], {**common, "steps": 8}, "phases"),
                                 ([a], {**common, "eval_images": 200}, "'eval_images'"),
                                 ([a], {**common, "calib_images": 32}, "'calib_images'"),
                                 ([a], {**common, "seed": 1}, "'seed'")]:
        with pytest.raises(SystemExit, match=text):
            standalone_runs(tmp_path, archs, [options["seed"]] if options["seed"] else [0], data, **options)
        assert (tmp_path / "standalone" / "00" / "subnet.json").read_text() == subnet  # not rewritten
    with pytest.raises(SystemExit, match="other data"):
        standalone_runs(tmp_path, [a], [0], {**data, "test": 500}, **common)
    # another subnet at another index is trained; the finished one is still reused
    assert standalone_runs(tmp_path, [a, c], [0], data, **common)[0] == {(0, 0): 0.625}


def test_train_stability_reuses_only_a_result_of_the_same_run(tmp_path):
    """--resume reuses a finished run's stability_run.json only where it records this run's options
    (here: the same steps and test images); another run's, one recording nothing, and any finished
    or interrupted one without --resume are refused with one line."""
    import argparse

    from benchmarks.train_stability import RUN_RESULT, finished_result, run_config

    args = argparse.Namespace(space="tiny", out=tmp_path, steps=8, eval_images=100, calib_images=64, ckpt_every=4)
    cfg = run_config("default", 0, args)
    assert finished_result(cfg, resume=True) is None
    (Path(cfg.out) / "ckpt").mkdir(parents=True)
    (Path(cfg.out) / "ckpt" / "step_00000004.pt").write_bytes(b"weights")  # an interrupted run
    with pytest.raises(SystemExit, match="holds an interrupted run"):
        finished_result(cfg, resume=False)
    assert finished_result(cfg, resume=True) is None  # train continues it (checking its options itself)
    (Path(cfg.out) / RUN_RESULT).write_text(json.dumps(finished_meta(cfg, recipe="default", seed=0)))
    assert finished_result(run_config("default", 0, argparse.Namespace(**{**vars(args), "ckpt_every": 2})),
                           resume=True)["recipe"] == "default"  # checkpoint spacing changes nothing trained
    for change, text in [({"steps": 10}, "phases"), ({"eval_images": 200}, "'eval_images'"), ({"space": "small"}, "'space'")]:
        with pytest.raises(SystemExit, match=text):
            finished_result(run_config("default", 0, argparse.Namespace(**{**vars(args), **change})), resume=True)
    with pytest.raises(SystemExit, match="pass --resume"):
        finished_result(cfg, resume=False)
    (Path(cfg.out) / RUN_RESULT).write_text(json.dumps({"recipe": "default", "seed": 0}))
    with pytest.raises(SystemExit, match="records no configuration"):
        finished_result(cfg, resume=True)


@pytest.mark.slow
def test_scale_pareto_quick(tmp_path):
    """Both arms' supernets trained with their own --weight-scale, searched under one table and the
    same budgets; every winner fits its budget, is exported through the parity gate and scored."""
    from qnas_cli.space import PRESETS
    from tests.test_latency import synthetic_table

    (tmp_path / "table.json").write_text(json.dumps(synthetic_table(PRESETS["tiny"], fit=(1.0, 0.0)).to_dict()))
    out = run_benchmark("scale_pareto", "--quick", "--supernet-steps", "8", "--table", str(tmp_path / "table.json"),
                        "--out", str(tmp_path))
    result = json.loads((tmp_path / "scale_pareto.json").read_text())
    for arm in ("predictor", "shared"):
        meta = json.loads((tmp_path / "supernets" / f"supernet_{arm}" / "supernet.json").read_text())
        assert meta["quant"]["weight_scale"] == arm
        front = [(r["latency_ms"], r["search_top1"]) for r in result["fronts"][arm]]
        assert front and all(a[0] <= b[0] and a[1] < b[1] for a, b in zip(front, front[1:]))
    assert len(result["rows"]) == len(result["budgets_ms"]) == 2
    for row in result["rows"]:
        for arm in ("predictor", "shared"):
            w = row[arm]
            assert w["predicted_ms"] <= row["budget_ms"] and w["passed"] and 0 < w["test_top1"] <= 1
    assert "predictor minus shared" in out and (tmp_path / "scale_pareto.png").stat().st_size > 0


@pytest.mark.slow
def test_fold_ablation_quick(tmp_path):
    """Both int8 runs start from the one float supernet trained first and differ only in --bn-fold."""
    out = run_benchmark("fold_ablation", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "fold_ablation.json").read_text())
    assert set(result["runs"]) == {"batch", "moving"} and "float supernet" in result["start"]
    for fold in ("batch", "moving"):
        meta = json.loads((tmp_path / fold / "supernet.json").read_text())
        assert meta["quant"]["bn_fold"] == fold and meta["config"]["init"] == str(tmp_path / "float" / "supernet.pt")
        assert result["runs"][fold]["steps"][-1] == 30 and 0 < result["runs"][fold]["test_top1"]["largest"] <= 1
    assert "verdict:" in out


@pytest.mark.slow
def test_train_stability_two_jobs(tmp_path):
    """Runs side by side in spawned processes, one thread each; every run reported with its recipe's phases."""
    out = run_benchmark("train_stability", "--space", "tiny", "--seeds", "0", "--steps", "8", "--eval-images", "100",
                        "--calib-images", "64", "--jobs", "2", "--out", str(tmp_path))
    result = json.loads((tmp_path / "train_stability.json").read_text())
    assert result["config"]["threads_per_run"] >= 1 and "2 at a time" in out
    phases = {r["recipe"]: set(r["phase"]) for r in result["runs"]}
    assert phases == {"scratch": {"int8"}, "default": {"float", "int8"}}
    assert all(0 < r["test_top1"]["largest"] <= 1 for r in result["runs"])


@pytest.mark.parametrize("module", ["search_cost", "search_quality"])
def test_searching_benchmarks_default_to_the_supernet_make_bench_trains_first(module, tmp_path):
    """On a clean clone (no runs/) the default --supernet is the one benchmarks.supernet_accuracy
    trains, earlier in `make bench`; missing, it is one usage error naming that command."""
    import os

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    assert r.stderr.strip().splitlines()[-1].endswith(
        "runs/bench/supernet_accuracy/default/supernet.pt does not exist: run python -m benchmarks.supernet_accuracy "
        "first (make bench does), or pass another --supernet")


def test_fault_injection_scores_one_line_refusals_writes_and_started_work(tmp_path):
    """A case is rejected cleanly only as exit 2 with one line, nothing written and no minutes-long
    work started: a valid table build reaches the conversion (stopped by the stand-in, reported as
    started work), a command that writes is caught writing, a bad option is a clean refusal."""
    from benchmarks.fault_injection import run_case, totals, work_stopped

    watch = [tmp_path]
    with work_stopped(tmp_path / "cache"):
        build = run_case(["latency", "build", "--space", "tiny", "--rounds", "1", "--out", str(tmp_path / "t.json")], watch)
        refused = run_case(["latency", "build", "--space", "tiny", "--threads", "0", "--out", str(tmp_path / "t.json")], watch)
        wrote = run_case(["space", "sample", "--space", "tiny", "--out", str(tmp_path / "subnet.json")], watch)
        demo = run_case(["demo", str(tmp_path / "nowhere.pt"), "--out", str(tmp_path / "demo")], watch)
    assert build["started_work"] == "converting and timing a latency table" and not build["clean"]
    assert refused["clean"] and refused["exit_code"] == 2 and refused["message"].startswith("error: --threads")
    assert wrote["exit_code"] == 0 and str(tmp_path / "subnet.json") in wrote["written"] and not wrote["clean"]
    assert demo["clean"] and "nowhere.pt" in demo["message"]
    assert totals([build, refused, wrote, demo]) == {"cases": 4, "exit_2_one_line": 2, "nothing_written": 3,
                                                     "started_work": 1, "rejected_cleanly": 2}


def test_cost_lists_what_is_missing_and_turns_phase_times_into_epochs(tmp_path):
    """No source: every row is 'not measured yet' with its command. A supernet_accuracy result with
    a 10-minute float phase of 1,000 steps gives 0.6 s per float step, and an epoch at that rate."""
    out = run_benchmark("cost", "--bench", str(tmp_path))
    empty = json.loads((tmp_path / "cost.json").read_text())
    assert empty["rows"] == [] and {m["source"] for m in empty["missing"]} == {
        "supernet_accuracy", "train_throughput", "search_cost", "export_parity", "latency_model"}
    assert "not measured yet: latency_model (run: python -m benchmarks.latency_model)" in out

    (tmp_path / "supernet_accuracy").mkdir()
    (tmp_path / "supernet_accuracy" / "supernet_accuracy.json").write_text(json.dumps({"recipes": {"default": {
        "command": "qnas train", "minutes": 31.0, "phase_end_minutes": {"float": 10.0, "int8": 30.0},
        "steps": {"total": 2000, "float": 1000}}}}))
    run_benchmark("cost", "--bench", str(tmp_path))
    rows = {r["item"].split(",")[1].split("(")[0].strip(): r for r in json.loads((tmp_path / "cost.json").read_text())["rows"]}
    steps = int(rows["float"]["item"].split("(")[1].split()[0])
    assert rows["float"]["detail"] == "0.600 s/step" and rows["float"]["minutes"] == pytest.approx(0.6 * steps / 60)
    assert rows["int8"]["detail"] == "1.200 s/step, 2.00x float"


@pytest.mark.slow
def test_partial_quant_quick(tmp_path):
    """The same tiny subnet as qnas's fully int8 file, litert-torch fp32, and ai-edge-quantizer's
    partial (float ops between Q/DQ) and full int8 files, each counted and timed on both runtimes."""
    from benchmarks.litert_route import BASELINES_PYTHON

    if not BASELINES_PYTHON.is_file():
        pytest.skip(f"{BASELINES_PYTHON} is missing (make baselines-venv installs litert-torch and ai-edge-quantizer)")
    out = run_benchmark("partial_quant", "--quick", "--out", str(tmp_path))
    rows = {r["file"]: r for r in json.loads((tmp_path / "partial_quant.json").read_text())["rows"]}
    assert set(rows) == {"qnas", "fp32", "partial", "aeq int8"}
    assert rows["qnas"]["float_ops"] == rows["qnas"]["quantize"] == rows["qnas"]["dequantize"] == 0
    assert rows["fp32"]["float_ops"] == rows["fp32"]["ops"]
    assert rows["partial"]["float_ops"] > 0 and rows["partial"]["quantize"] > 0 and rows["partial"]["dequantize"] > 0
    assert all(r["latency_ms"][rt] > 0 for r in rows.values() for rt in ("xnnpack", "builtin"))
    assert "paper, on a phone: 50.3% faster" in out


@pytest.mark.slow
def test_train_stability_resume_reuses_finished_runs_and_continues_the_rest(tmp_path):
    """A run killed after its step-4 checkpoint continues from it under --resume and ends where the
    uninterrupted run ended (exact resume); a finished run is reused, not retrained."""
    args = ["--space", "tiny", "--seeds", "0", "--steps", "8", "--eval-images", "100", "--calib-images", "64",
            "--ckpt-every", "4", "--out", str(tmp_path)]
    run_benchmark("train_stability", *args)
    first = {r["recipe"]: r for r in json.loads((tmp_path / "train_stability.json").read_text())["runs"]}
    killed = tmp_path / "default_seed0"
    (killed / "stability_run.json").unlink()
    last = sorted((killed / "ckpt").glob("step_00000008.*"))
    assert [p.suffix for p in last] == [".json", ".pt"]
    for p in last:
        p.unlink()
    run_benchmark("train_stability", *args, "--resume")
    second = {r["recipe"]: r for r in json.loads((tmp_path / "train_stability.json").read_text())["runs"]}
    assert second["scratch"] == first["scratch"]  # reused as it was
    assert second["default"]["resumed"] and not first["default"]["resumed"]
    assert second["default"]["test_top1"] == first["default"]["test_top1"]
    assert second["default"]["loss_largest"] == first["default"]["loss_largest"]


@pytest.mark.slow
def test_finetune_quick(tmp_path):
    """Issue 29's benchmark end to end at tiny size: stand-in truth, fine-tunes with the teacher on
    and off, a winner exported with its gate, the table, the JSON and the PNG."""
    out = run_benchmark("finetune", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "finetune.json").read_text())
    rows = result["truth_subnets"]
    assert len(rows) == 2 and all(0 < r[k] <= 1 for r in rows for k in ("inherited", "finetuned", "standalone"))
    assert all(r["teacher"] == "largest" for r in rows)  # random tiny subnets: none is the largest
    assert set(result["means"]) >= {"inherited", "finetuned", "standalone"} and "target" in out
    assert all(set(c) >= {"largest", "none"} for c in result["curves"]) and result["curves"]
    (winner,) = result["winners"]
    assert winner["export"]["passed"] and winner["export"]["file_equals_exact_forward"], winner["export"]
    assert (tmp_path / "finetune.png").stat().st_size > 0


def test_finetune_benchmark_gives_the_largest_no_teacher():
    from benchmarks.finetune import teacher_for

    assert teacher_for("big", "big", "largest") == "none"  # qnas finetune refuses the largest as its own teacher
    assert teacher_for("mid", "big", "largest") == "largest" and teacher_for("mid", "big", "none") == "none"
