"""Latency tables end to end on `tiny`: real onnx2tf conversions, cut parts, LiteRT timing.

The central claim checked here: every part timed for a table is made of exactly the TFLite
ops (kinds, options, shapes) that `qnas export`'s path writes for a subnet containing it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from ai_edge_litert.tools import flatbuffer_utils as fbu

from qnas_cli.export.blocks import arch_graph
from qnas_cli.export.cut import Cutter
from qnas_cli.export.latency_build import N_WHOLE, convert_covers, cover_folder, fit_archs
from qnas_cli.export.tflite import export_tflite
from qnas_cli.export.tflite_rewrite import OP_NAMES
from qnas_cli.cli import app
from qnas_cli.latency import Predictor, key_text, load_table, part_keys, table_space
from qnas_cli.space import PRESETS, sample
from tests.test_latency import FIXTURES

pytestmark = pytest.mark.slow
SPACE = PRESETS["tiny"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qnas-cache")


@pytest.fixture(scope="module")
def cover(cache):
    folder = cover_folder(cache / "latency", SPACE, 1, 10)
    return convert_covers(SPACE, 1, 10, folder, fit_archs(SPACE), log=lambda m: None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two subnets exported on their own, the way `qnas export` converts them."""
    out = {}
    for how in ("largest", "smallest"):
        arch = sample(SPACE, how)
        graph = arch_graph(SPACE, arch, 1, 10)
        calib = np.random.default_rng(0).integers(-128, 128, size=(4, *graph.input_shape[1:])).astype(np.int8)
        res = export_tflite(graph, calib, tmp_path_factory.mktemp(how), name="model")
        out[how] = (arch, graph, res.tflite)
    return out


def signature(model: bytes) -> list[tuple]:
    """Each op's kind, options, and input/output shapes and types: what a runtime's speed sees."""
    m = fbu.read_model_from_bytearray(bytearray(model))
    sg = m.subgraphs[0]
    rows = []
    for op in sg.operators:
        kind = OP_NAMES[fbu.get_builtin_code_from_operator_code(m.operatorCodes[op.opcodeIndex])]
        opts = op.builtinOptions
        fields = tuple(sorted((k, v) for k, v in vars(opts).items() if isinstance(v, (int, float, bool)))) if opts else ()
        shapes = tuple((tuple(sg.tensors[t].shape), int(sg.tensors[t].type)) for t in list(op.inputs) + list(op.outputs) if t >= 0)
        rows.append((kind, fields, shapes))
    return rows


def _part_spans(arch) -> list[tuple[str, str]]:
    """(input tensor, output tensor) of each part in an arch_graph, in execution order
    (qnas_cli/export/fold.py's names: a block ends in its residual add, the first of a stage in its project)."""
    spans, prev = [("input", "stem")], "stem"
    for i, stage in enumerate(arch.stages):
        for j in range(len(stage.blocks)):
            out = f"s{i}b{j}_add" if j > 0 else f"s{i}b{j}_project"
            spans.append((prev, out))
            prev = out
    return spans + [(prev, "logits")]


@pytest.mark.parametrize("how", ["largest", "smallest"])
def test_every_part_is_made_of_the_ops_a_real_export_writes(cover, exported, how):
    arch, graph, tflite = exported[how]
    keys = part_keys(SPACE, arch, 1, 10)
    spans = _part_spans(arch)
    assert len(spans) == len(keys)
    real = Cutter(tflite.read_bytes())
    for key, (src, dst) in zip(keys, spans):
        got = signature(cover.parts[key_text(key)])
        want = signature(real.cut(src, dst))
        assert got == want, f"{key_text(key)}: cover part differs from the exported subnet's ops"


def test_whole_subnets_cut_from_the_cover_equal_separate_exports(cover, exported):
    by_key = {a.key: m for a, m in cover.wholes}
    for arch, _, tflite in exported.values():  # fit_archs always holds the largest and the smallest
        assert signature(by_key[arch.key]) == signature(tflite.read_bytes())


def test_measure_times_a_real_export_on_both_runtimes(exported, runner):
    """The figure is the tables' statistic (p10) unless told otherwise, named in JSON and text."""
    _, _, tflite = exported["largest"]
    r = runner.invoke(app, ["latency", "measure", str(tflite), "--runtime", "both", "--rounds", "3", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["int8_in_out"] and set(res["runtimes"]) == {"xnnpack", "builtin"}
    assert res["statistic"] == res["method"]["statistic_name"] == "p10"
    for v in res["runtimes"].values():
        assert 0 < v["p10_ms"] <= v["median_ms"] <= v["p90_ms"] and v["rounds"] == 3 and v["invokes"] >= 9
        assert v["latency_ms"] == v["p10_ms"]
    assert res["runtimes"]["xnnpack"]["delegated_nodes"] >= 1
    r = runner.invoke(app, ["latency", "measure", str(tflite), "--rounds", "2", "--statistic", "median", "--json"])
    res = json.loads(r.output[r.output.index("{"):])
    assert res["statistic"] == res["method"]["statistic_name"] == "median"
    assert res["runtimes"]["xnnpack"]["latency_ms"] == res["runtimes"]["xnnpack"]["median_ms"]
    r = runner.invoke(app, ["latency", "measure", str(tflite), "--rounds", "2"])
    text = " ".join(r.output.split())  # the table wraps at the console's width
    assert r.exit_code == 0 and "latency = p10: 10th percentile" in text, r.output


def test_build_then_predict(cache, cover, tmp_path, runner, monkeypatch):
    monkeypatch.setenv("QNAS_CACHE", str(cache))  # reuses the module's conversions
    out = tmp_path / "tiny.json"
    r = runner.invoke(app, ["latency", "build", "--space", "tiny", "--runtime", "both", "--rounds", "2",
                            "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    for rt in ("xnnpack", "builtin"):
        table = load_table(tmp_path / f"tiny.{rt}.json", SPACE, 1, 10)
        h = table.header
        assert h["runtime"] == rt and h["threads"] == 1 and h["device"]["cpu"] and h["method"]["rounds"] == 2
        assert h["runtime_version"].startswith("ai-edge-litert") and h["space"]["fingerprint"] == SPACE.fingerprint
        Predictor(table, table_space(table))  # refuses a table missing any part of the space
        assert len(table.fit.points) == N_WHOLE and all(p["measured_ms"] > 0 for p in table.fit.points)
    subnet = tmp_path / "s.json"
    subnet.write_text(json.dumps(sample(SPACE, "largest").to_dict(SPACE)))
    r = runner.invoke(app, ["latency", "predict", str(subnet), "--table", str(tmp_path / "tiny.xnnpack.json"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["predictions"][0]["latency_ms"] > 0, r.output


def test_pack_then_import_a_phone_run(cache, cover, tmp_path, runner, monkeypatch):
    """The pack's files and script; the import of benchmark_model output in its real format
    (the fixture's text, with each model's median replaced by a known value)."""
    monkeypatch.setenv("QNAS_CACHE", str(cache))
    pack = tmp_path / "pack"
    r = runner.invoke(app, ["latency", "pack", "--space", "tiny", "--out", str(pack), "--rounds", "2"])
    assert r.exit_code == 0, r.output
    script = (pack / "run_benchmarks.sh").read_text()
    assert "--use_xnnpack=true" in script and "--num_threads=1" in script and "adb" in script
    manifest = json.loads((pack / "manifest.json").read_text())
    assert len(list((pack / "models").glob("*.tflite"))) == len(manifest["files"]) == len(cover.parts) + len(cover.wholes)
    r = runner.invoke(app, ["latency", "import", str(pack), "--out", str(tmp_path / "phone.json")])
    assert r.exit_code == 2 and "no benchmark output" in r.output, r.output
    template = (FIXTURES / "benchmark_model_processor_sdk.txt").read_text()
    (pack / "results").mkdir()
    want = {}
    for i, (name, what) in enumerate(sorted(manifest["files"].items())):
        us = 100 + 7 * i
        want[what.get("part") or what["whole"]] = us / 1e3
        for rnd in (1, 2):
            (pack / "results" / f"{name}.round{rnd}.txt").write_text(template.replace("median=899281", f"median={us}"))
    r = runner.invoke(app, ["latency", "import", str(pack), "--out", str(tmp_path / "phone.json")])
    assert r.exit_code == 0, r.output
    table = load_table(tmp_path / "phone.json", SPACE, 1, 10)
    assert table.entries == {k: v for k, v in want.items() if k in table.entries}
    assert table.header["device"]["kind"] == "android" and table.header["method"]["tool"] == "benchmark_model"
    assert {p["arch"]: p["measured_ms"] for p in table.fit.points} == {k: v for k, v in want.items() if k not in table.entries}


def test_tflite_size_benchmark_quick_fits_real_exports(tmp_path):
    """benchmarks/tflite_size.py --quick: real exports sized, the fit and each file's error, with provenance."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "benchmarks.tflite_size", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "tflite_size.json").read_text())
    assert res["command"].startswith("python -m benchmarks.tflite_size --quick") and res["commit"]
    on_disk = {(d / "arch.txt").read_text(): (d / "model_int8.tflite").stat().st_size
               for d in (tmp_path / "exports" / "tiny").iterdir()}
    assert len(res["files"]) == len(on_disk) == 3
    assert {f["arch"]: f["file_bytes"] for f in res["files"]} == on_disk
    assert res["fit"]["max_abs_error"] < 0.01 and "tflite_size" in r.stdout  # the form fits real files
