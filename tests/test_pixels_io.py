"""The file's ends (uint8 pixels in, uint8 scores out, RGB for grayscale models) and its TFLite
metadata: exact on every target runtime, and readable by the task API apps use (MediaPipe)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.task_api import mediapipe_available, mediapipe_scores
from qnas_cli.data import FASHION_MNIST_CLASSES, load_dataset, to_input
from qnas_cli.errors import UserError
from qnas_cli.export.fold import quantize_input
from qnas_cli.export.measure import interpreter
from qnas_cli.export.pixels import file_io, on_pixel_grid, pixel_grid
from qnas_cli.export.tflite import export_tflite
from qnas_cli.export.tflite_io import adapt_io
from qnas_cli.export.tflite_metadata import LABELS_FILE, ClassifierMetadata, attach
from qnas_cli.export.verify import as_file_input, failures, reference_runs, verify_tflite
from qnas_cli.kernels import TARGETS
from qnas_cli.space import sample
from tests.conftest import make_supernet
from tests.graph_factory import mobilenet_like, sample_images

FMNIST = {"spec": "fashion-mnist", "in_channels": 1, "num_classes": 10, "mean": [0.286], "std": [0.353]}
CIFAR = {"spec": "cifar10:x", "in_channels": 3, "num_classes": 10, "mean": [0.4914, 0.4822, 0.4465],
         "std": [0.247, 0.2435, 0.2616]}


def test_options_are_checked_against_the_training_data():
    assert file_io("uint8", "uint8", None, FMNIST).channel == 1  # grey model, RGB input: reads green
    assert file_io("uint8", "uint8", "grayscale", FMNIST).channels == 1
    assert file_io("int8", "int8", None, FMNIST).color_space == "grayscale"
    for args, match in ((("float16", "uint8", None, FMNIST), "--input"), (("uint8", "int16", None, FMNIST), "--output"),
                        (("uint8", "uint8", "bgr", FMNIST), "--color-space"),
                        (("uint8", "uint8", None, CIFAR), "one normalisation for every channel"),
                        (("int8", "int8", "grayscale", CIFAR), "3-channel"),
                        (("int8", "int8", "rgb", FMNIST), "--input uint8")):
        with pytest.raises(UserError, match=match):
            file_io(*args)
    assert file_io("int8", "uint8", None, CIFAR).color_space == "rgb"
    assert file_io(None, "uint8", None, CIFAR).input == "int8" and file_io(None, "uint8", None, FMNIST).input == "uint8"


def test_every_pixel_is_its_own_int8_value_on_the_pixel_grid(fmnist):
    """Normalising a pixel and quantizing it on the pixel grid gives p - 128, for every p: the
    QUANTIZE from uint8 (a shift by 128) is the dataset's normalisation, exactly."""
    data = load_dataset("fashion-mnist")
    net = make_supernet()
    sub = net.extract(sample(net.space, "largest"))
    grid = on_pixel_grid(sub, data.describe())
    scale, zero_point = pixel_grid(data.describe())
    assert (grid.input_q.scale.item(), grid.input_q.zero_point) == (scale, zero_point) == (scale, round(255 * 0.286) - 128)
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    q = quantize_input(grid, to_input(pixels, data, 16))
    assert np.array_equal(q.ravel().astype(int), np.arange(256) - 128)
    assert sub.input_q.scale.item() != scale  # the calibrated subnet itself is untouched


@pytest.fixture(scope="module", params=[1, 3], ids=lambda c: f"c{c}")
def pixel_file(request, tmp_path_factory):
    """A graph of ``channels`` inputs exported with the default ends (uint8 RGB pixels, uint8 scores)
    and metadata: (graph, the TFLite export, its FileIO), converted once for the module's tests."""
    channels = request.param
    graph, calib = mobilenet_like(channels, 28, "full_range")
    io = file_io("uint8", "uint8", None, {**FMNIST, "in_channels": channels, "mean": [0.5] * channels,
                                           "std": [0.25] * channels})
    meta = ClassifierMetadata("qnas test", "a test model", "1", FASHION_MNIST_CLASSES, "rgb", 28, 28, 128.0, 63.75,
                              "pixels", "scores")
    result = export_tflite(graph, calib, tmp_path_factory.mktemp("pixels"), "model",
                           lambda m: attach(adapt_io(m, io), meta))
    return graph, result, io


@pytest.mark.slow
def test_uint8_ends_are_exact_on_every_target_and_carry_metadata(pixel_file):
    """Pixels in, scores out, on the int8 graph our rewrite verified: every target runtime equals
    the exact integer forward end to end and op by op; census: the two uint8 ends are the only
    QUANTIZE ops and XNNPACK takes everything else; a grey model with RGB input reads one channel."""
    graph, result, rgb_io = pixel_file
    channels = graph.input_shape[1]
    images, _ = sample_images(100, channels, 28, "full_range", seed=7)
    report = verify_tflite(result.tflite, graph, reference_runs(graph, images), latency=False)
    report["io"] = {"file": rgb_io.to_dict()}
    c = report["census"]
    assert (c["input_dtype"], c["output_dtype"], c["input_shape"]) == ("uint8", "uint8", [1, 28, 28, 3])
    assert c["quantize_ops"] == 2 and c["float_tensors"] == 0
    assert report["xnnpack_coverage"]["undelegated_ops"] == ["QUANTIZE"]
    for runtime in TARGETS:
        assert report["parity"][runtime]["exact"] == 1.0, (runtime, report["parity"][runtime])
        assert all(o["exact"] == 1.0 for o in report["per_op"][runtime].values()), runtime
        assert failures(report, runtime) == []
    if channels == 1:  # only the green channel counts: red and blue may hold anything
        it = interpreter(result.tflite, "xnnpack")
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        grey = as_file_input(images[0], inp)
        noisy = grey.copy()
        noisy[..., [0, 2]] = np.random.default_rng(0).integers(0, 256, noisy[..., [0, 2]].shape)
        results = []
        for x in (grey, noisy):
            it.set_tensor(inp["index"], x)
            it.invoke()
            results.append(it.get_tensor(out["index"]).copy())
        assert np.array_equal(*results)
    assert LABELS_FILE.encode() in result.tflite.read_bytes()[-2000:]  # the appended zip's directory


@pytest.mark.slow
@pytest.mark.skipif(not mediapipe_available(), reason="no .venv-mediapipe (make mediapipe-venv)")
def test_mediapipe_classifies_exactly_as_the_exact_forward(pixel_file):
    """A real client: MediaPipe Tasks' ImageClassifier loads the default export (uint8 RGB in, uint8
    out, metadata) of a grey and a colour model, names the categories with our labels, and its
    scores are the exact forward's int8 logits in MediaPipe's arithmetic, bit for bit."""
    from qnas_cli.export.reference import run_reference

    graph, result, _ = pixel_file
    images, _ = sample_images(60, graph.input_shape[1], 28, "full_range", seed=11)
    detail = {"dtype": np.uint8, "shape": [1, 28, 28, 3]}
    scores, names = mediapipe_scores(result.tflite, np.concatenate([as_file_input(img, detail) for img in images]))
    assert names == list(FASHION_MNIST_CLASSES)
    out_q = graph.qparams[graph.output]
    client = np.round(scores / np.float32(out_q.scale)).astype(int) + out_q.zero_point
    assert np.array_equal(client, run_reference(graph, images, "mediapipe").astype(int))


@pytest.mark.parametrize("args, words", [
    (["--input", "float16"], "--input: 'float16' is not allowed"),
    (["--output", "float32"], "--output: 'float32' is not allowed"),
    (["--color-space", "bgr"], "--color-space: 'bgr' is not allowed"),
    (["--labels", "THREE"], "3 names for a model of 10 classes"),
    (["--labels", "MISSING"], "cannot read it"),
])
def test_bad_io_options_exit_2_before_anything_is_written(runner, tmp_path, args, words):
    from qnas_cli.checkpoint import save_weights, sha256_file, write_json
    from qnas_cli.cli import app
    from qnas_cli.space import PRESETS
    from qnas_cli.train import supernet_payload

    net = tmp_path / "run" / "supernet.pt"
    from dataclasses import asdict

    model = make_supernet()
    save_weights(net, supernet_payload(model), {"kind": "qnas.supernet", "config": {"data": "fashion-mnist"},
                                                "data": FMNIST, "quant": asdict(model.cfg)})  # as `qnas train` records it
    space = PRESETS["tiny"]
    subnet = tmp_path / "sub" / "subnet.json"
    write_json(subnet, {**sample(space, "smallest").to_dict(space), "supernet": {"path": str(net), "sha256": sha256_file(net)}})
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    args = [{"THREE": str(tmp_path / "three.txt"), "MISSING": str(tmp_path / "nope.txt")}.get(a, a) for a in args]
    r = runner.invoke(app, ["export", str(subnet), "--out", str(tmp_path / "export"), *args])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["subnet.json"] and not (tmp_path / "export").exists()
