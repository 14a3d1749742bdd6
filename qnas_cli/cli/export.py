"""``qnas export``: a fully int8 TFLite model with our own scales, proven by parity."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..calibrate import CALIB_IMAGES, VERIFY_IMAGES
from ..errors import UserError
from .calibrate import CalibOpt, DataOpt, RuntimeOpt, SupernetOpt
from .common import EXIT_GATE_FAILED, console, err_console, logger, print_json, say


def export(
    subnet: Annotated[Path, typer.Argument(help="subnet.json (calibrated first when needed) or a calibrated subnet.qnas.pt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (default: beside the subnet file).")] = None,
    supernet: SupernetOpt = None,
    data: DataOpt = None,
    calib_images: CalibOpt = CALIB_IMAGES,
    eval_images: Annotated[int, typer.Option(help="Test images the accuracy is measured on: a seeded, class-stratified subset (default: the whole test split).")] = None,
    runtime: RuntimeOpt = "xnnpack",
    verify_images: Annotated[str, typer.Option(
        metavar="N|all", help="Of those, how many the exported file itself runs on for the bit-exact gate, spread over "
                              "the classes; 'all' runs every one (slower: the largest small subnet's XNNPACK file "
                              "takes ~6 ms per image on a laptop core).")] = str(VERIFY_IMAGES),
    input_type: Annotated[str, typer.Option(
        "--input", metavar="uint8|int8",
        help="What the file takes. uint8: raw camera pixels 0-255, normalised inside the model exactly, what "
             "MediaPipe Tasks' ImageClassifier and the TFLite Task Library accept; int8: the graph's own int8 "
             "input (the app normalises and quantizes, as io.input says). Default: uint8 where the data has one "
             "normalisation for every channel (grayscale data), else int8.")] = None,
    output_type: Annotated[str, typer.Option(
        "--output", metavar="uint8|int8", help="What the file gives: uint8 scores (default; the task APIs need it) "
                                               "or the int8 logits. The same values either way, 128 apart.")] = "uint8",
    color_space: Annotated[str, typer.Option(
        "--color-space", metavar="rgb|grayscale",
        help="Channels of a uint8 input. Default: rgb, also for grayscale models (which then read the green "
             "channel: pass grey images as RGB), since MediaPipe's ImageClassifier takes only 3- or 4-channel "
             "models; grayscale keeps one channel (TFLite Micro, a grey sensor).")] = None,
    labels: Annotated[Path, typer.Option(
        help="Class names, one per line, for the file's metadata and labels.txt (default: the dataset's: "
             "Fashion-MNIST's and CIFAR-10's names, an image folder's class folders).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print export_report.json to stdout.")] = False,
) -> None:
    """Write model_int8.tflite (every op int8; uint8 pixels in, uint8 scores out by default; TFLite
    metadata with the labels), labels.txt, model.onnx and export_report.json.

    The calibrated subnet's exact integer forward for the target runtime scores the test images:
    the accuracy reported. The file runs on that runtime (LiteRT; TFLite Micro for micro) over
    --verify-images of them and must equal that forward bit for bit, end to end and op by op (and,
    for xnnpack, the delegate must take every op).

    The other runtimes (xnnpack, reference, micro, and the optimized built-in kernels, which are
    not a target) are compared on 100 of the images, for information. With --json the report
    (schema qnas.export_report/4) goes to stdout.

    Exit codes: 0 the model passed verification; 3 it failed parity or the op census (the report
    is still written and printed); 2 bad input; 1 internal failure; 130 interrupted.
    """
    from qnas_cli.export.pipeline import export_subnet

    report = export_subnet(subnet, out, supernet, data, calib_images, eval_images, runtime, _images(verify_images),
                           log=logger(err_console if json_out else console), input_type=input_type,
                           output_type=output_type, color_space=color_space, labels_file=labels)
    if json_out:
        print_json(report)
    else:
        _summary(report)
    if not report["passed"]:
        err_console.print("[bold red]export failed verification:[/] " + escape("; ".join(report["problems"])), highlight=False)
        raise typer.Exit(EXIT_GATE_FAILED)


def _images(value: str) -> int | None:
    """--verify-images: a positive count, or 'all' (None)."""
    if value.strip().lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--verify-images must be a positive integer or 'all', got {value!r}") from None


def _summary(r: dict) -> None:
    from qnas_cli.export.verify import CHECKED

    target, p = r["target"], r["parity"]
    say(console, f"model_int8.tflite  {r['arch_key']}  (target: {target})")
    t = Table()
    t.add_column("check")
    for b in CHECKED:
        t.add_column(f"{b} (target)" if b == target else b)
    t.add_row("images compared", *(str(p[b]["n_images"]) for b in CHECKED))
    t.add_row("compared with", *(f"exact {p[b]['compared_with']}" for b in CHECKED))
    t.add_row("exact", *(f"{100 * p[b]['exact']:.2f}%" for b in CHECKED))
    t.add_row("max |Δ| (LSB), end to end", *(str(p[b]["max_abs_lsb"]) for b in CHECKED))
    t.add_row("top-1 agreement", *(f"{100 * p[b]['top1_agreement']:.2f}%" for b in CHECKED))
    t.add_row("ops bit-exact (own inputs)",
              *(f"{sum(o['exact'] == 1.0 for o in r['per_op'][b].values())}/{len(r['per_op'][b])}" for b in CHECKED))
    t.add_row(f"latency (ms, 1 thread, {r['latency_ms'].get('statistic', 'median')})", *(f"{r['latency_ms'][b]:.3f}" if b in r["latency_ms"] else "-" for b in CHECKED))
    console.print(t)
    c, a = r["census"], r["accuracy"]
    say(console, f"ops {dict(c['ops'])}; float tensors {c['float_tensors']}; in/out {c['input_dtype']} {c['input_shape']}/{c['output_dtype']}; "
                 f"QUANTIZE {c['quantize_ops']} DEQUANTIZE {c['dequantize_ops']}")
    say(console, f"top-1 on {a['n_images']} test images: {100 * a['top1']:.2f}% on {target} (exact forward); "
                 f"on the {a['tflite_images']} the file ran: TFLite {100 * a['tflite_top1']:.2f}%, fake-quant "
                 f"(training's simulation) {100 * a['fake_quant_top1']:.2f}% (Δ {a['delta_pp']:+.2f} pp); "
                 f"size {r['size_bytes']} bytes; {r['seconds']['total_with_verification']:.0f} s")
    say(console, f"verdict: {'PASS' if r['passed'] else 'FAIL'}")
