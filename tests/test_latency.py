"""Latency tables without conversion: part keys, the table format, prediction, the fit, the
synthetic graphs' structure, and the parser for a phone's benchmark_model output."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from qnas_cli.export.blocks import arch_graph, cover_graph
from qnas_cli.export.fold import to_integer_graph
from qnas_cli.export.graph import Add, Conv, GlobalAvgPool, Linear
from qnas_cli.export.onnx_export import tensor_shapes
from qnas_cli.export.phone import parse_benchmark_output
from qnas_cli.cli import app
from qnas_cli.errors import UserError
from qnas_cli.latency import (Fit, LatencyTable, Predictor, fit_correction, key_text, load_table, parse_key,
                              part_keys, space_part_keys, table_space, table_statistic)
from qnas_cli.space import PRESETS, sample
from tests.conftest import make_supernet

FIXTURES = Path(__file__).parent / "fixtures"


def synthetic_table(space, in_channels=1, classes=10, fit=(1.1, -0.003), seed=0) -> LatencyTable:
    """A table with random positive entries for every part of ``space`` (what a build writes)."""
    rng = random.Random(seed)
    entries = {key_text(k): rng.uniform(0.001, 0.5) for k in space_part_keys(space, in_channels, classes)}
    header = {"space": {"name": space.name, "fingerprint": space.fingerprint, "definition": space.to_dict()},
              "in_channels": in_channels, "num_classes": classes, "runtime": "xnnpack", "threads": 1,
              "device": {"kind": "host", "cpu": "test"}}
    return LatencyTable(header, entries, Fit(*fit))


@pytest.mark.parametrize("name", ["tiny", "small", "mbv3"])
def test_table_covers_every_part_of_random_subnets(name):
    space = PRESETS[name]
    table_keys = set(space_part_keys(space, 3, 10))
    rng = random.Random(0)
    archs = [sample(space, how) for how in ("largest", "smallest")] + [sample(space, "random", rng) for _ in range(100)]
    for arch in archs:
        missing = [key_text(k) for k in part_keys(space, arch, 3, 10) if k not in table_keys]
        assert not missing, f"{arch.key}: no table entry for {missing}"


def test_key_text_round_trips_and_malformed_keys_are_refused():
    for k in space_part_keys(PRESETS["mbv3"], 3, 1000):
        assert parse_key(key_text(k)) == k
    for bad in ("block:12px:16>24:k3:e3", "block:12:16>24:k3:e3:s1:oops", "stem:x", "tail:3px:1>2"):
        with pytest.raises(UserError, match="malformed entry key"):
            parse_key(bad)


def test_prediction_is_the_sum_of_its_entries_plus_the_fit():
    space = PRESETS["small"]
    table = synthetic_table(space)
    pred = Predictor(table, space)
    rng = random.Random(1)
    for _ in range(50):
        arch = sample(space, "random", rng)
        keys = part_keys(space, arch, 1, 10)
        total = sum(table.entries[key_text(k)] for k in keys)
        assert pred.predict(arch) == pytest.approx(1.1 * total - 0.003 * len(keys), rel=1e-12)
        assert sum(v for _, v in pred.parts(arch)) == pytest.approx(total, rel=1e-12)


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    rows = [(s, n, 0.9 * s - 0.002 * n) for s, n in zip(rng.uniform(0.1, 5, 8), rng.integers(5, 15, 8))]
    assert fit_correction(rows) == pytest.approx((0.9, -0.002), rel=1e-6)
    assert fit_correction([(1.0, 5, 2.0)]) == pytest.approx((2.0, 0.0))  # one point: a scale only


def test_table_round_trips_through_json(tmp_path):
    space = PRESETS["tiny"]
    table = synthetic_table(space)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table.to_dict()))
    again = load_table(path, space, 1, 10)
    assert again.entries == table.entries and (again.fit.a, again.fit.b) == (1.1, -0.003)
    assert table_space(again) == space


def test_a_foreign_or_corrupt_table_is_refused_with_exit_2(tmp_path, runner):
    subnet = tmp_path / "subnet.json"
    subnet.write_text(json.dumps(sample(PRESETS["tiny"], "largest").to_dict(PRESETS["tiny"])))
    foreign = tmp_path / "small.json"
    foreign.write_text(json.dumps(synthetic_table(PRESETS["small"]).to_dict()))
    r = runner.invoke(app, ["latency", "predict", str(subnet), "--table", str(foreign)])
    assert r.exit_code == 2, r.output
    assert "space" in r.output and PRESETS["tiny"].fingerprint in r.output and PRESETS["small"].fingerprint in r.output
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(json.dumps(synthetic_table(PRESETS["tiny"]).to_dict())[:-40])
    r = runner.invoke(app, ["latency", "predict", str(subnet), "--table", str(corrupt)])
    assert r.exit_code == 2 and "not valid JSON" in r.output, r.output
    other = synthetic_table(PRESETS["tiny"]).to_dict()
    other["entries"].pop(next(iter(other["entries"])))
    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps(other))
    r = runner.invoke(app, ["latency", "predict", str(subnet), "--table", str(gap)])
    assert r.exit_code == 2 and "lacks 1 part" in r.output, r.output
    fake = tmp_path / "fake.json"
    fake.write_text(json.dumps({"format": "qnas.subnet/1"}))
    r = runner.invoke(app, ["latency", "predict", str(subnet), "--table", str(fake)])
    assert r.exit_code == 2 and "not a qnas latency table" in r.output, r.output


@pytest.mark.parametrize("where, value, says", [
    (("header", "space"), 5, "header.space must be an object"),
    (("header", "device"), "x", "header.device must be an object"),
    (("header", "in_channels"), "1", "header.in_channels must be a positive integer"),
    (("header", "threads"), 0, "header.threads must be a positive integer"),
    (("header", "runtime"), "reference", "header.runtime: 'reference' is not allowed"),
    (("fit", "a"), float("nan"), "is not finite"),
    (("fit", "points"), "abc", "fit.points must be a list"),
    (("spread",), [1], "malformed latency table"),
    (("entries", "stem:20px:1>8:k3:s2"), float("inf"), "not a positive number"),
])
def test_a_malformed_table_is_refused_with_one_line(tmp_path, runner, where, value, says):
    space = PRESETS["tiny"]
    d = synthetic_table(space).to_dict()
    parent = d
    for k in where[:-1]:
        parent = parent[k]
    parent[where[-1]] = value
    path = tmp_path / "t.json"
    path.write_text(json.dumps(d))
    subnet = tmp_path / "s.json"
    subnet.write_text(json.dumps(sample(space, "largest").to_dict(space)))
    r = runner.invoke(app, ["latency", "predict", str(subnet), "--table", str(path)])
    assert r.exit_code == 2 and says in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_a_table_names_its_statistic_and_an_unknown_one_is_refused(tmp_path):
    space = PRESETS["tiny"]
    table = synthetic_table(space).to_dict()
    assert table_statistic(table["header"]) == "median"  # tables from before the statistic was recorded
    table["header"]["method"] = {"statistic_name": "p10"}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    assert table_statistic(load_table(path, space, 1, 10).header) == "p10"
    table["header"]["method"] = {"statistic_name": "mean"}
    path.write_text(json.dumps(table))
    with pytest.raises(UserError, match="statistic_name: 'mean' is not allowed"):
        load_table(path, space, 1, 10)


def test_summarize_gives_the_round_median_the_invoke_percentiles_and_the_spread():
    """measure.summarize on known invoke times (ns): the statistics every table and report takes."""
    from qnas_cli.export.measure import summarize
    from qnas_cli.latency import STATISTICS

    rows = [[1_000_000, 2_000_000, 9_000_000], [4_000_000, 5_000_000, 6_000_000], [3_000_000, 3_000_000, 3_000_000]]
    t = summarize(rows)
    # round medians 2, 5, 3 ms -> their median 3 ms, spread (5 - 2) / 3; all nine invokes sorted:
    # 1 2 3 3 3 4 5 6 9 ms -> p10 at rank 0.8 (linear): 1 + 0.8 * (2 - 1), p90 at rank 7.2: 6 + 0.2 * (9 - 6)
    assert t.median_ms == pytest.approx(3.0) and t.spread == pytest.approx(1.0)
    assert t.p10_ms == pytest.approx(1.8) and t.p90_ms == pytest.approx(6.6)
    assert (t.rounds, t.invokes) == (3, 9)
    assert (t.ms("median"), t.ms("p10")) == (t.median_ms, t.p10_ms)
    assert set(STATISTICS) == {"median", "p10"}  # every statistic a table may name is one summarize gives


def test_every_timing_defaults_to_the_one_statistic():
    """Tables, measure and the method header all take latency.STATISTIC unless told otherwise."""
    import inspect

    from qnas_cli.cli.latency import build, measure
    from qnas_cli.export.latency_build import build_tables
    from qnas_cli.export.measure import measure_file, method
    from qnas_cli.latency import STATISTIC

    for fn in (build, measure, build_tables, measure_file, method):
        assert inspect.signature(fn).parameters["statistic"].default == STATISTIC, fn.__qualname__
    assert method(1, 2, 3.0)["statistic_name"] == STATISTIC


def test_predict_cli_prints_the_sum(tmp_path, runner):
    space = PRESETS["tiny"]
    table = synthetic_table(space, fit=(1.0, 0.0))
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table.to_dict()))
    arch = sample(space, "smallest")
    subnet = tmp_path / "s.json"
    subnet.write_text(json.dumps(arch.to_dict(space)))
    r = runner.invoke(app, ["latency", "predict", str(subnet), "--table", str(path), "--json", "--explain"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["predictions"][0]
    assert row["latency_ms"] == pytest.approx(sum(table.entries[key_text(k)] for k in part_keys(space, arch, 1, 10)))
    assert len(row["parts"]) == len(part_keys(space, arch, 1, 10))


def _structure(graph):
    """What latency depends on: each op's type, shapes, stride, groups, ReLU, in execution order."""
    shapes = tensor_shapes(graph)
    rows = []
    for op in graph.ops:
        if isinstance(op, (Conv, Linear)):
            rows.append((type(op).__name__, op.weight.shape, getattr(op, "stride", 1), getattr(op, "groups", 1),
                         op.relu, shapes[op.input], shapes[op.output]))
        elif isinstance(op, Add):
            rows.append(("Add", shapes[op.inputs[0]], shapes[op.inputs[1]]))
        else:
            assert isinstance(op, GlobalAvgPool)
            rows.append(("Pool", shapes[op.input], shapes[op.output]))
    return rows


@pytest.mark.parametrize("how, seed", [("largest", 0), ("smallest", 0), ("random", 3), ("random", 4)])
def test_synthetic_graph_has_the_export_structure_of_a_real_subnet(how, seed):
    net = make_supernet(weight_scale="shared")  # the fixture's jitter can make predictor scales negative
    arch = sample(net.space, how, random.Random(seed))
    real = to_integer_graph(net.extract(arch).eval())
    fake = arch_graph(net.space, arch, net.in_channels, net.num_classes)
    assert _structure(fake) == _structure(real)
    assert [op.name for op in fake.ops] == [op.name for op in real.ops]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_cover_graph_holds_every_part_once_with_the_right_shapes(name):
    space = PRESETS[name]
    for r in space.resolutions:
        wholes = [a for a in (sample(space, "largest"), sample(space, "smallest")) if a.resolution == r]
        graph, spans, whole_out = cover_graph(space, r, 1, 10, wholes)
        assert {s.key for s in spans} == set(space_part_keys(space, 1, 10, (r,)))
        shapes = tensor_shapes(graph)
        for s in spans:
            kind, size, c_in = s.key[:3]
            assert shapes[s.input][1:] == ((c_in, size, size) if kind != "stem" else (c_in, r, r))
        assert len(whole_out) == len(wholes)
        consumed = {t for op in graph.ops for t in (op.inputs if isinstance(op, Add) else (op.input,))}
        assert set(graph.outputs) == {op.output for op in graph.ops if op.output not in consumed}


def test_parser_reads_the_tflite_readme_output():
    """tensorflow/lite/tools/benchmark/README.md: the older summary line, no percentiles."""
    r = parse_benchmark_output((FIXTURES / "benchmark_model_tflite_readme.txt").read_text())
    assert r == {"init_us": 38467.0, "avg_us": 79760.9, "runs": 50, "inference_us": 79760.9, "statistic": "avg"}


def test_parser_reads_the_processor_sdk_output():
    """TI Processor SDK docs (tflite.rst): current format; the timed runs' median, not the warm-up's."""
    r = parse_benchmark_output((FIXTURES / "benchmark_model_processor_sdk.txt").read_text())
    assert r == {"init_us": 614333.0, "avg_us": 899641.0, "runs": 50, "inference_us": 899281.0, "statistic": "median"}


def test_parser_refuses_output_without_timings():
    with pytest.raises(ValueError, match="no 'Inference timings in us' line"):
        parse_benchmark_output("ERROR: Could not open '/data/local/tmp/x.tflite'.\nBenchmarking failed.\n")


def test_kendall_tau_matches_known_values():
    from qnas_cli.ranking import kendall_tau

    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # scipy.stats.kendalltau([1, 2, 3, 4, 5], [3, 1, 2, 5, 4]) = 0.4 (6 concordant, 4 discordant pairs)
    assert kendall_tau([1, 2, 3, 4, 5], [3, 1, 2, 5, 4]) == pytest.approx(0.4)
    # tau-b with a tie in y: scipy gives 0.9128709291752769
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 3]) == pytest.approx(0.9128709291752769)


@pytest.fixture
def bad_inputs(tmp_path):
    """A file, a folder, an empty .tflite and a malformed pack, for the refusal tests."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty.tflite").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "manifest.json").write_text(json.dumps({"format": "qnas.latency_pack/1", "space": [1]}))
    return tmp_path


REFUSALS = [  # (argv with {d} for the folder, what the one line must say)
    (["pack", "--space", "tiny", "--out", "{d}/afile"], "is a file"),
    (["pack", "--space", "tiny", "--out", "{d}/afile/sub"], "is a file, not a folder"),
    (["pack", "--space", "tiny", "--out", "{d}/pk", "--runs", "0"], "--runs must be a positive integer"),
    (["pack", "--space", "tiny", "--out", "{d}/pk", "--runtime", "both"], "one runtime"),
    (["build", "--space", "tiny", "--out", "{d}/folder"], "is a folder"),
    (["build", "--space", "tiny", "--out", "{d}/afile/t.json"], "is a file, not a folder"),
    (["build", "--space", "tiny", "--runtime", "both", "--out", "{d}/afile/t.json"], "is a file, not a folder"),
    (["build", "--space", "tiny", "--rounds", "0", "--out", "{d}/t.json"], "--rounds must be a positive integer"),
    (["build", "--space", "tiny", "--statistic", "mean", "--out", "{d}/t.json"], "--statistic: 'mean'"),
    (["build", "--space", "tiny", "--runtime", "reference", "--out", "{d}/t.json"], "export target"),
    (["build", "--space", "tiny", "--runtime", "micro", "--out", "{d}/t.json"], "export target"),
    (["build", "--space", "tiny", "--runtime", "fast", "--out", "{d}/t.json"], "--runtime: 'fast' is not allowed"),
    (["measure", "{d}/empty.tflite"], "is empty"),
    (["measure", "{d}/missing.tflite"], "does not exist"),
    (["measure", "{d}/empty.tflite", "--statistic", "mean"], "--statistic: 'mean'"),
    (["measure", "{d}/empty.tflite", "--threads", "0"], "--threads must be a positive integer"),
    (["import", "{d}/afile", "--out", "{d}/t.json"], "is not a folder"),
    (["import", "{d}/folder", "--out", "{d}/t.json"], "does not exist"),
    (["import", "{d}/pack", "--out", "{d}/t.json"], "malformed"),
    (["import", "{d}/pack", "--out", "{d}/folder"], "is a folder"),
    (["predict", "{d}/afile", "--table", "{d}/afile"], "not valid JSON"),
]


@pytest.mark.parametrize("argv, says", REFUSALS, ids=[f"{a[0]}: {s}" for a, s in REFUSALS])
def test_latency_commands_refuse_bad_input_before_any_work(bad_inputs, argv, says, runner, monkeypatch):
    """Exit 2, one line naming the problem, and nothing converted, cached or written first."""
    cache = bad_inputs / "cache"
    monkeypatch.setenv("QNAS_CACHE", str(cache))
    before = sorted(p.relative_to(bad_inputs) for p in bad_inputs.rglob("*"))
    r = runner.invoke(app, ["latency", *(a.replace("{d}", str(bad_inputs)) for a in argv)])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], r.output
    assert sorted(p.relative_to(bad_inputs) for p in bad_inputs.rglob("*")) == before  # nothing written, cache included


def _pack(folder: Path, space, **change) -> Path:
    """A pack manifest as `qnas latency pack` writes it (models not needed to read it), with ``change``."""
    from qnas_cli.export.latency_build import fit_archs
    from qnas_cli.export.phone import PACK_FORMAT

    files = {f"m{i:04d}": {"part": key_text(k)} for i, k in enumerate(space_part_keys(space, 1, 10))}
    files |= {f"w{i}": {"whole": a.key, "arch": a.to_dict(space)} for i, a in enumerate(fit_archs(space, 2))}
    man = {"format": PACK_FORMAT, "space": space.to_dict() | {"fingerprint": space.fingerprint}, "in_channels": 1,
           "num_classes": 10, "settings": {"threads": 1, "runtime": "xnnpack", "use_xnnpack": True, "rounds": 1,
                                           "warmup_runs": 1, "num_runs": 1}, "files": files}
    for k, v in change.items():
        if k in man["settings"]:
            man["settings"][k] = v
        else:
            man[k] = v(man[k]) if callable(v) else v
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(man))
    return folder


@pytest.mark.parametrize("change, says", [
    ({"runtime": "reference"}, "settings.runtime: 'reference' is not allowed"),
    ({"threads": 0}, "settings.threads must be a positive integer"),
    ({"in_channels": "1"}, "in_channels must be a positive integer"),
    ({"files": lambda f: dict(list(f.items())[1:])}, "1 missing"),
    ({"files": lambda f: f | {"x": {"part": "block:99px:1>2:k3:e1:s1"}}}, "1 foreign"),
    ({"files": lambda f: {k: v for k, v in f.items() if "part" in v}}, "no whole subnet"),
    ({"files": lambda f: f | {"x": {"part": ["a"]}}}, "files must map"),
    ({"settings": None}, "malformed"),
])
def test_import_refuses_a_malformed_pack_manifest(tmp_path, runner, change, says):
    pack = _pack(tmp_path / "pack", PRESETS["tiny"], **change)
    r = runner.invoke(app, ["latency", "import", str(pack), "--out", str(tmp_path / "t.json")])
    assert r.exit_code == 2 and says in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "t.json").exists()
    # the unchanged manifest gets as far as the missing phone results
    good = _pack(tmp_path / "good", PRESETS["tiny"])
    r = runner.invoke(app, ["latency", "import", str(good), "--out", str(tmp_path / "t.json")])
    assert r.exit_code == 2 and "no benchmark output" in r.output, r.output


def test_tflite_size_fit_recovers_known_constants():
    """benchmarks/tflite_size.py's least squares: file = weights + per_op * ops + fixed."""
    from benchmarks.tflite_size import fit_size_model

    rng = np.random.default_rng(0)
    rows = [(int(w), int(n), int(w) + 371 * int(n) + 1666) for w, n in zip(rng.integers(1e3, 2e6, 9), rng.integers(8, 80, 9))]
    assert fit_size_model(rows) == pytest.approx((371, 1666), rel=1e-9)
    noisy = [(w, n, s + e) for (w, n, s), e in zip(rows, rng.integers(-3, 4, 9))]
    per_op, fixed = fit_size_model(noisy)
    assert abs(per_op - 371) < 1 and abs(fixed - 1666) < 40
    with pytest.raises(ValueError, match="two different op counts"):
        fit_size_model([(100, 10, 5000), (200, 10, 5100)])
