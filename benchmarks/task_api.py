"""Exported files in the hands of a real client: MediaPipe Tasks' ImageClassifier, as apps call it.

For each export folder (default: the demo's, ``runs/demo/export_*``), every test image is given
to MediaPipe's ImageClassifier (``benchmarks/clients/mediapipe_classify.py`` in
``.venv-mediapipe``) as the uint8 RGB pixels the file takes; its scores (the dequantized uint8
outputs) are turned back into int8 logits and compared with qnas's exact forward of the same
calibrated subnet on the same pixels, in two arithmetics:
- ``mediapipe``: MediaPipe's bundled XNNPACK, which rounds MEAN half to even (qnas_cli/kernels.py);
- the export's target (``xnnpack``: LiteRT's), to show what differs when the client's runtime is not the target's.
Reported per file: logits bit-exact, top-1 agreement, the client's top-1 accuracy, and whether
the category names it reports are the labels the export wrote.

    python -m benchmarks.task_api [EXPORT_DIR ...] [--images N] [--out runs/bench/task_api]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MEDIAPIPE_PYTHON = ROOT / ".venv-mediapipe" / "bin" / "python"
CLIENT = Path(__file__).resolve().parent / "clients" / "mediapipe_classify.py"


def mediapipe_available() -> bool:
    return MEDIAPIPE_PYTHON.is_file()


def mediapipe_scores(model: Path, pixels_nhwc: np.ndarray, timeout_s: float = 1800) -> tuple[np.ndarray, list[str]]:
    """MediaPipe's ImageClassifier on uint8 RGB images: (scores (N, classes), category names)."""
    if not mediapipe_available():
        raise SystemExit(f"error: {MEDIAPIPE_PYTHON} is missing: run `make mediapipe-venv`")
    with tempfile.TemporaryDirectory(prefix="qnas_mediapipe_") as tmp:
        np.save(Path(tmp) / "images.npy", pixels_nhwc)
        proc = subprocess.run([str(MEDIAPIPE_PYTHON), str(CLIENT), str(model), str(Path(tmp) / "images.npy"),
                               str(Path(tmp) / "out.npz")], capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"MediaPipe client failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
        out = np.load(Path(tmp) / "out.npz")
        return out["scores"], [str(n) for n in out["names"]]


def compare(export_dir: Path, images: int | None = None) -> dict:
    """One export folder through MediaPipe against qnas's exact forwards (module docstring)."""
    from qnas_cli.export.pipeline import file_subnet, int8_images, subnet_outputs
    from qnas_cli.export.verify import as_file_input

    report = json.loads((export_dir / "export_report.json").read_text())
    io = report["io"]
    if io["file"]["input"] != "uint8" or io["file"]["color_space"] != "rgb" or io["file"]["output"] != "uint8":
        raise SystemExit(f"error: {export_dir}: MediaPipe's ImageClassifier needs uint8 RGB input and uint8 output; "
                         f"this file has {io['file']} (export it with the defaults)")
    sub, data = file_subnet(report)
    q, labels = int8_images(sub, data, data.test, images)
    detail = {"dtype": np.uint8, "shape": io["input"]["shape"]}
    pixels = np.concatenate([as_file_input(img, detail) for img in q])
    scores, names = mediapipe_scores(export_dir / report["files"]["tflite"], pixels)
    out = io["output"]
    client = (np.round(scores / out["scale"]) + out["zero_point"] - 128).astype(np.int8)
    row = {"export": str(export_dir), "arch_key": report["arch_key"], "target": report["target"], "images": int(len(q)),
           "names_match_labels": names == report["labels"]["names"], "client_top1": float(np.mean(client.argmax(1) == labels))}
    for arithmetic in dict.fromkeys(("mediapipe", report["target"])):
        exact = subnet_outputs(sub, q, arithmetic)
        row[f"vs_exact_{arithmetic}"] = {"logits_exact": float(np.mean(client == exact)),
                                         "images_all_exact": float(np.mean((client == exact).all(1))),
                                         "top1_agreement": float(np.mean(client.argmax(1) == exact.argmax(1))),
                                         "exact_top1": float(np.mean(exact.argmax(1) == labels))}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="*", type=Path, help="export folders (default: runs/demo/export_*)")
    ap.add_argument("--images", type=int, default=None, help="test images (default: the whole test split)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/task_api"))
    args = ap.parse_args()
    exports = args.exports or sorted(Path("runs/demo").glob("export_*"))
    if not exports:
        raise SystemExit("error: no export folders: run `make demo` or name them")
    rows = []
    for folder in exports:
        rows.append(compare(folder, args.images))
        r = rows[-1]
        print(f"{folder}: {r['images']} images, names match labels: {r['names_match_labels']}; client top-1 "
              f"{100 * r['client_top1']:.2f}%; " + "; ".join(
                  f"vs exact {a}: logits {100 * v['logits_exact']:.3f}% exact, top-1 agreement {100 * v['top1_agreement']:.3f}%"
                  for a, v in ((k[9:], v) for k, v in r.items() if k.startswith("vs_exact_"))), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "task_api.json").write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {args.out / 'task_api.json'}")


if __name__ == "__main__":
    main()
