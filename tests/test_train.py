"""Training: exact resume, torchrun with two CPU processes, the CLI surface."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qnas_cli.cli import app
from qnas_cli.quant import QuantConfig
from qnas_cli.train import TrainConfig, train
from tests.helpers import assert_same_weights, supernet_weights

FAST = dict(space="tiny", batch_size=32, eval_images=200, calib_images=64, warmup_steps=2, log_every=1)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_resume_gives_identical_weights(tmp_path, mode):
    """6 steps straight == 3 steps, crash, --resume, 3 more steps: bit for bit."""
    cfg = lambda out: TrainConfig(out=str(out), steps=6, ckpt_every=3, quant=QuantConfig(mode=mode), **FAST)  # noqa: E731
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


def test_int8_training_lowers_the_loss(tmp_path):
    train(TrainConfig(out=str(tmp_path), steps=30, ckpt_every=100, lr=0.1, **FAST), log=lambda *a, **k: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first
    meta = json.loads((tmp_path / "supernet.json").read_text())
    assert meta["kind"] == "qnas.supernet" and meta["space"]["name"] == "tiny"
    assert set(meta["metrics"]) == {"largest", "smallest"} and meta["weights"]["sha256"]


def test_resume_refuses_a_different_run(tmp_path):
    from qnas_cli.errors import UserError

    train(TrainConfig(out=str(tmp_path), steps=2, ckpt_every=1, **FAST), log=lambda *a, **k: None)
    with pytest.raises(UserError, match="'lr' differs"):
        train(TrainConfig(out=str(tmp_path), steps=2, ckpt_every=1, **{**FAST, "lr": 0.3}), resume=True)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "qnas_cli", "train", "--space", "tiny", "--steps", "4", "--batch-size", "16", "--device", "cpu",
           "--eval-images", "100", "--calib-images", "64", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    meta = json.loads((out / "supernet.json").read_text())
    assert meta["steps"] == 4 and meta["world_size"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 4  # one writer: rank 0
    # the ranks trained one model: a no-op gradient all-reduce lets them drift and fails the run here
    assert "all 2 processes hold identical weights" in r.stdout + r.stderr


# ---- the CLI ----------------------------------------------------------------------------------

def test_cli_train_tiny_json(runner, tmp_path):
    r = runner.invoke(app, ["train", "--space", "tiny", "--steps", "2", "--batch-size", "16", "--eval-images", "100",
                            "--calib-images", "32", "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["steps"] == 2 and (tmp_path / "supernet.pt").is_file()


@pytest.mark.parametrize("args, words", [
    (["train", "--space", "huge"], "neither a preset"),
    (["train", "--data", "mnist"], "unknown dataset 'mnist'"),
    (["train", "--quant", "int4"], "--quant: 'int4' is not allowed"),
    (["train", "--steps", "0", "--space", "tiny"], "--steps must be a positive integer"),
    (["train", "--bn-fold", "sideways"], "--bn-fold"),
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
