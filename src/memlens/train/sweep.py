"""Fine-tune every cell of a study's grid, skipping finished cells."""

from __future__ import annotations

from pathlib import Path

from memlens.config import StudyConfig, dump_study
from memlens.data import load_study_data
from memlens.models import load_tokenizer
from memlens.store import StudyLayout, atomic_write_text
from memlens.train.finetune import finetune_cell
from memlens.train.progress import training_progress


def finetune_study(study: StudyConfig, show_progress: bool = True) -> list[Path]:
    """Train all grid cells of `study` into `<out>/runs/`; returns the run folders in grid order.
    One bar for the sweep and one for the cell being trained (stderr); finished cells are skipped."""
    layout = StudyLayout(study.out_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.root / "study.yaml", dump_study(study))
    data = load_study_data(study.data)
    tokenizer = load_tokenizer(study.model)
    cells = study.cells()
    runs: list[Path] = []
    with training_progress(disable=not show_progress) as progress:
        task = progress.add_task("", total=len(cells), stage="fine-tune")
        for cell in cells:
            progress.update(task, description=cell.run_id(study))
            runs.append(finetune_cell(study, cell, data, layout, tokenizer, progress=progress))
            progress.advance(task)
    return runs
