"""Classify images with MediaPipe Tasks' ImageClassifier, as an app does: the client qnas files are
tested against (``benchmarks/task_api.py``, ``tests/test_task_api.py``).

Runs in its own environment, ``.venv-mediapipe`` (``make mediapipe-venv``): the mediapipe wheel
needs numpy 2, which the converters' pins exclude. Imports nothing from qnas.

    .venv-mediapipe/bin/python benchmarks/clients/mediapipe_classify.py MODEL.tflite IMAGES.npy OUT.npz

IMAGES.npy: uint8 (N, H, W, 3) RGB images of the model's size. OUT.npz: ``scores`` (N, classes)
float32, the ImageClassifier's score of every category in index order, and ``names``, the
category names it reports (from the model's metadata).
"""
import sys

import mediapipe as mp
import numpy as np
from mediapipe.tasks import python as tasks
from mediapipe.tasks.python import vision


def main(model: str, images_path: str, out: str) -> None:
    images = np.load(images_path)
    options = vision.ImageClassifierOptions(base_options=tasks.BaseOptions(model_asset_path=model), max_results=-1)
    scores, names = [], {}
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for image in images:
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
            categories = sorted(result.classifications[0].categories, key=lambda c: c.index)
            scores.append([c.score for c in categories])
            names.update({c.index: c.category_name for c in categories})
    np.savez(out, scores=np.asarray(scores, np.float32), names=np.asarray([names[i] for i in sorted(names)]))


if __name__ == "__main__":
    main(*sys.argv[1:4])
