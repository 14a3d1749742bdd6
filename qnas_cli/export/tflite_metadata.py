"""TFLite metadata: what the task APIs (MediaPipe Tasks, the TFLite Task Library) read from a model.

The metadata is a flatbuffer of the TFLite metadata schema (``metadata_schema.fbs``, file
identifier ``M001``) stored in one of the model's buffers under the name ``TFLITE_METADATA``;
associated files (the labels) ride in a zip archive appended to the model, which flatbuffer
readers ignore and the task APIs open. We write the few tables a classifier needs with the
``flatbuffers`` runtime directly: MediaPipe's ``metadata_writers`` does not import from the
PyPI wheel (``mediapipe.tasks.cc`` missing) and ``tflite-support`` pins protobuf < 4, below
TensorFlow's. Field slots follow the schema's declaration order (a union takes two: type, value).
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import flatbuffers
from ai_edge_litert import schema_py_generated as fb
from ai_edge_litert.tools import flatbuffer_utils as fbu

METADATA_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
MIN_PARSER_VERSION = "1.0.0"  # nothing here needs a newer parser
LABELS_FILE = "labels.txt"
# schema enums
_RGB, _GRAYSCALE = 1, 2
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2  # ContentProperties union
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union
_TENSOR_AXIS_LABELS = 2  # AssociatedFileType


@dataclass(frozen=True)
class ClassifierMetadata:
    name: str
    description: str
    version: str
    labels: tuple[str, ...]
    color_space: str  # rgb | grayscale
    width: int
    height: int
    mean: float  # in pixel units (0-255): the model's input is (pixel - mean) / std
    std: float
    input_description: str
    output_description: str
    author: str = "qnas"


def attach(model_bytes: bytes, meta: ClassifierMetadata) -> bytes:
    """The model with ``meta`` in its ``TFLITE_METADATA`` buffer and labels.txt appended."""
    model = fbu.read_model_from_bytearray(bytearray(model_bytes))
    buffer = fb.BufferT()
    buffer.data = list(metadata_flatbuffer(meta))
    model.buffers.append(buffer)
    entry = fb.MetadataT()
    entry.name, entry.buffer = METADATA_NAME.encode(), len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_NAME.encode()] + [entry]
    out = io.BytesIO(bytes(fbu.convert_object_to_bytearray(model)))
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a", zipfile.ZIP_STORED) as z:  # appended after the flatbuffer
        z.writestr(zipfile.ZipInfo(LABELS_FILE, date_time=(1980, 1, 1, 0, 0, 0)), labels_text(meta.labels))
    return out.getvalue()


def labels_text(labels: tuple[str, ...]) -> str:
    return "".join(f"{name}\n" for name in labels)


def metadata_flatbuffer(meta: ClassifierMetadata) -> bytes:
    b = flatbuffers.Builder(1024)
    s = b.CreateString

    # input: an image, its size and colour space, how its pixels are normalised
    size = _table(b, [(0, "u32", meta.width), (1, "u32", meta.height)])
    image = _table(b, [(0, "i8", _RGB if meta.color_space == "rgb" else _GRAYSCALE), (1, "off", size)])
    content_in = _table(b, [(0, "u8", _IMAGE_PROPERTIES), (1, "off", image)])
    norm = _table(b, [(0, "off", _floats(b, [meta.mean])), (1, "off", _floats(b, [meta.std]))])
    unit = _table(b, [(0, "u8", _NORMALIZATION_OPTIONS), (1, "off", norm)])
    stats_in = _table(b, [(0, "off", _floats(b, [255.0])), (1, "off", _floats(b, [0.0]))])
    tensor_in = _table(b, [(0, "off", s("image")), (1, "off", s(meta.input_description)), (3, "off", content_in),
                           (4, "off", _offsets(b, [unit])), (5, "off", stats_in)])
    # output: one score per class, labelled by labels.txt
    labels = _table(b, [(0, "off", s(LABELS_FILE)), (1, "off", s("Class names, one per line, in score order.")),
                        (2, "i8", _TENSOR_AXIS_LABELS)])
    content_out = _table(b, [(0, "u8", _FEATURE_PROPERTIES), (1, "off", _table(b, []))])
    tensor_out = _table(b, [(0, "off", s("scores")), (1, "off", s(meta.output_description)), (3, "off", content_out),
                            (6, "off", _offsets(b, [labels]))])
    subgraph = _table(b, [(2, "off", _offsets(b, [tensor_in])), (3, "off", _offsets(b, [tensor_out]))])
    root = _table(b, [(0, "off", s(meta.name)), (1, "off", s(meta.description)), (2, "off", s(meta.version)),
                      (3, "off", _offsets(b, [subgraph])), (4, "off", s(meta.author)),
                      (7, "off", s(MIN_PARSER_VERSION))])
    b.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _table(b: flatbuffers.Builder, fields: list[tuple[int, str, object]]) -> int:
    """A table of (slot, kind, value) fields; children must already be built (their offsets)."""
    b.StartObject(max((slot for slot, _, _ in fields), default=-1) + 1)
    for slot, kind, value in fields:
        {"off": lambda: b.PrependUOffsetTRelativeSlot(slot, value, 0),
         "u32": lambda: b.PrependUint32Slot(slot, value, 0),
         "u8": lambda: b.PrependUint8Slot(slot, value, 0),
         "i8": lambda: b.PrependInt8Slot(slot, value, 0)}[kind]()
    return b.EndObject()


def _offsets(b: flatbuffers.Builder, items: list[int]) -> int:
    b.StartVector(4, len(items), 4)
    for off in reversed(items):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _floats(b: flatbuffers.Builder, values: list[float]) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(values):
        b.PrependFloat32(v)
    return b.EndVector()
