"""TensorBoard event files in a run folder (``tensorboard --logdir runs/`` shows every run).

A view, not a record: ``metrics.jsonl`` (train) and ``pareto.json`` (search) stay the source of
truth. Written through ``torch.utils.tensorboard``, imported only when an ``EventLog`` is opened.

TensorFlow stays unloaded: ``tensorboard.compat.tf`` (which the writer uses for file I/O) imports
TensorFlow when it is installed unless a module ``tensorboard.compat.notf`` exists, in which case
it uses its own stub (tensorboard 2.x, ``tensorboard/compat/__init__.py``). The pip package ships
no such module, so ``_no_tensorflow`` registers an empty one before the import, unless TensorFlow
is loaded already (an export in the same process: then the real one serves as before).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

EVENT_FILES = "events.out.tfevents.*"


def _no_tensorflow() -> None:
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


class EventLog:
    """Scalars and figures into TensorBoard event files in ``logdir``, from the first write on (an
    ``EventLog`` opened before a run's last check touches nothing where the run is refused).

    ``purge_step``: a resumed run's first new step; TensorBoard drops what an earlier writer in
    ``logdir`` logged at that step or later, so curves do not double. ``fresh``: at the first
    write, remove the event files already in ``logdir`` (a run that replaces the one there)."""

    enabled = True

    def __init__(self, logdir: Path | str, purge_step: int | None = None, fresh: bool = False) -> None:
        self.logdir, self.purge_step, self.fresh = Path(logdir), purge_step, fresh
        self._w = None

    @property
    def _writer(self):
        if self._w is None:
            if self.fresh:
                for p in self.logdir.glob(EVENT_FILES):
                    p.unlink(missing_ok=True)
            _no_tensorflow()
            from torch.utils.tensorboard import SummaryWriter

            self._w = SummaryWriter(str(self.logdir), purge_step=self.purge_step)
        return self._w

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """``prefix/key`` for each number in ``values`` (other values are skipped)."""
        for key, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(f"{prefix}/{key}", float(v), step)

    def figure(self, tag: str, fig: Any, step: int = 0) -> None:
        """A matplotlib figure as an image (the caller still owns, and closes, ``fig``)."""
        self._writer.add_figure(tag, fig, step, close=False)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoEventLog:
    """``--no-tensorboard``, and every torchrun rank but 0: writes nothing, imports nothing."""

    enabled = False

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        pass

    def figure(self, tag: str, fig: Any, step: int = 0) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoEventLog:
        return self

    def __exit__(self, *exc) -> None:
        pass


def open_event_log(enabled: bool, logdir: Path | str, purge_step: int | None = None,
                   fresh: bool = False) -> EventLog | NoEventLog:
    """An ``EventLog`` where ``enabled``, else one that writes (and removes) nothing."""
    return EventLog(logdir, purge_step, fresh) if enabled else NoEventLog()


def read_scalars(logdir: Path | str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``logdir``'s event files as (step, value) points, as TensorBoard shows
    them (an earlier writer's points past a resumed writer's purge step dropped)."""
    _no_tensorflow()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def image_tags(logdir: Path | str) -> list[str]:
    _no_tensorflow()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]
