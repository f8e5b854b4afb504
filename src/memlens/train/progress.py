"""Quiet Trainer output: one rich progress bar per cell instead of printed log dicts."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from rich.console import Console
from rich.errors import LiveError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from memlens.models.loading import quiet_bitsandbytes_import

with quiet_bitsandbytes_import():  # transformers' trainer modules import PEFT, which imports bitsandbytes
    from transformers import TrainerCallback

log = logging.getLogger(__name__)


def training_progress(disable: bool = False) -> Progress:
    """The progress display used by the sweep and by single-cell training (on stderr)."""
    return Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
                    console=Console(stderr=True), disable=disable, transient=False)


@contextlib.contextmanager
def progress_or_own(progress: Progress | None) -> Iterator[Progress]:
    """`progress` if given, else a fresh transient display. When the caller already shows another live
    display (rich allows one at a time), the cell's bar is not drawn: it is only a display."""
    if progress is not None:
        yield progress
        return
    own = training_progress()
    own.transient = True
    try:
        own.start()
    except LiveError:
        log.debug("another live display is active; the cell's progress bar is not shown")
        own = training_progress(disable=True)
    try:
        yield own
    finally:
        own.stop()


class RichProgressCallback(TrainerCallback):
    """Advances a bar per optimizer step and shows the latest logged loss."""

    def __init__(self, progress: Progress, label: str):
        self.progress, self.label, self.task = progress, label, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.task = self.progress.add_task(self.label, total=state.max_steps, stage="train")

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.progress.update(self.task, description=f"{self.label} loss {logs['loss']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.task is not None:
            self.progress.remove_task(self.task)
