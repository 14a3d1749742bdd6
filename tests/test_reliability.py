"""Reliability (issue 5): user errors, nothing lost on a kill or Ctrl-C, untrusted files.

1. Every user error is one line on stderr and exit code 2, with no traceback unless --debug.
2. Outputs are written atomically; a SIGKILL at any moment resumes with --resume to the same
   weights as an uninterrupted run; SIGINT checkpoints before exiting.
3. Weights load with weights_only=True after a sha256 check against the sidecar; a truncated,
   corrupt or swapped file is refused by name.
(4. Property-based tests of the parsers are in test_properties.py.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qnas_cli.calibrate import calibrate_file
from qnas_cli.checkpoint import atomic_write, load_weights, save_weights, sha256_file, sidecar, write_json
from qnas_cli.cli import app
from qnas_cli.errors import UserError
from qnas_cli.space import PRESETS, sample
from qnas_cli.supernet import load_supernet
from qnas_cli.run_folder import Interrupted
from qnas_cli.train import TrainConfig, train
from tests.helpers import assert_same_weights, space_doc, supernet_weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
TINY = ["--space", "tiny", "--batch-size", "16", "--eval-images", "100", "--calib-images", "64"]
quiet = lambda *a, **k: None  # noqa: E731


def _cfg(out: Path, **kw) -> TrainConfig:
    """The TrainConfig that `qnas train TINY --steps S --float-steps S/2 --ckpt-every C --out OUT`
    builds: half float, so the phase boundary falls on a checkpoint the damage tests name."""
    steps = kw.get("steps", 4)
    return TrainConfig(**{"space": "tiny", "batch_size": 16, "eval_images": 100, "calib_images": 64,
                          "out": str(out), "steps": steps, "float_steps": steps // 2, "ckpt_every": 2, **kw})


def _audit(out: Path) -> tuple[list[str], list[Path]]:
    """Files at their final names that are half-written or corrupt, and leftover temporary files."""
    bad = []
    for pt in sorted(out.rglob("*.pt")):
        if sidecar(pt).exists():  # a .pt without one is a kill between the two renames: complete, skipped on resume
            try:
                load_weights(pt)
            except UserError as e:
                bad.append(str(e))
    for f in sorted(out.rglob("*.json")) + sorted(out.rglob("*.jsonl")):
        for line in ([f.read_text()] if f.suffix == ".json" else f.read_text().splitlines()):
            try:
                json.loads(line)
            except ValueError:
                bad.append(f"{f}: half-written")
    return bad, sorted(out.rglob(".*.tmp"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step tiny run (checkpoints at steps 2 and 4). Copy it before changing it."""
    out = tmp_path_factory.mktemp("finished")
    train(_cfg(out), log=quiet)
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---- 1. user errors: exit 2, one line, no traceback ----------------------------------------------

def _space_file(d: Path, name: str, **change) -> str:
    (d / name).write_text(json.dumps(space_doc(**change)))
    return str(d / name)


@pytest.fixture
def bad_inputs(tmp_path) -> Path:
    (tmp_path / "syntax.json").write_text('{"resolutions": [16,')
    (tmp_path / "syntax.toml").write_text("resolutions = [16")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    (tmp_path / "bytes.json").write_bytes(b'{"name": "\xff\xfe"}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    _space_file(tmp_path, "negative.json", stage_widths=[-8, 12])
    _space_file(tmp_path, "kernel4.json", stage_kernels=[3, 4])
    _space_file(tmp_path, "empty.json", stage_depths=[])
    _space_file(tmp_path, "stride3.json", stem_stride=3)
    _space_file(tmp_path, "unknown.json", widths=[8])
    return tmp_path


TRAIN_1 = ["train", *TINY, "--steps", "1"]  # bounded, should a case ever be accepted


@pytest.mark.parametrize("args, words", [
    (["space", "show", "--space", "huge"], "neither a preset"),
    (["space", "show", "--space", "{d}/missing.toml"], "does not exist"),
    (["space", "show", "--space", "{d}/dir.json"], "not a file"),
    (["space", "show", "--space", "{d}/syntax.json"], "not valid JSON"),
    (["space", "show", "--space", "{d}/syntax.toml"], "not valid TOML"),
    (["space", "show", "--space", "{d}/deep.json"], "not valid JSON"),
    (["space", "show", "--space", "{d}/bytes.json"], "not valid JSON"),
    (["space", "show", "--space", "{d}/list.json"], "expected an object"),
    (["space", "show", "--space", "{d}/negative.json"], "-8 is not a positive integer"),
    (["space", "sample", "--space", "{d}/kernel4.json"], "4 is even"),
    (["space", "sample", "--space", "{d}/empty.json"], "depths: the list of choices is empty"),
    (["space", "sample", "--space", "{d}/stride3.json"], "stem_stride: 3 is not allowed"),
    (["space", "sample", "--space", "{d}/unknown.json"], "unknown field 'widths'"),
    (["space", "sample", "--space", "tiny", "--out", "{d}/dir.json"], "cannot write"),
    ([*TRAIN_1, "--space", "{d}/kernel4.json"], "4 is even"),
    ([*TRAIN_1, "--data", "mnist"], "unknown dataset 'mnist'"),
    ([*TRAIN_1, "--data", "fashion-mnist:{d}/nowhere"], "does not exist"),
    ([*TRAIN_1, "--data", "cifar10:{d}/nowhere"], "CIFAR-10 not found"),
    ([*TRAIN_1, "--data", "imagefolder"], "needs the folder"),
    ([*TRAIN_1, "--eval-images", "0"], "--eval-images must be a positive integer"),
    ([*TRAIN_1, "--seed", "-1"], "--seed must be"),
    ([*TRAIN_1, "--seed", str(2**64)], "--seed must be"),
    ([*TRAIN_1, "--lr", "nan"], "--lr must be a positive number"),
    ([*TRAIN_1, "--batch-size", "1000000"], "exceeds"),
    ([*TRAIN_1, "--resume"], "no usable checkpoint"),
    ([*TRAIN_1, "--init", "{d}/missing.pt"], "does not exist"),
    ([*TRAIN_1, "--out", "{d}/a_file"], "is a file"),
    ([*TRAIN_1, "--out", "{d}/a_file/run"], "cannot write"),
])
def test_user_errors_exit_2_with_one_line(runner, bad_inputs, args, words):
    args = [a.replace("{d}", str(bad_inputs)) for a in args]
    if args[0] == "train" and "--out" not in args:
        args += ["--out", str(bad_inputs / "out")]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert words in r.output
    assert r.output.strip().splitlines()[-1].startswith("error:")


def test_internal_errors_exit_1_with_the_tools_message(runner, monkeypatch):
    def broken(_):
        raise RuntimeError("boom")
    monkeypatch.setattr("qnas_cli.cli.space.load_space", broken)
    r = runner.invoke(app, ["space", "show", "--space", "tiny"])
    assert r.exit_code == 1 and "internal error: RuntimeError: boom" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("change, words", [
    (["--space", "small"], "'space' differs"),
    (["--lr", "0.1"], "'lr' differs"),
    (["--seed", "1"], "'seed' differs"),
])
def test_resume_with_other_options_is_refused(runner, run_copy, change, words):
    r = runner.invoke(app, ["train", *TINY, "--steps", "4", "--float-steps", "2", "--ckpt-every", "2", "--out", str(run_copy),
                            "--resume", *change])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


def test_resume_with_an_edited_space_file_is_refused(runner, tmp_path):
    """Same --space path, new content: the checkpoint would load (same shapes) into another space."""
    space = _space_file(tmp_path, "space.json")
    train(_cfg(tmp_path / "run", space=space, steps=2, ckpt_every=1), log=quiet)
    _space_file(tmp_path, "space.json", resolutions=[16, 24])
    r = runner.invoke(app, ["train", *TINY, "--space", space, "--steps", "2", "--float-steps", "1", "--ckpt-every", "1",
                            "--out", str(tmp_path / "run"), "--resume"])
    assert r.exit_code == 2 and "changed since the interrupted run" in r.output, r.output


def test_resume_from_a_checkpoint_of_another_shape_is_refused(run_copy):
    """A checkpoint whose hash verifies but whose tensors do not fit this run."""
    meta = json.loads((run_copy / "ckpt" / "step_00000004.json").read_text())
    save_weights(run_copy / "ckpt" / "step_00000004.pt", {"model": {"stem.weight": torch.zeros(1)}, "optimizer": {}, "step": 4},
                 {k: v for k, v in meta.items() if k not in ("weights", "versions")})
    with pytest.raises(UserError, match="step_00000004.pt is not a checkpoint of this run"):
        train(_cfg(run_copy), resume=True, log=quiet)


def _listing(out: Path) -> dict[str, str]:
    """Every file under ``out`` and its sha256: what a refused command must leave as it was."""
    return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_new_run_does_not_bury_an_unfinished_one(run_copy):
    (run_copy / "supernet.pt").unlink()  # killed before it finished
    (run_copy / "supernet.json").unlink()
    before = _listing(run_copy)
    with pytest.raises(UserError, match="unfinished run .* continue it with --resume, replace it with --overwrite"):
        train(_cfg(run_copy), log=quiet)
    assert _listing(run_copy) == before


def test_a_new_run_does_not_replace_a_finished_one(run_copy):
    before = _listing(run_copy)
    with pytest.raises(UserError, match=r"holds a finished run \(supernet.pt, float_supernet.pt\): pass --overwrite"):
        train(_cfg(run_copy, steps=2, ckpt_every=1), log=quiet)
    assert _listing(run_copy) == before


BAD_TRAIN = [["--data", "fashion-mnits"], ["--init", "no-such.pt"], ["--subnet", "no-such.json"], ["--space", "huge"],
             ["--batch-size", "100000"], ["--device", "tpu"]]


@pytest.mark.parametrize("overwrite, bad", [([], b) for b in BAD_TRAIN] + [(["--overwrite"], b) for b in BAD_TRAIN]
                         + [(["--overwrite"], ["--resume"])])
def test_a_refused_run_leaves_the_finished_run_whole(runner, run_copy, overwrite, bad):
    """Every input is checked before the folder is touched: a typo loses nothing, with --overwrite
    or without (the finished run's checkpoints used to go first, then the typo exited 2)."""
    before = _listing(run_copy)
    extra = ["--float-steps", "0"] if "--init" in bad else []
    r = runner.invoke(app, ["train", *TINY, "--steps", "2", "--out", str(run_copy), *overwrite, *extra, *bad])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert _listing(run_copy) == before


def test_a_used_out_without_overwrite_exits_2_naming_it(runner, run_copy):
    r = runner.invoke(app, ["train", *TINY, "--steps", "2", "--out", str(run_copy)])
    assert r.exit_code == 2 and "holds a finished run" in r.output and "--overwrite" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("unfinished", [False, True])
def test_overwrite_replaces_the_earlier_run_whole(run_copy, unfinished):
    """Pruning keeps the two newest names: an old step_4 must not outlive (and outrank) the new run's;
    nor may the old run's float_supernet.pt sit beside a run that has no float phase."""
    if unfinished:
        (run_copy / "supernet.pt").unlink()
    train(_cfg(run_copy, steps=2, ckpt_every=1, float_steps=0), log=quiet, overwrite=True)
    assert sorted(p.name for p in (run_copy / "ckpt").glob("*.pt")) == ["step_00000001.pt", "step_00000002.pt"]
    assert not (run_copy / "float_supernet.pt").exists() and not (run_copy / "float_supernet.json").exists()
    assert load_weights(run_copy / "supernet.pt")[1]["steps"] == 2


# ---- 2. atomic writes -------------------------------------------------------------------------

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"v": 1})

    def half(f):
        f.write('{"v": ')
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        atomic_write(path, half, binary=False)
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_writing_over_a_folder_is_a_user_error(tmp_path):
    (tmp_path / "x.json").mkdir()
    with pytest.raises(UserError, match="cannot write"):
        write_json(tmp_path / "x.json", {})
    assert sorted(os.listdir(tmp_path)) == ["x.json"]


def test_outputs_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


# ---- 3. untrusted files -------------------------------------------------------------------------

@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "w.pt"
    save_weights(path, {"model": {"w": torch.arange(1000.0)}}, {"kind": "test"})
    return path


def test_sidecar_holds_the_sha256(weights):
    meta = json.loads(sidecar(weights).read_text())
    assert meta["weights"]["sha256"] == sha256_file(weights) and meta["weights"]["bytes"] == weights.stat().st_size


@pytest.mark.parametrize("damage", ["truncate", "flip", "append", "empty"])
def test_a_damaged_weights_file_is_named(weights, damage):
    data = bytearray(weights.read_bytes())
    data = {"truncate": data[: len(data) // 2], "append": data + b"\0", "empty": b"",
            "flip": data[:100] + bytes([data[100] ^ 1]) + data[101:]}[damage]
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"{re.escape(str(weights))} is corrupt or was modified"):
        load_weights(weights)


@pytest.mark.parametrize("text", [b"", b"{", b"\xff\xfe", b"[]", b'{"weights": {}}', b'{"weights": {"sha256": 5}}',
                                  b'{"weights": {"sha256": null}}', b"[" * 100_000])
def test_a_damaged_sidecar_is_named(weights, text):
    sidecar(weights).write_bytes(text)
    with pytest.raises(UserError, match=rf"{re.escape(str(sidecar(weights)))} is corrupt or not a qnas sidecar"):
        load_weights(weights)


def test_weights_without_a_sidecar_are_refused(weights):
    sidecar(weights).unlink()
    with pytest.raises(UserError, match="has no sidecar"):
        load_weights(weights)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creates the marker file if ever unpickled


def test_a_pickle_that_runs_code_is_refused_even_with_a_matching_sidecar(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    save_weights(path, {"model": _Evil(marker)}, {"kind": "test"})  # the sidecar's sha256 matches
    with pytest.raises(UserError, match="holds more than weights .* and was not loaded") as e:
        load_weights(path)
    assert not marker.exists()
    assert "weights_only" not in str(e.value) and "safe_globals" not in str(e.value)  # no hint to load it anyway


def test_a_swapped_file_is_refused(weights):
    with pytest.raises(UserError, match="not the file this subnet was made from"):
        load_weights(weights, expected_sha256="0" * 64)


def test_a_checkpoint_is_not_a_supernet(finished):
    with pytest.raises(UserError, match="is not a qnas supernet"):
        load_supernet(finished / "ckpt" / "step_00000004.pt")


def test_calibrate_refuses_bad_subnets_and_supernets(tmp_path, finished):
    space = PRESETS["tiny"]
    sub = tmp_path / "subnet.json"
    doc = sample(space, "smallest").to_dict(space)
    write_json(sub, {**doc, "supernet": {"path": str(finished / "supernet.pt"), "sha256": "0" * 64}})
    with pytest.raises(UserError, match="not the file this subnet was made from"):
        calibrate_file(sub)
    doc["stages"][0]["width"] = 9
    write_json(sub, doc)
    with pytest.raises(UserError, match=r"subnet.stages\[0\].width: 9 is not allowed"):
        calibrate_file(sub, supernet=finished / "supernet.pt")
    small = PRESETS["small"]
    write_json(sub, sample(small, "smallest").to_dict(small))
    with pytest.raises(UserError, match="belongs to space 'small'"):
        calibrate_file(sub, supernet=finished / "supernet.pt")
    broken = tmp_path / "supernet.pt"
    shutil.copy(finished / "supernet.pt", broken)
    shutil.copy(finished / "supernet.json", tmp_path / "supernet.json")
    broken.write_bytes(broken.read_bytes()[:-10])
    write_json(sub, sample(space, "smallest").to_dict(space))
    with pytest.raises(UserError, match="supernet.pt is corrupt"):
        calibrate_file(sub, supernet=broken)


# ---- 2 + 3. resuming past damage, in process ----------------------------------------------------

def _kill_artifacts(out: Path, how: str) -> None:
    """The state a kill or a bad disk leaves: the newest checkpoint unusable, temporary files around."""
    for name in ("supernet.pt", "supernet.json"):
        (out / name).unlink()
    newest = out / "ckpt" / "step_00000004.pt"
    if how == "truncated":
        newest.write_bytes(newest.read_bytes()[:1000])
    else:  # killed between the .pt and the .json renames, and inside two writes
        sidecar(newest).unlink()
        (out / "ckpt" / ".step_00000006.pt.x1y2.tmp").write_bytes(b"half")
        (out / ".supernet.pt.x1y2.tmp").write_bytes(b"half")


@pytest.mark.parametrize("how", ["truncated", "orphan"])
def test_resume_skips_a_damaged_checkpoint_by_name_and_ends_identical(finished, run_copy, how):
    _kill_artifacts(run_copy, how)
    log: list[str] = []
    train(_cfg(run_copy), resume=True, log=log.append)
    assert any("skipping checkpoint" in m and "step_00000004.pt" in m for m in log), log
    assert "resuming from step 2 (step_00000002.pt)" in log
    assert_same_weights(supernet_weights(finished), supernet_weights(run_copy))
    assert _audit(run_copy) == ([], [])


def test_resume_with_every_checkpoint_damaged_says_so(run_copy):
    for pt in (run_copy / "ckpt").glob("*.pt"):
        pt.write_bytes(b"")
    log: list[str] = []
    with pytest.raises(UserError, match=r"no usable checkpoint .*\(2 found, none verifies"):
        train(_cfg(run_copy), resume=True, log=log.append)
    assert not [m for m in log if "skipping checkpoint" in m]  # the refusal is the one line printed


def test_resume_past_a_damaged_newest_checkpoint_names_it(run_copy):
    newest = sorted((run_copy / "ckpt").glob("step_*.pt"))[-1]
    newest.write_bytes(b"")
    log: list[str] = []
    train(_cfg(run_copy), resume=True, log=log.append)
    assert len([m for m in log if "skipping checkpoint" in m and newest.name in m]) == 1


def test_sigint_on_the_last_step_still_checkpoints(finished, tmp_path):
    def ctrl_c(step, total, _):
        if step == total - 1:  # seen at the next (last) step
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Interrupted) as e:
        train(_cfg(tmp_path), on_step=ctrl_c, log=quiet)
    assert e.value.step == 4 and load_weights(tmp_path / "ckpt" / "step_00000004.pt")[0]["step"] == 4
    train(_cfg(tmp_path), resume=True, log=quiet)
    assert_same_weights(supernet_weights(finished), supernet_weights(tmp_path))


# ---- 2. real processes: SIGKILL and SIGINT ------------------------------------------------------

CLI_RUN = [*TINY, "--steps", "8", "--float-steps", "2", "--ckpt-every", "2"]  # killed at step 4: in the int8 phase


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qnas_cli", "train", *CLI_RUN, "--out", str(out), *extra]


def _start_and_wait_for(out: Path, path: Path, timeout: float = 300) -> subprocess.Popen:
    p = subprocess.Popen(_train_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert p.poll() is None, f"training ended before {path.name} appeared: {p.communicate()}"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.02)
    return p


def _resume(out: Path) -> str:
    r = subprocess.run(_train_cmd(out, "--resume"), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference")
    r = subprocess.run(_train_cmd(out), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return supernet_weights(out)


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_weights(tmp_path, reference):
    out = tmp_path / "killed"
    p = _start_and_wait_for(out, out / "ckpt" / "step_00000004.json")
    p.kill()
    p.communicate()
    assert p.returncode == -signal.SIGKILL and not (out / "supernet.pt").exists()
    assert _audit(out)[0] == []  # nothing half-written under its final name
    assert "resuming from step 4" in _resume(out)
    assert_same_weights(reference, supernet_weights(out))
    # each row once: the float phase's last step (2) and the run's last, none repeated by the resume
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 8]
    assert _audit(out) == ([], [])


@pytest.mark.slow
def test_sigint_checkpoints_then_resume_reaches_the_same_weights(tmp_path, reference):
    out = tmp_path / "interrupted"
    p = _start_and_wait_for(out, out / "ckpt" / "step_00000002.json")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    step = int(re.search(r"interrupted at step (\d+); checkpoint saved", err).group(1))
    assert step > 2 and load_weights(out / "ckpt" / f"step_{step:08d}.pt")[0]["step"] == step
    assert f"resuming from step {step}" in _resume(out)
    assert_same_weights(reference, supernet_weights(out))
    assert _audit(out) == ([], [])
