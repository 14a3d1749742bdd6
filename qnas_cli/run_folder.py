"""A training run's folder: what makes ``qnas train`` safe to interrupt and exact to resume.

Checkpoints (``ckpt/step_*.pt``, atomic, the newest ``KEEP_CHECKPOINTS`` kept), the newest one that
verifies, the refusals that keep a resume the same run (other options, another space, an
earlier run, finished or not, in the way of a new one), ``metrics.jsonl`` (appended; cut back to the checkpoint on
resume) and the Ctrl-C handling that finishes a step and checkpoints before stopping.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from .checkpoint import atomic_write, load_weights, save_weights, sidecar
from .errors import UserError
from .guard import CollapseGuard
from .space import SearchSpace
from .supernet import Supernet

KEEP_CHECKPOINTS = 2
RESULTS = ("supernet.pt", "float_supernet.pt")  # a run's results (each with its .json sidecar)


class StopFlag:
    """SIGINT/SIGTERM ask the loop to finish its step, checkpoint, and stop."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    """Training stopped on request after saving a checkpoint."""

    def __init__(self, step: int, path: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved to {path}; continue with --resume")
        self.step, self.path = step, path


# ---- checkpoints ------------------------------------------------------------------------------

def ckpt_dir(out: Path) -> Path:
    return out / "ckpt"


def save_checkpoint(out: Path, model: Supernet, opt: torch.optim.Optimizer, step: int, config: dict[str, Any],
                    guard: CollapseGuard | None = None, phases: list[dict[str, Any]] | None = None) -> Path:
    """The model of the phase it belongs to (float or int8: ``phase``), its optimizer, the step;
    ``phases``: the run's resolved plan (what default lengths came to), which --resume checks."""
    path = ckpt_dir(out) / f"step_{step:08d}.pt"
    phase = "int8" if model.cfg.quantized else "float"  # the quantized phase (--quant int8 or convs)
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "phase": phase,
               "guard": guard.state_dict() if guard else None}
    save_weights(path, payload, {"kind": "qnas.checkpoint", "step": step, "phase": phase, "config": config,
                                 "space": model.space.to_dict(), **({"phases": phases} if phases else {})})
    old = sorted(ckpt_dir(out).glob("step_*.pt"))[:-KEEP_CHECKPOINTS]
    for p in old:
        p.unlink(missing_ok=True)
        p.with_suffix(".json").unlink(missing_ok=True)
    return path


def latest_checkpoint(out: Path, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint that verifies; a corrupt newer one is named and skipped. None when
    none verifies: the caller's refusal is then the one line printed (no warnings before it)."""
    skipped = []
    for path in sorted(ckpt_dir(out).glob("step_*.pt"), reverse=True):
        try:
            found = load_weights(path)
        except UserError as e:
            skipped.append(str(e))
            continue
        for reason in skipped:
            log(f"warning: skipping checkpoint: {reason}")
        return found
    return None


def checkpoint_to_resume(out: Path, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The latest verified checkpoint in ``out`` (payload, sidecar), or a one-line refusal of --resume."""
    found = latest_checkpoint(out, log)
    if found is None:
        corrupt = len(list(ckpt_dir(out).glob("step_*.pt")))
        raise UserError(f"--resume: no usable checkpoint in {ckpt_dir(out)}"
                        + (f" ({corrupt} found, none verifies against its sidecar)" if corrupt else "")
                        + "; start without --resume")
    return found


def check_resumable(meta: dict[str, Any], config: dict[str, Any], keys: tuple[str, ...], space: SearchSpace,
                    space_arg: str, phases: list[dict[str, Any]] | None = None, length_keys: tuple[str, ...] = ()) -> None:
    """Refuse to resume a checkpoint (``meta``) made with other options (``keys`` of ``config``) or
    another space. Where the checkpoint records its resolved ``phases``, those are compared instead
    of the ``length_keys`` options: a run started under other default lengths (an upgrade) is
    refused rather than silently continued on another plan, and resumes with the lengths given."""
    saved, mine = meta.get("config", {}), config
    if phases is not None and "phases" in meta:
        if meta["phases"] != phases:
            text = lambda ps: " + ".join(f"{p['name']} {p['steps']}" for p in ps)  # noqa: E731
            raise UserError(f"--resume: the interrupted run's phases were {text(meta['phases'])} steps, these options "
                            f"give {text(phases)} (changed defaults?); pass the lengths explicitly "
                            "(--steps, --float-steps) or use a new --out")
        keys = tuple(k for k in keys if k not in length_keys)
    for key in keys:
        if saved.get(key) != mine.get(key):
            raise UserError(f"--resume: option {key!r} differs from the interrupted run "
                            f"({saved.get(key)!r} there, {mine.get(key)!r} now); use the same options or a new --out")
    if "space" in meta and SearchSpace.from_dict(meta["space"]).fingerprint != space.fingerprint:
        raise UserError(f"--resume: the space file {space_arg} changed since the interrupted run; "
                        "restore it or use a new --out")


def check_fresh(out: Path, overwrite: bool = False) -> list[Path]:
    """The files of an earlier run in ``out`` that a new run there replaces; reads only (every
    rank may call it). Without ``overwrite`` a run in the way is refused: an unfinished one
    (checkpoints without their supernet.pt: continue it with --resume) and a finished one
    (supernet.pt) alike, so nothing is lost that the user did not name."""
    ckpts = sorted(ckpt_dir(out).glob("step_*.pt"))
    results = [p for name in RESULTS for p in (out / name, sidecar(out / name)) if p.exists()]
    if not overwrite:
        if ckpts and not finished(out, ckpts[-1]):
            raise UserError(f"{out} holds an unfinished run (last checkpoint {ckpts[-1].name}): continue it with --resume, "
                            "replace it with --overwrite, or choose a new --out")
        done = [name for name in RESULTS if (out / name).exists()]
        if done or ckpts:
            raise UserError(f"{out} holds a finished run ({', '.join(done) or 'its checkpoints'}): pass --overwrite "
                            "to replace it, or choose a new --out")
    return [*ckpts, *results, *ckpt_dir(out).glob("step_*.json")]  # weights first: a kill midway leaves no orphan


def start_afresh(out: Path, log: Callable[[str], None], overwrite: bool = False) -> None:
    """A new run in ``out``: refused where ``check_fresh`` refuses; with ``overwrite``, the earlier
    run's checkpoints (pruning by name would keep them and delete ours), its supernet.pt and
    float_supernet.pt go first, so the folder never mixes two runs."""
    old = check_fresh(out, overwrite)
    if old:
        log(f"note: --overwrite: removing the earlier run in {out} (its checkpoints, supernet.pt, float_supernet.pt)")
    try:
        for p in old:
            p.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot clear the earlier run in {out}: {e.strerror}") from None


def finished(out: Path, last: Path) -> bool:
    """Whether ``out/supernet.json`` is the end of the run whose newest checkpoint is ``last``."""
    try:
        final, ckpt = json.loads((out / "supernet.json").read_bytes()), json.loads(last.with_suffix(".json").read_bytes())
        return final["config"] == ckpt["config"] and final["steps"] == ckpt["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_temp_files(out: Path) -> None:
    """Temporary files of atomic writes that a SIGKILL cut short (never a finished file)."""
    try:
        for tmp in [*out.glob(".*.tmp"), *ckpt_dir(out).glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass  # best effort: a folder we cannot clean is reported when we write to it


# ---- metrics.jsonl ---------------------------------------------------------------------------

def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in rows:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: drop it
    atomic_write(path, lambda f: f.write("".join(r + "\n" for r in keep)), binary=False)
