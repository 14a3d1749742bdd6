"""`qnas finetune`: one subnet trained on from its inherited weights, with a frozen teacher;
only its slices move; its lineage is recorded; resume is exact; bad input is refused before any
write; a fine-tuned subnet exports with the bit-exact gate passing (slow)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qnas_cli.calibrate import calibrate_file, subnet_document
from qnas_cli.checkpoint import load_weights, save_weights, sha256_file, write_json
from qnas_cli.cli import app
from qnas_cli.data import load_dataset
from qnas_cli.layers import keep_scales_positive
from qnas_cli.finetune import FinetuneConfig, finetune, frozen_teacher
from qnas_cli.errors import UserError
from qnas_cli.search_job import SearchConfig, prepare_search
from qnas_cli.space import PRESETS, sample
from qnas_cli.train import supernet_payload
from tests.conftest import make_supernet
from tests.helpers import assert_same_weights

TINY = PRESETS["tiny"]
FAST = dict(batch_size=16, eval_images=100, calib_images=64, warmup_steps=2, log_every=1, tensorboard=False)
QUIET = dict(log=lambda *a, **k: None)


class _Stop(Exception):
    pass


def _supernet(folder: Path, mode: str = "int8") -> Path:
    """A tiny supernet file as `qnas train` writes it (data-initialised scales, untrained weights)."""
    net = make_supernet(mode)
    keep_scales_positive(net)  # as every training step leaves them (make_supernet's noise can push a theta below 0)
    path = folder / "supernet.pt"
    save_weights(path, supernet_payload(net), {"kind": "qnas.supernet", "config": {"data": "fashion-mnist"}})
    return path


def _subnet(folder: Path, supernet: Path, arch=None, name: str = "subnet.json") -> Path:
    arch = arch or sample(TINY, "random", random.Random(3))
    path = folder / name
    sha = sha256_file(supernet) if supernet.exists() else "0" * 64
    write_json(path, subnet_document(arch, TINY, str(supernet.resolve()), sha))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A supernet, a mid-sized subnet of it, and one fine-tune of that subnet (4 steps, teacher largest)."""
    root = tmp_path_factory.mktemp("ft")
    net = _supernet(root)
    arch = sample(TINY, "random", random.Random(3))
    assert arch.key not in (sample(TINY, "largest").key, sample(TINY, "smallest").key)
    subnet = _subnet(root, net, arch)
    summary = finetune(FinetuneConfig(subnet=str(subnet), out=str(root / "ft"), steps=4, ckpt_every=2, **FAST), **QUIET)
    return root, net, subnet, arch, summary


def test_only_the_subnets_slices_move_and_the_original_is_untouched(base):
    root, net, subnet, arch, _ = base
    before, _ = load_weights(net)
    after, meta = load_weights(root / "ft" / "supernet.pt")
    assert sha256_file(net) == json.loads((root / "subnet.json").read_text())["supernet"]["sha256"]  # the input, unchanged
    a, b = before["model"], after["model"]
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved, "the fine-tune changed nothing"
    for s, (stage, spec) in enumerate(zip(arch.stages, TINY.stages)):
        for j in range(len(stage.blocks), max(spec.depths)):  # blocks the subnet does not have: bit for bit
            unused = [k for k in a if k.startswith(f"stages.{s}.{j}.")]
            assert unused and not [k for k in unused if k in moved], (s, j)
        w = f"stages.{s}.0.project.weight"  # output channels past the subnet's width: bit for bit
        assert torch.equal(a[w][stage.width:], b[w][stage.width:]), w
        assert not torch.equal(a[w][: stage.width], b[w][: stage.width]), w


def test_lineage_is_recorded_and_calibrate_takes_the_result_as_it_is(base):
    root, net, subnet, arch, summary = base
    doc = json.loads((root / "ft" / "subnet.json").read_text())
    meta = json.loads((root / "ft" / "supernet.json").read_text())
    assert doc["supernet"] == {"path": "supernet.pt", "sha256": meta["weights"]["sha256"]}
    lineage = doc["finetune"]
    assert lineage["supernet"] == {"path": str(net.resolve()), "sha256": sha256_file(net)}
    assert (lineage["arch_key"], lineage["steps"], lineage["teacher"], lineage["lr"]) == (arch.key, 4, "largest", FinetuneConfig.lr)
    assert lineage["data"]["spec"] == "fashion-mnist" and lineage["seed"] == 0
    assert meta["finetuned_for"] == arch.key and load_weights(root / "ft" / "supernet.pt")[0]["finetuned_for"] == arch.key
    assert set(summary["metrics"]) == {"inherited", "finetuned"}
    for how in ("inherited", "finetuned"):  # both held-out splits, the search one to choose candidates by
        assert {k: lineage[k][how] for k in ("test_top1", "search_top1")} == \
            {k: summary["metrics"][how][k] for k in ("test_top1", "search_top1")}
        assert 0.0 < summary["metrics"][how]["search_top1"] <= 1.0
    _, cal, _ = calibrate_file(root / "ft" / "subnet.json", calib_images=64, eval_images=50)  # no --supernet: the file names it
    assert cal["arch_key"] == arch.key and cal["supernet"]["sha256"] == meta["weights"]["sha256"]


def test_a_finetuned_supernet_serves_its_subnet_only(base, tmp_path):
    root, *_ = base
    ft = root / "ft" / "supernet.pt"
    other = _subnet(tmp_path, ft, sample(TINY, "smallest"))
    with pytest.raises(UserError, match="was fine-tuned for the subnet .* alone"):
        calibrate_file(other, calib_images=64, eval_images=50)
    with pytest.raises(UserError, match="search the original supernet"):
        prepare_search(SearchConfig(supernet=str(ft), budgets_ms=[1.0], out=str(tmp_path / "s")))
    r = CliRunner().invoke(app, ["export", str(other), "--out", str(tmp_path / "export")])
    assert r.exit_code == 2 and "was fine-tuned for the subnet" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subnet.json"]


def test_the_teacher_is_frozen_and_changes_the_result(base, fmnist, tmp_path):
    """The teacher's logits depend only on the original weights (not on the student's steps) and it
    has nothing to train; fine-tuning with it gives other weights than on the labels alone."""
    root, net, subnet, arch, _ = base
    from qnas_cli.supernet import load_supernet

    origin, _ = load_supernet(net)
    data = load_dataset("fashion-mnist", load_size=max(TINY.resolutions))
    teacher = frozen_teacher(origin, data, 64, "cpu")
    x, _ = data.train.get(torch.arange(16))
    first = teacher(x)
    assert not first.requires_grad
    with torch.no_grad():  # the student's supernet moving does not move the teacher (it is a calibrated copy)
        for p in origin.parameters():
            p.add_(1.0)
    assert torch.equal(teacher(x), first)
    finetune(FinetuneConfig(subnet=str(subnet), out=str(tmp_path / "none"), steps=4, ckpt_every=2, teacher="none", **FAST), **QUIET)
    with_teacher = load_weights(root / "ft" / "supernet.pt")[0]["model"]
    without = load_weights(tmp_path / "none" / "supernet.pt")[0]["model"]
    assert any(not torch.equal(with_teacher[k], without[k]) for k in with_teacher)


def test_resume_gives_identical_weights(base, tmp_path):
    """4 steps straight (the fixture's) == 3 steps, crash after the checkpoint of step 2, --resume: bit for bit."""
    root, net, subnet, *_ = base
    cfg = FinetuneConfig(subnet=str(subnet), out=str(tmp_path / "b"), steps=4, ckpt_every=2, **FAST)

    def crash(step, total, metrics):
        if step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(cfg, on_step=crash, **QUIET)
    assert not (tmp_path / "b" / "supernet.pt").exists() and not (tmp_path / "b" / "subnet.json").exists()
    finetune(cfg, resume=True, **QUIET)
    assert_same_weights(load_weights(root / "ft" / "supernet.pt")[0]["model"], load_weights(tmp_path / "b" / "supernet.pt")[0]["model"])
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    with pytest.raises(UserError, match="option 'lr' differs"):
        finetune(FinetuneConfig(subnet=str(subnet), out=str(tmp_path / "b"), steps=4, ckpt_every=2, lr=0.5, **FAST),
                 resume=True, **QUIET)


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGKILL", -9)])
def test_a_killed_or_interrupted_finetune_resumes_to_the_same_weights(base, tmp_path, sig, code):
    """The command killed (SIGKILL) or interrupted (Ctrl-C: a checkpoint, exit 130) after its first
    checkpoint, then --resume: the weights of an uninterrupted run, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, net, subnet, *_ = base
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run: same floats
    cmd = lambda out: [sys.executable, "-m", "qnas_cli", "finetune", str(subnet), "--steps", "120", "--ckpt-every", "10",  # noqa: E731
                       "--batch-size", "16", "--eval-images", "50", "--calib-images", "64", "--no-tensorboard", "--out", str(out)]
    subprocess.run(cmd(tmp_path / "a"), env=env, check=True, capture_output=True, timeout=600)
    p = subprocess.Popen(cmd(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (tmp_path / "b" / "ckpt" / "step_00000010.json").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if p.poll() is not None:
        pytest.skip("the run finished before it could be stopped (a fast host): nothing to resume")
    p.send_signal(getattr(signal, sig))
    assert p.wait(timeout=300) == code, p.stderr.read()
    assert not (tmp_path / "b" / "supernet.pt").exists()
    r = subprocess.run([*cmd(tmp_path / "b"), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert_same_weights(load_weights(tmp_path / "a" / "supernet.pt")[0]["model"], load_weights(tmp_path / "b" / "supernet.pt")[0]["model"])


def test_cli_json(runner, base, tmp_path):
    root, net, subnet, arch, _ = base
    r = runner.invoke(app, ["finetune", str(subnet), "--steps", "2", "--batch-size", "16", "--eval-images", "50",
                            "--calib-images", "32", "--teacher", "none", "--no-tensorboard", "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["finetuned_for"] == arch.key and summary["subnet"] == str(tmp_path / "o" / "subnet.json")
    assert not list((tmp_path / "o").glob("events.out.tfevents.*"))


# ---- bad input: exit 2, one line, nothing written ---------------------------------------------

def _refusals(root: Path, net: Path, subnet: Path, arch) -> list[tuple[list[str], str]]:
    small = sample(PRESETS["small"], "smallest")
    other_space = root / "small.json"
    write_json(other_space, subnet_document(small, PRESETS["small"], str(net.resolve()), sha256_file(net)))
    changed = root / "changed"
    changed.mkdir()
    changed_net = _supernet(changed)
    changed_subnet = _subnet(changed, changed_net, arch)
    torch.manual_seed(1)
    save_weights(changed_net, supernet_payload(make_supernet(seed=1)), {"kind": "qnas.supernet", "config": {"data": "fashion-mnist"}})  # retrained since
    missing = _subnet(root, root / "gone" / "supernet.pt", arch, "missing.json")
    largest = _subnet(root, net, sample(TINY, "largest"), "largest.json")
    finetuned = root / "ft" / "subnet.json"  # the fixture's fine-tune: a fine-tuned supernet's largest is no teacher
    used = root / "used"
    (used / "ckpt").mkdir(parents=True)
    (used / "supernet.pt").write_bytes(b"x")
    out = ["--out", str(root / "new")]
    return [
        ([str(other_space), *out], "space"),
        ([str(missing), *out], "does not exist"),
        ([str(changed_subnet), *out], "is not the file this subnet was made from"),
        ([str(subnet), "--steps", "0", *out], "--steps must be a positive integer"),
        ([str(subnet), "--steps", "-3", *out], "--steps must be a positive integer"),
        ([str(subnet), "--teacher", "smallest", *out], "--teacher"),
        ([str(largest), *out], "the subnet is the supernet's largest"),
        ([str(finetuned), *out], "is itself fine-tuned"),
        ([str(subnet), "--out", str(used)], "holds a finished run"),
        ([str(subnet), "--out", str(root)], "would overwrite the input"),
        ([str(subnet), "--resume", "--overwrite", *out], "give one of them"),
        ([str(subnet), "--resume", *out], "no usable checkpoint"),
        ([str(subnet), "--lr", "0", *out], "--lr"),
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(runner, base):
    root, net, subnet, arch, _ = base
    for args, says in _refusals(root, net, subnet, arch):
        before = sorted(str(p) for p in root.rglob("*"))
        stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
        r = runner.invoke(app, ["finetune", *args])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and says in lines[0], (args, r.output)
        assert sorted(str(p) for p in root.rglob("*")) == before, args
        assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps, args


# ---- end to end (slow) -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_finetuned_subnet_exports_with_the_gate_passing(runner, tmp_path):
    """qnas train (tiny) -> a subnet -> qnas finetune -> qnas export: PASS, 100% of int8 logits exact."""
    r = runner.invoke(app, ["train", "--space", "tiny", "--steps", "60", "--batch-size", "32", "--lr", "0.1",
                            "--warmup-steps", "5", "--eval-images", "200", "--calib-images", "128", "--no-tensorboard",
                            "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    subnet = _subnet(tmp_path, tmp_path / "run" / "supernet.pt")
    r = runner.invoke(app, ["finetune", str(subnet), "--steps", "30", "--batch-size", "32", "--eval-images", "300",
                            "--no-tensorboard", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    out = Path(summary["subnet"])
    r = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "export"), "--eval-images", "300",
                            "--verify-images", "300", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    assert report["passed"] and report["parity"][report["target"]]["exact"] == 1.0
    assert report["accuracy"]["tflite_top1"] == report["accuracy"]["top1"]  # the file scores what the exact forward scores


@pytest.mark.slow
def test_the_benchmark_runs_quick(tmp_path):
    """benchmarks/finetune.py --quick: tiny supernet, two subnets, curves, one export; JSON and PNG written."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "benchmarks.finetune", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "finetune.json").read_text())
    assert len(result["truth_subnets"]) == 2 and {"largest", "none"} <= set(result["curves"][0])
    assert result["winners"][0]["export"]["passed"] and result["winners"][0]["export"]["file_equals_exact_forward"]
    assert (tmp_path / "finetune.png").is_file()
