"""What the exported file takes and gives: camera pixels (uint8) or the graph's int8 values.

Task APIs (MediaPipe Tasks' ImageClassifier, what Android, iOS and Python apps call) accept a
model only with uint8 or float32 input and output, and three- or four-channel images; a camera
gives uint8 RGB. So by default the file takes raw uint8 pixels and gives uint8 scores, with the
rest of the graph int8 as trained.

The dataset's normalisation ``(p / 255 - mean) / std`` moves into the model, exactly: the int8
graph input is put on the *pixel grid*, scale ``1 / (255 std)`` and zero point
``round(255 mean) - 128``, on which a pixel ``p`` is the int8 value ``p - 128`` (a normalised
pixel divided by that scale is ``p - 255 mean``; rounded, ``p - round(255 mean)``). The uint8
input tensor then carries the same scale with zero point ``round(255 mean)``, and TFLite's
QUANTIZE from it to the int8 input has a requantization multiplier of exactly 1: it subtracts
128, on every runtime. Only the stem sees a change, a finer input grid (one step per pixel value
instead of the trained input scale, ~1.5x coarser on Fashion-MNIST), applied by its int32
requantization, so the exact forward of the file is the calibrated subnet with that input grid.
One (mean, std) for every channel is what a per-tensor scale can hold; per-channel
normalisation (CIFAR-10, RGB image folders) keeps the int8 input by default, and ``--input uint8``
is refused for it rather than approximated.

A grayscale model exported for RGB input reads one channel of it (green, the channel closest to
luminance, 0.587 of BT.601 luma) through a STRIDED_SLICE: the same integers for a grey image
given as RGB, as MediaPipe needs it (its ImageClassifier refuses one-channel models).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch

from qnas_cli.errors import UserError, choice_error
from qnas_cli.supernet import Subnet

IO_TYPES = ("uint8", "int8")
COLOR_SPACES = ("rgb", "grayscale")
GRAY_FROM_RGB = 1  # the RGB channel a grayscale model reads: green


@dataclass(frozen=True)
class FileIO:
    """The exported file's input and output (the report's ``io.file``)."""

    input: str = "uint8"  # uint8: raw pixels 0-255; int8: the graph's int8 input (normalise and quantize in the app)
    output: str = "uint8"  # uint8: scores with zero point +128; int8: the graph's logits
    color_space: str = "rgb"  # rgb: (1, H, W, 3); grayscale: (1, H, W, 1)
    channel: int | None = None  # the RGB channel a grayscale model reads (None: all channels are the model's)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def adapters(self) -> int:
        """QUANTIZE ops the uint8 ends add (tflite_io)."""
        return (self.input == "uint8") + (self.output == "uint8")

    @property
    def channels(self) -> int:
        return 3 if self.color_space == "rgb" else 1


def file_io(input_type: str | None, output_type: str, color_space: str | None, data: dict) -> FileIO:
    """Check the options against the data the model was trained on (``Dataset.describe()``, as
    a checkpoint records it). ``input_type`` None: uint8 where one normalisation serves every
    channel, else int8 (``default_input``); ``color_space`` None: the data's own, except that a
    grayscale model with uint8 input takes RGB, as the task APIs give it."""
    check_choices(input_type, output_type, color_space)
    input_type = input_type or default_input(data)
    gray = data["in_channels"] == 1
    if color_space is None:
        color_space = "rgb" if (input_type == "uint8" or not gray) else "grayscale"
    if color_space == "grayscale" and not gray:
        raise UserError(f"--color-space grayscale: the model was trained on {data['in_channels']}-channel images")
    if color_space == "rgb" and gray and input_type == "int8":
        raise UserError("--color-space rgb reads raw pixels: use it with --input uint8 (an int8 input holds "
                        "the model's own normalised grey values)")
    if input_type == "uint8":
        pixel_grid(data)  # refuses per-channel normalisation
    return FileIO(input_type, output_type, color_space, GRAY_FROM_RGB if (gray and color_space == "rgb") else None)


def default_input(data: dict) -> str:
    """uint8 pixels where the data's normalisation fits one input scale (module docstring), else int8."""
    return "uint8" if len(set(data["mean"])) == 1 and len(set(data["std"])) == 1 else "int8"


def check_choices(input_type: str | None, output_type: str, color_space: str | None) -> None:
    """The options' values alone (before the data they are checked against is known)."""
    if input_type is not None and input_type not in IO_TYPES:
        raise choice_error("--input", input_type, IO_TYPES)
    if output_type not in IO_TYPES:
        raise choice_error("--output", output_type, IO_TYPES)
    if color_space is not None and color_space not in COLOR_SPACES:
        raise choice_error("--color-space", color_space, COLOR_SPACES)


def pixel_grid(data: dict) -> tuple[float, int]:
    """(scale, zero point) of the int8 input on which pixel ``p`` is ``p - 128``; ``data`` as in ``file_io``."""
    if len(set(data["mean"])) != 1 or len(set(data["std"])) != 1:
        raise UserError(f"--input uint8 needs one normalisation for every channel (a TFLite input has one scale "
                        f"and zero point); {data['spec']} normalises per channel (mean {list(data['mean'])}, std "
                        f"{list(data['std'])}): use --input int8 and normalise in the app as export_report.json's io.input says")
    mean, std = data["mean"][0], data["std"][0]
    return float(np.float32(1.0 / (255.0 * std))), round(255.0 * mean) - 128


@torch.no_grad()
def on_pixel_grid(sub: Subnet, data: dict) -> Subnet:
    """A copy of the calibrated subnet whose int8 input is on the pixel grid (module docstring)."""
    scale, zero_point = pixel_grid(data)
    out = copy.deepcopy(sub)
    out.input_q.scale.fill_(scale)
    out.input_q.zero_point = zero_point
    return out
