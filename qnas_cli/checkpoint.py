"""Artifacts on disk: atomic writes, sha256 sidecars, safe loading.

Every weights file ``X.pt`` has ``X.json`` beside it holding its sha256, so a truncated,
corrupt or swapped file is detected before use. Loading never unpickles code
(``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import platform
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except OSError as e:  # disk full, a folder in the way, ...: the old file (if any) is untouched
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes) -> Path:
    atomic_write(path, lambda f: f.write(data))
    return Path(path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), binary=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions(*packages: str) -> dict[str, str]:
    """qnas, torch and Python versions, plus those of the installed ``packages`` ("missing" if absent)."""
    from importlib import metadata

    import qnas_cli

    out = {"qnas": qnas_cli.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def save_weights(path: Path, payload: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Save ``payload`` (tensors and plain values) to ``path`` and ``meta`` + sha256 to ``path.json``."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    write_bytes(path, data)
    meta = {**meta, "weights": {"file": Path(path).name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
            "versions": versions()}
    write_json(sidecar(path), meta)
    return meta


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def read_meta(path: Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """The sidecar of ``path``, once the file's sha256 matches it (and ``expected_sha256`` if given); nothing unpickled."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    meta_path = sidecar(path)
    if not meta_path.is_file():
        raise UserError(f"{path} has no sidecar {meta_path.name}: cannot verify it (was it written by qnas?)")
    try:
        meta = json.loads(meta_path.read_bytes())
        recorded = meta["weights"]["sha256"]
    except (ValueError, RecursionError, KeyError, TypeError):  # ValueError: bad JSON or bad UTF-8
        raise UserError(f"{meta_path} is corrupt or not a qnas sidecar") from None
    except OSError as e:
        raise UserError(f"cannot read {meta_path}: {e.strerror}") from None
    if not isinstance(recorded, str):
        raise UserError(f"{meta_path} is corrupt or not a qnas sidecar (weights.sha256 is not a string)")
    try:
        actual = sha256_file(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if actual != recorded:
        raise UserError(f"{path} is corrupt or was modified: sha256 {actual[:12]}… does not match its sidecar ({recorded[:12]}…)")
    if expected_sha256 and actual != expected_sha256:
        raise UserError(f"{path} is not the file this subnet was made from (sha256 {actual[:12]}… != {expected_sha256[:12]}…)")
    return meta


def load_weights(path: Path, expected_sha256: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``path`` after checking it against its sidecar (and ``expected_sha256`` if given)."""
    meta = read_meta(path, expected_sha256)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # PyTorch's message suggests weights_only=False: the one thing not to do with an untrusted file
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it names {found.group(1)})" if found else ""
        raise UserError(f"{path} holds more than weights{what} and was not loaded: qnas loads only tensors and plain "
                        "values, never pickled code") from None
    except Exception as e:  # noqa: BLE001 - any other failure means a file that is not a weights file
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__}); it was not loaded") from None
    return payload, meta
