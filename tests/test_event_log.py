"""TensorBoard event files of `qnas train` (the search's are in test_search_cli.py): the scalars
are metrics.jsonl's rows, a resumed run's curves do not double, --no-tensorboard writes none,
and writing them never loads TensorFlow."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qnas_cli.cli import app
from qnas_cli.event_log import EVENT_FILES, read_scalars
from qnas_cli.run_folder import check_resumable
from qnas_cli.space import load_space
from qnas_cli.train import TrainConfig, train
from tests.test_train import FAST

QUIET = dict(log=lambda *a, **k: None)
PER_STEP = ("loss", "loss_largest", "loss_smallest", "acc_largest", "lr", "grad_norm", "img_per_s", "sec_per_step")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class _Stop(Exception):
    pass


def test_train_writes_every_metrics_row_per_phase_and_the_final_accuracies(tmp_path):
    summary = train(TrainConfig(out=str(tmp_path), steps=4, float_steps=2, ckpt_every=100, **FAST), **QUIET)
    scalars, rows = read_scalars(tmp_path), _rows(tmp_path)
    for phase in ("float", "int8"):
        mine = [r for r in rows if r["phase"] == phase]
        for key in PER_STEP:
            points = scalars[f"{phase}/{key}"]
            assert [s for s, _ in points] == [r["step"] for r in mine], key  # one point per metrics.jsonl row
            if key != "sec_per_step":
                assert [v for _, v in points] == pytest.approx([r[key] for r in mine], rel=1e-6), key
        assert [v for _, v in scalars[f"{phase}/sec_per_step"]] == pytest.approx([32 / r["img_per_s"] for r in mine], rel=1e-5)
    for how in ("largest", "smallest"):
        assert scalars[f"eval/{how}_test_top1"] == [(4, pytest.approx(summary["metrics"][how]["test_top1"]))]


def test_resume_continues_the_curves_without_doubling_them(tmp_path):
    """Killed after step 4 (checkpoint at 3), resumed: TensorBoard shows steps 1-6 once each, and
    the values metrics.jsonl holds (step 4 of the killed run is purged, as its row was)."""
    cfg = TrainConfig(out=str(tmp_path), steps=6, ckpt_every=3, **FAST)

    def crash(step, total, metrics):
        if step == 4:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, on_step=crash, **QUIET)
    train(cfg, resume=True, **QUIET)
    assert len(list(tmp_path.glob(EVENT_FILES))) == 2
    scalars, rows = read_scalars(tmp_path), _rows(tmp_path)
    points = scalars["float/loss"] + scalars["int8/loss"]
    assert [s for s, _ in points] == [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in points] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_a_resumed_run_may_switch_tensorboard_off():
    """A logging switch is not part of the run's identity: --resume accepts a change of it."""
    space = load_space("tiny")
    cfg = lambda **k: TrainConfig(out="x", steps=4, **FAST, **k)  # noqa: E731
    meta = {"config": cfg(tensorboard=True).to_dict(), "space": space.to_dict()}
    check_resumable(meta, cfg(tensorboard=False).to_dict(), TrainConfig.RESUME_KEYS, space, "tiny")
    assert "tensorboard" not in TrainConfig.RESUME_KEYS


def test_no_tensorboard_writes_no_event_file(runner, tmp_path):
    r = runner.invoke(app, ["train", "--space", "tiny", "--steps", "2", "--batch-size", "16", "--eval-images", "100",
                            "--calib-images", "32", "--out", str(tmp_path), "--no-tensorboard", "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "supernet.pt").exists() and list(tmp_path.rglob(EVENT_FILES)) == []


def test_overwrite_replaces_the_earlier_runs_event_files(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), steps=2, ckpt_every=100, **FAST)
    train(cfg, **QUIET)
    first = set(tmp_path.glob(EVENT_FILES))
    train(cfg, overwrite=True, **QUIET)
    assert len(list(tmp_path.glob(EVENT_FILES))) == 1 and not first & set(tmp_path.glob(EVENT_FILES))
    assert [s for s, _ in read_scalars(tmp_path)["float/loss"]] == [1]


def test_writing_event_files_does_not_load_tensorflow(tmp_path):
    """tensorboard imports TensorFlow, when installed, for its file I/O unless told not to
    (qnas_cli.event_log): training, the model core, must run without it."""
    code = ("import sys\n"
            "from qnas_cli.train import TrainConfig, train\n"
            f"train(TrainConfig(out={str(tmp_path)!r}, steps=2, ckpt_every=100, tensorboard=True, **{FAST!r}), log=lambda *a: None)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
    assert len(list(tmp_path.glob(EVENT_FILES))) == 1
