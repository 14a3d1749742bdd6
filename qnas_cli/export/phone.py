"""A phone's latency: a *pack* of models plus an adb script, and the import of its results.

``write_pack`` writes every part of the space and the fit's whole subnets as numbered
``.tflite`` files (the same cut models the host table times), a manifest, and
``run_benchmarks.sh``, which runs TFLite's ``benchmark_model`` on an attached Android device
over adb, several rounds over all models (interleaved, as on the host), saving each output.
``import_pack`` parses those outputs into a latency table for that device, with the same
whole-model fit as a host build.

``benchmark_model`` prints (tensorflow/lite/tools/benchmark/benchmark_model.cc,
``BenchmarkLoggingListener::OnBenchmarkEnd``)::

    count=50 first=... curr=... min=... max=... avg=... std=... [p5=... median=... p95=...]
    Inference timings in us: Init: ..., First inference: ..., Warmup (avg): ..., Inference (avg): ...

and older builds ``Average inference timings in us: Warmup: ..., Init: ..., Inference: ...``.
We take the median of the timed runs when the statistics line has one, else the average.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

from qnas_cli.checkpoint import write_bytes, write_json
from qnas_cli.errors import UserError, choice_error
from qnas_cli.latency import RUNTIMES, LatencyTable, check_table_fits, key_text, space_part_keys
from qnas_cli.space import Arch, SearchSpace, read_structured

from .latency_build import Cover, make_table

PACK_FORMAT = "qnas.latency_pack/1"
_NUM = r"([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
_SUMMARY = re.compile(rf"Inference timings in us: Init: {_NUM}, First inference: {_NUM}, "
                      rf"Warmup \(avg\): {_NUM}, Inference \(avg\): {_NUM}")
_SUMMARY_OLD = re.compile(rf"Average inference timings in us: Warmup: {_NUM}, Init: {_NUM}, Inference: {_NUM}")
_STATS = re.compile(rf"count={_NUM} first={_NUM} curr={_NUM} min={_NUM} max={_NUM} avg={_NUM} std={_NUM}"
                    rf"(?: p5={_NUM} median={_NUM} p95={_NUM})?")


def parse_benchmark_output(text: str) -> dict:
    """The timings of one ``benchmark_model`` run, in microseconds.

    Returns ``{"inference_us": ..., "statistic": "median"|"avg", "runs": n, "init_us": ...}``;
    raises ValueError when the text holds no inference timings (a crash, a wrong path, ...).
    """
    summary, old = _SUMMARY.search(text), _SUMMARY_OLD.search(text)
    if summary is None and old is None:
        tail = " | ".join(text.strip().splitlines()[-3:])[:300]
        raise ValueError(f"no 'Inference timings in us' line (output ends: {tail!r})")
    # The last statistics line before the summary belongs to the timed (not the warm-up) runs.
    end = (summary or old).start()
    stats = list(_STATS.finditer(text, 0, end))
    timed = stats[-1] if stats else None
    if summary is not None:
        init, avg = float(summary.group(1)), float(summary.group(4))
    else:
        init, avg = float(old.group(2)), float(old.group(3))
    out = {"init_us": init, "avg_us": avg, "runs": int(float(timed.group(1))) if timed else None}
    if timed is not None and timed.group(9) is not None:
        out.update(inference_us=float(timed.group(9)), statistic="median")
    else:
        out.update(inference_us=avg, statistic="avg")
    return out


_SCRIPT = """#!/bin/sh
# Time every model of this qnas latency pack on an Android phone with TFLite's benchmark_model.
# Needs: adb, one attached device (or its serial as $1), and benchmark_model pushed to the phone
# (build: bazel build -c opt --config=android_arm64 tensorflow/lite/tools/benchmark:benchmark_model;
#  then: adb push bazel-bin/tensorflow/lite/tools/benchmark/benchmark_model /data/local/tmp/).
# Settings: --num_threads={threads} --use_xnnpack={xnnpack} --warmup_runs={warmup} --num_runs={runs},
# {rounds} rounds over all models (interleaved). Results land in results/; then, on the host:
#   qnas latency import {name} --out TABLE.json
set -eu
cd "$(dirname "$0")"
ADB="adb${{1:+ -s $1}}"
BM="${{BENCHMARK_MODEL:-/data/local/tmp/benchmark_model}}"
REMOTE=/data/local/tmp/qnas_pack
mkdir -p results
$ADB shell "test -x $BM" || {{ echo "benchmark_model not found at $BM on the device (set BENCHMARK_MODEL)"; exit 2; }}
$ADB shell mkdir -p "$REMOTE"
$ADB push models/. "$REMOTE/" >/dev/null
{{ $ADB shell getprop ro.product.manufacturer; $ADB shell getprop ro.product.model;
   $ADB shell getprop ro.board.platform; $ADB shell getprop ro.build.version.release; }} > results/device.txt
for round in $(seq 1 {rounds}); do
  for f in models/*.tflite; do
    n=$(basename "$f" .tflite)
    $ADB shell "$BM" --graph="$REMOTE/$n.tflite" --num_threads={threads} --use_xnnpack={xnnpack} \\
      --warmup_runs={warmup} --num_runs={runs} > "results/$n.round$round.txt" 2>&1 || true
  done
  echo "round $round of {rounds} done"
done
$ADB shell rm -r "$REMOTE"
"""


def write_pack(cover: Cover, space: SearchSpace, in_channels: int, num_classes: int, out: Path,
               threads: int = 1, runtime: str = "xnnpack", rounds: int = 3, warmup: int = 20, runs: int = 100) -> dict:
    """Write ``out/models/*.tflite``, ``out/manifest.json`` and ``out/run_benchmarks.sh``."""
    out = Path(out)
    files: dict[str, dict] = {}
    models = [({"part": k}, m) for k, m in sorted(cover.parts.items())]
    models += [({"whole": a.key, "arch": a.to_dict(space)}, m) for a, m in cover.wholes]
    for i, (what, data) in enumerate(models):
        name = f"m{i:04d}"
        write_bytes(out / "models" / f"{name}.tflite", data)
        files[name] = what
    settings = {"threads": threads, "runtime": runtime, "use_xnnpack": runtime == "xnnpack", "rounds": rounds,
                "warmup_runs": warmup, "num_runs": runs}
    manifest = {"format": PACK_FORMAT, "space": space.to_dict() | {"fingerprint": space.fingerprint},
                "in_channels": in_channels, "num_classes": num_classes, "settings": settings, "files": files}
    write_json(out / "manifest.json", manifest)
    script = _SCRIPT.format(threads=threads, xnnpack=str(runtime == "xnnpack").lower(), warmup=warmup, runs=runs,
                            rounds=rounds, name=out.name)
    write_bytes(out / "run_benchmarks.sh", script.encode())
    (out / "run_benchmarks.sh").chmod(0o755)
    return manifest


def _read_manifest(folder: Path) -> tuple[SearchSpace, int, int, dict, dict[str, dict]]:
    """A pack's manifest, checked: (space, in_channels, num_classes, settings, files); every
    problem is a one-line UserError naming the manifest."""
    where = f"latency pack manifest {folder / 'manifest.json'}"
    man = read_structured(folder / "manifest.json", "latency pack manifest")
    if man.get("format") != PACK_FORMAT:
        raise UserError(f"{folder}: not a qnas latency pack (manifest format {man.get('format')!r}, expected {PACK_FORMAT!r})")
    try:
        space = SearchSpace.from_dict({k: v for k, v in man["space"].items() if k != "fingerprint"})
        in_ch, classes, settings, files = man["in_channels"], man["num_classes"], man["settings"], man["files"]
        for what, v in (("in_channels", in_ch), ("num_classes", classes), ("settings.threads", settings["threads"]),
                        ("settings.rounds", settings["rounds"]), ("settings.warmup_runs", settings["warmup_runs"]),
                        ("settings.num_runs", settings["num_runs"])):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise UserError(f"{where}: {what} must be a positive integer, got {v!r}")
        if settings["runtime"] not in RUNTIMES:
            raise choice_error(f"{where}: settings.runtime", settings["runtime"], RUNTIMES)
        if not isinstance(files, dict) or not all(isinstance(w, dict) and ("part" in w) != ("whole" in w)
                                                  and isinstance(w.get("part", ""), str) for w in files.values()):
            raise UserError(f"{where}: files must map each model to {{'part': KEY}} or {{'whole': ARCH, 'arch': {{...}}}}")
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{where}: malformed ({type(e).__name__}: {e})") from None
    parts = {w["part"] for w in files.values() if "part" in w}
    want = [key_text(k) for k in space_part_keys(space, in_ch, classes)]
    missing, foreign = [k for k in want if k not in parts], sorted(map(str, parts - set(want)))
    if missing or foreign:
        raise UserError(f"{where}: the pack's parts are not those of its space ("
                        + (f"{len(missing)} missing, e.g. {missing[0]!r}" if missing else f"{len(foreign)} foreign, e.g. {foreign[0]!r}")
                        + "); write a new one with `qnas latency pack`")
    if not any("whole" in w for w in files.values()):
        raise UserError(f"{where}: the pack holds no whole subnet to fit the correction on; "
                        "write a new one with `qnas latency pack`")
    return space, in_ch, classes, settings, files


def import_pack(folder: Path) -> LatencyTable:
    """Read ``folder/results`` (from run_benchmarks.sh) into a latency table for that phone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder (a pack written by `qnas latency pack`)")
    space, in_ch, classes, settings, files = _read_manifest(folder)
    results = folder / "results"
    entries: dict[str, float] = {}
    measured: dict[str, float] = {}
    wholes: list[Arch] = []
    statistic = set()
    for name, what in files.items():
        runs = sorted(results.glob(f"{name}.round*.txt"))
        if not runs:
            raise UserError(f"{folder}: no benchmark output for {name} ({what.get('part') or what.get('whole')}); "
                            "run run_benchmarks.sh first")
        values = []
        for f in runs:
            try:
                parsed = parse_benchmark_output(f.read_text(errors="replace"))
            except ValueError as e:
                raise UserError(f"{f}: {e}") from None
            except OSError as e:
                raise UserError(f"cannot read {f}: {e.strerror}") from None
            if not parsed["inference_us"] > 0:
                raise UserError(f"{f}: the inference time {parsed['inference_us']} us is not positive")
            values.append(parsed["inference_us"] / 1e3)
            statistic.add(parsed["statistic"])
        ms = statistics.median(values)
        if "part" in what:
            entries[what["part"]] = ms
        else:
            arch = Arch.from_dict(what.get("arch"), space)
            wholes.append(arch)
            measured[arch.key] = ms
    device_txt = results / "device.txt"
    device = {"kind": "android", "getprop": device_txt.read_text(errors="replace").split("\n") if device_txt.is_file() else []}
    header = {"runtime": settings["runtime"], "runtime_version": "benchmark_model (version of the binary on the phone)",
              "threads": settings["threads"], "device": device,
              "method": {"tool": "benchmark_model", "warmup_runs": settings["warmup_runs"], "num_runs": settings["num_runs"],
                         "rounds": settings["rounds"], "statistic": f"median over rounds of each run's {'/'.join(sorted(statistic))}"}}
    table = make_table(space, in_ch, classes, entries, wholes, measured, header)
    check_table_fits(table, space, in_ch, classes, f"imported table from {folder}")
    return table
