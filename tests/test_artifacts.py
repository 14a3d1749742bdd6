"""Artifacts you can trust (issue 13): export reuses a calibrated subnet only when it is provably
current, calibrate never writes over its inputs, and a refused export leaves nothing behind.

Each test builds its own tiny supernet files (no training), so none depends on another's files.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_supernet
from qnas_cli.export.pipeline import prepare
from qnas_cli import calibrate as calibrate_mod
from qnas_cli.checkpoint import save_weights, sha256_file, write_json
from qnas_cli.cli import app
from qnas_cli.errors import UserError
from qnas_cli.space import PRESETS, sample
from qnas_cli.train import supernet_payload

CALIB = 64  # calibration images: enough to give every subnet its own statistics, fast
EVAL = 32


def _supernet(path: Path, seed: int) -> Path:
    """A tiny int8 supernet file (weights + sidecar) as `qnas train` writes it; ``seed`` picks the weights."""
    save_weights(path, supernet_payload(make_supernet(seed=seed)), {"kind": "qnas.supernet", "config": {"data": "fashion-mnist"}})
    return path


def _subnet(path: Path, supernet: Path) -> Path:
    """subnet.json of the smallest tiny subnet, naming ``supernet`` as `qnas space sample --supernet` does."""
    space = PRESETS["tiny"]
    write_json(path, {**sample(space, "smallest").to_dict(space), "supernet": {"path": str(supernet), "sha256": sha256_file(supernet)}})
    return path


def _prepare(subnet: Path, calib_images: int = CALIB, **kw):
    log: list[str] = []
    sub, meta, _ = prepare(subnet, kw.pop("supernet", None), kw.pop("data_spec", None), calib_images, eval_images=EVAL,
                           log=log.append, **kw)
    return sub, meta, log


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def calibrated(tmp_path, fmnist):
    """subnet.json + the subnet.qnas.pt that export (calibrating itself) leaves beside it."""
    subnet = _subnet(tmp_path / "sub" / "subnet.json", _supernet(tmp_path / "run" / "supernet.pt", seed=0))
    sub, meta, log = _prepare(subnet)
    assert not any("using" in m for m in log) and (tmp_path / "sub" / "subnet.qnas.pt").is_file()
    return subnet, sub, meta


def test_export_reuses_a_calibration_made_from_the_same_inputs(calibrated):
    subnet, sub, meta = calibrated
    again, meta2, log = _prepare(subnet)
    assert any(m.startswith("using subnet.qnas.pt") for m in log), log
    assert _same_state(again, sub) and meta2["weights"]["sha256"] == meta["weights"]["sha256"]
    c = meta["calibration"]
    assert (c["calib_images"], c["calib_seed"], c["data"]) == (CALIB, calibrate_mod.CALIB_SEED, "fashion-mnist")
    assert c["supernet_sha256"] == json.loads(subnet.read_text())["supernet"]["sha256"]


def test_export_recalibrates_after_the_supernet_was_retrained(calibrated, tmp_path):
    """The issue's story: retrain, sample the same architecture, export: the old weights must not ship."""
    subnet, old, _ = calibrated
    _subnet(subnet, _supernet(tmp_path / "run" / "supernet.pt", seed=1))  # retrained in place, same arch sampled
    new, meta, log = _prepare(subnet)
    assert any(m.startswith("recalibrating: subnet.qnas.pt") and "supernet_sha256" in m for m in log), log
    assert not _same_state(new, old)
    fresh, _, _ = calibrate_mod.calibrate_file(subnet, calib_images=CALIB, out=tmp_path / "fresh.qnas.pt", eval_images=EVAL)
    assert _same_state(new, fresh)
    assert meta["calibration"]["supernet_sha256"] == sha256_file(tmp_path / "run" / "supernet.pt")


@pytest.mark.parametrize("change, reason", [
    (dict(calib_images=CALIB // 2), "calib_images"),
    (dict(data_spec="fashion-mnist:/usr/share/datasets/fashion-mnist"), "data"),
    (dict(contract=True), "integer_contract"),
    (dict(seed=True), "calib_seed"),
    (dict(arch=True), "another architecture"),
])
def test_export_recalibrates_when_any_calibration_input_differs(calibrated, monkeypatch, change, reason):
    subnet, _, _ = calibrated
    if change.pop("arch", False):
        space = PRESETS["tiny"]
        write_json(subnet, {**json.loads(subnet.read_text()), **sample(space, "largest").to_dict(space)})
    if change.pop("contract", False):
        monkeypatch.setattr(calibrate_mod, "INTEGER_CONTRACT_VERSION", calibrate_mod.INTEGER_CONTRACT_VERSION + 1)
    if change.pop("seed", False):
        monkeypatch.setattr(calibrate_mod, "CALIB_SEED", calibrate_mod.CALIB_SEED + 1)
    _, meta, log = _prepare(subnet, **change)
    assert any(m.startswith("recalibrating:") and reason in m for m in log), log
    _, _, log = _prepare(subnet, **change)  # and the new calibration is then current
    assert any(m.startswith("using") for m in log), log


def test_a_calibration_without_its_inputs_is_not_reused(calibrated):
    subnet, _, meta = calibrated
    side = subnet.with_name("subnet.qnas.json")
    write_json(side, {k: v for k, v in json.loads(side.read_text()).items() if k != "calibration"})  # an older qnas's file
    _, _, log = _prepare(subnet)
    assert any("records no calibration inputs" in m for m in log), log


# ---- calibrate --out must not overwrite an input --------------------------------------------------

@pytest.mark.parametrize("out, words", [
    ("{d}/subnet.pt", "would overwrite the input"),  # writes subnet.json beside it: the subnet file itself
    ("{d}/subnet.json", "must end in .pt"),
    ("{r}/supernet.pt", "would overwrite the input"),
])
def test_calibrate_refuses_an_out_that_overwrites_an_input(runner, tmp_path, out, words):
    net = _supernet(tmp_path / "run" / "supernet.pt", seed=0)
    subnet = _subnet(tmp_path / "sub" / "subnet.json", net)
    before = {p: p.read_bytes() for p in (subnet, net, net.with_suffix(".json"))}
    out = out.format(d=subnet.parent, r=net.parent)
    r = runner.invoke(app, ["calibrate", str(subnet), "--out", out, "--calib-images", "8"])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert all(p.read_bytes() == data for p, data in before.items())


# ---- count options: exit 2 before any work ----------------------------------------------------------

@pytest.mark.parametrize("command", ["calibrate", "export"])
@pytest.mark.parametrize("option, value", [("--eval-images", "0"), ("--eval-images", "-5"), ("--calib-images", "0"),
                                           ("--calib-images", "-1")])
def test_count_options_are_checked_before_any_work(runner, tmp_path, monkeypatch, command, option, value):
    def no_work(*a, **k):
        raise AssertionError("work started before the options were checked")
    monkeypatch.setattr("qnas_cli.calibrate.load_supernet", no_work)
    monkeypatch.setattr("qnas_cli.export.pipeline.prepare", no_work)
    subnet = _subnet(tmp_path / "subnet.json", _supernet(tmp_path / "supernet.pt", seed=0))
    r = runner.invoke(app, [command, str(subnet), option, value, "--out", str(tmp_path / "o" / "x.qnas.pt")])
    assert r.exit_code == 2, r.output
    assert f"{option} must be a positive integer, got {value}" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("value, words", [("0", "--verify-images must be a positive integer, got 0"),
                                          ("-3", "--verify-images must be a positive integer, got -3"),
                                          ("some", "--verify-images must be a positive integer or 'all', got 'some'")])
def test_verify_images_is_checked_before_any_work(runner, tmp_path, monkeypatch, value, words):
    monkeypatch.setattr("qnas_cli.export.pipeline.prepare", lambda *a, **k: pytest.fail("work started before --verify-images was checked"))
    subnet = _subnet(tmp_path / "subnet.json", _supernet(tmp_path / "supernet.pt", seed=0))
    r = runner.invoke(app, ["export", str(subnet), "--verify-images", value, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and words in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["--steps", "--batch-size", "--epochs", "--ckpt-every", "--calib-images", "--eval-images"])
def test_train_count_options_exit_2(runner, tmp_path, option):
    r = runner.invoke(app, ["train", "--space", "tiny", option, "0", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and f"{option} must be a positive integer, got 0" in r.output, r.output
    assert not (tmp_path / "run").exists()


# ---- a refused export leaves nothing behind ------------------------------------------------------

def test_a_refused_export_creates_no_output_folder(runner, tmp_path):
    space = PRESETS["tiny"]
    write_json(tmp_path / "subnet.json", sample(space, "smallest").to_dict(space))  # names no supernet
    r = runner.invoke(app, ["export", str(tmp_path / "subnet.json"), "--out", str(tmp_path / "new" / "folder")])
    assert r.exit_code == 2 and "names no supernet" in r.output, r.output
    assert not (tmp_path / "new").exists()


def test_export_to_an_impossible_folder_is_refused_up_front(tmp_path):
    from qnas_cli.export.pipeline import export_subnet

    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot write there"):
        export_subnet(tmp_path / "subnet.json", tmp_path / "a_file" / "out")  # before the missing subnet is noticed


@pytest.mark.parametrize("mode, words", [("convs", "convs-only (--quant convs"), ("none", "float (--quant none)")])
def test_export_refuses_a_subnet_that_is_not_fully_int8_before_writing_anything(runner, tmp_path, mode, words):
    """A convs-only or float supernet's subnet: refused before calibration writes subnet.qnas.pt
    (it used to be written, then refused), and no output folder."""
    net, model = tmp_path / "run" / "supernet.pt", make_supernet(mode)
    save_weights(net, supernet_payload(model), {"kind": "qnas.supernet", "config": {"data": "fashion-mnist"},
                                                "quant": asdict(model.cfg)})  # as `qnas train` records it
    subnet = _subnet(tmp_path / "sub" / "subnet.json", net)
    r = runner.invoke(app, ["export", str(subnet), "--calib-images", str(CALIB), "--eval-images", str(EVAL),
                            "--out", str(tmp_path / "export")])
    assert r.exit_code == 2 and words in r.output and "qnas exports fully int8 subnets" in r.output, r.output
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["subnet.json"] and not (tmp_path / "export").exists()


def _image_folder(root: Path, classes: int, mode: str) -> str:
    """A tiny imagefolder data set: ``classes`` classes of 32x32 ``mode`` ("L" or "RGB") images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in range(classes):
            (root / split / f"c{cls}").mkdir(parents=True)
            for i in range(n):
                shape = (32, 32, 3) if mode == "RGB" else (32, 32)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / f"c{cls}" / f"{i}.png")
    return f"imagefolder:{root}"


@pytest.mark.parametrize("classes, mode, words", [(10, "RGB", "3 channels / 10 classes, but the subnet was trained for 1 / 10"),
                                                  (4, "L", "1 channels / 4 classes, but the subnet was trained for 1 / 10")])
def test_export_of_a_calibrated_file_refuses_data_of_other_channels_or_classes(runner, calibrated, tmp_path, classes, mode, words):
    subnet, _, _ = calibrated
    spec = _image_folder(tmp_path / "other", classes, mode)
    r = runner.invoke(app, ["export", str(subnet.with_name("subnet.qnas.pt")), "--data", spec, "--eval-images", str(EVAL),
                            "--out", str(tmp_path / "export")])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "export").exists()


# ---- one preprocessing recipe: export decodes images as calibration did -----------------------------

def test_export_of_a_calibrated_file_decodes_images_as_its_calibration_did(tmp_path):
    """Calibration decodes image files at the space's largest resolution; export from subnet.qnas.pt
    must feed the very same inputs (it used to decode at the subnet's own resolution)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for cls in range(10):
            (tmp_path / "images" / split / f"c{cls}").mkdir(parents=True)
            for i in range(n):  # not square, not the space's size
                Image.fromarray(rng.integers(0, 256, (37, 23), dtype=np.uint8), "L").save(tmp_path / "images" / split / f"c{cls}" / f"{i}.png")
    spec = f"imagefolder:{tmp_path / 'images'}"
    subnet = _subnet(tmp_path / "subnet.json", _supernet(tmp_path / "supernet.pt", seed=0))
    sub, meta, calibrated_with = calibrate_mod.calibrate_file(subnet, data_spec=spec, calib_images=8, eval_images=4)
    assert sub.arch.resolution < meta["data"]["decode_size"] == max(PRESETS["tiny"].resolutions)
    _, _, exported_with = prepare(subnet.with_name("subnet.qnas.pt"), None, None, CALIB, log=lambda m: None)
    idx = torch.arange(len(exported_with.test))
    assert torch.equal(exported_with.test.get(idx)[0], calibrated_with.test.get(idx)[0])
    assert exported_with.preprocessing(16) == calibrated_with.preprocessing(16)
