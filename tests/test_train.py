"""Training: exact resume (across the float -> int8 boundary too), the collapse and its guard,
torchrun with two CPU processes, the CLI surface."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import math
import random

import pytest
import torch

import qnas_cli.train as train_module
from qnas_cli.cli import app
from qnas_cli.layers import SCALE_FLOOR, init_scales, keep_scales_positive
from qnas_cli.quant import QuantConfig
from qnas_cli.space import PRESETS, SearchSpace, sample
from qnas_cli.train import TrainConfig, make_optimizer, optimizer_step, train
from qnas_cli.supernet import Supernet
from tests.helpers import assert_same_weights, supernet_weights

FAST = dict(space="tiny", batch_size=32, eval_images=200, calib_images=64, warmup_steps=2, log_every=1)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("mode", ["none", "int8", "convs"])
def test_resume_gives_identical_weights(tmp_path, mode):
    """6 steps straight == 3 steps, crash, --resume, 3 more steps: bit for bit."""
    quant = QuantConfig(mode=mode, weight_scale="shared" if mode == "convs" else "predictor")
    cfg = lambda out: TrainConfig(out=str(out), steps=6, ckpt_every=3, quant=quant, **FAST)  # noqa: E731
    train(cfg(tmp_path / "a"), log=lambda *a, **k: None)

    def crash_after_checkpoint(step, total, metrics):
        if step == 4:  # the checkpoint of step 3 is on disk; step 4's work is lost
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg(tmp_path / "b"), on_step=crash_after_checkpoint, log=lambda *a, **k: None)
    assert not (tmp_path / "b" / "supernet.pt").exists()
    train(cfg(tmp_path / "b"), resume=True, log=lambda *a, **k: None)
    assert_same_weights(supernet_weights(tmp_path / "a"), supernet_weights(tmp_path / "b"))
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the lost step is logged once


@pytest.mark.parametrize("crash_at", [3, 4])
def test_resume_across_the_float_to_int8_boundary(tmp_path, crash_at):
    """3 float + 3 int8 steps straight == the same run killed in the float phase (crash_at 3:
    resumed from the float checkpoint of step 2, it crosses the boundary itself) or just after the
    boundary (crash_at 4: resumed from the boundary's float checkpoint, it builds the int8
    supernet from it): bit for bit."""
    cfg = lambda out: TrainConfig(out=str(out), steps=6, float_steps=3, ckpt_every=2, **FAST)  # noqa: E731
    train(cfg(tmp_path / "a"), log=lambda *a, **k: None)

    def crash(step, total, metrics):
        if step == crash_at:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg(tmp_path / "b"), on_step=crash, log=lambda *a, **k: None)
    train(cfg(tmp_path / "b"), resume=True, log=lambda *a, **k: None)
    assert_same_weights(supernet_weights(tmp_path / "a"), supernet_weights(tmp_path / "b"))
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in rows] == [(1, "float"), (2, "float"), (3, "float"), (4, "int8"), (5, "int8"), (6, "int8")]
    meta = json.loads((tmp_path / "b" / "supernet.json").read_text())
    assert meta["quant"]["mode"] == "int8" and meta["phases"] == [{"name": "float", "steps": 3}, {"name": "int8", "steps": 3}]
    assert json.loads((tmp_path / "b" / "float_supernet.json").read_text())["phase"] == "float"


def test_a_float_only_run_is_the_float_phase_of_the_whole_recipe(tmp_path):
    """`--quant none --steps N` trains bit for bit what a run's N-step float phase leaves in
    float_supernet.pt: the same draws, batches and schedule. Issue 31 screens float-phase levers on
    such runs, so a float-only arm is paired with the whole recipe's own float supernet."""
    train(TrainConfig(out=str(tmp_path / "whole"), steps=5, float_steps=3, **FAST), log=lambda *a, **k: None)
    train(TrainConfig(out=str(tmp_path / "float"), steps=3, quant=QuantConfig(mode="none"), **FAST), log=lambda *a, **k: None)
    assert_same_weights(supernet_weights(tmp_path / "whole", "float_supernet.pt"), supernet_weights(tmp_path / "float"))


@pytest.mark.parametrize("draws, replays", [("phase", True), ("run", False)])
def test_the_int8_phase_replays_the_float_phases_first_draws(tmp_path, draws, replays):
    """--draws phase (a supernet's default): each phase draws its batches, augmentations and
    subnets from its own first step, so a whole run is bit for bit its float phase followed by an
    --init run of its int8 steps (issue 31: the int8 phase that retraces the float phase's first
    draws ranks subnets better, +0.070 Kendall tau over three seeds). --draws run (the stand-alone
    truth's recipe) draws by the run's step: the int8 phase sees other batches and subnets."""
    log = lambda *a, **k: None  # noqa: E731
    train(TrainConfig(out=str(tmp_path / "whole"), steps=6, float_steps=3, draws=draws, **FAST), log=log)
    train(TrainConfig(out=str(tmp_path / "rerun"), steps=3, init=str(tmp_path / "whole" / "float_supernet.pt"), draws=draws,
                      **FAST), log=log)
    whole, rerun = supernet_weights(tmp_path / "whole"), supernet_weights(tmp_path / "rerun")
    if replays:
        assert_same_weights(whole, rerun)
    else:
        assert any(not torch.equal(whole[k], rerun[k]) for k in whole)


def test_draws_default_to_the_phase_for_a_supernet_and_the_run_for_a_subnet_alone():
    """The replay is a supernet's default; a subnet alone keeps the draws its committed truth was
    trained with (a truth recorded before --draws existed reads as "run")."""
    from qnas_cli.train import with_added_defaults

    assert TrainConfig().draws == "phase" and TrainConfig(subnet="subnet.json").draws == "run"
    assert with_added_defaults({"config": {}})["config"]["draws"] == "run"
    with pytest.raises(train_module.UserError, match="--draws"):
        TrainConfig(draws="epoch")


def test_the_default_plans_float_heavy_supernet_and_the_subnet_recipe_of_the_truth():
    """A supernet run defaults to 2800 float + 700 int8 steps (issue 31: more accurate at the same
    time); a subnet alone keeps 1400 + 1400, the recipe the committed stand-alone truth records."""
    from pathlib import Path

    from qnas_cli.train import phase_plan, plan_record

    assert plan_record(phase_plan(TrainConfig(), 0)) == [{"name": "float", "steps": 2800}, {"name": "int8", "steps": 700}]
    alone = TrainConfig(subnet="subnet.json")
    assert plan_record(phase_plan(alone, 0)) == [{"name": "float", "steps": 1400}, {"name": "int8", "steps": 1400}]
    truth = json.loads((Path(__file__).parents[1] / "benchmarks/data/standalone_small_fashion-mnist.json").read_text())
    assert truth["recipe"]["phases"] == plan_record(phase_plan(alone, 0))


def test_resume_keeps_the_plan_the_run_started_with(tmp_path, monkeypatch):
    """A run started under one default float share and resumed under another (an upgrade) is
    refused, naming both plans; given the lengths explicitly it continues, bit for bit."""
    from qnas_cli.errors import UserError

    cfg = lambda out, **k: TrainConfig(out=str(out), steps=6, ckpt_every=2, **FAST, **k)  # noqa: E731
    monkeypatch.setattr(train_module, "FLOAT_SHARE", 0.5)
    train(cfg(tmp_path / "a"), log=lambda *a, **k: None)

    def crash(step, total, metrics):
        if step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg(tmp_path / "b"), on_step=crash, log=lambda *a, **k: None)
    monkeypatch.setattr(train_module, "FLOAT_SHARE", 0.25)
    with pytest.raises(UserError, match="phases were float 3 [+] int8 3 steps, these options give float 1 [+] int8 5"):
        train(cfg(tmp_path / "b"), resume=True, log=lambda *a, **k: None)
    train(cfg(tmp_path / "b", float_steps=3), resume=True, log=lambda *a, **k: None)
    assert_same_weights(supernet_weights(tmp_path / "a"), supernet_weights(tmp_path / "b"))


def test_a_subnet_trains_alone(tmp_path):
    """--subnet: only that subnet's slices learn (the rest of the supernet moves by weight decay
    alone), across the float -> int8 boundary, and the summary scores that subnet."""
    space = PRESETS["tiny"]
    arch = sample(space, "random", random.Random(3))
    (tmp_path / "subnet.json").write_text(json.dumps(arch.to_dict(space)))
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=4, float_steps=2, subnet=str(tmp_path / "subnet.json"), **FAST)
    summary = train(cfg, log=lambda *a, **k: None)
    assert list(summary["metrics"]) == ["subnet"] and summary["metrics"]["subnet"]["arch"] == arch.key
    trained = supernet_weights(tmp_path / "run")
    torch.manual_seed(cfg.seed)
    initial = Supernet(space, 1, 10, QuantConfig()).state_dict()
    width = arch.stages[-1].width  # the last stage's project conv: channels beyond the subnet's width never ran
    key = next(k for k in trained if k.startswith(f"stages.{len(arch.stages) - 1}.0.project.weight"))
    change = lambda part: ((trained[key][part] - initial[key][part]).norm() / initial[key][part].norm()).item()  # noqa: E731
    assert change(slice(width, None)) < 1e-5 < 1e-4 < change(slice(0, width))  # decay: lr * 1e-5 per step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["float", "float", "int8", "int8"] and "loss_smallest" not in rows[0]


@pytest.mark.parametrize("SEED", [0, 1, 2])
def test_momentum_drives_a_step_size_through_zero_and_the_bound_stops_it(SEED):
    """The collapse mechanism, on the tiny supernet: a few large gradients on the stem's weight
    scale (as from-scratch training gives them in its first hundred steps) and momentum carry the
    scale through zero. Plain SGD + projection to the floor leaves it at 1e-8, where every folded
    weight clips to +-127e-8: the stem outputs a constant, so do the logits, for every image (the
    loss is at chance), and momentum keeps it there after the push stops. The bounded update
    (``optimizer_step``) keeps the scale within 2x per step and drops its momentum: the network
    keeps telling images apart."""
    arch = sample(PRESETS["tiny"], "largest")
    x = torch.randn(16, 1, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(SEED))

    def push_then_coast(step):
        torch.manual_seed(0)
        net = Supernet(PRESETS["tiny"], 1, 10, QuantConfig())
        with init_scales(net):
            net(x, arch)
        opt = make_optimizer(net, TrainConfig())
        for g in opt.param_groups:
            g["lr"] = 0.05
        theta0 = net.stem.theta.detach().clone()
        for i in range(8):
            opt.zero_grad()
            for p in net.parameters():
                p.grad = torch.zeros_like(p)
            if i < 3:  # three steps of a gradient that asks the scale to shrink by about its own size
                net.stem.theta.grad = theta0 / 0.05
            step(net, opt)
        net.eval()
        with torch.no_grad():
            logits = net(x, arch)
        return net.stem.theta.detach(), logits, theta0

    def old_step(net, opt):
        opt.step()
        keep_scales_positive(net)

    theta, logits, _ = push_then_coast(old_step)
    assert theta.max().item() == torch.tensor(SCALE_FLOOR).item()  # at the floor, still there after 5 steps without a push
    assert logits.std(0).max().item() < 1e-6  # the same logits for every image: the collapse

    theta, logits, theta0 = push_then_coast(optimizer_step)
    assert (theta >= theta0 / 8 * 0.999).all()  # three bounded steps down at most, then no momentum left
    assert logits.std(0).max().item() > 1e-3


@pytest.fixture(scope="module")
def float_tiny(tmp_path_factory):
    """A tiny float supernet trained until its largest subnet is well below chance (loss < 0.8 ln 10)."""
    out = tmp_path_factory.mktemp("float_tiny")
    train(TrainConfig(out=str(out), quant=QuantConfig(mode="none"), steps=40, lr=0.2,
                      **{**FAST, "warmup_steps": 2}), log=lambda *a, **k: None)
    return out / "supernet.pt"


def _guarded(out, init, **kw):
    return TrainConfig(out=str(out), init=str(init), steps=10, ckpt_every=100, collapse_patience=2, collapse_give_up=4,
                       **{**FAST, **kw})


def test_guard_stops_a_run_forced_to_collapse(tmp_path, float_tiny, monkeypatch):
    """From step 3 the stem's weight scale is pinned to the floor (the mechanism above, forced):
    the guard logs a collapse with diagnostics that show it, then stops the run with exit 4."""
    real_step = train_module.optimizer_step
    calls = []

    def pin_stem_scale(model, opt):
        real_step(model, opt)
        calls.append(1)
        if len(calls) >= 2:
            with torch.no_grad():
                model.stem.theta.fill_(SCALE_FLOOR)

    monkeypatch.setattr(train_module, "optimizer_step", pin_stem_scale)
    with pytest.raises(train_module.TrainingCollapsed, match="collapsed at step 6: the largest subnet's loss is at chance"):
        train(_guarded(tmp_path, float_tiny), log=lambda *a, **k: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if "event" in r]
    assert [e["event"] for e in events] == ["collapse", "stop"]
    assert all(e["loss_largest"] >= 0.97 * math.log(10) for e in events)  # constant logits: at chance or worse
    stem = events[0]["layers"]["stem"]
    assert stem["w_clipped"] == 1.0 and stem["w_scale"] < 1e-7  # the diagnostics name the layer and the cause
    assert "stem" in events[0]["grad_norms"]
    assert not (tmp_path / "supernet.pt").exists()


def test_guard_is_quiet_on_a_healthy_run(tmp_path, float_tiny):
    summary = train(_guarded(tmp_path, float_tiny), log=lambda *a, **k: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "event" in r] and summary["collapse_events"] == 0


def test_guard_stops_on_a_non_finite_loss(runner, tmp_path, monkeypatch):
    """A NaN in the weights (poisoned after step 2): the run stops at once, exit code 4, one
    message naming the cause, and the event row in metrics.jsonl. (A huge --lr does not do it:
    gradient clipping and the bounded step sizes keep everything finite.)"""
    real_step = train_module.optimizer_step
    calls = []

    def poison(model, opt):
        real_step(model, opt)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                model.stem.weight[0, 0, 0, 0] = float("nan")

    monkeypatch.setattr(train_module, "optimizer_step", poison)
    r = runner.invoke(app, ["train", "--space", "tiny", "--steps", "8", "--float-steps", "0", "--batch-size", "16",
                            "--warmup-steps", "1", "--eval-images", "100", "--calib-images", "32", "--out", str(tmp_path)])
    assert r.exit_code == 4, r.output
    assert "training collapsed at step 3: non-finite" in r.output and "Traceback" not in r.output
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "event" in line]
    assert [e["event"] for e in events] == ["non-finite"] and events[0]["layers"]["stem.out_q"]["act_finite"] == 0.0


def test_int8_training_lowers_the_loss(tmp_path):
    train(TrainConfig(out=str(tmp_path), steps=30, ckpt_every=100, lr=0.1, **FAST), log=lambda *a, **k: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first
    meta = json.loads((tmp_path / "supernet.json").read_text())
    assert meta["kind"] == "qnas.supernet" and meta["space"]["name"] == "tiny"
    assert set(meta["metrics"]) == {"largest", "smallest"} and meta["weights"]["sha256"]


def test_a_convs_only_supernet_trains_evaluates_and_is_refused_by_search_and_export(tmp_path):
    """--quant convs (the partially quantized baseline): float phase, then convs-only; its subnets
    calibrate and score (fake-quant); search and export, which need fully int8, refuse it."""
    from qnas_cli.export.pipeline import export_subnet
    from qnas_cli.calibrate import calibrated_subnet, evaluate, subnet_document
    from qnas_cli.data import load_dataset
    from qnas_cli.errors import UserError
    from qnas_cli.search_job import SearchConfig, run_search
    from qnas_cli.supernet import load_supernet

    train(TrainConfig(out=str(tmp_path), steps=4, float_steps=2, quant=QuantConfig(mode="convs", weight_scale="shared"),
                      **FAST), log=lambda *a, **k: None)
    meta = json.loads((tmp_path / "supernet.json").read_text())
    assert meta["quant"]["mode"] == "convs" and [p["name"] for p in meta["phases"]] == ["float", "int8"]
    net, meta = load_supernet(tmp_path / "supernet.pt")
    arch = sample(net.space, "smallest")
    data = load_dataset("fashion-mnist", load_size=max(net.space.resolutions))
    assert 0 < evaluate(calibrated_subnet(net, arch, data, 64), data.test, data, arch.resolution, limit=100) <= 1
    with pytest.raises(UserError, match="convs-only .* search needs a fully int8"):
        run_search(SearchConfig(supernet=str(tmp_path / "supernet.pt"), budgets_ms=[1.0]), log=lambda m: None)
    (tmp_path / "subnet.json").write_text(json.dumps(subnet_document(arch, net.space, "supernet.pt", meta["weights"]["sha256"])))
    with pytest.raises(UserError, match="convs-only .* qnas exports fully int8"):
        export_subnet(tmp_path / "subnet.json", tmp_path / "export", calib_images=64, eval_images=100, log=lambda *a: None)
    with pytest.raises(UserError, match="--quant convs keeps BN unfolded"):
        QuantConfig(mode="convs")  # the scale predictor acts on folded weights


def test_resume_refuses_a_different_run(tmp_path):
    from qnas_cli.errors import UserError

    train(TrainConfig(out=str(tmp_path), steps=2, ckpt_every=1, **FAST), log=lambda *a, **k: None)
    with pytest.raises(UserError, match="'lr' differs"):
        train(TrainConfig(out=str(tmp_path), steps=2, ckpt_every=1, **{**FAST, "lr": 0.3}), resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("sampling, port", [("uniform", 29517), ("worst", 29518)])
def test_torchrun_two_cpu_processes(tmp_path, sampling, port):
    """``worst`` also all-reduces the candidates' losses, so every rank picks the same subnet."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "qnas_cli", "train", "--space", "tiny", "--steps", "4", "--batch-size", "16", "--device", "cpu",
           "--eval-images", "100", "--calib-images", "64", "--sampling", sampling, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    meta = json.loads((out / "supernet.json").read_text())
    assert meta["steps"] == 4 and meta["world_size"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 4  # one writer: rank 0
    # the ranks trained one model: a no-op gradient all-reduce lets them drift and fails the run here
    assert "all 2 processes hold identical weights" in r.stdout + r.stderr


_RANK_SCRIPT = """
import atexit, os, signal, sys
import torch
import torch.distributed as dist
import qnas_cli.train as t

how, report = sys.argv.pop(1), sys.argv.pop(1)
rank, real, calls = int(os.environ["RANK"]), t.optimizer_step, []

def step(model, opt):  # after the 2nd step: rank 0's weights turn NaN, or rank 1 is sent SIGTERM
    real(model, opt)
    calls.append(1)
    if len(calls) == 2 and how == "collapse" and rank == 0:
        with torch.no_grad():
            model.stem.weight[0, 0, 0, 0] = float("nan")
    if len(calls) == 2 and how == "interrupt" and rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)

def setup(device):  # registered once the group exists, so it runs before torch's own exit hooks (last in, first out)
    d = real_setup(device)
    atexit.register(lambda: open(f"{report}.{rank}", "w").write(str(dist.is_initialized())))
    return d

real_setup, t.optimizer_step, t.setup_distributed = t.setup_distributed, step, setup
from qnas_cli.cli import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("how, code", [("collapse", 4), ("interrupt", 130)])
def test_torchrun_ranks_leave_the_process_group_on_a_collapse_or_an_interrupt(tmp_path, how, code):
    """Two ranks with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), a collapse (a NaN
    on rank 0) or SIGTERM to rank 1: each rank exits with the documented code, having left its gloo
    process group (the normal path alone used to: a rank that exits with the group open can abort,
    SIGABRT, "terminate called without an active exception"). The processes are started here
    rather than by torchrun, which kills the other ranks as soon as one fails and so hides their
    own exit codes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "rank.py").write_text(_RANK_SCRIPT)
    out, report = tmp_path / "run", tmp_path / "initialized"
    procs = [subprocess.Popen(
        [sys.executable, str(tmp_path / "rank.py"), how, str(report), "train", "--space", "tiny", "--steps", "8",
         "--float-steps", "0", "--batch-size", "16", "--warmup-steps", "1", "--eval-images", "100", "--calib-images", "32",
         "--device", "cpu", "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
             "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (stdout, stderr)) in enumerate(zip(procs, results)):
        assert p.returncode == code, (rank, p.returncode, stderr[-3000:])
        assert "terminate called" not in stderr and "Traceback" not in stderr, stderr[-3000:]
        assert (tmp_path / f"initialized.{rank}").read_text() == "False", f"rank {rank} exited with its process group open"
    if how == "interrupt":
        assert "interrupted at step 2; checkpoint saved" in results[0][1]
        assert (out / "ckpt" / "step_00000002.pt").is_file()
    else:
        assert "training collapsed at step 3: non-finite" in results[0][1]


# ---- the CLI ----------------------------------------------------------------------------------

def test_cli_train_tiny_json(runner, tmp_path):
    """The summary reports what the run computed: its steps in metrics.jsonl, and each test top-1
    is that of the saved supernet's calibrated subnet, re-evaluated here."""
    from qnas_cli.calibrate import calibrated_subnet, evaluate
    from qnas_cli.data import load_dataset
    from qnas_cli.supernet import load_supernet

    r = runner.invoke(app, ["train", "--space", "tiny", "--steps", "2", "--batch-size", "16", "--eval-images", "100",
                            "--calib-images", "32", "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["phase"]) for row in rows] == [(1, "float"), (2, "int8")]  # each phase logs its last step
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in rows)
    net, meta = load_supernet(tmp_path / "supernet.pt")
    assert meta["weights"]["sha256"] == summary["weights"]["sha256"]
    data = load_dataset("fashion-mnist", load_size=max(net.space.resolutions))
    for how in ("largest", "smallest"):
        arch = sample(net.space, how)
        top1 = evaluate(calibrated_subnet(net, arch, data, 32), data.test, data, arch.resolution, limit=100)
        assert summary["metrics"][how] == {"arch": arch.key, "test_top1": top1}


def _supernet_file(path, in_channels=1, num_classes=10, mode="none", space=PRESETS["tiny"]):
    """A supernet file as `qnas train` writes it (untrained weights: only its shape and kind matter here)."""
    from qnas_cli.checkpoint import save_weights
    from qnas_cli.train import supernet_payload

    torch.manual_seed(0)
    net = Supernet(space, in_channels, num_classes, QuantConfig(mode=mode))
    save_weights(path, supernet_payload(net), {"kind": "qnas.supernet"})
    return path


@pytest.mark.parametrize("init, words", [
    (dict(in_channels=3), "that supernet is for 3 input channels, but --data fashion-mnist has 1 input channels and 10 classes"),
    (dict(num_classes=7), "that supernet is for 7 classes, but --data fashion-mnist has"),
    (dict(in_channels=3, num_classes=7), "that supernet is for 3 input channels and 7 classes"),
    (dict(mode="int8"), "expected a float supernet (trained with --quant none, or a run's float_supernet.pt), got a fully int8 one"),
    (dict(space=PRESETS["small"]), "that supernet is of space 'small', not this run's --space 'tiny'"),
    (dict(space=SearchSpace.from_dict({**PRESETS["tiny"].to_dict(), "resolutions": [16]})),
     "that supernet is of space another 'tiny' (the two differ in their fields)"),
])
def test_init_from_a_float_supernet_that_does_not_fit_exits_2_before_any_write(runner, tmp_path, init, words):
    """--init from a float supernet of other data, space or quantization: one line naming what
    differs (other data used to end in a state-dict size error, exit 1), and no run folder."""
    path = _supernet_file(tmp_path / "float.pt", **init)
    r = runner.invoke(app, ["train", "--space", "tiny", "--steps", "2", "--batch-size", "16", "--init", str(path),
                            "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, words", [
    (["train", "--space", "huge"], "neither a preset"),
    (["train", "--data", "mnist"], "unknown dataset 'mnist'"),
    (["train", "--quant", "int4"], "--quant: 'int4' is not allowed"),
    (["train", "--quant", "convs"], "--quant convs keeps BN unfolded: it takes --weight-scale shared"),
    (["train", "--steps", "0", "--space", "tiny"], "--steps must be a positive integer"),
    (["train", "--bn-fold", "sideways"], "--bn-fold"),
    (["train", "--draws", "epoch"], "--draws must be one of phase, run, got 'epoch'"),
    (["train", "--subnet", "no-such-subnet.json"], "no-such-subnet.json"),
    (["space", "show", "--space", "nope.toml"], "does not exist"),
    (["space", "sample", "--largest", "--smallest"], "choose one"),
])
def test_cli_user_errors_exit_2_with_one_line(runner, args, words, tmp_path):
    r = runner.invoke(app, args + ["--out", str(tmp_path / "o")] if args[0] == "train" else args)
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output


def test_cli_space_show_and_sample(runner, tmp_path):
    r = runner.invoke(app, ["space", "show", "--space", "small", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["name"] == "small"
    r = runner.invoke(app, ["space", "show", "--space", "mbv3"])
    assert r.exit_code == 0 and "960" in r.stdout
    out = tmp_path / "subnet.json"
    r = runner.invoke(app, ["space", "sample", "--space", "small", "--smallest", "--out", str(out)])
    assert r.exit_code == 0 and json.loads(out.read_text())["resolution"] == 24
    r = runner.invoke(app, ["space", "sample", "--random", "--seed", "3"])
    assert r.exit_code == 0 and json.loads(r.stdout)["format"] == "qnas.subnet/1"


def test_cli_help_teaches(runner):
    r = runner.invoke(app, ["train", "--help"])
    assert r.exit_code == 0 and "--resume" in r.output and "sandwich" in r.output


def test_cli_export_and_calibrate_bad_input(runner, tmp_path):
    sub = tmp_path / "subnet.json"
    r = runner.invoke(app, ["space", "sample", "--space", "tiny", "--out", str(sub)])
    assert r.exit_code == 0
    r = runner.invoke(app, ["export", str(sub), "--out", "/dev/null/cannot"])
    assert r.exit_code == 2 and "cannot write there" in r.output
    r = runner.invoke(app, ["calibrate", str(sub)])
    assert r.exit_code == 2 and "names no supernet" in r.output
    r = runner.invoke(app, ["calibrate", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "does not exist" in r.output
    fake = tmp_path / "supernet.pt"
    fake.write_bytes(b"not a checkpoint")
    r = runner.invoke(app, ["calibrate", str(sub), "--supernet", str(fake)])
    assert r.exit_code == 2 and "no sidecar" in r.output and "Traceback" not in r.output
