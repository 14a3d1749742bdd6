"""Fault injection (issue 5): random SIGKILLs during `qnas train`, malformed inputs for every command.

Kills: one uninterrupted reference run of `qnas train` (tiny preset), then N runs, each SIGKILLed
at a random moment of its life (seeded; from start-up to the final evaluation), restarted with
--resume (or afresh when no checkpoint was written yet) and compared with the reference bit for
bit. After each kill the run folder is audited: a file under its final name that is truncated,
fails its sha256 or does not parse is "half-written" (must be 0); temporary files of interrupted
atomic writes are counted apart and must be gone after the resume.

Inputs: every command (`space show`, `space sample`, `train`, `calibrate`, `export`) is run
in-process with malformed inputs: bad or missing files, impossible spaces, subnets outside their
space, corrupt or swapped weights, bad numbers, incompatible options. "Rejected cleanly" means exit
code 2, an `error:` line, and no traceback.

    python -m benchmarks.fault_injection [--kills 3] [--steps 12] [--seed 0] [--out runs/bench/fault_injection.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from qnas_cli.checkpoint import load_weights, sidecar, versions, write_json
from qnas_cli.cli import app
from qnas_cli.errors import UserError
from qnas_cli.space import PRESETS, sample
from tests.helpers import assert_same_weights, space_doc, supernet_weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # same threads in every run: same floats
TINY = ["--space", "tiny", "--batch-size", "16", "--eval-images", "100", "--calib-images", "64"]


# ---- kills ----------------------------------------------------------------------------------------

def train_cmd(out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qnas_cli", "train", *TINY, "--steps", str(steps), "--ckpt-every", "2",
            "--out", str(out), *extra]


def run_to_end(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed ({r.returncode}): {r.stderr[-1500:]}")


def audit(out: Path) -> dict[str, list[str]]:
    """Files under their final names that are half-written; orphans; leftover temporary files."""
    half, orphans = [], []
    for pt in sorted(out.rglob("*.pt")):
        if not sidecar(pt).exists():
            orphans.append(str(pt))  # complete (renamed atomically) but killed before its sidecar: skipped on resume
            continue
        try:
            load_weights(pt)
        except UserError as e:
            half.append(str(e))
    for f in sorted(out.rglob("*.json")) + sorted(out.rglob("*.jsonl")):
        for line in [f.read_text()] if f.suffix == ".json" else f.read_text().splitlines():
            try:
                json.loads(line)
            except ValueError:
                half.append(f"{f}: does not parse")
    return {"half_written": half, "orphans": orphans, "temp_files": [str(p) for p in sorted(out.rglob(".*.tmp"))]}


def same_weights(a: Path, b: Path) -> bool:
    try:
        assert_same_weights(supernet_weights(a), supernet_weights(b))
    except AssertionError:
        return False
    return True


def kill_runs(n: int, steps: int, rng: random.Random, root: Path) -> dict[str, Any]:
    ref = root / "reference"
    t = time.perf_counter()
    run_to_end(train_cmd(ref, steps))
    t_ref = time.perf_counter() - t
    print(f"reference run: {steps} steps in {t_ref:.1f} s", flush=True)
    runs = []
    for i in range(n):
        out = root / f"kill_{i}"
        delay = rng.uniform(0.05, 0.95) * t_ref
        p = subprocess.Popen(train_cmd(out, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        time.sleep(delay)
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
        p.wait()
        after_kill = audit(out)
        ckpts = sorted((out / "ckpt").glob("step_*.pt")) if (out / "ckpt").is_dir() else []
        resumed = bool(ckpts)
        if killed:
            run_to_end(train_cmd(out, steps, *(["--resume"] if resumed else [])))
        after_resume = audit(out)
        row = {"kill_at_s": round(delay, 2), "killed": killed, "checkpoints_on_disk": [c.name for c in ckpts],
               "restart": "--resume" if resumed else "afresh" if killed else "none (finished first)",
               "identical": same_weights(ref, out), "after_kill": after_kill, "after_resume": after_resume}
        runs.append(row)
        print(f"kill {i + 1}/{n} at {delay:.1f} s: {'killed' if killed else 'finished first'}, restart {row['restart']} "
              f"(checkpoints {', '.join(row['checkpoints_on_disk']) or 'none'}), identical {row['identical']}, "
              f"half-written {len(after_kill['half_written'])}, temp files {len(after_kill['temp_files'])}", flush=True)
        shutil.rmtree(out)
    return {"reference_s": round(t_ref, 2), "total": n, "resumed_identically": sum(r["identical"] for r in runs), "runs": runs}


# ---- malformed inputs -------------------------------------------------------------------------

def bad_space_files(d: Path) -> dict[str, str]:
    """name -> path of a space file (or spec) that must be refused."""
    texts = {
        "syntax.json": '{"resolutions": [16,', "syntax.toml": "resolutions = [16", "empty.json": "",
        "deep.json": "[" * 100_000, "deep.toml": "a = " + "[" * 100_000, "bigint.json": "[" + "9" * 5000 + "]",
        "list.json": "[1, 2]", "nan.json": '{"resolutions": NaN}',
    }
    docs = {
        "negative_width.json": space_doc(stage_widths=[-8, 12]), "kernel4.json": space_doc(stage_kernels=[3, 4]),
        "empty_depths.json": space_doc(stage_depths=[]), "zero_expand.json": space_doc(stage_expands=[0]),
        "stride3.json": space_doc(stem_stride=3), "stage_stride0.json": space_doc(stage_stride=0),
        "no_stages.json": space_doc(stages=[]), "stages_int.json": space_doc(stages=5),
        "unknown_field.json": space_doc(widths=[8]), "missing_field.json": {k: v for k, v in space_doc().items() if k != "stages"},
        "float_width.json": space_doc(stage_widths=[8.5]), "bool_stem.json": space_doc(stem_channels=True),
        "string_res.json": space_doc(resolutions="16"), "repeated.json": space_doc(resolutions=[16, 16]),
        "negative_feature.json": space_doc(feature_channels=-1),
    }
    paths = {}
    for name, text in texts.items():
        (d / name).write_text(text)
        paths[name] = str(d / name)
    for name, doc in docs.items():
        (d / name).write_text(json.dumps(doc))
        paths[name] = str(d / name)
    (d / "bytes.json").write_bytes(b'{"name": "\xff"}')
    (d / "folder.json").mkdir()
    paths.update({"bytes.json": str(d / "bytes.json"), "folder.json": str(d / "folder.json"),
                  "missing.toml": str(d / "missing.toml"), "unknown preset": "huge", "no suffix": str(d / "space")})
    return paths


def bad_subnets(d: Path) -> dict[str, Path]:
    """name -> subnet.json that must be refused against the tiny space."""
    tiny, small = PRESETS["tiny"], PRESETS["small"]
    good = sample(tiny, "smallest").to_dict(tiny)

    def edit(fn) -> dict:
        doc = json.loads(json.dumps(good))
        fn(doc)
        return doc
    docs: dict[str, Any] = {
        "width 9": edit(lambda x: x["stages"][0].update(width=9)),
        "kernel 4": edit(lambda x: x["stages"][0]["blocks"][0].update(kernel=4)),
        "expand 0": edit(lambda x: x["stages"][0]["blocks"][0].update(expand=0)),
        "kernel true": edit(lambda x: x["stages"][0]["blocks"][0].update(kernel=True)),
        "depth 3": edit(lambda x: x["stages"][0]["blocks"].extend([{"kernel": 3, "expand": 2}] * 2)),
        "no blocks": edit(lambda x: x["stages"][0].update(blocks=[])),
        "resolution 17": edit(lambda x: x.update(resolution=17)),
        "resolution 16.0": edit(lambda x: x.update(resolution=16.0)),
        "one stage": edit(lambda x: x["stages"].pop()),
        "stages null": edit(lambda x: x.update(stages=None)),
        "no resolution": edit(lambda x: x.pop("resolution")),
        "other format": edit(lambda x: x.update(format="qnas.subnet/9")),
        "block is a list": edit(lambda x: x["stages"][0]["blocks"].__setitem__(0, [3, 2])),
        "other space": sample(small, "smallest").to_dict(small),
        "top-level list": [good],
    }
    paths = {}
    for i, (name, doc) in enumerate(docs.items()):
        paths[name] = d / f"subnet_{i}.json"
        paths[name].write_text(json.dumps(doc))
    for name, raw in {"syntax": b'{"resolution": 16,', "bytes": b"\xff\xfe", "empty": b""}.items():
        paths[name] = d / f"subnet_{name}.json"
        paths[name].write_bytes(raw)
    paths["missing"] = d / "nowhere.json"
    return paths


def bad_weights(run: Path, d: Path) -> dict[str, Path]:
    """name -> a supernet.pt (with sidecar) that must be refused."""
    out = {}

    def copy(name: str) -> Path:
        folder = d / name.replace(" ", "_")
        folder.mkdir()
        shutil.copy(run / "supernet.pt", folder / "supernet.pt")
        shutil.copy(run / "supernet.json", folder / "supernet.json")
        out[name] = folder / "supernet.pt"
        return folder / "supernet.pt"
    p = copy("truncated")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    p = copy("flipped byte")
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    sidecar(copy("no sidecar")).unlink()
    sidecar(copy("corrupt sidecar")).write_text('{"weights": {"sha256": ')
    sidecar(copy("sidecar of another file")).write_text(json.dumps({"weights": {"sha256": "0" * 64}}))
    p = copy("a checkpoint, not a supernet")
    shutil.copy(sorted((run / "ckpt").glob("step_*.pt"))[-1], p)
    shutil.copy(sorted((run / "ckpt").glob("step_*.json"))[-1], sidecar(p))
    p = copy("empty")
    p.write_bytes(b"")
    out["missing"] = d / "nowhere" / "supernet.pt"
    return out


def input_cases(run: Path, steps: int, d: Path) -> list[tuple[str, str, list[str]]]:
    """(command, what is wrong, argv) for every malformed input; ``run``: a finished run of ``steps`` steps."""
    cases: list[tuple[str, str, list[str]]] = []
    train = ["train", *TINY, "--steps", "1"]  # bounded, should a case ever be accepted
    spaces = bad_space_files(d)
    for name, spec in spaces.items():
        cases.append(("space show", f"space {name}", ["space", "show", "--space", spec]))
        cases.append(("space sample", f"space {name}", ["space", "sample", "--space", spec]))
    cases += [
        ("space sample", "two of --largest/--smallest", ["space", "sample", "--largest", "--smallest"]),
        ("space sample", "--out is a folder", ["space", "sample", "--out", str(d)]),
        ("space sample", "--supernet truncated", ["space", "sample", "--supernet", "{w:truncated}"]),
    ]
    for name in ("syntax.json", "deep.toml", "kernel4.json", "negative_width.json", "empty_depths.json", "missing.toml"):
        cases.append(("train", f"space {name}", [*train, "--space", spaces[name]]))
    (d / "empty_folder").mkdir()
    fm = d / "fmnist_truncated"
    fm.mkdir()
    for f in Path("/usr/share/datasets/fashion-mnist").glob("*idx*"):
        (fm / f.name).write_bytes(f.read_bytes()[: 5000])
    cases += [("train", what, [*train, *args]) for what, args in [
        ("unknown dataset", ["--data", "mnist"]), ("missing dataset folder", ["--data", f"fashion-mnist:{d}/nowhere"]),
        ("truncated dataset files", ["--data", f"fashion-mnist:{fm}"]),
        ("cifar10 without folder", ["--data", "cifar10"]), ("cifar10 empty folder", ["--data", f"cifar10:{d}/empty_folder"]),
        ("imagefolder empty", ["--data", f"imagefolder:{d}/empty_folder"]),
        ("--steps 0", ["--steps", "0"]), ("--batch-size 0", ["--batch-size", "0"]), ("--batch-size huge", ["--batch-size", "10000000"]),
        ("--lr -1", ["--lr", "-1"]), ("--lr nan", ["--lr", "nan"]), ("--lr inf", ["--lr", "inf"]),
        ("--epochs 0", ["--epochs", "0"]), ("--ckpt-every 0", ["--ckpt-every", "0"]), ("--calib-images 0", ["--calib-images", "0"]),
        ("--eval-images 0", ["--eval-images", "0"]), ("--num-random -1", ["--num-random", "-1"]),
        ("--seed -1", ["--seed", "-1"]), ("--seed 2^64", ["--seed", str(2**64)]), ("--steps abc", ["--steps", "abc"]),
        ("--quant int4", ["--quant", "int4"]), ("--bn-fold sideways", ["--bn-fold", "sideways"]),
        ("--act-scheme odd", ["--act-scheme", "odd"]), ("--weight-scale odd", ["--weight-scale", "odd"]),
        ("--device tpu", ["--device", "tpu"]), ("--resume without a run", ["--resume", "--out", f"{d}/no_run"]),
        ("--out is a file", ["--out", str(d / "syntax.json")]),
        ("--init missing", ["--init", f"{d}/nowhere.pt"]), ("--init truncated", ["--init", "{w:truncated}"]),
        ("--init is a checkpoint", ["--init", "{w:a checkpoint, not a supernet}"]),
        ("--init int8 supernet", ["--init", str(run / "supernet.pt")]),
        ("--init with --quant none", ["--init", str(run / "supernet.pt"), "--quant", "none"]),
    ]]
    resume = ["train", *TINY, "--steps", str(steps), "--ckpt-every", "2", "--resume"]
    cases += [("train", what, [*resume, *args]) for what, args in [
        ("--resume with another space", ["--out", "{r}", "--space", "small"]),
        ("--resume with another --lr", ["--out", "{r}", "--lr", "0.2"]),
        ("--resume with another --seed", ["--out", "{r}", "--seed", "5"]),
        ("--resume with another --quant", ["--out", "{r}", "--quant", "none"]),
        ("--resume with every checkpoint corrupt", ["--out", "{corrupt_run}"]),
    ]]
    (d / "unfinished").mkdir()
    shutil.copytree(run / "ckpt", d / "unfinished" / "ckpt")
    cases.append(("train", "new run over an unfinished one", ["train", *TINY, "--steps", str(steps), "--out", str(d / "unfinished")]))
    subnets = bad_subnets(d)
    for name, path in subnets.items():
        cases.append(("calibrate", f"subnet {name}", ["calibrate", str(path), "--supernet", str(run / "supernet.pt")]))
    good = d / "good_subnet.json"
    good.write_text(json.dumps(sample(PRESETS["tiny"], "smallest").to_dict(PRESETS["tiny"])))
    for name in ("truncated", "flipped byte", "no sidecar", "corrupt sidecar", "sidecar of another file",
                 "a checkpoint, not a supernet", "empty", "missing"):
        cases.append(("calibrate", f"supernet {name}", ["calibrate", str(good), "--supernet", f"{{w:{name}}}"]))
    named = d / "named_subnet.json"
    named.write_text(json.dumps({**json.loads(good.read_text()),
                                 "supernet": {"path": str(run / "supernet.pt"), "sha256": "f" * 64}}))
    cases += [("calibrate", what, ["calibrate", *args]) for what, args in [
        ("no supernet named", [str(good)]), ("recorded sha256 differs", [str(named)]),
        ("--calib-images 0", [str(good), "--supernet", str(run / "supernet.pt"), "--calib-images", "0"]),
        ("unknown dataset", [str(good), "--supernet", str(run / "supernet.pt"), "--data", "mnist"]),
    ]]
    for name in ("width 9", "other space", "syntax", "missing"):
        cases.append(("export", f"subnet {name}", ["export", str(subnets[name]), "--supernet", str(run / "supernet.pt"),
                                                   "--out", str(d / "export")]))
    cases.append(("export", "supernet truncated", ["export", str(good), "--supernet", "{w:truncated}", "--out", str(d / "export")]))
    beside = d / "calibrated"  # a calibrated subnet.qnas.pt, and the subnet.json beside it damaged / it truncated
    beside.mkdir()
    r = CliRunner().invoke(app, ["calibrate", str(good), "--supernet", str(run / "supernet.pt"), "--calib-images", "64",
                                 "--eval-images", "50", "--out", str(beside / "subnet.qnas.pt")])
    assert r.exit_code == 0, r.output
    (beside / "subnet.json").write_text('{"resolution": 16,')
    shutil.copy(beside / "subnet.qnas.pt", beside / "cut.qnas.pt")
    shutil.copy(beside / "subnet.qnas.json", beside / "cut.qnas.json")
    (beside / "cut.qnas.pt").write_bytes((beside / "cut.qnas.pt").read_bytes()[:500])
    cases += [("export", "malformed subnet.json beside its .qnas.pt", ["export", str(beside / "subnet.json"), "--out", str(d / "export")]),
              ("export", "truncated .qnas.pt", ["export", str(beside / "cut.qnas.pt"), "--out", str(d / "export")])]
    return cases


def input_runs(run: Path, steps: int, root: Path) -> dict[str, Any]:
    d = root / "inputs"
    d.mkdir()
    weights = bad_weights(run, d)
    resumable = d / "resumable"  # a run killed mid-way: checkpoints, no supernet.pt
    shutil.copytree(run / "ckpt", resumable / "ckpt")
    corrupt = d / "corrupt_run"
    shutil.copytree(run / "ckpt", corrupt / "ckpt")
    for pt in (corrupt / "ckpt").glob("*.pt"):
        pt.write_bytes(pt.read_bytes()[:100])
    known = {cmd.name or "" for cmd in app.registered_commands} | {"space"}
    runner = CliRunner()
    rows = []
    for command, what, argv in input_cases(run, steps, d):
        if command.split()[0] not in known:
            continue
        argv = [a.replace("{r}", str(resumable)).replace("{corrupt_run}", str(corrupt)) for a in argv]
        argv = [str(weights[a[3:-1]]) if a.startswith("{w:") else a for a in argv]
        t = time.perf_counter()
        r = runner.invoke(app, argv)
        lines = r.output.strip().splitlines()
        clean = (r.exit_code == 2 and "Traceback" not in r.output and bool(lines)
                 and (lines[-1].startswith("error:") or "Usage:" in r.output))  # Typer's own usage errors exit 2 too
        rows.append({"command": command, "input": what, "exit_code": r.exit_code, "clean": clean,
                     "message": lines[-1][:300] if lines else "", "seconds": round(time.perf_counter() - t, 2)})
        if not clean:
            print(f"NOT CLEAN: {command}: {what}: exit {r.exit_code}: {r.output.strip()[-600:]}", flush=True)
    by_command: dict[str, dict[str, int]] = {}
    for row in rows:
        c = by_command.setdefault(row["command"], {"total": 0, "rejected_cleanly": 0})
        c["total"] += 1
        c["rejected_cleanly"] += row["clean"]
    return {"total": len(rows), "rejected_cleanly": sum(r["clean"] for r in rows), "by_command": by_command, "cases": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLed training runs")
    ap.add_argument("--steps", type=int, default=12, help="steps of each tiny training run (checkpoint every 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--skip-inputs", action="store_true", help="only the kills")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/fault_injection.json"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qnas_faults_") as tmp:
        root = Path(tmp)
        kills = kill_runs(args.kills, args.steps, random.Random(args.seed), root)
        inputs = {"total": 0, "rejected_cleanly": 0, "by_command": {}, "cases": []}
        if not args.skip_inputs:
            inputs = input_runs(root / "reference", args.steps, root)
    half = sum(len(r["after_kill"]["half_written"]) + len(r["after_resume"]["half_written"]) for r in kills["runs"])
    temps_left = sum(len(r["after_resume"]["temp_files"]) for r in kills["runs"])
    result = {"kills": kills, "inputs": inputs, "half_written_files": half, "temp_files_left_after_resume": temps_left,
              "seconds": round(time.perf_counter() - t0, 1), "versions": versions(),
              "config": {"kills": args.kills, "steps": args.steps, "seed": args.seed}}
    write_json(args.out, result)
    print(f"runs resumed identically: {kills['resumed_identically']}/{kills['total']}")
    per = ", ".join(f"{c} {v['rejected_cleanly']}/{v['total']}" for c, v in inputs["by_command"].items())
    print(f"inputs rejected cleanly: {inputs['rejected_cleanly']}/{inputs['total']} ({per})")
    print(f"files left half-written: {half} (temporary files left after resume: {temps_left})")
    print(f"wrote {args.out} ({result['seconds']} s)")
    ok = kills["resumed_identically"] == kills["total"] and inputs["rejected_cleanly"] == inputs["total"] and half == 0 \
        and temps_left == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
