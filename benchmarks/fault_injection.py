"""Fault injection (issue 5): random SIGKILLs during `qnas train`, malformed inputs for every command.

Kills: one uninterrupted reference run of `qnas train` (tiny preset), then N runs, each SIGKILLed
at a random moment of its life (seeded; from start-up to the final evaluation), restarted with
--resume (or afresh when no checkpoint was written yet) and compared with the reference bit for
bit. After each kill the run folder is audited: a file under its final name that is truncated,
fails its sha256 or does not parse is "half-written" (must be 0); temporary files of interrupted
atomic writes are counted apart and must be gone after the resume.

Inputs: every command (`space show`, `space sample`, `train`, `calibrate`, `export`, `search`,
`finetune`, `latency build/predict/measure/pack/import`, and `python -m qnas_cli.demo`) is run in-process
with malformed inputs: bad or missing files, impossible spaces, subnets outside their space,
corrupt or swapped weights, malformed tables and packs, bad numbers, incompatible options, --out
where it cannot write. Each case is scored three ways: exit code 2 with one line (`error: ...`,
or Typer's own usage error) and no traceback; nothing written (the inputs folder, the working
folder and the latency cache are unchanged); and refused up front: the minutes-long work
(converting and timing a latency table or pack, the evolutionary search) is replaced by a
stand-in that stops the case, so a case that gets there is reported as "started work" (a
finding: it would have run for minutes before failing, or not failed at all). "Rejected
cleanly" is all three.

    python -m benchmarks.fault_injection [--kills 3] [--steps 12] [--seed 0] [--out runs/bench/fault_injection.json]
"""
from __future__ import annotations

import argparse
import contextlib
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
from unittest import mock

from typer.testing import CliRunner

from qnas_cli.checkpoint import load_weights, save_weights, sidecar, versions, write_json
from qnas_cli.cli import app
from qnas_cli.errors import UserError
from qnas_cli.demo import app as demo_app
from qnas_cli.quant import QuantConfig
from qnas_cli.space import PRESETS, sample
from qnas_cli.supernet import Supernet
from qnas_cli.train import supernet_payload
from tests.helpers import assert_same_weights, space_doc, supernet_weights
from tests.test_latency import _pack, synthetic_table

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
    kt_float = d / "kernel_transform_float.pt"  # a float supernet that learned kernel transforms
    save_weights(kt_float, supernet_payload(Supernet(PRESETS["tiny"], 1, 10, QuantConfig(mode="none"), kernel_transform=True)),
                 {"kind": "qnas.supernet"})
    floats = {}  # float supernets with and without separate kernels
    for name, separate in (("separate_kernels_float.pt", True), ("plain_float.pt", False)):
        floats[separate] = d / name
        save_weights(floats[separate], supernet_payload(Supernet(PRESETS["tiny"], 1, 10, QuantConfig(mode="none"),
                                                                 separate_kernels=separate)), {"kind": "qnas.supernet"})
    cases += [("train", what, [*train, *args]) for what, args in [
        ("unknown dataset", ["--data", "mnist"]), ("missing dataset folder", ["--data", f"fashion-mnist:{d}/nowhere"]),
        ("truncated dataset files", ["--data", f"fashion-mnist:{fm}"]),
        ("cifar10 without folder", ["--data", "cifar10"]), ("cifar10 empty folder", ["--data", f"cifar10:{d}/empty_folder"]),
        ("imagefolder empty", ["--data", f"imagefolder:{d}/empty_folder"]),
        ("--steps 0", ["--steps", "0"]), ("--batch-size 0", ["--batch-size", "0"]), ("--batch-size huge", ["--batch-size", "10000000"]),
        ("--lr -1", ["--lr", "-1"]), ("--lr nan", ["--lr", "nan"]), ("--lr inf", ["--lr", "inf"]),
        ("--epochs 0", ["--epochs", "0"]), ("--ckpt-every 0", ["--ckpt-every", "0"]), ("--calib-images 0", ["--calib-images", "0"]),
        ("--eval-images 0", ["--eval-images", "0"]), ("--num-random -1", ["--num-random", "-1"]),
        ("--sampling greedy", ["--sampling", "greedy"]), ("--sampling-k 1", ["--sampling", "worst", "--sampling-k", "1"]),
        ("--seed -1", ["--seed", "-1"]), ("--seed 2^64", ["--seed", str(2**64)]), ("--steps abc", ["--steps", "abc"]),
        ("--quant int4", ["--quant", "int4"]), ("--bn-fold sideways", ["--bn-fold", "sideways"]),
        ("--act-scheme odd", ["--act-scheme", "odd"]), ("--weight-scale odd", ["--weight-scale", "odd"]),
        ("--weight-granularity per-row", ["--weight-granularity", "per-row"]),
        ("--quant convs per-channel", ["--quant", "convs", "--weight-scale", "shared", "--weight-granularity", "per-channel"]),
        ("--device tpu", ["--device", "tpu"]), ("--resume without a run", ["--resume", "--out", f"{d}/no_run"]),
        ("--out is a file", ["--out", str(d / "syntax.json")]),
        ("--init missing", ["--init", f"{d}/nowhere.pt"]), ("--init truncated", ["--init", "{w:truncated}"]),
        ("--init is a checkpoint", ["--init", "{w:a checkpoint, not a supernet}"]),
        ("--init int8 supernet", ["--init", str(run / "supernet.pt")]),
        ("--init with --quant none", ["--init", str(run / "supernet.pt"), "--quant", "none"]),
        ("--init with kernel transforms, run without", ["--init", str(kt_float)]),
        ("--kernel-transform with --separate-kernels", ["--kernel-transform", "--separate-kernels"]),
        ("--init with separate kernels, run without", ["--init", str(floats[True])]),
        ("--init without separate kernels, run with", ["--init", str(floats[False]), "--separate-kernels"]),
        ("--sampling small kernels", ["--sampling", "small_kernels"]),
        ("--draws epoch", ["--draws", "epoch"]),
    ]]
    resume = ["train", *TINY, "--steps", str(steps), "--ckpt-every", "2", "--resume"]
    cases += [("train", what, [*resume, *args]) for what, args in [
        ("--resume with another space", ["--out", "{r}", "--space", "small"]),
        ("--resume with another --lr", ["--out", "{r}", "--lr", "0.2"]),
        ("--resume with another --seed", ["--out", "{r}", "--seed", "5"]),
        ("--resume with another --quant", ["--out", "{r}", "--quant", "none"]),
        ("--resume with another --weight-granularity", ["--out", "{r}", "--weight-granularity", "per-channel"]),
        ("--resume with another --kernel-transform", ["--out", "{r}", "--kernel-transform"]),
        ("--resume with another --separate-kernels", ["--out", "{r}", "--separate-kernels"]),
        ("--resume with another --sampling", ["--out", "{r}", "--sampling", "stratified"]),
        ("--resume with another --draws", ["--out", "{r}", "--draws", "run"]),
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
    (d / "three_labels.txt").write_text("a\nb\nc\n")
    (d / "blank_label.txt").write_text("a\n\nc\n")
    for what, extra in (("--input float16", ["--input", "float16"]), ("--output float32", ["--output", "float32"]),
                        ("--color-space bgr", ["--color-space", "bgr"]), ("--labels: 3 for 10 classes", ["--labels", str(d / "three_labels.txt")]),
                        ("--labels: a blank line", ["--labels", str(d / "blank_label.txt")]),
                        ("--labels missing", ["--labels", str(d / "no_labels.txt")])):
        cases.append(("export", what, ["export", str(good), "--supernet", str(run / "supernet.pt"), "--out", str(d / "export"), *extra]))
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


def bad_tables(d: Path) -> dict[str, Path]:
    """name -> a latency table file (for the tiny space, 1 input channel, 10 classes) that must be
    refused; "good" is one that must not be."""
    tiny = PRESETS["tiny"]
    good = synthetic_table(tiny, fit=(1.0, 0.0)).to_dict()

    def edit(fn) -> dict:
        doc = json.loads(json.dumps(good))
        fn(doc)
        return doc
    key = next(iter(good["entries"]))
    docs: dict[str, Any] = {
        "good": good,
        "another space": synthetic_table(PRESETS["small"], fit=(1.0, 0.0)).to_dict(),
        "3 input channels": synthetic_table(tiny, in_channels=3, fit=(1.0, 0.0)).to_dict(),
        "an entry missing": edit(lambda t: t["entries"].pop(key)),
        "a negative entry": edit(lambda t: t["entries"].update({key: -1.0})),
        "a string entry": edit(lambda t: t["entries"].update({key: "fast"})),
        "no header": edit(lambda t: t.pop("header")),
        "space definition edited": edit(lambda t: t["header"]["space"]["definition"]["resolutions"].append(99)),
        "top-level list": [good],
    }
    paths = {}
    for i, (name, doc) in enumerate(docs.items()):
        paths[name] = d / ("table_good.json" if name == "good" else f"table_{i}.json")
        paths[name].write_text(json.dumps(doc))
    text = json.dumps(good)
    for name, raw in {"truncated": text[: len(text) // 2].encode(), "empty": b"", "bytes": b"\xff\xfe"}.items():
        paths[name] = d / f"table_{name}.json"
        paths[name].write_bytes(raw)
    paths["missing"] = d / "no_table.json"
    paths["a folder"] = d / "folder.json"
    return paths


def bad_packs(d: Path) -> dict[str, Path]:
    """name -> a latency pack folder (`qnas latency import`) that must be refused."""
    tiny = PRESETS["tiny"]
    packs = {"no results yet": _pack(d / "pack_good", tiny),
             "manifest of another format": _pack(d / "pack_format", tiny, format="qnas.latency_pack/9"),
             "a part missing": _pack(d / "pack_missing", tiny, files=lambda f: dict(list(f.items())[1:])),
             "threads 0": _pack(d / "pack_threads", tiny, threads=0)}
    garbage = _pack(d / "pack_garbage", tiny)
    (garbage / "results").mkdir()
    for name in json.loads((garbage / "manifest.json").read_text())["files"]:
        (garbage / "results" / f"{name}.round0.txt").write_text("adb: device offline\n")
    packs["benchmark output without timings"] = garbage
    for name, raw in {"manifest truncated": b'{"format": "qnas.latency_pack/1", "space": {', "manifest empty": b""}.items():
        (d / name.replace(" ", "_")).mkdir()
        (d / name.replace(" ", "_") / "manifest.json").write_bytes(raw)
        packs[name] = d / name.replace(" ", "_")
    (d / "pack_empty").mkdir()
    packs.update({"empty folder": d / "pack_empty", "missing": d / "no_pack", "a file": d / "syntax.json"})
    return packs


def search_latency_demo_cases(run: Path, d: Path) -> list[tuple[str, str, list[str]]]:
    """(command, what is wrong, argv) for `qnas search`, `qnas latency ...` and the demo module
    (argv starting with "demo"); ``run``: a finished tiny int8 run; ``d``: input_cases' folder
    (its space files, good subnet, datasets and the bad_weights names)."""
    cases: list[tuple[str, str, list[str]]] = []
    supernet, tables, packs = str(run / "supernet.pt"), bad_tables(d), bad_packs(d)
    (d / "subnets").mkdir()
    subnets = bad_subnets(d / "subnets")
    table, subnet = str(tables["good"]), str(d / "good_subnet.json")

    # qnas search: the supernet, the table, every option; a good table, so only what is named is wrong
    search = ["search", "--latency-ms", "1.0", "--population", "4", "--generations", "1", "--out", str(d / "search_out")]
    good_search = [*search, "--supernet", supernet, "--table", table]
    cases += [("search", f"--supernet {name}", [*search, "--table", table, "--supernet", f"{{w:{name}}}"])
              for name in ("truncated", "flipped byte", "no sidecar", "a checkpoint, not a supernet", "empty", "missing")]
    if (run / "float_supernet.pt").is_file():
        cases.append(("search", "--supernet a float supernet", [*search, "--table", table, "--supernet", str(run / "float_supernet.pt")]))
    cases.append(("search", "--supernet default missing", [*search, "--table", table]))
    cases += [("search", f"--table {name}", [*search, "--supernet", supernet, "--table", str(path)])
              for name, path in tables.items() if name not in ("good", "space definition edited")]  # search reads the supernet's space
    cases += [("search", what, [*good_search, *args]) for what, args in [
        ("--latency-ms abc", ["--latency-ms", "abc"]), ("--latency-ms -1", ["--latency-ms", "-1"]),
        ("--latency-ms 0", ["--latency-ms", "0"]), ("--latency-ms nan", ["--latency-ms", "nan"]),
        ("--latency-ms inf", ["--latency-ms", "inf"]), ("--latency-ms empty", ["--latency-ms", ""]),
        ("--latency-ms 1,,2", ["--latency-ms", "1,,2"]), ("budget below the fastest subnet", ["--latency-ms", "1e-9"]),
        ("--population 0", ["--population", "0"]), ("--population 1", ["--population", "1"]),
        ("--generations 0", ["--generations", "0"]), ("--mutate-prob 1.5", ["--mutate-prob", "1.5"]),
        ("--mutate-prob nan", ["--mutate-prob", "nan"]), ("--crossover-prob -0.1", ["--crossover-prob", "-0.1"]),
        ("--screen 0", ["--screen", "0"]), ("--screen 2", ["--screen", "2"]),
        ("--calib-images 0", ["--calib-images", "0"]), ("--eval-images 0", ["--eval-images", "0"]),
        ("--eval-images -5", ["--eval-images", "-5"]), ("--seed -1", ["--seed", "-1"]),
        ("--runtime tpu", ["--runtime", "tpu"]), ("--table-runtime odd", ["--table-runtime", "odd"]),
        ("--threads 0", ["--threads", "0"]), ("--flops-m -1", ["--flops-m", "-1"]), ("--params-k 0", ["--params-k", "0"]),
        ("--size-kb nan", ["--size-kb", "nan"]), ("--flops-m below every subnet", ["--flops-m", "1e-9"]),
        ("--data mnist", ["--data", "mnist"]), ("--data cifar10 empty folder", ["--data", f"cifar10:{d}/empty_folder"]),
        ("--data truncated dataset files", ["--data", f"fashion-mnist:{d}/fmnist_truncated"]),
        ("--out is a file", ["--out", str(d / "syntax.json")]), ("--out under a file", ["--out", str(d / "syntax.json" / "s")]),
        ("--resume without a search", ["--resume", "--out", str(d / "no_search")]),
    ]]
    cases.append(("search", "no --table, --threads 0 (before building the host table)",
                  [*search, "--supernet", supernet, "--threads", "0"]))

    # qnas latency build / pack: refused before any conversion
    build = ["latency", "build", "--space", "tiny", "--rounds", "1", "--out", str(d / "t_build.json")]
    spaces = {name: str(d / name) for name in ("syntax.json", "kernel4.json", "negative_width.json", "empty.json")}
    spaces |= {"missing.toml": str(d / "missing.toml"), "unknown preset": "huge"}
    cases += [("latency build", f"space {name}", [*build, "--space", spec]) for name, spec in spaces.items()]
    cases += [("latency build", what, [*build, *args]) for what, args in [
        ("--supernet truncated", ["--supernet", "{w:truncated}"]), ("--supernet missing", ["--supernet", "{w:missing}"]),
        ("--in-channels 0", ["--in-channels", "0"]), ("--classes 0", ["--classes", "0"]), ("--classes -3", ["--classes", "-3"]),
        ("--runtime tpu", ["--runtime", "tpu"]), ("--runtime reference (an export target)", ["--runtime", "reference"]),
        ("--threads 0", ["--threads", "0"]), ("--rounds 0", ["--rounds", "0"]), ("--statistic odd", ["--statistic", "odd"]),
        ("--out is a folder", ["--out", str(d)]), ("--out under a file", ["--out", str(d / "syntax.json" / "t.json")]),
        ("--runtime both, --out under a file", ["--runtime", "both", "--out", str(d / "syntax.json" / "t.json")]),
    ]]
    pack = ["latency", "pack", "--space", "tiny", "--out", str(d / "pack_out")]
    cases += [("latency pack", f"space {name}", [*pack, "--space", spec]) for name, spec in spaces.items()]
    cases += [("latency pack", what, [*pack, *args]) for what, args in [
        ("--supernet truncated", ["--supernet", "{w:truncated}"]), ("--in-channels 0", ["--in-channels", "0"]),
        ("--runtime both", ["--runtime", "both"]), ("--runtime tpu", ["--runtime", "tpu"]), ("--threads 0", ["--threads", "0"]),
        ("--rounds 0", ["--rounds", "0"]), ("--runs 0", ["--runs", "0"]), ("--warmup -1", ["--warmup", "-1"]),
        ("--out is a file", ["--out", str(d / "syntax.json")]), ("--out is a non-empty folder", ["--out", str(d)]),
        ("--out under a file", ["--out", str(d / "syntax.json" / "pack")]),
    ]]

    # qnas latency predict / measure / import
    predict = ["latency", "predict", "--table", table]
    for name in ("width 9", "other space", "syntax", "bytes", "missing", "top-level list"):
        cases.append(("latency predict", f"subnet {name}", [*predict, str(subnets[name])]))
    cases += [("latency predict", f"--table {name}", ["latency", "predict", subnet, "--table", str(path)])
              for name, path in tables.items() if name not in ("good", "3 input channels")]
    cases.append(("latency predict", "no subnet", predict))
    tfl = {"not a flatbuffer": d / "syntax.json", "empty": d / "empty.tflite", "truncated flatbuffer": d / "cut.tflite",
           "missing": d / "no.tflite", "a folder": d / "empty_folder"}
    (d / "empty.tflite").write_bytes(b"")
    (d / "cut.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(40))
    cases += [("latency measure", f"model {name}", ["latency", "measure", str(path), "--rounds", "1"]) for name, path in tfl.items()]
    cases += [("latency measure", what, ["latency", "measure", str(d / "cut.tflite"), *args]) for what, args in [
        ("--runtime tpu", ["--runtime", "tpu"]), ("--threads 0", ["--threads", "0"]), ("--rounds 0", ["--rounds", "0"]),
        ("--statistic odd", ["--statistic", "odd"])]]
    cases += [("latency import", f"pack {name}", ["latency", "import", str(path), "--out", str(d / "t_import.json")])
              for name, path in packs.items()]
    cases += [("latency import", what, ["latency", "import", str(packs["no results yet"]), "--out", out]) for what, out in [
        ("--out is a folder", str(d)), ("--out under a file", str(d / "syntax.json" / "t.json"))]]

    # python -m qnas_cli.demo: refused before the host table is built
    demo = ["demo", "--population", "4", "--generations", "1", "--eval-images", "50"]
    cases += [("demo", f"supernet {name}", [*demo, f"{{w:{name}}}", "--out", str(d / "demo_out")])
              for name in ("truncated", "flipped byte", "a checkpoint, not a supernet", "empty", "missing")]
    if (run / "float_supernet.pt").is_file():
        cases.append(("demo", "a float supernet", [*demo, str(run / "float_supernet.pt"), "--out", str(d / "demo_out")]))
    cases.append(("demo", "no supernet", ["demo"]))
    cases += [("demo", what, ["demo", supernet, *args]) for what, args in [
        ("--population 0", ["--population", "0"]), ("--generations 0", ["--generations", "0"]),
        ("--eval-images 0", ["--eval-images", "0"]), ("--population abc", ["--population", "abc"]),
        ("--out is a file", ["--out", str(d / "syntax.json")]), ("--out under a file", ["--out", str(d / "syntax.json" / "demo")]),
    ]]
    return cases


def finetune_cases(run: Path, d: Path) -> list[tuple[str, str, list[str]]]:
    """(command, what is wrong, argv) for `qnas finetune`; ``run``: a finished tiny int8 run; ``d``:
    input_cases' folder (its good and named subnets, the unfinished run, the bad_weights names)."""
    supernet, out = str(run / "supernet.pt"), ["--out", str(d / "finetune_out")]
    (d / "ft_subnets").mkdir()
    subnets = bad_subnets(d / "ft_subnets")
    good = str(d / "good_subnet.json")
    largest = d / "largest_subnet.json"
    largest.write_text(json.dumps(sample(PRESETS["tiny"], "largest").to_dict(PRESETS["tiny"])))
    cases = [("finetune", f"subnet {name}", ["finetune", str(subnets[name]), "--supernet", supernet, *out])
             for name in ("other space", "width 9", "syntax", "missing", "top-level list")]
    cases += [("finetune", f"supernet {name}", ["finetune", good, "--supernet", f"{{w:{name}}}", *out])
              for name in ("truncated", "flipped byte", "no sidecar", "a checkpoint, not a supernet", "empty", "missing")]
    with_net = ["finetune", good, "--supernet", supernet]
    cases += [("finetune", what, args) for what, args in [
        ("no supernet named", ["finetune", good, *out]),
        ("recorded sha256 differs", ["finetune", str(d / "named_subnet.json"), *out]),
        ("--steps 0", [*with_net, "--steps", "0", *out]), ("--steps -5", [*with_net, "--steps", "-5", *out]),
        ("--steps abc", [*with_net, "--steps", "abc", *out]),
        ("--teacher smallest", [*with_net, "--teacher", "smallest", *out]),
        ("--teacher largest for the largest subnet", ["finetune", str(largest), "--supernet", supernet, *out]),
        ("--lr 0", [*with_net, "--lr", "0", *out]), ("--lr nan", [*with_net, "--lr", "nan", *out]),
        ("--batch-size 0", [*with_net, "--batch-size", "0", *out]), ("--kd-ratio 2", [*with_net, "--kd-ratio", "2", *out]),
        ("--seed -1", [*with_net, "--seed", "-1", *out]), ("--eval-images 0", [*with_net, "--eval-images", "0", *out]),
        ("--device tpu", [*with_net, "--device", "tpu", *out]), ("unknown dataset", [*with_net, "--data", "mnist", *out]),
        ("--out holds an unfinished run", [*with_net, "--out", str(d / "unfinished")]),
        ("--out holds the input supernet", [*with_net, "--out", str(run)]),
        ("--out is a file", [*with_net, "--out", str(d / "syntax.json")]),
        ("--resume without a run", [*with_net, "--resume", "--out", str(d / "no_finetune")]),
        ("--resume with --overwrite", [*with_net, "--resume", "--overwrite", *out]),
    ]]
    return cases


def controls(run: Path, d: Path) -> list[tuple[str, list[str], str]]:
    """(command, valid argv, what it must reach): each gets past every check to its work (the
    stand-in) or its result, so that the cases above are refused for what they name, not for
    something wrong in the harness (a table of another space, a missing file)."""
    supernet, table = str(run / "supernet.pt"), str(d / "table_good.json")
    return [
        ("search", ["search", "--latency-ms", "1.0", "--population", "4", "--generations", "1", "--supernet", supernet,
                    "--table", table, "--out", str(d / "control_search")], "the evolutionary search"),
        ("latency build", ["latency", "build", "--space", "tiny", "--rounds", "1", "--out", str(d / "control_table.json")],
         "converting and timing a latency table"),
        ("latency pack", ["latency", "pack", "--space", "tiny", "--out", str(d / "control_pack")],
         "converting the models of a latency pack"),
        ("latency predict", ["latency", "predict", str(d / "good_subnet.json"), "--table", table], "exit 0"),
        ("demo", ["demo", supernet, "--out", str(d / "control_demo")], "converting and timing a latency table"),
        ("finetune", ["finetune", str(d / "good_subnet.json"), "--supernet", supernet, "--out", str(d / "control_finetune"),
                      "--calib-images", "64"], "the fine-tune's training loop"),
    ]


class WorkStarted(BaseException):
    """Raised by the stand-ins of minutes-long work: a case that gets there was not refused up front.
    A BaseException, so that no error handler of the CLI turns it into an exit code."""


# The work a malformed input must be refused before (each takes minutes on 2 cores).
WORK = {"qnas_cli.export.latency_build.build_tables": "converting and timing a latency table",
        "qnas_cli.export.latency_build.convert_covers": "converting the models of a latency pack",
        "qnas_cli.search_job.evolve": "the evolutionary search",
        "qnas_cli.finetune.train_loop": "the fine-tune's training loop"}


@contextlib.contextmanager
def work_stopped(cache: Path):
    """Every entry of WORK replaced by a stand-in that raises WorkStarted, and the latency cache
    moved to ``cache`` (empty: no host table is found there, none of the user's is touched)."""
    with contextlib.ExitStack() as stack:
        for target, what in WORK.items():
            def stand_in(*args, what=what, **kwargs):
                raise WorkStarted(what)
            stack.enter_context(mock.patch(target, stand_in))
        stack.enter_context(mock.patch.dict(os.environ, {"QNAS_CACHE": str(cache)}))
        yield


def tree(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folders``: (size, modification time), to tell what a case wrote."""
    out = {}
    for folder in folders:
        for p in [folder, *folder.rglob("*")] if folder.exists() else []:
            st = p.lstat()
            out[str(p)] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def run_case(argv: list[str], watch: list[Path]) -> dict[str, Any]:
    """One malformed input, in-process (argv[0] "demo": the demo module's app, else qnas's), under
    ``work_stopped`` (the caller's): exit code, the message, whether it is one line, what it wrote
    under ``watch``, and whether it started minutes-long work instead of refusing."""
    target, argv = (demo_app, argv[1:]) if argv[0] == "demo" else (app, argv)
    before = tree(*watch)
    t = time.perf_counter()
    started = None
    try:
        r = CliRunner().invoke(target, argv)
        output, code = r.output, r.exit_code
    except WorkStarted as e:
        output, code, started = "", None, str(e)
    after = tree(*watch)
    written = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    lines = output.strip().splitlines()
    usage = code == 2 and "Usage:" in output  # Typer's own usage errors: its box, one error in it
    one_line = code == 2 and "Traceback" not in output and (usage or (len(lines) == 1 and lines[0].startswith("error:")))
    return {"exit_code": code, "one_line": one_line, "usage_error": usage, "lines": len(lines), "written": written,
            "started_work": started, "clean": one_line and not written and not started,
            "message": f"started {started}" if started else (lines[-1][:300] if lines else ""),
            **({} if one_line or started else {"output": output.strip()[-1000:]}),
            "seconds": round(time.perf_counter() - t, 2)}


TOTALS = ("cases", "exit_2_one_line", "nothing_written", "started_work", "rejected_cleanly")


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {"cases": len(rows), "exit_2_one_line": sum(r["one_line"] for r in rows),
            "nothing_written": sum(not r["written"] for r in rows), "started_work": sum(bool(r["started_work"]) for r in rows),
            "rejected_cleanly": sum(r["clean"] for r in rows)}


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
    cwd = root / "cwd"  # the working folder of every case: defaults that name relative paths land here
    cwd.mkdir()
    sys.path.insert(0, str(Path.cwd()))  # this repository stays importable (benchmarks, tests) after chdir
    cases = input_cases(run, steps, d) + search_latency_demo_cases(run, d) + finetune_cases(run, d)
    rows = []
    home = Path.cwd()
    with work_stopped(root / "cache"):
        os.chdir(cwd)
        try:
            for command, what, argv in cases:
                argv = [a.replace("{r}", str(resumable)).replace("{corrupt_run}", str(corrupt)) for a in argv]
                argv = [str(weights[a[3:-1]]) if a.startswith("{w:") else a for a in argv]
                row = {"command": command, "input": what, **run_case(argv, [d, cwd, root / "cache"])}
                rows.append(row)
                if not row["clean"]:
                    print(f"NOT CLEAN: {command}: {what}: exit {row['exit_code']}, {row['lines']} line(s)"
                          + (f", wrote {', '.join(row['written'][:3])}" if row["written"] else "")
                          + f": {row.get('output', row['message'])}", flush=True)
            passed = []
            for command, argv, want in controls(run, d):
                r = run_case(argv, [])
                passed.append({"command": command, "reached": r["started_work"] or f"exit {r['exit_code']}", "want": want})
                if passed[-1]["reached"] != want:
                    print(f"CONTROL FAILED: {command} (valid input) reached {passed[-1]['reached']}, not {want}: "
                          f"{r.get('output', r['message'])}", flush=True)
        finally:
            os.chdir(home)
    by_command = {c: totals([r for r in rows if r["command"] == c]) for c in dict.fromkeys(r["command"] for r in rows)}
    t = totals(rows)
    return {"totals": t, "total": t["cases"], "rejected_cleanly": t["rejected_cleanly"], "by_command": by_command, "cases": rows,
            "controls": passed, "controls_passed": sum(c["reached"] == c["want"] for c in passed)}


def print_table(inputs: dict[str, Any]) -> None:
    head = ("command", "cases", "exit 2, one line", "nothing written", "started work", "rejected cleanly")
    print(f"{head[0]:16}" + "".join(f"{h:>18}" for h in head[1:]))
    for c, t in [*inputs["by_command"].items(), ("total", inputs["totals"])]:
        print(f"{c:16}" + "".join(f"{t[k]:>18}" for k in TOTALS))


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
        inputs = {"totals": totals([]), "total": 0, "rejected_cleanly": 0, "by_command": {}, "cases": [], "controls": [],
                  "controls_passed": 0}
        if not args.skip_inputs:
            inputs = input_runs(root / "reference", args.steps, root)
    half = sum(len(r["after_kill"]["half_written"]) + len(r["after_resume"]["half_written"]) for r in kills["runs"])
    temps_left = sum(len(r["after_resume"]["temp_files"]) for r in kills["runs"])
    result = {"kills": kills, "inputs": inputs, "half_written_files": half, "temp_files_left_after_resume": temps_left,
              "seconds": round(time.perf_counter() - t0, 1), "versions": versions(),
              "config": {"kills": args.kills, "steps": args.steps, "seed": args.seed}}
    write_json(args.out, result)
    print(f"\nruns resumed identically: {kills['resumed_identically']}/{kills['total']}")
    print(f"files left half-written: {half} (temporary files left after resume: {temps_left})")
    print("malformed inputs (rejected cleanly: exit 2 with one line, nothing written, no work started):")
    print_table(inputs)
    print(f"valid inputs (controls) that got past every check: {inputs['controls_passed']}/{len(inputs['controls'])}")
    print(f"wrote {args.out} ({result['seconds']} s)")
    ok = kills["resumed_identically"] == kills["total"] and inputs["rejected_cleanly"] == inputs["total"] and half == 0 \
        and temps_left == 0 and inputs["controls_passed"] == len(inputs["controls"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
