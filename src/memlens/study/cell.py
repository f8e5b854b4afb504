"""A grid cell as the unit of work: running one cell's stages, and every cell's status in a study folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from memlens.config import CellConfig, StudyConfig
from memlens.context import StudyContext
from memlens.store import RunFile
from memlens.store.integrity import damaged_study_files, rebuilt_file_message
from memlens.store.lock import StudyLock
from memlens.store.records import CellRecord
from memlens.study.stage import STAGE_NAMES, STAGES, enabled_stages, execute
from memlens.study.status import REPORT_FAILURE, CellOutcome, read_status, write_status


def normalise_study(study: StudyConfig) -> StudyConfig:
    """The study as it reads back from its JSON/YAML dump (what workers and `status` see): int defaults of
    float fields (e.g. lora.alpha 16) become floats, so run_ids hash the same everywhere."""
    return StudyConfig.model_validate(study.model_dump(mode="json"))


def run_cell(study_dict: dict, cell_dict: dict, only: list[str] | None = None) -> dict:
    """Run one cell's enabled stages (those of `only`, when given) that are not done yet.

    The unit of work of every executor (importable, plain-dict arguments so it pickles). A failure is
    recorded in `<out>/status/<run_id>.json` with its traceback and returned, never raised.
    Returns a :class:`CellOutcome` as a dict.
    """
    study = normalise_study(StudyConfig.model_validate(study_dict))
    cell = CellConfig.model_validate(cell_dict)
    ctx = StudyContext(study)
    layout = ctx.layout
    run_id = cell.run_id(study)
    done: list[str] = []
    stage = None
    try:
        for stage in enabled_stages(study):
            if not stage.done(ctx, run_id):
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
    damaged / disabled) and the error of a failed stage, or what is damaged and how it is repaired. Reads only
    files: works while a run (local or Ray) is going on."""
    ctx = StudyContext.of_folder(out)
    study, layout = ctx.study, ctx.layout
    live = StudyLock(layout.root).is_held()
    enabled = {s.name for s in enabled_stages(study)}
    rows = []
    status_ids = sorted(p.stem for p in layout.status_dir.glob("*.json") if p.stem != REPORT_FAILURE)
    cells = ctx.cells
    for run_id in list(cells) + [r for r in status_ids if r not in cells]:
        record = read_status(layout, run_id)
        failed = record is not None and record.state == "failed"
        row, damages = {"run_id": run_id}, []
        for stage in STAGES:
            running_here = record is not None and record.stage == stage.name
            damage = stage.damage(ctx, run_id) if stage.name in enabled else None
            if stage.name not in enabled:
                row[stage.name] = "disabled"
            elif damage:
                row[stage.name] = "damaged"
                damages.append(damage)
            elif stage.done(ctx, run_id):
                row[stage.name] = "done"
            elif running_here and failed:
                row[stage.name] = "failed"
            elif running_here and record.state == "running":
                row[stage.name] = "running" if live else "interrupted"
            else:
                row[stage.name] = "pending"
        row["error"] = " ".join(damages) if damages else record.error if failed else None
        rows.append(row)
    return pd.DataFrame(rows, columns=["run_id", *STAGE_NAMES, "error"])


def study_problems(out: Path) -> list[str]:
    """What is damaged in the folder beyond the cells' stages (:func:`study_status` shows those), each with what
    repairs it: study-level files that cannot be read, and finished runs outside the grid whose cell.json cannot
    be read (which cell they are cannot be told)."""
    ctx = StudyContext.of_folder(out)
    layout = ctx.layout
    problems = [rebuilt_file_message(layout, path, why) for path, why in damaged_study_files(layout).items()]
    for run_id in (r for r in layout.finished_runs() if r not in ctx.cells):
        try:
            CellRecord.load(layout.run_file(run_id, RunFile.CELL))
        except (OSError, ValueError) as exc:
            problems.append(f"{exc}. This run cannot be matched to a cell of the study, so status and the stages "
                            f"skip it: remove it (`rm -r {layout.run_dir(run_id)}`) or restore its cell.json")
    return problems


__all__ = ["normalise_study", "run_cell", "study_problems", "study_status"]
