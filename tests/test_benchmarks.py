"""The paper-claim benchmarks at tiny sizes, so their scripts cannot rot (each as a user runs it)."""
from __future__ import annotations

import json
import subprocess
import sys

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
    """Every arm trained with its own quantization, the stand-alone runs trained alone, tau per arm;
    a second invocation reuses every finished run instead of training it again."""
    args = ["--quick", "--subnets", "3", "--supernet-steps", "8", "--standalone-steps", "6", "--out", str(tmp_path)]
    out = run_benchmark("scale_ranking", *args)
    result = json.loads((tmp_path / "scale_ranking.json").read_text())
    for arm, (mode, scale) in {"predictor": ("int8", "predictor"), "shared": ("int8", "shared"),
                               "convs": ("convs", "shared")}.items():
        meta = json.loads((tmp_path / f"supernet_{arm}" / "supernet.json").read_text())
        assert (meta["quant"]["mode"], meta["quant"]["weight_scale"]) == (mode, scale)
        assert -1 <= result["kendall_tau"][arm] <= 1
    assert len(result["subnets"]) == 3 and len({r["arch"] for r in result["subnets"]}) == 3
    for i, r in enumerate(result["subnets"]):  # two seeds each (the default): the truth is their mean
        top1 = {}
        for seed, run in (("0", "run"), ("1", "run_seed1")):
            meta = json.loads((tmp_path / "standalone" / f"{i:02d}" / run / "supernet.json").read_text())
            assert meta["metrics"]["subnet"]["arch"] == r["arch"] and meta["config"]["seed"] == int(seed)
            top1[seed] = meta["metrics"]["subnet"]["test_top1"]
        assert r["standalone_per_seed"] == top1 and r["standalone"] == pytest.approx((top1["0"] + top1["1"]) / 2)
    assert len(result["standalone_replica_tau"]) == 1 and set(result["kendall_tau_per_seed"]["shared"]) == {"0", "1"}
    assert "Kendall tau, int8, scale predictor" in out and "Kendall tau, convs-only int8" in out
    assert "Kendall tau between stand-alone seeds" in out
    again = run_benchmark("scale_ranking", *args, "--arms", "convs")
    assert "9 training runs" in out and "0 training runs" in again and "(7 finished ones reused)" in again
    assert json.loads((tmp_path / "scale_ranking.json").read_text())["kendall_tau"] == {"convs": result["kendall_tau"]["convs"]}


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
