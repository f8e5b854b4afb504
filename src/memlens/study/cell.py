"""A grid cell as the unit of work: which cells a study folder holds, and running one cell's stages."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from memlens.config import CellConfig, ConfigError, StudyConfig
from memlens.store import RunFile, StudyFile, StudyLayout
from memlens.store.lock import StudyLock
from memlens.store.records import CellRecord
from memlens.study.stage import STAGE_NAMES, STAGES, StageContext, enabled_stages, execute
from memlens.study.status import REPORT_FAILURE, CellOutcome, read_status, write_status


def normalise_study(study: StudyConfig) -> StudyConfig:
    """The study as it reads back from its JSON/YAML dump (what workers and `status` see): int defaults of
    float fields (e.g. lora.alpha 16) become floats, so run_ids hash the same everywhere."""
    return StudyConfig.model_validate(study.model_dump(mode="json"))


def study_cells(study: StudyConfig, layout: StudyLayout) -> list[tuple[str, CellConfig]]:
    """The grid's cells plus cells of finished runs already in the folder (from an earlier, other grid)."""
    cells = {c.run_id(study): c for c in study.cells()}
    for run_id in layout.finished_runs():
        record = CellRecord.read(layout.run_file(run_id, RunFile.CELL))
        if run_id not in cells and record is not None and record.cell.run_id(study) == run_id:
            cells[run_id] = record.cell  # same determinants: part of this study
    return list(cells.items())


def run_cell(study_dict: dict, cell_dict: dict, only: list[str] | None = None) -> dict:
    """Run one cell's enabled stages (those of `only`, when given) that are not done yet.

    The unit of work of every executor (importable, plain-dict arguments so it pickles). A failure is
    recorded in `<out>/status/<run_id>.json` with its traceback and returned, never raised.
    Returns a :class:`CellOutcome` as a dict.
    """
    study = normalise_study(StudyConfig.model_validate(study_dict))
    cell = CellConfig.model_validate(cell_dict)
    ctx = StageContext(study)
    layout = ctx.layout
    run_id = cell.run_id(study)
    done: list[str] = []
    stage = None
    try:
        for stage in enabled_stages(study):
            if not stage.done(layout, run_id):
                if only is not None and stage.name not in only:
                    break  # a stage outside `only` is not done: the later ones cannot run
                write_status(layout, run_id, "running", cell=cell, stage=stage.name, stages_done=done)
                execute(stage, ctx, [cell])
            done.append(stage.name)
    except Exception as exc:  # recorded, reported, and turned into a non-zero exit by the driver
        record = write_status(layout, run_id, "failed", cell=cell, stage=stage.name, stages_done=done, error=exc)
        return CellOutcome(run_id, "failed", record.traceback, done).to_dict()
    state = "done" if len(done) == len(enabled_stages(study)) else "pending"
    write_status(layout, run_id, state, cell=cell, stages_done=done)
    return CellOutcome(run_id, state, None, done).to_dict()




def study_status(out: Path) -> pd.DataFrame:
    """One row per cell: run_id, one column per stage (done / running / failed / pending / interrupted /
    disabled) and the error of a failed stage. Reads only files: works while a run (local or Ray) is going on."""
    layout = StudyLayout(Path(out))
    if not layout.study_file.exists():
        raise ConfigError(f"{out}: not a memlens study folder (no {StudyFile.STUDY})")
    study = normalise_study(StudyConfig.model_validate(yaml.safe_load(layout.study_file.read_text())))
    live = StudyLock(layout.root).is_held()
    enabled = {s.name for s in enabled_stages(study)}
    rows = []
    status_ids = sorted(p.stem for p in layout.status_dir.glob("*.json") if p.stem != REPORT_FAILURE)
    cells = dict(study_cells(study, layout))
    for run_id in list(cells) + [r for r in status_ids if r not in cells]:
        record = read_status(layout, run_id)
        row = {"run_id": run_id}
        for stage in STAGES:
            running_here = record is not None and record.stage == stage.name
            if stage.name not in enabled:
                row[stage.name] = "disabled"
            elif stage.done(layout, run_id):
                row[stage.name] = "done"
            elif running_here and record.state == "failed":
                row[stage.name] = "failed"
            elif running_here and record.state == "running":
                row[stage.name] = "running" if live else "interrupted"
            else:
                row[stage.name] = "pending"
        row["error"] = record.error if record is not None and record.state == "failed" else None
        rows.append(row)
    return pd.DataFrame(rows, columns=["run_id", *STAGE_NAMES, "error"])


__all__ = ["normalise_study", "run_cell", "study_cells", "study_status"]
